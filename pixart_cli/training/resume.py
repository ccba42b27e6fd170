"""Training checkpoints: saving them atomically, finding and checking the one to resume, and restoring it."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from torch import nn

from pixart_cli.adapters.format import (
    ADAPTER_CONFIG,
    Adapter,
    BaseReference,
    is_adapter_dir,
    load_adapter,
    read_adapter_config,
    write_adapter_files,
)
from pixart_cli.adapters.lora import adapter_state_dict, load_adapter_weights
from pixart_cli.checkpoints.format import (
    ADAPTER_EMA_FILE,
    ADAPTER_FILE,
    CHECKPOINTS,
    CONFIG_FILE,
    EMA_FILE,
    MODEL_FILE,
    POSITION_FILE,
    STATE_FILE,
    Checkpoint,
    CheckpointMeta,
    check_state_dict,
    checkpoint_dirs,
    config_file,
    load_checkpoint,
    read_config,
    write_checkpoint_files,
)
from pixart_cli.checkpoints.sharded import (
    is_sharded_dir,
    optimizer_state,
    read_layout,
    read_sharded,
    read_sharded_weights,
    shard_name,
    write_layout,
)
from pixart_cli.errors import PixartError
from pixart_cli.io import atomic_directory, load_torch_file
from pixart_cli.training.ema import EMA
from pixart_cli.training.recipe import (
    RESUME_MAY_CHANGE,
    RESUME_NOTED,
    Recipe,
    resume_changes,
)
from pixart_cli.training.sharding import PlainState

logger = logging.getLogger(__name__)


RECIPE_FILE = "recipe.yaml"
SHARD_STAGING = ".shards-"  # <checkpoints>/.shards-step-NNNNNNN/: a sharded checkpoint's shards while written


@dataclass
class Position:
    step: int = 0  # optimiser steps completed
    epoch: int = 0  # data position: the next micro-batch is batch `batch` of epoch `epoch`
    batch: int = 0
    images: int = 0  # images seen, all processes together
    # Finite losses since the last logged step: the next metric line averages them, so a run resumed between two
    # log lines logs what the uninterrupted run would have.
    window: list[float] = dataclasses.field(default_factory=list)


class DamagedCheckpoint(PixartError):
    """A training checkpoint with a file that is missing, cut short or not what it should be."""


def resume_candidates(resume: str | None, output: str | Path) -> list[Path]:
    """The checkpoints ``--resume`` may continue from, newest first: every complete one in ``output`` for
    ``auto`` (the loader falls back past damaged ones), else the one named."""
    if resume is None:
        return []
    if resume == "auto":
        return [path for _, path in reversed(checkpoint_dirs(output))]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise PixartError(f"--resume {resume}: not a training checkpoint (no {STATE_FILE})")
    return [path]


def saved_recipe(checkpoint: Path) -> dict:
    """The resolved recipe a training checkpoint was written with (``recipe.yaml``)."""
    path = checkpoint / RECIPE_FILE
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DamagedCheckpoint(f"{path}: cannot read ({exc.strerror})") from None
    except (UnicodeDecodeError, yaml.YAMLError):
        raise DamagedCheckpoint(f"{path}: not a YAML recipe") from None
    if not isinstance(data, dict):
        raise DamagedCheckpoint(f"{path}: not a YAML recipe")
    return data


def _read_position(checkpoint: Path) -> Position:
    path = checkpoint / POSITION_FILE
    try:
        return Position(**json.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as exc:
        raise DamagedCheckpoint(f"{path}: not a training position ({str(exc).splitlines()[0][:200]})") from None


def _refuse_changes(checkpoint: Path, saved: dict, resolved: dict) -> list[str]:
    """Raise naming every refused difference from the recipe ``checkpoint`` was trained with; returns the allowed
    differences worth a log line."""
    refused, noted = resume_changes(saved, resolved)
    if refused:
        sections = ("output", "log", "cluster")
        allowed = ", ".join(f"{n}.*" if n in sections else n for n in RESUME_MAY_CHANGE + RESUME_NOTED)
        raise PixartError(
            f"--resume: {checkpoint} was trained with another recipe ({'; '.join(refused)}); a resumed run may change "
            f"only {allowed}: keep those values, or start a new run in another output.dir (model.init={checkpoint})"
        )
    return noted


def _refuse_past_end(checkpoint: Path, step: int, recipe: Recipe) -> None:
    if step > recipe.train.steps:
        raise PixartError(
            f"--resume: {checkpoint} is at step {step}, already past train.steps={recipe.train.steps}: nothing to "
            f"train (raise train.steps, or name an earlier checkpoint with --resume PATH)"
        )


def check_resume(recipe: Recipe, resolved: dict, resume: str | None) -> None:
    """Refuse a resume that cannot continue the run — a recipe that changes what is trained, a checkpoint already
    past ``train.steps``, a damaged named checkpoint — reading only small files and writing nothing (the CLI calls
    this before reading any data; :func:`train` checks again as it loads)."""
    for path in resume_candidates(resume, recipe.output.dir):
        try:
            saved, position = saved_recipe(path), _read_position(path)
            _check_files(path)
        except DamagedCheckpoint as exc:
            if resume == "auto":
                continue  # the loader falls back past it, and says so
            raise PixartError(f"--resume {resume}: the checkpoint is damaged: {exc}") from None
        _refuse_changes(path, saved, resolved)
        _refuse_past_end(path, position.step, recipe)
        return


def _check_files(checkpoint: Path) -> None:
    """Find a missing, cut-short or foreign file of a training checkpoint from its headers, without reading the
    weights (the full load in :func:`_restore` catches what this cannot)."""
    adapter = (checkpoint / ADAPTER_CONFIG).is_file()
    weights, ema = (ADAPTER_FILE, ADAPTER_EMA_FILE) if adapter else (MODEL_FILE, EMA_FILE)
    if is_sharded_dir(checkpoint):
        try:
            world = read_layout(checkpoint)["world_size"]  # checked there: an int ≥ 1
        except PixartError as exc:
            raise DamagedCheckpoint(str(exc)) from None
        files = [shard_name(rank, world) for rank in range(world)]
    else:
        if not (checkpoint / ema).is_file():  # never restart the EMA from the raw weights unsaid
            raise DamagedCheckpoint(f"{checkpoint / ema}: missing (a training checkpoint holds its EMA weights)")
        files = [weights, ema]
    for name in files:
        try:
            with safe_open(str(checkpoint / name), "pt"):
                pass  # opening validates the header against the file's length
        except (SafetensorError, OSError) as exc:
            raise DamagedCheckpoint(f"{checkpoint / name}: not a readable safetensors file ({exc})") from None
    try:
        with zipfile.ZipFile(checkpoint / STATE_FILE) as archive:  # torch.save's format; its index is at the end
            archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise DamagedCheckpoint(f"{checkpoint / STATE_FILE}: not a PyTorch checkpoint file ({exc})") from None
    try:
        read_adapter_config(checkpoint) if adapter else read_config(checkpoint)
    except PixartError as exc:
        raise DamagedCheckpoint(str(exc)) from None


def _restore_adapter(checkpoint: Path, model: nn.Module, ema: EMA, base: BaseReference | None) -> None:
    if base is None:
        raise PixartError(f"--resume: {checkpoint} holds an adapter, and the recipe trains every weight")
    adapter = load_adapter(checkpoint)
    if adapter.base.sha256 != base.sha256:
        raise PixartError(
            f"--resume: {checkpoint} trained its adapter on {adapter.base.path} (weights sha256 "
            f"{adapter.base.sha256[:12]}), and model.init {base.path} now holds other weights ({base.sha256[:12]})"
        )
    assert adapter.ema_state_dict is not None  # checked by _check_files
    load_adapter_weights(model, adapter.ema_state_dict, what=str(checkpoint / ADAPTER_EMA_FILE))
    ema.copy_from(model)
    load_adapter_weights(model, adapter.state_dict, what=str(checkpoint / ADAPTER_FILE))


def _restore(
    checkpoint: Path,
    model: nn.Module,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    lr: float,
    base: BaseReference | None = None,
    io: PlainState = PlainState(),
) -> Position:
    """Load weights, EMA, optimiser and schedule state from a training checkpoint; a DamagedCheckpoint naming the
    file for anything missing or unreadable."""
    _check_files(checkpoint)
    position = _read_position(checkpoint)
    adapter = is_adapter_dir(checkpoint)
    if adapter != (base is not None):
        held, trains = ("an adapter", "every weight") if adapter else ("every weight", "an adapter")
        raise PixartError(f"--resume: {checkpoint} holds {held}, and the recipe trains {trains}")
    sharded = is_sharded_dir(checkpoint)
    own_shard = False
    try:
        if adapter:
            _restore_adapter(checkpoint, model, ema, base)
        elif sharded and io.sharded:
            own_shard = io.read_own_shard(checkpoint, model, ema, optimizer)  # type: ignore[attr-defined]
        state = load_torch_file(checkpoint / STATE_FILE)
        if sharded and not own_shard:  # resumed without sharding: the shards put together
            state_dict, averaged = read_sharded_weights(checkpoint)
            if not set(ema.names) <= averaged.keys():
                raise DamagedCheckpoint(f"{checkpoint}: the shards hold no EMA of the trained weights")
            ckpt = Checkpoint(model.config, state_dict, {**state_dict, **averaged}, CheckpointMeta())
            moments = read_sharded(checkpoint, ("optim.",))
            state["optimizer"] = optimizer_state(moments, read_layout(checkpoint)["param_groups"])
        elif not adapter and not own_shard:
            ckpt = load_checkpoint(checkpoint)
        if not adapter and not own_shard:
            check_state_dict(ckpt.state_dict, model.config, str(checkpoint / MODEL_FILE))
    except DamagedCheckpoint:
        raise
    except PixartError as exc:
        if str(exc).startswith("--resume"):
            raise
        raise DamagedCheckpoint(str(exc)) from None
    if not adapter and not own_shard:
        io.load_model(model, ckpt.state_dict)
        ema.load(ckpt.ema_state_dict)
    try:
        if not own_shard:
            io.load_optimizer(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except Exception as exc:  # a loadable file with the wrong contents: KeyError, ValueError, TypeError, ...
        raise DamagedCheckpoint(f"{checkpoint / STATE_FILE}: not this model's optimiser state ({exc!r:.200})") from None
    # The schedule is the recipe's, not the checkpoint's: re-evaluate it at the resumed step, so that a changed
    # train.steps applies from the first resumed step (the loaded optimiser holds the lr of the old schedule).
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group, multiplier in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"], group["lr"] = lr, lr * multiplier(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return position


def resume_training(
    resume: str | None,
    recipe: Recipe,
    resolved: dict,
    model: nn.Module,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    lr: float,
    main: bool,
    base: BaseReference | None = None,
    io: PlainState = PlainState(),
) -> tuple[Path, Position] | None:
    """Continue from the newest readable checkpoint (``auto``: a damaged one is set aside with a log line) or the
    named one (damaged: an error)."""
    candidates = resume_candidates(resume, recipe.output.dir)
    damaged: list[tuple[Path, str]] = []
    for path in candidates:
        try:
            saved = saved_recipe(path)
        except DamagedCheckpoint as exc:
            damaged.append((path, str(exc)))
            continue
        noted = _refuse_changes(path, saved, resolved)
        try:
            position = _restore(path, model, ema, optimizer, scheduler, lr, base, io)
        except DamagedCheckpoint as exc:
            damaged.append((path, str(exc)))
            continue
        _refuse_past_end(path, position.step, recipe)
        for bad, reason in damaged:
            aside = _set_aside(bad) if main else bad
            logger.warning("%s is damaged (%s); resuming from %s instead (kept as %s)", bad.name, reason, path, aside)
        for change in noted:
            logger.info("since the checkpoint: %s (allowed; numerics differ from the uninterrupted run)", change)
        logger.info("resumed from %s at step %d", path, position.step)
        return path, position
    if damaged and resume != "auto":
        raise PixartError(f"--resume {resume}: the checkpoint is damaged: {damaged[0][1]}")
    if damaged:
        raise PixartError(
            f"--resume auto: no readable checkpoint in {Path(recipe.output.dir) / CHECKPOINTS} "
            f"(newest: {damaged[0][1]})"
        )
    return None


def _set_aside(checkpoint: Path) -> Path:
    """Rename a damaged checkpoint out of ``step-*`` so that neither pruning, ``--resume auto`` nor a run directory
    standing for its latest checkpoint takes it; kept for inspection."""
    target = checkpoint.with_name(f"damaged-{checkpoint.name}")
    if target.exists():
        target = checkpoint.with_name(f"damaged-{checkpoint.name}-{time.time_ns()}")
    with contextlib.suppress(OSError):  # another process set it aside first
        checkpoint.rename(target)
    return target


def _meta(recipe: Recipe, source: str) -> CheckpointMeta:
    if recipe.model.architecture == "DiT":
        return CheckpointMeta(vae=recipe.data.vae, source=source)
    return CheckpointMeta(
        text_encoder=recipe.data.text_encoder,
        vae=recipe.data.vae,
        source=source,
        prompt_completion=recipe.prompt_completion(),
    )


def save_training_checkpoint(
    output: Path,
    recipe: Recipe,
    resolved: dict,
    model: nn.Module,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    position: Position,
    base: BaseReference | None = None,
    io: PlainState = PlainState(),
    main: bool = True,
) -> Path:
    """Write one checkpoint directory atomically and prune old ones; every process calls it (a sharded model's state
    is gathered by all), the main process writes. An adapter run (``base`` given) writes the adapter's directory
    instead of the model's."""
    directory = output / CHECKPOINTS / f"step-{position.step:07d}"
    source = f"{recipe.name} step {position.step}"
    if io.sharded and recipe.output.checkpoint == "sharded":
        # Every process writes its rows into a staging folder; the main one moves them into the checkpoint.
        staging = directory.with_name(f"{SHARD_STAGING}{directory.name}")
        whole, groups = io.write_shards(staging, model, ema, optimizer)  # type: ignore[attr-defined]
        if main:
            with atomic_directory(directory, overwrite=True) as tmp:
                for shard in staging.iterdir():
                    shard.rename(tmp / shard.name)
                write_layout(tmp, io.world, whole, groups)  # type: ignore[attr-defined]
                config = config_file(model.config, _meta(recipe, source))
                (tmp / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
                _write_training_files(tmp, resolved, {"scheduler": scheduler.state_dict()}, position)
            shutil.rmtree(staging, ignore_errors=True)
            _prune(output, recipe.output.keep_last)
        return directory
    if not (main or io.sharded):
        return directory
    weights, averaged, optimizer_state = io.model(model), io.ema(model, ema), io.optimizer(model, optimizer)
    if not main:
        return directory
    with atomic_directory(directory, overwrite=True) as tmp:
        if base is not None:
            assert recipe.adapter is not None
            weights, averaged = adapter_state_dict(model), adapter_state_dict(model, state_dict=averaged)
            write_adapter_files(Adapter(recipe.adapter, base, model.config, weights, averaged, source), tmp)
        else:
            write_checkpoint_files(Checkpoint(model.config, weights, averaged, _meta(recipe, source)), tmp)
        state = {"optimizer": optimizer_state, "scheduler": scheduler.state_dict()}
        _write_training_files(tmp, resolved, state, position)
    _prune(output, recipe.output.keep_last)
    return directory


def _write_training_files(directory: Path, resolved: dict, state: dict, position: Position) -> None:
    (directory / RECIPE_FILE).write_text(yaml.safe_dump(resolved, sort_keys=False))
    torch.save(state, directory / STATE_FILE)
    (directory / POSITION_FILE).write_text(json.dumps(dataclasses.asdict(position)))


def _prune(output: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (only ever after a newer one is complete)."""
    for _, old in checkpoint_dirs(output)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def remove_shard_staging(output: Path) -> list[Path]:
    """Staging folders of sharded checkpoints a killed run left (never read: the checkpoint was not complete)."""
    found = list((output / CHECKPOINTS).glob(f"{SHARD_STAGING}*")) if (output / CHECKPOINTS).is_dir() else []
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    return found
