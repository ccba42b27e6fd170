"""`pixart eval-fid`: COCO zero-shot FID (generating resumably, sharded under `accelerate launch`), or FID of two
folders."""

from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import Annotated

import typer

from pixart_cli.cli.common import (
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
)
from pixart_cli.cli.generation import (
    BatchOpt,
    CfgOpt,
    DeviceOpt,
    DTypeOpt,
    LimitOpt,
    LoraOpt,
    ModelOpt,
    SamplerOpt,
    StepsOpt,
    T5Opt,
    VaeOpt,
    device_and_shard,
    image_maker,
    model_and_adapters,
    recorded_generation,
    stage_progress,
)
from pixart_cli.errors import PixartError


def _cache_dir(cache_dir: Path | None, no_cache: bool) -> Path | None:
    if no_cache:
        return None
    if cache_dir is not None:
        return cache_dir
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "pixart" / "fid-stats"


class RealSet(str, enum.Enum):
    drawn = "drawn"
    all = "all"


@app.command("eval-fid")
@fails_cleanly
def eval_fid(
    coco: Annotated[
        str | None, typer.Option("--coco", help="COCO split whose captions to draw, e.g. val2014.", show_default=False)
    ] = None,
    coco_root: Annotated[
        Path, typer.Option("--coco-root", help="Holds annotations/captions_<split>.json and <split>/ images.")
    ] = Path("coco"),
    real: Annotated[Path | None, typer.Option("--real", help="Folder of real images (with --fake).")] = None,
    fake: Annotated[Path | None, typer.Option("--fake", help="Folder of generated images (with --real).")] = None,
    model: ModelOpt = None,
    lora: LoraOpt = None,
    num: Annotated[int, typer.Option("--num", help="Captions drawn (one per distinct image).")] = 30_000,
    size: Annotated[int, typer.Option("--size", help="Both sides centre-cropped and resized to this.")] = 256,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the caption draw; image i uses noise seed + i.")] = 0,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output directory (images, report).")] = Path(
        "eval-fid"
    ),
    real_set: Annotated[
        RealSet, typer.Option("--real-set", help="Real side: the drawn images, or all images of the split.")
    ] = RealSet.drawn,
    inception: Annotated[
        Path | None, typer.Option("--inception", help="Inception file (default: clean-fid's /tmp file, fid-helper's).")
    ] = None,
    clip: Annotated[
        Path | None, typer.Option("--clip", help="Local CLIPModel directory: also report CLIP score.")
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option("--cache-dir", help="Real-side statistics cache (default ~/.cache/pixart/fid-stats).")
    ] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Do not read or write cached statistics.")] = False,
    limit: LimitOpt = None,
    t5: T5Opt = None,
    t5_quant: T5QuantOpt = T5Quant.none,
    vae: VaeOpt = None,
    sampler: SamplerOpt = "dpm-solver",
    steps: StepsOpt = None,
    cfg: CfgOpt = 4.5,
    batch_size: BatchOpt = 8,
    feature_batch_size: Annotated[int, typer.Option("--feature-batch-size", help="Images per Inception pass.")] = 64,
    workers: Annotated[int | None, typer.Option("--workers", help="Threads decoding/resizing images.")] = None,
    device: DeviceOpt = None,
    dtype: DTypeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """COCO zero-shot FID (FID-30K protocol, clean-fid clean mode), or FID between two folders.

    Generation is resumable (existing images are kept) and is split across processes under `accelerate launch`.
    """
    from pixart_cli.evaluation.fid import coco_fid, find_inception, folder_fid, load_inception

    if coco is None and (real is None or fake is None):
        raise PixartError("pass --coco SPLIT (with --model), or --real DIR and --fake DIR")
    if coco is not None and (real is not None or fake is not None):
        raise PixartError("--coco and --real/--fake are two different modes: pass one of them")
    inception_path = find_inception(inception)  # fail before any generation
    torch_device, shard = device_and_shard(device)
    model, adapters = model_and_adapters(model, lora)
    cache = _cache_dir(cache_dir, no_cache)
    quiet_hub_libraries()
    with library_logging(), stage_progress(shard.is_main) as progress:
        if coco is None:
            with console.status("loading the Inception network"):
                extractor = load_inception(inception_path)
            report = folder_fid(
                real, fake, extractor, size=size, cache_dir=cache, output_dir=output, batch_size=feature_batch_size,
                workers=workers, device=torch_device, progress=progress,
            )  # fmt: skip
        else:
            from pixart_cli.evaluation.t2i_compbench.scorers import ClipScorer
            from pixart_cli.sampling.settings import SampleSettings

            # Image i's noise seed is seed + i, in its item: the settings' own seed is not read.
            settings = SampleSettings(sampler=sampler, steps=steps, cfg=cfg, batch_size=batch_size)
            generation = recorded_generation(settings, model, t5, vae, dtype, lora=lora, t5_quant=t5_quant.value)
            maker = image_maker(
                model, settings, device=torch_device, dtype=dtype, t5=t5, vae=vae, adapters=adapters,
                t5_quant=t5_quant.value,
            )  # fmt: skip
            if clip is not None and not (clip / "config.json").is_file():
                raise PixartError(f"--clip {clip}: not a CLIP model directory (no config.json)")
            scorer = (lambda: ClipScorer.from_pretrained(clip, device=torch_device)) if clip else None
            report = coco_fid(
                coco_root, output, lambda: load_inception(inception_path), maker, generation=generation, split=coco,
                num=num, limit=limit, seed=seed, size=size, real_set=real_set.value, cache_dir=cache, clip=scorer,
                batch_size=feature_batch_size, workers=workers, device=torch_device, shard=shard, progress=progress,
            )  # fmt: skip
    if report is None:  # not the main process under accelerate: it prints nothing
        return
    if as_json:
        print_json(
            {
                "fid": report.fid,
                "clip_score": report.clip_score,
                "real_images": report.real_images,
                "fake_images": report.fake_images,
                "size": size,
                "report": report.path,
                "settings": report.settings,
            }
        )
        return
    line = f"FID {report.fid:.3f} ({report.fake_images} generated vs {report.real_images} real images, {size} px)"
    if report.clip_score is not None:
        line += f", CLIP score {report.clip_score:.4f}"
    out.print(line, soft_wrap=True)
    if report.path is not None:
        out.print(f"report: [bold]{report.path}[/]", soft_wrap=True)
