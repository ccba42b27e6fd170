"""`pixart convert` and `pixart init-from-dit`."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer

from pixart_cli.cli.common import DType, JsonOpt, app, console, fails_cleanly, out, print_json
from pixart_cli.errors import PixartError


class Target(str, enum.Enum):
    pixart = "pixart"
    diffusers = "diffusers"
    official = "official"


@app.command()
@fails_cleanly
def convert(
    src: Annotated[Path, typer.Argument(help="Our checkpoint dir, an official .pth, or a diffusers dir.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the result.")],
    to: Annotated[Target, typer.Option("--to", help="Target format.")] = Target.pixart,
    ema: Annotated[
        bool | None,
        typer.Option(
            "--ema/--no-ema",
            help="Write only the EMA / only the raw weights. Default: keep both where the target holds both "
            "(pixart, official); EMA when present for diffusers.",
        ),
    ] = None,
    dtype: Annotated[DType | None, typer.Option("--dtype", help="Cast weights (default: keep).")] = None,
    t5: Annotated[str | None, typer.Option("--t5", help="T5 dir or hub id (diffusers: full pipeline).")] = None,
    vae: Annotated[str | None, typer.Option("--vae", help="VAE dir or hub id (diffusers: full pipeline).")] = None,
    num_heads: Annotated[
        int | None, typer.Option("--num-heads", help="Attention heads, for widths outside the DiT family.")
    ] = None,
    max_length: Annotated[
        int, typer.Option("--max-length", help="Caption tokens, for diffusers sources (they do not record it).")
    ] = 120,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Convert a PixArt checkpoint between our format, the official .pth and diffusers (source detected)."""
    from pixart_cli.convert import convert as run_convert

    report = run_convert(
        src,
        output,
        to.value,
        ema=ema,
        dtype=dtype.torch if dtype else None,
        t5=t5,
        vae=vae,
        num_heads=num_heads,
        max_length=max_length,
        overwrite=overwrite,
    )
    if as_json:
        print_json(
            {
                "source": src,
                "source_format": report.source_format,
                "output": report.destination,
                "format": report.target,
                "weights": report.weights,
                "dropped": report.dropped,
                "created": report.created,
            }
        )
        return
    # What was read and changed on the way is a log (stderr); what was written is the result (stdout).
    console.print(f"read {report.source_format} checkpoint [bold]{src}[/] ({report.weights} weights)")
    for key, why in report.dropped.items():
        console.print(f"  dropped {key}: {why}")
    for key, why in report.created.items():
        console.print(f"  created {key}: {why}")
    out.print(f"wrote {report.target} → [bold]{report.destination}[/]", soft_wrap=True)


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
    from pixart_cli.checkpoint import save_checkpoint
    from pixart_cli.init_from_dit import in_dit_release_format
    from pixart_cli.init_from_dit import init_from_dit as run

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
