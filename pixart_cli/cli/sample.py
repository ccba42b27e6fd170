"""`pixart sample`: prompts → PNG files (settings in each file and in manifest.jsonl), resumable."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
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


def _read_prompts(prompts: list[str] | None, prompts_file: Path | None) -> list[str]:
    found = list(prompts or [])
    if prompts_file is not None:
        try:
            text = prompts_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or type(exc).__name__
            raise PixartError(f"{prompts_file}: cannot read the prompts file ({why})") from None
        found += [line.strip() for line in text.splitlines() if line.strip()]
    if not found:
        raise PixartError("no prompts given (pass PROMPT arguments or --prompts-file with one prompt per line)")
    return found


@contextlib.contextmanager
def _progress_bar() -> Iterator[Callable[[float, int], None]]:
    """A rich progress bar counting images (advancing by fractions as solver steps finish)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from pixart_cli.cli.progress import Bar

    columns = (
        TextColumn("sampling"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("images"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    bar = Bar(*columns, transient=False)
    task = bar.add_task("sampling", total=None)

    def update(done: float, total: int) -> None:
        if total and not bar.live.is_started:  # shown once there is something to make
            bar.start()
        bar.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        if bar.live.is_started:
            bar.stop()


def _show_completion(pipeline, prompts: list[str], settings) -> None:
    """Say what the model will read where prompt completion rewords a prompt (the first image's wording)."""
    from pixart_cli.sampling.settings import make_jobs

    firsts = make_jobs(prompts, 1, settings.seed)
    changed = [(job.prompt, text) for job in firsts if (text := pipeline.caption(job)) != job.prompt]
    if not changed:
        return
    prompt, text = changed[0]
    each = " (drawn per image)" if settings.num_images_per_prompt > 1 else ""
    console.print(
        f"completing prompts as the model's training captions were worded{each}: [italic]{prompt}[/] → "
        f"[italic]{text}[/]; --no-complete-prompts to read them as given",
        soft_wrap=True,
        highlight=False,
    )


@app.command()
@fails_cleanly
def sample(
    prompts: Annotated[list[str] | None, typer.Argument(help="Prompts (quote each one).", show_default=False)] = None,
    num_images: Annotated[int, typer.Option("-n", "--num-images", help="Images per prompt.")] = 4,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Our checkpoint directory, a diffusers pipeline directory or hub id, or an official .pth "
            "(with --t5 and --vae).",
        ),
    ] = None,
    sampler: Annotated[
        str, typer.Option("--sampler", help="dpm-solver (20 steps), sa-solver (25), ddim (50) or iddpm (100).")
    ] = "dpm-solver",
    steps: Annotated[int | None, typer.Option("--steps", help="Solver steps (default: per sampler).")] = None,
    cfg: Annotated[float, typer.Option("--cfg", help="Classifier-free guidance scale (1 = none).")] = 4.5,
    seed: Annotated[int, typer.Option("--seed", help="Image j of every prompt uses seed + j.")] = 0,
    size: Annotated[int | None, typer.Option("--size", help="Square image side in pixels.")] = None,
    height: Annotated[int | None, typer.Option("--height", help="Image height in pixels.")] = None,
    width: Annotated[int | None, typer.Option("--width", help="Image width in pixels.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per forward pass.")] = 4,
    prompts_file: Annotated[
        Path | None, typer.Option("--prompts-file", help="Text file, one prompt per line (blank lines skipped).")
    ] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output directory.")] = Path("samples"),
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1 … (default: cuda if any).")] = None,
    dtype: Annotated[DType | None, typer.Option("--dtype", help="Default: bf16 on CUDA, fp32 on CPU.")] = None,
    grid: Annotated[bool, typer.Option("--grid", help="Also write grid.png (a row per prompt).")] = False,
    negative_prompt: Annotated[
        str | None, typer.Option("--negative-prompt", help="Guide away from this (default: the null caption).")
    ] = None,
    t5: Annotated[str | None, typer.Option("--t5", help="T5 directory or hub id (overrides the checkpoint's).")] = None,
    vae: Annotated[
        str | None, typer.Option("--vae", help="AutoencoderKL directory or hub id, or 'none' for pixel space.")
    ] = None,
    offload: Annotated[
        bool, typer.Option("--offload", help="Free T5 after encoding; one component on the GPU at a time.")
    ] = False,
    t5_quant: T5QuantOpt = T5Quant.none,
    complete_prompts: Annotated[
        bool | None,
        typer.Option(
            "--complete-prompts/--no-complete-prompts",
            help="Word each prompt as the training captions were (ShapesWorld: add the sizes and background a short "
            "prompt leaves out, drawn per image). Default: on where the model's text encoder tells how.",
            show_default=False,
        ),
    ] = None,
    lora: Annotated[
        list[str] | None,
        typer.Option(
            "--lora",
            help="An adapter directory (or its training run), optionally :SCALE (default 1); repeat to combine. "
            "Without --model, the base it was trained on.",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Generate images from text prompts: one PNG per image, settings in the PNG and in manifest.jsonl.

    Existing images made with the same settings are skipped, so an interrupted run can be resumed.
    """
    from pixart_cli.adapters.format import adapter_base, parse_adapter_arg
    from pixart_cli.sampling.pipeline import Pipeline, default_model
    from pixart_cli.sampling.settings import SampleSettings
    from pixart_cli.sampling.writer import write_samples
    from pixart_cli.shapesworld.demo import SHAPES_DEMO, demo_warnings

    prompt_list = _read_prompts(prompts, prompts_file)
    # Validated here, before the model loads (a bad setting is one error line); sizes are checked against the
    # model once it has loaded.
    sides = (height, width) if size is None else (size, size)
    settings = SampleSettings(
        sampler=sampler, steps=steps, cfg=cfg, seed=seed, num_images_per_prompt=num_images, batch_size=batch_size,
        negative_prompt=negative_prompt, height=sides[0], width=sides[1],
    )  # fmt: skip
    settings.check_image_count(len(prompt_list))
    if size is not None and (height is not None or width is not None):
        raise PixartError("give --size or --height/--width, not both")
    adapters = [parse_adapter_arg(text) for text in lora or []]
    model = model or (adapter_base(adapters[0][0]) if adapters else default_model())
    if model is None:
        raise PixartError(
            "no model given: pass --model (our checkpoint directory, a diffusers pipeline, or an official .pth "
            "with --t5 and --vae)"
        )
    if model == SHAPES_DEMO and not adapters:  # an adapter may have taught it new words
        for warning in demo_warnings(prompt_list):
            console.print(f"[yellow]warning:[/] {warning}", soft_wrap=True, highlight=False)
    torch_device = resolve_device(device)
    quiet_hub_libraries()
    with library_logging():
        with console.status(f"loading {model}"):
            pipeline = Pipeline.from_pretrained(
                model, t5=t5, vae=vae, device=torch_device, dtype=dtype.torch if dtype else None, offload=offload,
                complete_prompts=complete_prompts, adapters=adapters, t5_quant=t5_quant.value,
            )  # fmt: skip
        # Sizes and memory are checked against the model before anything else is said (write_samples checks them
        # again): a refused run prints one error line.
        h, w = pipeline.image_size(settings.height, settings.width)
        pipeline.check_memory(h, w, min(settings.batch_size, len(prompt_list) * num_images), settings.cfg)
        _show_completion(pipeline, prompt_list, settings)
        with _progress_bar() as progress:
            report = write_samples(pipeline, prompt_list, output, settings, grid=grid, progress=progress)
    h, w = report.size  # (height, width), as tensors are; people read sizes as width×height
    if as_json:
        print_json(
            {
                "output_dir": report.output_dir,
                "written": report.written,
                "skipped": report.skipped,
                "width": w,
                "height": h,
                "manifest": report.manifest,
                "grid": report.grid,
            }
        )
        return
    made = f"wrote {len(report.written)} image{'s' if len(report.written) != 1 else ''} ({w}×{h})"
    if report.skipped:
        made += f", skipped {len(report.skipped)} already there"
    out.print(f"{made} → [bold]{report.output_dir}[/]", soft_wrap=True)
    out.print(f"settings per image: [bold]{report.manifest}[/] (and in each PNG's text chunk)", soft_wrap=True)
    if report.grid is not None:
        out.print(f"grid: [bold]{report.grid}[/]", soft_wrap=True)
