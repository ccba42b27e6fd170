"""The training loop of all three stages, on accelerate (one CPU process, one GPU, or many nodes).

Stage 1 trains the class-conditional DiT; stages 2 and 3 train PixArt from the previous stage's checkpoint.
Everything that is random is a pure function of (seed, rank, step): the data order of an epoch, the timesteps,
the noise, caption dropout and the latent posterior samples. A resumed run therefore needs only the weights,
the EMA, the optimiser/scheduler state and the data position to continue exactly as if never stopped.

Checkpoints are our checkpoint directories (``pixart sample --model`` reads them directly) plus the training
state::

    <output.dir>/checkpoints/step-0001000/
        config.yaml  model.safetensors  ema.safetensors   # the model, as everywhere else
        recipe.yaml                                       # the resolved recipe that produced it
        training_state.pt                                 # optimiser, LR schedule, data position (tensors only)

Each is written to a hidden temporary directory and renamed into place, so a killed job never leaves a partial
checkpoint where ``--resume auto`` would look (the next run deletes the hidden leftover); only the last
``output.keep_last`` are kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import signal
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
import yaml
from torch import nn

from pixart_cli.checkpoint import (
    CHECKPOINTS,
    EMA_FILE,
    MODEL_FILE,
    POSITION_FILE,
    STATE_FILE,
    Checkpoint,
    CheckpointMeta,
    build_model,
    check_state_dict,
    checkpoint_dirs,
    expected_shapes,
    latest_in_run,
    load_checkpoint,
    read_config,
    write_checkpoint_files,
)
from pixart_cli.data.cache import same_component
from pixart_cli.data.loader import step_generator
from pixart_cli.diffusion import GaussianDiffusion
from pixart_cli.errors import PixartError
from pixart_cli.io import atomic_directory, load_torch_file, remove_stale_temporaries
from pixart_cli.models import DiTConfig, PixArtConfig
from pixart_cli.precision import PrecisionChoice, choose_precision
from pixart_cli.recipe import RESUME_MAY_CHANGE, RESUME_NOTED, OptimSection, Recipe, TrainSection, resume_changes

logger = logging.getLogger(__name__)

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.jsonl"
NUM_TIMESTEPS = 1000
# Keys a stage may add to what it starts from; anything else missing from `model.init` is an error.
NEW_IN_MULTI_SCALE = ("csize_embedder.", "ar_embedder.")
# Keys of the step generators (seed, rank, step, micro-batch, stream): distinct from the data loader's draws.
_TRAIN_STREAM = 1


class TrainingDiverged(PixartError):
    """The loss or the gradients became NaN/inf."""


class Interrupted(Exception):
    """SIGTERM/SIGINT: a checkpoint was saved and the run stopped (not a user error: the CLI says how to go on)."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.signal_name} at step {step}; checkpoint saved to {checkpoint}")

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number (130 SIGINT, 143 SIGTERM)."""
        return 128 + self.signum


#################################################################################
#                                   Data                                        #
#################################################################################


class BatchSource(Protocol):
    """Per-process micro-batches in a deterministic order, resumable from a position.

    Each batch is a dict with ``x0`` (B, C, H, W) (latents sampled from the posterior, or pixels) and either
    ``caption`` (B, L, D) + ``caption_mask`` (B, L) or ``label`` (B,); multi-scale batches add ``resolution``
    (B, 2) and ``aspect_ratio`` (B, 1). ``iterate`` yields (epoch, index of the next batch in that epoch, batch).
    """

    def iterate(self, epoch: int, start: int, device: torch.device) -> Iterator[tuple[int, int, dict]]: ...


#################################################################################
#                                   State                                       #
#################################################################################


@dataclass
class Position:
    step: int = 0  # optimiser steps completed
    epoch: int = 0  # data position: the next micro-batch is batch `batch` of epoch `epoch`
    batch: int = 0
    images: int = 0  # images seen, all processes together
    # Finite losses since the last logged step: the next metric line averages them, so a run resumed between two
    # log lines logs what the uninterrupted run would have.
    window: list[float] = dataclasses.field(default_factory=list)


class EMA:
    """Exponential moving average of the parameters (float32), updated after every optimiser step.

    With ``warmup`` the decay of update n is min(decay, (1 + n) / (10 + n)): without it an EMA of a model trained
    from scratch keeps decay^n of its random initial weights (37% after 10k steps at 0.9999), which ruins it.
    The official PixArt recipes start from trained weights and use no warm-up.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        self.decay, self.warmup = decay, warmup
        self.names = [n for n, _ in model.named_parameters()]
        self.params = [p.detach().float().clone() for p in model.parameters()]

    def decay_at(self, update: int) -> float:
        return min(self.decay, (1 + update) / (10 + update)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, update: int) -> None:
        """Fold in the current weights; ``update`` counts from 0 (the optimiser steps done before this one)."""
        current = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(self.params, current, 1.0 - self.decay_at(update))

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with EMA parameters (buffers such as the null caption are the model's)."""
        out = {k: v.detach() for k, v in model.state_dict().items()}
        out.update(dict(zip(self.names, self.params, strict=True)))
        return out

    def load(self, state_dict: dict[str, torch.Tensor]) -> None:
        for name, param in zip(self.names, self.params, strict=True):
            param.copy_(state_dict[name])


#################################################################################
#                                 Model set-up                                  #
#################################################################################


class InitialWeights(NamedTuple):
    weights: dict | None  # None: a fresh initialisation
    fresh: list[str]  # keys the weights lack, initialised fresh (multi-scale embedders)
    description: str  # one line for the log
    new_caption_path: bool  # the caption projection starts fresh (from scratch, or from a DiT)
    prediction_type: str | None = None  # what the source model predicts (None: a fresh initialisation)


def initial_weights(recipe: Recipe, config: PixArtConfig | DiTConfig) -> InitialWeights:
    """Weights to start from, the keys initialised fresh, and a one-line description."""
    if recipe.model.init is None:
        return InitialWeights(None, [], "fresh initialisation", True)
    init = str(latest_in_run(recipe.model.init))
    if isinstance(config, DiTConfig):
        from pixart_cli.init_from_dit import read_dit

        weights, source_config = read_dit(init, num_heads=config.num_heads)
        if source_config.num_classes != config.num_classes:
            raise PixartError(
                f"model.init: {init} has {source_config.num_classes} classes, the recipe {config.num_classes}"
            )
        return InitialWeights(weights, [], f"DiT weights from {init}", False, source_config.prediction_type)
    from pixart_cli.convert import detect_format, read_any

    fmt = detect_format(init)  # read once: for a .pth file it means loading the whole file
    from_dit = fmt == "dit" or (fmt == "pixart" and isinstance(read_config(init)[0], DiTConfig))
    if from_dit:
        # Stage 2 straight from a stage-1 DiT: what `pixart init-from-dit` would write, done here.
        from pixart_cli.init_from_dit import read_dit, reparameterise

        dit, dit_config = read_dit(init, num_heads=config.num_heads)
        weights, _ = reparameterise(
            dit, dit_config, caption_channels=config.caption_channels, max_length=config.max_length,
            seed=recipe.train.seed,
        )  # fmt: skip
        use_ema, source = False, f"DiT weights from {init}, re-parameterised as by `pixart init-from-dit`"
        prediction_type = dit_config.prediction_type
    else:
        checkpoint = read_any(init, num_heads=config.num_heads, max_length=config.max_length, fmt=fmt)
        use_ema = recipe.model.init_weights == "ema" and checkpoint.ema_state_dict is not None
        weights = checkpoint.ema_state_dict if use_ema else checkpoint.state_dict
        source = f"{'EMA' if use_ema else 'model'} weights from {init}"
        read = checkpoint.meta.text_encoder
        if not same_component(read, recipe.data.text_encoder):  # allowed (a switch of encoder), never unsaid
            source += f"; it learned to read {read}'s features and now reads {recipe.data.text_encoder}'s"
        prediction_type = checkpoint.config.prediction_type
    expected = expected_shapes(config)
    fresh = [k for k in expected if k not in weights]
    not_allowed = [k for k in fresh if not (config.multi_scale and k.startswith(NEW_IN_MULTI_SCALE))]
    unexpected = [k for k in weights if k not in expected]
    wrong = [k for k in expected if k in weights and weights[k].shape != expected[k]]
    if not_allowed or unexpected or wrong:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
            for label, keys in (("missing", not_allowed), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        )
        raise PixartError(f"model.init: {init} does not fit the recipe's model ({detail})")
    return InitialWeights(weights, fresh, source, from_dit, prediction_type)


def build_training_model(recipe: Recipe) -> tuple[nn.Module, str]:
    config = recipe.model_config()
    weights, fresh, description, new_caption_path, source_prediction = initial_weights(recipe, config)
    if source_prediction not in (None, config.prediction_type):
        if "prediction_type" in recipe.model.config:  # a deliberate switch: the model learns the new target
            description += f"; switching from {source_prediction} to {config.prediction_type} prediction"
        else:  # unsaid: keep predicting what the model already predicts
            config = dataclasses.replace(config, prediction_type=source_prediction)
    if config.prediction_type != "epsilon":
        description += f"; predicts {config.prediction_type}"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.train.seed)  # identical initial weights on every process
        model = build_model(config)
    if weights is not None:
        missing, unexpected = model.load_state_dict(weights, strict=False)
        assert sorted(missing) == sorted(fresh) and not unexpected, (missing, unexpected)  # checked above
        if fresh:
            description += (
                f" ({len(fresh)} new keys initialised: {', '.join(sorted({k.split('.')[0] for k in fresh}))})"
            )
    if recipe.model.caption_init == "xavier" and new_caption_path and isinstance(config, PixArtConfig):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.train.seed)
            for linear in (model.y_embedder.y_proj.fc1, model.y_embedder.y_proj.fc2):
                nn.init.xavier_uniform_(linear.weight)
        description += "; caption projection xavier-initialised"
    model.enable_gradient_checkpointing(recipe.model.gradient_checkpointing)
    return model, description


