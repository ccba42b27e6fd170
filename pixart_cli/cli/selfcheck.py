"""`pixart selfcheck`: verify an installation offline in seconds."""

from __future__ import annotations

import typer

from pixart_cli.cli.common import app, console, fails_cleanly


@app.command()
@fails_cleanly
def selfcheck() -> None:
    """Check the install offline: tiny random models through init-from-dit and diffusers conversion parity."""
    from pixart_cli.selfcheck import run_selfcheck

    def show(result) -> None:
        mark = "[green]ok[/]" if result.ok else "[red]FAILED[/]"
        console.print(f"{mark}  {result.name}  (max diff {result.value:.1e} ≤ {result.tolerance:.0e})")

    results = run_selfcheck(show)
    if not all(r.ok for r in results):
        raise typer.Exit(1)
    console.print("all checks passed")
