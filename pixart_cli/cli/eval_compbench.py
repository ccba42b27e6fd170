"""`pixart eval-compbench`: T2I-CompBench or the ShapesWorld held-out benchmark, generated resumably (sharded under
`accelerate launch`) in T2I-CompBench's layout, then scored per category."""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

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
    HeightOpt,
    LimitOpt,
    LoraOpt,
    ModelOpt,
    SamplerOpt,
    StepsOpt,
    T5Opt,
    VaeOpt,
    WidthOpt,
    device_and_shard,
    image_maker,
    model_and_adapters,
    recorded_generation,
    stage_progress,
)
from pixart_cli.errors import PixartError


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
    lora: LoraOpt = None,
    concept: Annotated[
        str | None,
        typer.Option(
            "--concept",
            help="--bench shapes: one-object prompts of this concept colour (e.g. pink) instead of the held-out ones.",
        ),
    ] = None,
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
    t5_quant: T5QuantOpt = T5Quant.none,
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
    from pixart_cli.sampling.settings import SampleSettings
    from pixart_cli.shapesworld.bench import evaluate_shapes

    torch_device, shard = device_and_shard(device)
    model, adapters = model_and_adapters(model, lora)
    if (height is None) != (width is None):
        raise PixartError("give both --width and --height, or neither (the model's own size)")
    if prompt_style is not PromptStyle.dense and bench is not Bench.shapes:
        raise PixartError("--prompt-style is for --bench shapes (T2I-CompBench's prompts are fixed)")
    if concept is not None and bench is not Bench.shapes:
        raise PixartError("--concept is for --bench shapes (a colour taught to a ShapesWorld model)")
    if complete_prompts and bench is not Bench.shapes:
        raise PixartError("--complete-prompts is for --bench shapes (it words prompts as ShapesWorld captions)")
    if complete_prompts and model is not None:
        from pixart_cli.sampling.pipeline import check_prompt_completion

        check_prompt_completion(model, t5)  # before anything is written
    # The benchmark lays out each image's seed (seed + j for image j of a prompt): the settings' own is not read.
    settings = SampleSettings(sampler=sampler, steps=steps, cfg=cfg, batch_size=batch_size, height=height, width=width)
    generation = recorded_generation(
        settings, model, t5, vae, dtype, complete_prompts=complete_prompts, lora=lora, t5_quant=t5_quant.value
    )
    maker = image_maker(
        model, settings, device=torch_device, dtype=dtype, t5=t5, vae=vae, complete_prompts=complete_prompts,
        adapters=adapters, t5_quant=t5_quant.value,
    )  # fmt: skip
    quiet_hub_libraries()
    with library_logging(), stage_progress(shard.is_main) as progress:
        if bench is Bench.shapes:
            report = evaluate_shapes(
                output, maker, generation=generation, num_prompts=limit or 100, images_per_prompt=images_per_prompt,
                seed=seed, aspect=width / height if width and height else 1.0, prompt_style=prompt_style.value,
                shard=shard, progress=progress, concept=concept,
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
