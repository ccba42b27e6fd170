"""`pixart selfcheck`: verify an installation offline in seconds."""

from __future__ import annotations

import typer

from pixart_cli.cli.common import JsonOpt, app, console, fails_cleanly, out, print_json


@app.command()
@fails_cleanly
def selfcheck(as_json: JsonOpt = False) -> None:
    """Check the install offline: tiny random models through init-from-dit and diffusers conversion parity."""
    from pixart_cli.checkpoints.selfcheck import run_selfcheck

    def show(result) -> None:  # each check as it finishes: progress, on stderr
        mark = "[green]ok[/]" if result.ok else "[red]FAILED[/]"
        console.print(f"{mark}  {result.name}  (max diff {result.value:.1e} ≤ {result.tolerance:.0e})")

    results = run_selfcheck(show)
    passed = all(r.ok for r in results)
    if as_json:
        checks = [{"name": r.name, "ok": r.ok, "max_diff": r.value, "tolerance": r.tolerance} for r in results]
        print_json({"ok": passed, "checks": checks})
    elif passed:
        out.print(f"all {len(results)} checks passed")
    else:
        failed = [r.name for r in results if not r.ok]
        out.print(f"{len(failed)} of {len(results)} checks FAILED: " + "; ".join(failed), soft_wrap=True)
    if not passed:
        raise typer.Exit(1)
