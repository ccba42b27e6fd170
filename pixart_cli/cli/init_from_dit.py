"""`pixart init-from-dit`: a PixArt checkpoint from DiT weights, re-parameterised (the paper's stage 2 start)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pixart_cli.cli.common import JsonOpt, app, console, fails_cleanly, out, print_json
from pixart_cli.errors import PixartError


@app.command("init-from-dit")
@fails_cleanly
def init_from_dit(
    checkpoint: Annotated[Path, typer.Argument(help="DiT weights: raw state dict, DiT train.py checkpoint, or ours.")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Checkpoint directory to write.")] = None,
    t: Annotated[float, typer.Option("--t", help="Timestep at which PixArt reproduces DiT exactly.")] = 500.0,
    caption_channels: Annotated[int, typer.Option("--caption-channels", help="T5 feature width.")] = 4096,
    max_length: Annotated[int, typer.Option("--max-length", help="Caption tokens.")] = 120,
    num_heads: Annotated[int | None, typer.Option("--num-heads", help="For widths outside the DiT family.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the new caption layers.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Initialise a PixArt model from a class-conditional DiT (the paper's re-parameterisation, at t=500)."""
    from pixart_cli.checkpoints.format import save_checkpoint
    from pixart_cli.checkpoints.init_from_dit import in_dit_release_format
    from pixart_cli.checkpoints.init_from_dit import init_from_dit as run

    if caption_channels <= 0 or max_length <= 0:
        raise PixartError("--caption-channels and --max-length must be positive")
    result = run(checkpoint, t, caption_channels, max_length, num_heads, seed)
    output = output or Path(f"{checkpoint.stem if checkpoint.is_file() else checkpoint.name}-pixart")
    save_checkpoint(result, output, overwrite=overwrite)
    c = result.config
    if as_json:
        print_json(
            {
                "output": output,
                "format": "pixart",
                "depth": c.depth,
                "hidden_size": c.hidden_size,
                "patch_size": c.patch_size,
                "input_size": c.input_size,
                "t": t,
            }
        )
    else:
        out.print(
            f"PixArt depth {c.depth}, width {c.hidden_size}, patch {c.patch_size}, input {c.input_size} "
            f"from DiT at t={t:g} → [bold]{output}[/]",
            soft_wrap=True,
        )
    if in_dit_release_format(checkpoint):  # not for our own DiT checkpoints (builtin:shapes-dit, stage-1 runs)
        console.print("[dim]note: DiT's released weights are CC-BY-NC 4.0; derived models inherit that licence.[/]")
