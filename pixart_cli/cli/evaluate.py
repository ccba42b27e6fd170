"""`pixart eval-fid` (COCO zero-shot FID, or FID of two folders) and `pixart eval-compbench` (T2I-CompBench,
ShapesWorld). Both generate resumably and shard generation across processes under `accelerate launch`."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from pixart_cli.cli.common import (
    DType,
    JsonOpt,
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

_STAGES = {
    "generate": "generating images",
    "features:real": "real-side features",
    "features:fake": "generated-side features",
    "clip": "CLIP score",
}


def _describe(stage: str) -> str:
    if stage in _STAGES:
        return _STAGES[stage]
    if stage.startswith("score:"):
        category, _, part = stage[len("score:") :].partition(":")
        return f"scoring {category}" + (f" ({part})" if part else "")
    return stage


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[str, float, int], None]]:
    """One rich progress bar per stage, shown from the first report with something to do."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from pixart_cli.cli.progress import Bar

    bar = Bar(
        TextColumn("{task.description:<26}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
    tasks: dict[str, int] = {}

    def update(stage: str, done: float, total: int) -> None:
        if not enabled:
            return
        if stage not in tasks:
            if not total:
                return
            if not bar.live.is_started:
                bar.start()
            tasks[stage] = bar.add_task(_describe(stage), total=total)
        bar.update(tasks[stage], completed=done, total=total)

    try:
        yield update
    finally:
        if bar.live.is_started:
            bar.stop()


def _generation(
    model: str | None, t5: str | None, vae: str | None, sampler: str, steps: int | None, cfg: float, dtype, batch: int
) -> dict:
    """The generation settings recorded beside the images (resuming with other settings is refused)."""
    from pixart_cli.sampling.solvers import check_sampler

    spec = check_sampler(sampler)
    if batch <= 0:
        raise PixartError(f"--batch-size must be positive, got {batch}")
    return {
        "model": model,
        "t5": t5,
        "vae": vae,
        "sampler": sampler,
        "steps": spec.default_steps if steps is None else steps,
        "cfg": cfg,
        "dtype": dtype.value if dtype else "default",
    }


def _maker(model: str | None, settings: dict, device, dtype, batch_size: int, t5, vae):
    """A lazy PixArt image maker (the model loads only if an image is missing), or None without --model.

    Benchmark prompts are fed as written unless ``settings["complete_prompts"]`` asks for prompt completion.
    """
    if model is None:
        return None
    from pixart_cli.evaluation.generate import pipeline_maker
    from pixart_cli.sampling.pipeline import Pipeline

    def load():
        with console.status(f"loading {model}"):
            return Pipeline.from_pretrained(
                model, t5=t5, vae=vae, device=device, dtype=dtype.torch if dtype else None,
                complete_prompts=settings.get("complete_prompts", False),
            )  # fmt: skip

    return pipeline_maker(
        load,
        sampler=settings["sampler"],
        steps=settings["steps"],
        cfg=settings["cfg"],
        height=settings.get("height"),
        width=settings.get("width"),
        batch_size=batch_size,
    )


def _device_and_shard(device: str | None):
    from pixart_cli.evaluation.generate import accelerate_shard

    shard = accelerate_shard()
    if device is None and shard.count > 1:
        import torch
        from accelerate import PartialState

        return PartialState(cpu=not torch.cuda.is_available()).device, shard  # one GPU per process
    return resolve_device(device), shard


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


# Options shared by both commands (generation).
ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Checkpoint dir, diffusers pipeline or official .pth (with --t5/--vae)."),
]
T5Opt = Annotated[str | None, typer.Option("--t5", help="T5 directory (overrides the checkpoint's).")]
VaeOpt = Annotated[str | None, typer.Option("--vae", help="VAE directory, or 'none' (overrides the checkpoint's).")]
SamplerOpt = Annotated[str, typer.Option("--sampler", help="dpm-solver, sa-solver, ddim or iddpm.")]
StepsOpt = Annotated[int | None, typer.Option("--steps", help="Solver steps (default: per sampler).")]
CfgOpt = Annotated[float, typer.Option("--cfg", help="Classifier-free guidance scale.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", help="Images per generation forward pass.")]
DeviceOpt = Annotated[
    str | None,
    typer.Option("--device", help="cpu, cuda, cuda:1 … (default: cuda if any; per process under accelerate)."),
]
DTypeOpt = Annotated[
    DType | None, typer.Option("--dtype", help="Generation dtype (default: bf16 on CUDA, fp32 on CPU).")
]
HeightOpt = Annotated[int | None, typer.Option("--height", help="Image height in pixels (default: the model's).")]
WidthOpt = Annotated[int | None, typer.Option("--width", help="Image width in pixels (default: the model's).")]
LimitOpt = Annotated[int | None, typer.Option("--limit", help="Quick look: only the first N captions / prompts.")]


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
    torch_device, shard = _device_and_shard(device)
    cache = _cache_dir(cache_dir, no_cache)
    quiet_hub_libraries()
    with library_logging(), _progress(shard.is_main) as progress:
        if coco is None:
            with console.status("loading the Inception network"):
                extractor = load_inception(inception_path)
            report = folder_fid(
                real, fake, extractor, size=size, cache_dir=cache, output_dir=output, batch_size=feature_batch_size,
                workers=workers, device=torch_device, progress=progress,
            )  # fmt: skip
        else:
            from pixart_cli.evaluation.t2i_compbench.scorers import ClipScorer

            generation = _generation(model, t5, vae, sampler, steps, cfg, dtype, batch_size)
            maker = _maker(model, generation, torch_device, dtype, batch_size, t5, vae)
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


class Bench(str, enum.Enum):
    t2i_compbench = "t2i-compbench"
    shapes = "shapes"


class Scorer(str, enum.Enum):
    auto = "auto"
    clip = "clip"
    vqascore = "vqascore"


class PromptStyle(str, enum.Enum):
    dense = "dense"
    short = "short"


@app.command("eval-compbench")
@fails_cleanly
def eval_compbench(
    prompts: Annotated[
        Path | None, typer.Option("--prompts", help="T2I-CompBench's examples/dataset directory (*_val.txt).")
    ] = None,
    bench: Annotated[Bench, typer.Option("--bench", help="t2i-compbench, or shapes (ShapesWorld held-out).")] = (
        Bench.t2i_compbench
    ),
    prompt_style: Annotated[
        PromptStyle,
        typer.Option("--prompt-style", help="shapes: dense (sizes and background named, as trained) or short."),
    ] = PromptStyle.dense,
    complete_prompts: Annotated[
        bool,
        typer.Option(
            "--complete-prompts",
            help="Generate from the prompts completed as `pixart sample` does for ShapesWorld models (sizes and "
            "background filled in); scoring still reads the prompts as written.",
        ),
    ] = False,
    categories: Annotated[
        str, typer.Option("--categories", help="Comma-separated T2I-CompBench categories.")
    ] = "color,shape,texture,spatial,non_spatial,complex",
    model: ModelOpt = None,
    images_per_prompt: Annotated[int, typer.Option("--images-per-prompt", help="Images per prompt.")] = 10,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output directory.")] = Path("eval-compbench"),
    scorer: Annotated[
        Scorer, typer.Option("--scorer", help="auto (each category's evaluator), clip, or vqascore (t2v-metrics).")
    ] = Scorer.auto,
    blip: Annotated[
        Path | None, typer.Option("--blip", help="Local BLIP VQA directory (color, shape, texture).")
    ] = None,
    clip: Annotated[Path | None, typer.Option("--clip", help="Local CLIPModel directory (non_spatial).")] = None,
    detector: Annotated[
        Path | None, typer.Option("--detector", help="Local object detector directory (spatial), e.g. DETR, OWL-ViT.")
    ] = None,
    detector_threshold: Annotated[float, typer.Option("--detector-threshold", help="Detection score cut.")] = 0.3,
    vqascore_python: Annotated[
        Path | None, typer.Option("--vqascore-python", help="Python of an environment with t2v-metrics installed.")
    ] = None,
    vqascore_model: Annotated[str, typer.Option("--vqascore-model", help="t2v-metrics model.")] = "clip-flant5-xxl",
    limit: LimitOpt = None,
    seed: Annotated[int, typer.Option("--seed", help="Image j of every prompt uses seed + j.")] = 0,
    t5: T5Opt = None,
    vae: VaeOpt = None,
    sampler: SamplerOpt = "dpm-solver",
    steps: StepsOpt = None,
    cfg: CfgOpt = 4.5,
    batch_size: BatchOpt = 8,
    height: HeightOpt = None,
    width: WidthOpt = None,
    device: DeviceOpt = None,
    dtype: DTypeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """T2I-CompBench: generate in its layout (<out>/<category>/samples/<prompt>_<index>.png) and score each category.

    Without --model the images already in the output are scored. Evaluator weights come from local directories.
    """
    from pixart_cli.evaluation.t2i_compbench.bench import evaluate_compbench
    from pixart_cli.evaluation.t2i_compbench.layout import FLAGS
    from pixart_cli.evaluation.t2i_compbench.scorers import (
        BlipVqaScorer,
        ClipScorer,
        DetectorScorer,
        Scorers,
        VqaScoreSubprocess,
        check_categories,
        required,
    )
    from pixart_cli.shapesworld.bench import evaluate_shapes

    torch_device, shard = _device_and_shard(device)
    if (height is None) != (width is None):
        raise PixartError("give both --width and --height, or neither (the model's own size)")
    if prompt_style is not PromptStyle.dense and bench is not Bench.shapes:
        raise PixartError("--prompt-style is for --bench shapes (T2I-CompBench's prompts are fixed)")
    if complete_prompts and bench is not Bench.shapes:
        raise PixartError("--complete-prompts is for --bench shapes (it words prompts as ShapesWorld captions)")
    if complete_prompts and model is not None:
        from pixart_cli.sampling.pipeline import check_prompt_completion

        check_prompt_completion(model, t5)  # before anything is written
    generation = _generation(model, t5, vae, sampler, steps, cfg, dtype, batch_size)
    # Recorded only when given, so that outputs made before these options existed still resume.
    generation.update({k: v for k, v in (("height", height), ("width", width)) if v is not None})
    if complete_prompts:
        generation["complete_prompts"] = True
    maker = _maker(model, generation, torch_device, dtype, batch_size, t5, vae)
    quiet_hub_libraries()
    with library_logging(), _progress(shard.is_main) as progress:
        if bench is Bench.shapes:
            report = evaluate_shapes(
                output, maker, generation=generation, num_prompts=limit or 100, images_per_prompt=images_per_prompt,
                seed=seed, aspect=width / height if width and height else 1.0, prompt_style=prompt_style.value,
                shard=shard, progress=progress,
            )  # fmt: skip
        else:
            if prompts is None:
                raise PixartError("pass --prompts (T2I-CompBench's examples/dataset directory), or --bench shapes")
            wanted = check_categories([c.strip() for c in categories.split(",") if c.strip()])
            given = {"blip": blip, "clip": clip, "detector": detector, "vqascore": vqascore_python}
            lacking = sorted(n for n in required(wanted, scorer.value) if given[n] is None)
            if lacking:
                raise PixartError(
                    f"scoring {', '.join(wanted)} with --scorer {scorer.value} needs "
                    + ", ".join(f"{FLAGS[n]} DIR" for n in lacking)
                )
            needed = required(wanted, scorer.value)
            for name in needed - {"vqascore"}:  # fail before generating, not after
                if not (given[name] / "config.json").is_file():
                    raise PixartError(f"{FLAGS[name]} {given[name]}: not a model directory (no config.json)")

            def load_scorers() -> Scorers:
                with console.status("loading the evaluators"):
                    found = Scorers(
                        blip=BlipVqaScorer.from_pretrained(blip, device=torch_device) if "blip" in needed else None,
                        clip=ClipScorer.from_pretrained(clip, device=torch_device) if "clip" in needed else None,
                        detector=DetectorScorer.from_pretrained(
                            detector, threshold=detector_threshold, device=torch_device
                        )
                        if "detector" in needed
                        else None,
                        vqascore=VqaScoreSubprocess(vqascore_python, vqascore_model) if "vqascore" in needed else None,
                    )
                    if found.vqascore is not None:
                        found.vqascore.check()
                return found

            report = evaluate_compbench(
                prompts, output, maker, load_scorers, generation=generation, categories=wanted,
                images_per_prompt=images_per_prompt, seed=seed, limit=limit, scorer=scorer.value, shard=shard,
                progress=progress,
            )  # fmt: skip
    if report is None:
        return
    if as_json:
        categories = {name: dataclasses.asdict(result) for name, result in report.categories.items()}
        print_json({"benchmark": report.benchmark, "categories": categories, "report": report.path})
        return
    table = Table(title=f"{report.benchmark}: mean score per category")
    for column in ("category", "evaluator", "score", "images", "prompts"):
        table.add_column(column, justify="right" if column in ("score", "images", "prompts") else "left")
    for result in report.categories.values():
        table.add_row(result.category, result.evaluator, f"{result.mean:.4f}", str(result.images), str(result.prompts))
        for name, value in result.extra.items():
            table.add_row(f"  {name}", "", f"{value:.4f}", "", "")
    out.print(table)
    out.print(f"report: [bold]{report.path}[/] (per-image scores in <category>/scores.json)", soft_wrap=True)