#################################################################################
#                                 Checkpoints                                   #
#################################################################################


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
    from safetensors import SafetensorError, safe_open

    if not (checkpoint / EMA_FILE).is_file():  # never restart the EMA from the raw weights unsaid
        raise DamagedCheckpoint(f"{checkpoint / EMA_FILE}: missing (a training checkpoint holds its EMA weights)")
    for name in (MODEL_FILE, EMA_FILE):
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
        read_config(checkpoint)
    except PixartError as exc:
        raise DamagedCheckpoint(str(exc)) from None


def _restore(
    checkpoint: Path, model: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer, scheduler: Any, lr: float
) -> Position:
    """Load weights, EMA, optimiser and schedule state from a training checkpoint; a DamagedCheckpoint naming the
    file for anything missing or unreadable."""
    _check_files(checkpoint)
    position = _read_position(checkpoint)
    try:
        ckpt = load_checkpoint(checkpoint)
        check_state_dict(ckpt.state_dict, model.config, str(checkpoint / MODEL_FILE))
        state = load_torch_file(checkpoint / STATE_FILE)
    except DamagedCheckpoint:
        raise
    except PixartError as exc:
        raise DamagedCheckpoint(str(exc)) from None
    model.load_state_dict(ckpt.state_dict, strict=True)
    ema.load(ckpt.ema_state_dict)
    try:
        optimizer.load_state_dict(state["optimizer"])
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


