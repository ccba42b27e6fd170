"""`pixart caption`: dense captions for a dataset from a vision-language model, as a JSONL manifest (resumable)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pixart_cli.cli.common import JsonOpt, app, console, fails_cleanly, library_logging, out, print_json
from pixart_cli.errors import PixartError

# Layouts with captions to keep (class folders have none).
CAPTION_KINDS = ("auto", "captions", "manifest", "webdataset", "hf-dataset", "parquet")


@app.command()
@fails_cleanly
def caption(
    data: Annotated[
        Path,
        typer.Argument(
            help="A dataset: folder of images (+ optional .txt captions), a .jsonl manifest, tar shards (a .tar, a "
            "folder of them or shards/{00000..00009}.tar), a datasets save_to_disk folder, or .parquet files."
        ),
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="The captions manifest to write (.jsonl).")],
    model: Annotated[
        str | None,
        typer.Option(
            "--model", "-m", help="A transformers image-text-to-text model (LLaVA, Qwen2-VL, ...): directory or hub id."
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="A YAML file of these settings (recipes/caption/sam-llava.yaml); options win."),
    ] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", help="Default: the PixArt-α paper's prompt.")] = None,
    field: Annotated[
        str | None,
        typer.Option("--field", help="The key the generated caption is written under (default: caption_vlm)."),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", "-b", help="Images per generate call (default: 8).")
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option("--max-new-tokens", help="Longest caption, in tokens (default: 300).")
    ] = None,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="auto (bf16 on a GPU that has it, else fp32), fp32, bf16 or fp16.")
    ] = None,
    kind: Annotated[
        str,
        typer.Option("--kind", help="Dataset layout: auto, captions, manifest, webdataset, hf-dataset or parquet."),
    ] = "auto",
    shard_size: Annotated[
        int | None,
        typer.Option("--shard-size", help="Images per unit of work (processes take whole shards; default: 256)."),
    ] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1 … (default: cuda if any).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Caption every image with a vision-language model (greedy, batched), keeping each source caption.

    Reruns skip what is done; under `torchrun --nproc_per_node N -m pixart_cli caption …` the processes share
    the work (whole shards each) and one of them writes the output in the dataset's order.
    """
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from pixart_cli.captioning.run import Progress, caption_dataset
    from pixart_cli.captioning.settings import load_caption_settings
    from pixart_cli.cli.common import quiet_hub_libraries, resolve_device
    from pixart_cli.cli.progress import Bar
    from pixart_cli.data.sources import is_shard_pattern

    if not data.exists() and not is_shard_pattern(data):
        raise PixartError(f"{data}: no such dataset file or directory")
    if kind not in CAPTION_KINDS:
        raise PixartError(f"--kind must be {', '.join(CAPTION_KINDS[:-1])} or {CAPTION_KINDS[-1]}, got {kind!r}")
    given = {
        "model": model,
        "prompt": prompt,
        "field": field,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "dtype": dtype,
        "shard_size": shard_size,
    }
    settings = load_caption_settings(config, given)
    torch_device = resolve_device(device)
    quiet_hub_libraries()
    bar = Bar(
        TextColumn("captioning"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("images · {task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    task = bar.add_task("captioning", total=None, info="")
    first: list[tuple[float, int]] = []  # (time, images) at the first report: the rate counts this run's work

    def show(p: Progress) -> None:
        now = time.monotonic()
        if not first:
            first.append((now, p.images_done))
        start, before = first[0]
        rate = (p.images_done - before) / (now - start) if now > start else 0.0
        bar.update(task, completed=p.images_done, total=p.images_total, info=f"{rate:.2f} img/s · {p.bad_images} bad")

    with library_logging(), bar:
        report = caption_dataset(data, output, settings, kind=kind, device=torch_device, progress=show)
    if report is None:  # another process of the launch writes the output and reports
        return
    if as_json:
        print_json(
            {
                "output": report.output,
                "settings": report.settings_file,
                "images": report.images,
                "captioned": report.captioned,
                "already_done": report.already_done,
                "bad_images": [{"path": b.path, "reason": b.reason} for b in report.bad_images],
                "processes": report.processes,
                "seconds": round(report.seconds, 2),
            }
        )
    else:
        done = f" ({report.already_done} already there)" if report.already_done else ""
        out.print(
            f"captioned {report.captioned} image(s){done} → [bold]{report.output}[/] ({report.images} lines, "
            f"field {settings.field!r}) in {report.seconds:.1f} s",
            soft_wrap=True,
        )
    if report.bad_images:
        console.print(f"  [yellow]{len(report.bad_images)} unreadable image(s) skipped[/], e.g.:")
        for bad in report.bad_images[:5]:
            console.print(f"    {bad.path}: {bad.reason}", soft_wrap=True, markup=False)
