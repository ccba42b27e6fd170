"""`pixart convert`: a checkpoint from one layout to another (ours, official .pth, diffusers)."""

from __future__ import annotations

import enum
import logging
from pathlib import Path
from typing import Annotated

import typer

from pixart_cli.cli.common import DType, JsonOpt, app, console, fails_cleanly, library_logging, out, print_json
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
        int | None,
        typer.Option(
            "--max-length",
            help="Caption tokens, for diffusers sources (they do not record it). Default: 300 for a "
            "PixArtSigmaPipeline, else 120.",
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")] = False,
    merge_lora: Annotated[
        list[str] | None,
        typer.Option(
            "--merge-lora",
            help="Bake this adapter directory (optionally :SCALE) into the weights; repeat to combine.",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Convert a PixArt checkpoint between our format, the official .pth and diffusers (source detected).

    An adapter directory converts to diffusers' PEFT layout (--to diffusers); --merge-lora bakes adapters into a
    base checkpoint, written in any format.
    """
    from pixart_cli.adapters.export import export_to_diffusers, merge_into
    from pixart_cli.adapters.format import is_adapter_dir, parse_adapter_arg
    from pixart_cli.checkpoints.convert import convert as run_convert
    from pixart_cli.checkpoints.format import latest_in_run

    if src.exists() and is_adapter_dir(latest_in_run(src)):
        if to != Target.diffusers or merge_lora:
            raise PixartError(
                f"{src}: an adapter; it converts to diffusers' PEFT layout (--to diffusers), or merges into its base "
                f"with `pixart convert BASE --merge-lora {src}`"
            )
        written = export_to_diffusers(src, output, ema=ema, overwrite=overwrite)
        if as_json:
            print_json({"source": src, "source_format": "adapter", "output": written, "format": "diffusers-peft"})
        else:
            out.print(f"wrote a PEFT adapter for diffusers → [bold]{written}[/]", soft_wrap=True)
        return
    options = dict(
        dtype=dtype.torch if dtype else None, t5=t5, vae=vae, num_heads=num_heads, max_length=max_length,
        overwrite=overwrite,
    )  # fmt: skip
    with library_logging(logging.WARNING):  # what the conversion cannot carry over is said, not lost quietly
        if merge_lora:
            adapters = [parse_adapter_arg(text) for text in merge_lora]
            report = merge_into(src, output, adapters, to.value, ema=ema, **options)
        else:
            report = run_convert(src, output, to.value, ema=ema, **options)
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
