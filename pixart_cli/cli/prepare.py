"""`pixart prepare`: a dataset → a sharded cache of T5 caption features and VAE latent posteriors (resumable)."""

from __future__ import annotations

import enum
import functools
import logging
from pathlib import Path
from typing import Annotated

import typer

from pixart_cli.cli.common import (
    DType,
    JsonOpt,
    T5Quant,
    T5QuantOpt,
    app,
    console,
    fails_cleanly,
    library_logging,
    out,
    print_json,
    quiet_hub_libraries,
    resolve_device,
)
from pixart_cli.errors import PixartError


class Kind(str, enum.Enum):
    auto = "auto"
    captions = "captions"
    manifest = "manifest"
    classes = "classes"
    webdataset = "webdataset"
    hf_dataset = "hf-dataset"
    parquet = "parquet"


class Storage(str, enum.Enum):
    fp16 = "fp16"
    fp32 = "fp32"


@app.command()
@fails_cleanly
def prepare(
    data: Annotated[
        Path,
        typer.Argument(
            metavar="RECIPE_OR_DATA",
            help="A training recipe (.yaml: its data section and model say everything), or a dataset: folder of "
            "images + .txt captions, a .jsonl manifest, class folders, tar shards (a .tar or a folder of them), a "
            "datasets save_to_disk folder, or .parquet files.",
        ),
    ],
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Cache directory (default: DATA-cache beside DATA).")
    ] = None,
    t5: Annotated[
        str | None, typer.Option("--t5", help="T5 encoder directory or hub id (not needed for class folders).")
    ] = None,
    vae: Annotated[str, typer.Option("--vae", help="VAE directory or hub id, or 'none' for pixel space.")] = "",
    resolution: Annotated[int, typer.Option("--resolution", help="Image side in pixels (bucket base).")] = 256,
    multi_scale: Annotated[
        bool, typer.Option("--multi-scale", help="Resize each image to its nearest aspect-ratio bucket.")
    ] = False,
    kind: Annotated[Kind, typer.Option("--kind", help="Dataset layout (auto: detected).")] = Kind.auto,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per encoder call.")] = 32,
    shard_size: Annotated[int, typer.Option("--shard-size", help="Items per cache shard.")] = 1024,
    max_length: Annotated[int, typer.Option("--max-length", help="Caption tokens.")] = 120,
    device: Annotated[str | None, typer.Option("--device", help="Encoder device (default: cuda if any).")] = None,
    dtype: Annotated[
        DType | None, typer.Option("--dtype", help="Encoder compute dtype (default: as stored; T5 overflows in fp16).")
    ] = None,
    storage: Annotated[Storage, typer.Option("--storage", help="dtype of the features on disk.")] = Storage.fp16,
    keep_empty_captions: Annotated[
        bool, typer.Option("--keep-empty-captions", help="Keep images without a caption (empty caption).")
    ] = False,
    max_bad_fraction: Annotated[
        float | None,
        typer.Option(
            "--max-bad-fraction",
            help="Abort if more than this fraction of images is unreadable (default: the recipe's, else 0.01).",
        ),
    ] = None,
    workers: Annotated[int, typer.Option("--workers", help="Image-decoding processes (0: main process).")] = 2,
    caption_fields: Annotated[
        list[str] | None,
        typer.Option(
            "--caption-field",
            help="A manifest's caption field to encode (repeatable; default: caption). With a recipe: its "
            "data.captions.",
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing cache.")] = False,
    t5_quant: T5QuantOpt = T5Quant.none,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="With a recipe: override a recipe value (repeatable).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Pre-extract caption features (or class labels) and latents into a sharded cache; reruns resume.

    Given a recipe, the dataset, cache directory, encoders, resolution, buckets and caption length come from it
    (--t5, --vae and -o still override), so `pixart train` then finds exactly the cache it expects.

    Under `torchrun --nproc_per_node N -m pixart_cli prepare …` (or `accelerate launch`) the processes share the
    shards, each on its own GPU, and write the cache one process would.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from pixart_cli.cli.progress import Bar
    from pixart_cli.data.cache import PrepareProgress, PrepareSettings
    from pixart_cli.data.cache import prepare as run_prepare
    from pixart_cli.data.sources import is_shard_pattern
    from pixart_cli.distributed import Dist

    is_recipe = data.suffix in (".yaml", ".yml")
    # The positional argument first, then the options, as they are read.
    if not is_recipe and not data.exists() and not is_shard_pattern(data):
        raise PixartError(f"{data}: no such dataset file or directory")
    storage_dtype = {"fp16": "float16", "fp32": "float32"}[storage.value]
    compute_dtype = dtype.torch if dtype else None
    # A recipe's dataset and VAE load here, outside the progress bar and the library's log lines, as they always did.
    dist = Dist.from_environment()
    if is_recipe:
        from pixart_cli.training.prepare import recipe_cache

        if caption_fields:
            raise PixartError("--caption-field: a recipe's caption fields are its data.captions")

        quiet_hub_libraries()
        job = recipe_cache(
            data,
            overrides or (),
            output=output,
            t5=t5,
            vae=vae,
            max_length=max_length,
            batch_size=batch_size,
            shard_size=shard_size,
            storage_dtype=storage_dtype,
            keep_empty_captions=keep_empty_captions,
            max_bad_fraction=max_bad_fraction,
            num_workers=workers,
            device=resolve_device(device),
            dtype=compute_dtype,
            t5_quant=t5_quant.value,
        )
        run = functools.partial(job.prepare, overwrite=overwrite)
    else:
        if overrides:
            raise PixartError("--set needs a recipe as the first argument")
        if not vae:
            raise PixartError("--vae is required: a VAE directory or hub id, or 'none' for a pixel-space model")
        settings = PrepareSettings(
            resolution=resolution,
            multi_scale=multi_scale,
            kind=kind.value,
            batch_size=batch_size,
            shard_size=shard_size,
            max_length=max_length,
            storage_dtype=storage_dtype,
            keep_empty_captions=keep_empty_captions,
            max_bad_fraction=0.01 if max_bad_fraction is None else max_bad_fraction,
            num_workers=workers,
            **({"caption_fields": tuple(caption_fields)} if caption_fields else {}),
        )
        quiet_hub_libraries()
        if output is None:
            output = data.with_name(f"{data.stem if data.is_file() else data.name}-cache")
        run = functools.partial(
            run_prepare,
            data,
            output,
            settings,
            t5=t5,
            vae=vae,
            device=resolve_device(device),
            dtype=compute_dtype,
            overwrite=overwrite,
            t5_quant=t5_quant.value,
        )
    bar = Bar(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("items · {task.fields[info]}"),
        TimeRemainingColumn(),
        transient=True,
    )
    task = bar.add_task("encoding", total=None, info="")

    def show(p: PrepareProgress) -> None:
        info = f"shard {p.shards_done}/{p.shards_total} · {p.bad_images} bad"
        bar.update(task, completed=p.items_done + p.bad_images, total=p.items_total, info=info)

    if not dist.is_main:  # the other processes of a launch: quiet but for errors; process 0 shows the whole job
        with library_logging(logging.ERROR):
            run(progress=None)
        return
    with library_logging(), bar:
        report = run(progress=show)
    if as_json:
        print_json(
            {
                "cache_dir": report.cache_dir,
                "items": report.items,
                "records": report.records,
                "shards": report.shards,
                "resumed_shards": report.resumed_shards,
                "buckets": [
                    {"width": w, "height": h, "items": n} for (h, w), n in sorted(report.bucket_counts.items())
                ],
                "missing_captions": report.missing_captions,
                "skipped_captions": report.skipped_captions,
                "bad_images": [{"path": bad.path, "reason": bad.reason} for bad in report.bad_images],
                "seconds": report.seconds,
            }
        )
    else:
        resumed = f" ({report.resumed_shards} shards were already done)" if report.resumed_shards else ""
        out.print(
            f"cached [bold]{report.items}[/] of {report.records} images in {report.shards} shards → "
            f"[bold]{report.cache_dir}[/] in {report.seconds:.1f} s{resumed}",
            soft_wrap=True,
        )
        if len(report.bucket_counts) > 1:
            sizes = ", ".join(f"{w}×{h}: {n}" for (h, w), n in sorted(report.bucket_counts.items()))
            out.print(f"  buckets (W×H: items): {sizes}", soft_wrap=True)
    # What was left out is a warning: stderr, with or without --json.
    if report.missing_captions:
        what = "kept with empty captions" if keep_empty_captions else "skipped"
        console.print(f"  [yellow]{report.missing_captions} image(s) without a caption ({what})[/]")
    if report.bad_images:
        console.print(f"  [yellow]{len(report.bad_images)} unreadable image(s) skipped[/], e.g.:")
        for bad in report.bad_images[:5]:
            console.print(f"    {bad.path}: {bad.reason}", soft_wrap=True, markup=False)
