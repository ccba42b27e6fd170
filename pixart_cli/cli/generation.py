"""What `pixart eval-fid` and `pixart eval-compbench` share: their generation options, the settings recorded beside
the images, the lazy image maker, the device/shard under `accelerate launch`, and the per-stage progress bars.

No command lives here. Heavy imports stay inside the functions, so `pixart --help` loads no torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Annotated

import typer

from pixart_cli.cli.common import DType, console, resolve_device

if TYPE_CHECKING:
    import torch

    from pixart_cli.evaluation.generate import ImageMaker, Shard
    from pixart_cli.sampling.settings import SampleSettings

# Generation options, shared by both commands.
ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Checkpoint dir, diffusers pipeline or official .pth (with --t5/--vae)."),
]
LoraOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--lora",
        help="Adapter directory (or its run), optionally :SCALE; repeatable. Without --model, the base it names.",
        show_default=False,
    ),
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


def recorded_generation(
    settings: SampleSettings,
    model: str | None,
    t5: str | None,
    vae: str | None,
    dtype: DType | None,
    *,
    complete_prompts: bool = False,
    lora: list[str] | None = None,
    t5_quant: str = "none",
) -> dict:
    """The generation settings recorded beside the images (``generation.json``; resuming with others is refused).

    The keys and values earlier versions wrote, so their folders resume: the size and prompt completion appear
    only when asked for (they were not recorded before these options existed); the seed and batch size not at all
    (each image's seed is in its file; batching does not change the images).
    """
    recorded = {
        "model": model,
        "t5": t5,
        "vae": vae,
        "sampler": settings.sampler,
        "steps": settings.steps,
        "cfg": settings.cfg,
        "dtype": dtype.value if dtype else "default",
    }
    recorded.update({k: v for k, v in (("height", settings.height), ("width", settings.width)) if v is not None})
    if complete_prompts:
        recorded["complete_prompts"] = True
    if lora:
        recorded["lora"] = list(lora)
    if t5_quant != "none":
        recorded["t5_quant"] = t5_quant
    return recorded


def model_and_adapters(model: str | None, lora: list[str] | None) -> tuple[str | None, list[tuple[str, float]]]:
    """``--model`` (default: the base the first ``--lora`` names) and the adapters as (directory, scale)."""
    from pixart_cli.adapters.format import adapter_base, parse_adapter_arg

    adapters = [parse_adapter_arg(text) for text in lora or []]
    if model is None and adapters:
        model = adapter_base(adapters[0][0])
    return model, adapters


def image_maker(
    model: str | None,
    settings: SampleSettings,
    *,
    device: torch.device,
    dtype: DType | None,
    t5: str | None,
    vae: str | None,
    complete_prompts: bool = False,
    adapters: list[tuple[str, float]] | None = None,
    t5_quant: str = "none",
) -> ImageMaker | None:
    """A lazy PixArt image maker (the model loads only if an image is missing), or None without --model.

    Benchmark prompts are fed as written unless ``complete_prompts`` asks for prompt completion.
    """
    if model is None:
        return None
    from pixart_cli.evaluation.generate import pipeline_maker
    from pixart_cli.sampling.pipeline import Pipeline

    def load() -> Pipeline:
        with console.status(f"loading {model}"):
            return Pipeline.from_pretrained(
                model, t5=t5, vae=vae, device=device, dtype=dtype.torch if dtype else None,
                complete_prompts=complete_prompts, adapters=adapters or (), t5_quant=t5_quant,  # type: ignore[arg-type]
            )  # fmt: skip

    return pipeline_maker(load, settings)


def device_and_shard(device: str | None) -> tuple[torch.device, Shard]:
    """The torch device and this process's shard; under `accelerate launch` without --device, one GPU a process."""
    from pixart_cli.evaluation.generate import accelerate_shard

    shard = accelerate_shard()
    if device is None and shard.count > 1:
        import torch
        from accelerate import PartialState

        return PartialState(cpu=not torch.cuda.is_available()).device, shard
    return resolve_device(device), shard


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
def stage_progress(enabled: bool) -> Iterator[Callable[[str, float, int], None]]:
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
