"""`pixart train`: validate a recipe, print its plan (--dry-run), or run it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from pixart_cli.cli.common import app, console, fails_cleanly, library_logging, quiet_hub_libraries


@app.command()
@fails_cleanly
def train(
    recipe_path: Annotated[Path, typer.Argument(metavar="RECIPE", help="A recipe YAML, e.g. recipes/stage2.yaml.")],
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a recipe value: --set optim.lr=1e-4 (repeatable).")
    ] = None,
    resume: Annotated[
        str | None, typer.Option("--resume", help="'auto' (latest checkpoint in output.dir, if any) or a checkpoint.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate and print the plan and launch command; train nothing.")
    ] = False,
) -> None:
    """Train one stage described by a recipe (runs unchanged under `accelerate launch` and `torchrun`)."""
    from pixart_cli.plan import describe_model, describe_schedule, plan
    from pixart_cli.recipe import load_recipe

    overrides = tuple(overrides or ())
    recipe, resolved = load_recipe(recipe_path, overrides)
    if dry_run:
        p = plan(recipe, str(recipe_path), overrides)
        table = Table(title=f"{recipe.name} (stage {recipe.stage})", show_header=False, box=None)
        rows = [
            ("model", describe_model(recipe)),
            ("parameters", f"{p.parameters:,} ({p.trainable:,} trainable)"),
            ("image tokens", f"{p.tokens:,} per sample at {recipe.data.resolution} px"),
            ("cluster", f"{recipe.cluster.nodes} × {recipe.cluster.gpus_per_node} {recipe.cluster.gpu}"),
            (
                "global batch",
                f"{p.per_gpu_batch} per GPU × {p.grad_accumulation} accumulation × {p.world_size} GPUs"
                f" = {p.global_batch:,}",
            ),
            ("steps", f"{p.steps:,} ({p.images:,} images)"),
            ("learning rate", f"{p.learning_rate:.3g} ({recipe.optim.lr_scaling} scaling of {recipe.optim.lr:g})"),
            ("schedule", describe_schedule(recipe)),
            ("memory / GPU", f"≈ {p.memory_gib:.1f} GiB (estimate: training state + activations)"),
            ("init", recipe.model.init or "fresh"),
            ("output", recipe.output.dir),
        ]
        for key, value in rows:
            table.add_row(f"[bold]{key}[/]", value)
        console.print(table)
        console.print("launch (on every node):")
        print(p.launch)
        return

    import torch
    from accelerate import Accelerator

    from pixart_cli.train import ensure_output_dir
    from pixart_cli.train import train as run_train
    from pixart_cli.train_data import batch_source, validation_sampler

    quiet_hub_libraries()
    ensure_output_dir(Path(recipe.output.dir))
    accelerator = Accelerator(mixed_precision=recipe.train.accelerate_precision, cpu=not torch.cuda.is_available())
    progress = _Progress(recipe.train.steps, enabled=accelerator.is_main_process)
    with library_logging():
        source = batch_source(recipe, accelerator)  # data errors surface before the progress bar starts
        with progress:
            result = run_train(
                recipe,
                resolved,
                source,
                resume=resume,
                on_log=progress.update,
                on_sample=validation_sampler(recipe),
                accelerator=accelerator,
            )
    if accelerator.is_main_process:
        console.print(f"done: {result.steps} steps, last loss {result.final_loss:.4f}")
        console.print(f"checkpoint: [bold]{result.checkpoint}[/]  metrics: {result.metrics}")
        faults = source.faults.summary()
        if faults:
            console.print(faults, style="yellow", soft_wrap=True, markup=False)


class _Progress:
    """A rich progress bar fed by the training loop's metric records."""

    def __init__(self, total: int, enabled: bool) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
        )
        self.task = self.progress.add_task("train", total=total, info="")

    def __enter__(self) -> _Progress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def update(self, record: dict) -> None:
        info = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['images_per_s']:.1f} img/s"
        self.progress.update(self.task, completed=record["step"], info=info)