def _resume(
    resume: str | None,
    recipe: Recipe,
    resolved: dict,
    model: nn.Module,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    lr: float,
    main: bool,
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
            position = _restore(path, model, ema, optimizer, scheduler, lr)
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
    return CheckpointMeta(text_encoder=recipe.data.text_encoder, vae=recipe.data.vae, source=source)


def save_training_checkpoint(
    output: Path,
    recipe: Recipe,
    resolved: dict,
    model: nn.Module,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    position: Position,
) -> Path:
    """Write one checkpoint directory atomically (main process only) and prune old ones."""
    directory = output / CHECKPOINTS / f"step-{position.step:07d}"
    meta = _meta(recipe, f"{recipe.name} step {position.step}")
    checkpoint = Checkpoint(model.config, model.state_dict(), ema.state_dict(model), meta)
    with atomic_directory(directory, overwrite=True) as tmp:
        write_checkpoint_files(checkpoint, tmp)
        (tmp / RECIPE_FILE).write_text(yaml.safe_dump(resolved, sort_keys=False))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / STATE_FILE)
        (tmp / POSITION_FILE).write_text(json.dumps(dataclasses.asdict(position)))
    for _, old in checkpoint_dirs(output)[: -recipe.output.keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return directory


#################################################################################
#                                   The loop                                    #
#################################################################################


@dataclass
class TrainResult:
    checkpoint: Path
    steps: int
    final_loss: float  # the last logged loss: the mean over its log window, as in metrics.jsonl and the bar
    metrics: Path
    already_done: bool = False  # resumed at train.steps: nothing was left to train


def lr_multiplier(optim: OptimSection, total_steps: int) -> Callable[[int], float]:
    """The lr of optimiser step ``step`` (0-based) as a fraction of the peak: linear warm-up, then ``optim.decay``."""
    warmup, final = optim.warmup_steps, optim.final_lr_fraction

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if optim.decay == "none" or total_steps <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / (total_steps - warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if optim.decay == "cosine" else 1 - progress
        return final + (1 - final) * shape

    return multiplier


def make_accelerator(recipe: Recipe) -> tuple[Any, PrecisionChoice]:
    """The run's Accelerator, with ``train.mixed_precision`` resolved for this machine (``auto``: bf16 only where
    it is native)."""
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    choice = choose_precision(recipe.train.mixed_precision, "cuda" if cuda else "cpu")
    return Accelerator(mixed_precision=choice.accelerate, cpu=not cuda), choice


def ensure_output_dir(output: Path, resume: str | None = None) -> None:
    """Create ``output.dir`` and prove it writable now, not at the first checkpoint hours later.

    A folder that already holds checkpoints is refused unless the run resumes: a fresh run there would mix its
    checkpoints and metrics with the old run's.
    """
    found = checkpoint_dirs(output) if output.is_dir() else []
    if found and resume is None:
        raise PixartError(
            f"output.dir: {output} already holds checkpoints of a run (latest: {found[-1][1].name}); continue it "
            "with --resume auto, or start a new run elsewhere with --set output.dir=NEW_DIR"
        )
    try:
        output.mkdir(parents=True, exist_ok=True)
        # a name of its own: every rank of a launch runs this at once, and a shared name races (touch, unlink, unlink)
        with tempfile.NamedTemporaryFile(dir=output, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise PixartError(f"output.dir: cannot write to {output} ({exc.strerror})") from None


def _forward(model: nn.Module, batch: dict, x_t: torch.Tensor, t: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    if "label" in batch:
        return model(x_t, t, batch["label"], drop_label=drop)
    return model(
        x_t,
        t,
        batch["caption"],
        batch.get("caption_mask"),
        drop_caption=drop,
        resolution=batch.get("resolution"),
        aspect_ratio=batch.get("aspect_ratio"),
    )


class _StopFlag:
    """Records SIGTERM/SIGINT so the loop can save a checkpoint at the next step boundary."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: leave the handlers alone
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(
    recipe: Recipe,
    resolved: dict,
    batches: BatchSource,
    *,
    resume: str | None = None,
    on_log: Callable[[dict], None] | None = None,
    on_sample: Callable[[nn.Module, int], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    accelerator: Any = None,
) -> TrainResult:
    """Run (or continue) the training described by ``recipe``; returns the last checkpoint.

    ``batches`` supplies per-process micro-batches (see :class:`BatchSource`); ``on_log`` receives metric dicts
    (main process); ``on_step`` the number of optimiser steps done, once at the start and after every step (main
    process); ``on_sample`` is called with the EMA model every ``log.sample_every`` steps.
    """
    acc = accelerator or make_accelerator(recipe)[0]
    torch.backends.cuda.matmul.allow_tf32 = recipe.train.tf32
    torch.backends.cudnn.allow_tf32 = recipe.train.tf32
    output = Path(recipe.output.dir)
    check_resume(recipe, resolved, resume)  # before anything is built or written
    if acc.is_main_process:
        ensure_output_dir(output, resume)
        for path in remove_stale_temporaries(output / CHECKPOINTS):  # never picked up, but each is a full checkpoint
            logger.info("removed a half-written checkpoint left by an interrupted run: %s", path.name)

    model, description = build_training_model(recipe)
    logger.info("model: %s", description)
    ema = EMA(model, recipe.train.ema_decay, recipe.train.ema_warmup)
    lr = recipe.learning_rate(acc.num_processes)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=lr,
        betas=recipe.optim.betas,
        eps=recipe.optim.eps,
        weight_decay=recipe.optim.weight_decay,
        fused=acc.device.type == "cuda",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(recipe.optim, recipe.train.steps))
    resumed = _resume(resume, recipe, resolved, model, ema, optimizer, scheduler, lr, acc.is_main_process)
    start, position = resumed if resumed is not None else (None, Position())
    already_done = position.step >= recipe.train.steps

    if recipe.model.compile:
        for block in model.blocks:
            block.compile()
    ema.params = [p.to(acc.device) for p in ema.params]
    model, optimizer = acc.prepare(model, optimizer)
    raw_model = acc.unwrap_model(model)
    diffusion = GaussianDiffusion.for_model(raw_model.config, NUM_TIMESTEPS)
    accumulation = recipe.train.grad_accumulation
    rank, world, device, seed = acc.process_index, acc.num_processes, acc.device, recipe.train.seed
    metrics_path = output / METRICS_FILE
    existing = checkpoint_dirs(output)
    last = start if start is not None else existing[-1][1] if existing else None
    if acc.is_main_process and metrics_path.exists():  # forget metrics logged after the checkpoint we resume
        kept = [line for line in metrics_path.read_text().splitlines() if _step_of(line) <= position.step]
        metrics_path.write_text("".join(line + "\n" for line in kept))
    trained = False  # any step taken by this call (loss.png is drawn only then)
    logged = _read_losses(metrics_path) if start is not None else []
    last_logged = logged[-1][1] if logged else math.nan  # what the run logged last, also when nothing is left to do
    window_images, window_start = 0, time.perf_counter()
    if on_step and acc.is_main_process:
        on_step(position.step)

    data = batches.iterate(position.epoch, position.batch, device)
    with _StopFlag() as stop, contextlib.ExitStack() as stack:
        metrics = stack.enter_context(open(metrics_path, "a")) if acc.is_main_process else None
        board = _tensorboard(output) if acc.is_main_process and recipe.log.tensorboard else None
        if board is not None:
            stack.callback(board.close)
        while position.step < recipe.train.steps:
            step = position.step
            model.train()
            step_loss = torch.zeros((), device=device)
            step_images = 0
            for micro in range(accumulation):
                epoch, next_batch, batch = next(data)
                x0 = batch["x0"]
                b = x0.shape[0]
                t, noise, drop = _draws(seed, step, micro, x0, world, rank, recipe.train, diffusion)
                x_t = diffusion.q_sample(x0, t, noise)
                sync = contextlib.nullcontext() if micro == accumulation - 1 else acc.no_sync(model)
                with sync, acc.autocast():
                    output_ = _forward(model, batch, x_t, t, drop)
                    loss = diffusion.training_losses(output_, x0, t, noise)["loss"].mean()
                acc.backward(loss / accumulation)
                step_loss += loss.detach() / accumulation
                position.epoch, position.batch = epoch, next_batch
                position.images += b * acc.num_processes
                step_images += b * acc.num_processes
            grad_norm = acc.clip_grad_norm_(model.parameters(), recipe.optim.grad_clip or math.inf)
            # The one host sync of the step: the loss averaged over processes, any process's stop signal, and the
            # gradient norm (equal on all processes after the all-reduce), so every process decides alike.
            votes = torch.stack([step_loss.float(), torch.tensor(float(stop.signal is not None), device=device)])
            if world > 1:
                votes = acc.reduce(votes, "sum")
            loss_sum, stop_votes, norm = torch.cat([votes, grad_norm.detach().float().reshape(1)]).tolist()
            loss_value, stopping = loss_sum / world, stop_votes > 0
            # fp16 overflow in the gradients is the grad scaler's business (it skips that update itself).
            finite = math.isfinite(loss_value) and (acc.mixed_precision == "fp16" or math.isfinite(norm))
            if not finite:
                if recipe.train.nan_policy == "stop":
                    where = f"last good checkpoint: {last}" if last else "no checkpoint was written"
                    raise TrainingDiverged(f"non-finite loss or gradient at step {step + 1}; stopped ({where})")
                logger.warning("step %d: non-finite loss or gradient, update skipped", step + 1)
            else:
                optimizer.step()
                scheduler.step()
                ema.update(raw_model, position.step)
            optimizer.zero_grad(set_to_none=True)
            position.step += 1

            # A skipped step is not logged, but still saves and stops where due (the last step included).
            if finite:
                position.window.append(loss_value)
                trained = True
                window_images += step_images
            if finite and (position.step % recipe.log.every == 0 or position.step == recipe.train.steps):
                elapsed = time.perf_counter() - window_start
                record = {
                    "step": position.step,
                    "loss": sum(position.window) / len(position.window),
                    "lr": scheduler.get_last_lr()[0],
                    "images_per_s": window_images / max(elapsed, 1e-9),
                    "images": position.images,
                    "grad_norm": norm,
                }
                last_logged = record["loss"]
                position.window = []
                if metrics is not None:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    for key, value in record.items() if board is not None else ():
                        if key != "step":
                            board.add_scalar(f"train/{key}", value, position.step)
                    if on_log:
                        on_log(record)
                window_images, window_start = 0, time.perf_counter()

            if on_step and acc.is_main_process:
                on_step(position.step)
            at_end = position.step == recipe.train.steps
            if position.step % recipe.output.save_every == 0 or at_end or stopping:
                _check_replicas(acc, raw_model)
                if acc.is_main_process:
                    last = save_training_checkpoint(
                        output, recipe, resolved, raw_model, ema, optimizer, scheduler, position
                    )
                acc.wait_for_everyone()
                last = checkpoint_dirs(output)[-1][1]
            if on_sample and recipe.log.sample_every and position.step % recipe.log.sample_every == 0:
                if acc.is_main_process:
                    on_sample(_ema_model(raw_model, ema), position.step)
                acc.wait_for_everyone()
            if stopping and not at_end:
                raise Interrupted(stop.signal or signal.SIGTERM, position.step, last)

    if acc.is_main_process and trained:
        from pixart_cli.plot import line_plot, smooth

        history = _read_losses(metrics_path)
        line_plot(
            [s for s, _ in history],
            {"loss": [v for _, v in history], "smoothed": smooth([v for _, v in history])},
            output / "loss.png",
            title=recipe.name,
        )
    acc.wait_for_everyone()
    acc.end_training()
    return TrainResult(last, position.step, last_logged, metrics_path, already_done=already_done)


def _draws(
    seed: int,
    step: int,
    micro: int,
    x0: torch.Tensor,
    world: int,
    rank: int,
    train: TrainSection,
    diffusion: GaussianDiffusion,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Timesteps, noise and caption-dropout flags for this process's slice of the global micro-batch.

    Drawn for the whole global batch from a generator keyed on (seed, step, micro) and sliced, so a run on N
    processes sees exactly the draws of a one-process run with N times the batch (and a resumed run the same
    draws as an uninterrupted one). Every process has the same bucket, hence the same shape, at each step.
    """
    g = step_generator(seed, step, micro, _TRAIN_STREAM, device=x0.device)
    b = x0.shape[0]
    mine = slice(rank * b, (rank + 1) * b)
    t = diffusion.sample_timesteps(world * b, g, train.timesteps, train.timestep_mean, train.timestep_std)[mine]
    noise = torch.randn((world * b, *x0.shape[1:]), generator=g, device=x0.device, dtype=x0.dtype)[mine]
    drop = (torch.rand(world * b, generator=g, device=x0.device) < train.caption_dropout)[mine]
    return t, noise, drop


def _check_replicas(acc: Any, model: nn.Module) -> None:
    """Every process must hold the same weights; a cheap checksum catches a desynchronised data-parallel run."""
    if acc.num_processes == 1:
        return
    with torch.no_grad():
        checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    gathered = acc.gather(checksum)
    if not torch.all(gathered == gathered[0]):
        raise PixartError(f"data-parallel processes hold different weights (checksums {gathered.tolist()})")


def _tensorboard(output: Path) -> Any:
    """A TensorBoard writer in ``output/tensorboard`` when the tensorboard package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(output / "tensorboard"))


def _ema_model(model: nn.Module, ema: EMA) -> nn.Module:
    copy = build_model(model.config).to(ema.params[0].device)
    copy.load_state_dict(ema.state_dict(model), strict=True)
    return copy.eval()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return 1 << 62


def _read_losses(path: Path) -> list[tuple[int, float]]:
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        with contextlib.suppress(json.JSONDecodeError, KeyError):
            record = json.loads(line)
            out.append((record["step"], record["loss"]))
    return out
