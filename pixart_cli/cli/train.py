"""`pixart train`: validate a recipe, print its plan (--dry-run), or run it."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from pixart_cli.cli.common import (
    JsonOpt,
    app,
    console,
    fails_cleanly,
    library_logging,
    out,
    print_json,
    quiet_hub_libraries,
)

if TYPE_CHECKING:
    from pixart_cli.training.recipe import Recipe


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
    as_json: JsonOpt = False,
) -> None:
    """Train one stage described by a recipe (runs unchanged under `accelerate launch` and `torchrun`)."""
    from pixart_cli.training.recipe import load_recipe

    overrides = tuple(overrides or ())
    recipe, resolved = load_recipe(recipe_path, overrides)
    if dry_run:
        _print_plan(recipe, str(recipe_path), overrides, as_json)
        return

    from pixart_cli.errors import PixartError
    from pixart_cli.io import LOCK_FILE, exclusive_output

    # One run per output.dir: a second `pixart train` into it is refused, naming the holder (the main process of a
    # launch holds it; the kernel frees it however the holder exits).
    holder = int(os.environ.get("RANK", "0")) == 0
    output = Path(recipe.output.dir)
    created = not output.exists()
    try:
        with exclusive_output(output, "train", "output.dir") if holder else contextlib.nullcontext():
            _train(recipe, resolved, str(recipe_path), overrides, resume, as_json)
    except PixartError:
        # Refused before training began (bad data, a refused resume): leave no empty folder behind.
        if created and holder and output.is_dir() and {p.name for p in output.iterdir()} <= {LOCK_FILE}:
            shutil.rmtree(output, ignore_errors=True)
        raise


def _train(
    recipe: Recipe, resolved: dict, recipe_path: str, overrides: tuple[str, ...], resume: str | None, as_json: bool
) -> None:
    from pixart_cli.training.batches import batch_source, validation_batches, validation_sampler
    from pixart_cli.training.dreambooth import dreambooth_batches
    from pixart_cli.training.loop import Interrupted, ensure_output_dir, make_accelerator
    from pixart_cli.training.loop import train as run_train
    from pixart_cli.training.optimizers import check_optimizer_available
    from pixart_cli.training.resume import check_resume
    from pixart_cli.training.trackers import check_trackers_available

    quiet_hub_libraries()
    check_optimizer_available(recipe.optim)
    check_trackers_available(recipe.log)
    check_resume(recipe, resolved, resume)  # a refused resume writes nothing and reads no data
    ensure_output_dir(Path(recipe.output.dir), resume)  # before any data is read: a used folder is refused at once
    accelerator, precision = make_accelerator(recipe)
    main = accelerator.is_main_process
    progress = _Progress(recipe.train.steps, recipe.global_batch(accelerator.num_processes), enabled=main)
    try:
        with library_logging():
            sets = [f"--set={o}" for o in overrides]
            prepare = shlex.join(["pixart", "prepare", str(recipe_path), *sets, "--overwrite"])
            # Data errors surface before the progress bar starts.
            if recipe.dreambooth is not None:
                source = dreambooth_batches(recipe, accelerator)
            else:
                source = batch_source(recipe, accelerator, prepare_command=prepare)
            held_out = validation_batches(recipe, accelerator)
            if main:  # after the input checks: a bad input's output is one error line
                console.print(f"precision: {precision.describe()}", style="dim", soft_wrap=True)
                if precision.warning:
                    console.print(f"warning: {precision.warning}", style="yellow", soft_wrap=True)
            with progress:
                result = run_train(
                    recipe,
                    resolved,
                    source,
                    resume=resume,
                    on_log=progress.log,
                    on_step=progress.step,
                    on_sample=validation_sampler(recipe),
                    accelerator=accelerator,
                    validation=held_out,
                )
    except Interrupted as stop:
        if main:
            again = shlex.join(["pixart", "train", str(recipe_path), *(f"--set={o}" for o in overrides)])
            where = f"stopped at step {stop.step} ({stop.signal_name}); checkpoint: {stop.checkpoint}"
            console.print(where, soft_wrap=True, markup=False)
            console.print(f"continue with: {again} --resume auto", soft_wrap=True, markup=False)
        raise typer.Exit(stop.exit_code) from None
    if not main:
        return
    if as_json:
        print_json(
            {
                "checkpoint": result.checkpoint,
                "steps": result.steps,
                "final_loss": result.final_loss,
                "metrics": result.metrics,
                "already_done": result.already_done,
                "unreadable_images": source.faults.unreadable,
                "missing_captions": source.faults.missing_captions,
            }
        )
    elif result.already_done:
        out.print(
            f"nothing to do: the run is already at train.steps ({result.steps}); checkpoint: {result.checkpoint}",
            soft_wrap=True,
            markup=False,
        )
    else:
        out.print(f"done: {result.steps} steps, loss {result.final_loss:.4f} (the last logged value)")
        out.print(f"checkpoint: [bold]{result.checkpoint}[/]  metrics: {result.metrics}", soft_wrap=True)
    faults = source.faults.summary()
    if faults:  # a warning: stderr
        console.print(faults, style="yellow", soft_wrap=True, markup=False)


def _print_plan(recipe: Recipe, recipe_path: str, overrides: tuple[str, ...], as_json: bool = False) -> None:
    from pixart_cli.training.plan import (
        describe_batch,
        describe_learning_rate,
        describe_memory,
        describe_model,
        describe_optimizer,
        describe_schedule,
        plan,
    )

    p = plan(recipe, recipe_path, overrides)
    if as_json:
        print_json({"recipe": recipe.name, "stage": recipe.stage, **dataclasses.asdict(p)})
        for line in p.missing:
            console.print(f"missing: {line}", style="yellow", soft_wrap=True, markup=False)
        return
    unit = "process" if recipe.cluster.gpu.upper() == "CPU" else "GPU"
    table = Table(title=f"{recipe.name} (stage {recipe.stage})", show_header=False, box=None)
    rows = [
        ("model", describe_model(recipe)),
        ("parameters", f"{p.parameters:,} ({p.trainable:,} trainable)"),
        ("image tokens", f"{p.tokens:,} per sample at {recipe.data.resolution} px"),
        ("cluster", f"{recipe.cluster.nodes} × {recipe.cluster.gpus_per_node} {recipe.cluster.gpu}"),
        ("global batch", describe_batch(recipe, p.world_size)),
        ("steps", f"{p.steps:,} ({p.images:,} images)"),
        ("learning rate", describe_learning_rate(recipe, p.world_size)),
        ("optimiser", describe_optimizer(recipe)),
        ("schedule", describe_schedule(recipe)),
        ("precision", p.precision),
        (f"memory / {unit}", describe_memory(recipe, p.memory_gib_by_strategy)),
        ("time", p.time),
        ("init", recipe.model.init or "fresh"),
        ("output", recipe.output.dir),
    ]
    for key, value in rows:
        table.add_row(f"[bold]{key}[/]", value)
    console.print(table)
    for line in p.missing:
        console.print(f"missing: {line}", style="yellow", soft_wrap=True, markup=False)
    console.print("launch (on every node):")
    print(p.launch)


class _Progress:
    """The training bar: moves every step, with images/s and an ETA; loss and lr from the logged metrics."""

    def __init__(self, total: int, images_per_step: int, enabled: bool) -> None:
        from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        from pixart_cli.cli.progress import Bar

        self.images_per_step = images_per_step
        self.loss = ""
        self.started = False
        self.bar = Bar(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            disable=not enabled,
        )
        self.task = self.bar.add_task("train", total=total, info="")

    def __enter__(self) -> _Progress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def step(self, step: int) -> None:
        if not self.started:  # the start (0, or the resumed step): no speed yet
            self.started = True
            self.bar.reset(self.task, completed=step, info=self.loss)
            return
        speed = self.bar.tasks[self.task].speed
        rate = f"  {speed * self.images_per_step:.1f} img/s" if speed else ""
        self.bar.update(self.task, completed=step, info=self.loss + rate)

    def log(self, record: dict) -> None:
        self.loss = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}"
