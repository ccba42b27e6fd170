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
import json
import logging
import math
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from pixart_cli.adapters.lora import hold_base_in, merged_model
from pixart_cli.checkpoints.format import (
    CHECKPOINTS,
    build_model,
    checkpoint_dirs,
)
from pixart_cli.data.loader import step_generator
from pixart_cli.diffusion import GaussianDiffusion
from pixart_cli.distributed import leave_process_group
from pixart_cli.errors import PixartError
from pixart_cli.io import remove_stale_temporaries
from pixart_cli.precision import PrecisionChoice, choose_precision
from pixart_cli.training.ema import EMA
from pixart_cli.training.optimizers import build_optimizer
from pixart_cli.training.plot import line_plot, smooth
from pixart_cli.training.recipe import (
    OptimSection,
    Recipe,
    TrainSection,
)
from pixart_cli.training.resume import (
    Position,
    check_resume,
    remove_shard_staging,
    resume_training,
    save_training_checkpoint,
)
from pixart_cli.training.setup import build_training_model
from pixart_cli.training.sharding import describe_shards, make_fsdp_accelerator, shard_ema_like, state_io
from pixart_cli.training.trackers import accelerator_kwargs, finish_trackers, start_trackers

logger = logging.getLogger(__name__)


METRICS_FILE = "metrics.jsonl"
VALIDATION_FILE = "validation.jsonl"  # {"step", "val_loss"} per measurement (validation.every)
NUM_TIMESTEPS = 1000


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


class BatchSource(Protocol):
    """Per-process micro-batches in a deterministic order, resumable from a position.

    Each batch is a dict with ``x0`` (B, C, H, W) (latents sampled from the posterior, or pixels) and either
    ``caption`` (B, L, D) + ``caption_mask`` (B, L) or ``label`` (B,); multi-scale batches add ``resolution``
    (B, 2) and ``aspect_ratio`` (B, 1). ``iterate`` yields (epoch, index of the next batch in that epoch, batch).
    """

    def iterate(self, epoch: int, start: int, device: torch.device) -> Iterator[tuple[int, int, dict]]: ...


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
    from accelerate import Accelerator  # lazy: accelerate adds ~1 s to start-up (docs/reference.md §8)

    cuda = torch.cuda.is_available()
    choice = choose_precision(recipe.train.mixed_precision, "cuda" if cuda else "cpu")
    if recipe.cluster.strategy == "fsdp":
        block = f"{recipe.model.architecture}Block"  # PixArtBlock, DiTBlock: the unit each shard gathers
        return make_fsdp_accelerator(choice.accelerate, not cuda, block, **accelerator_kwargs(recipe)), choice
    return Accelerator(mixed_precision=choice.accelerate, cpu=not cuda, **accelerator_kwargs(recipe)), choice


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
    validation: Callable[[], list[dict]] | None = None,
) -> TrainResult:
    """Run (or continue) the training described by ``recipe``; returns the last checkpoint.

    ``batches`` supplies per-process micro-batches (see :class:`BatchSource`); ``on_log`` receives metric dicts
    (main process); ``on_step`` the number of optimiser steps done, once at the start and after every step (main
    process); ``on_sample`` is called with the EMA model every ``log.sample_every`` steps. ``validation``: gives this
    process's held-out micro-batches (``training.batches.validation_batches``), scored every ``validation.every``
    steps into ``validation.jsonl`` (``val_loss``) and ``val_loss.png``.
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
        for path in remove_shard_staging(output):
            logger.info("removed the shards of a half-written checkpoint left by an interrupted run: %s", path.name)

    model, description, base = build_training_model(recipe)
    logger.info("model: %s", description)
    if recipe.adapter is not None:
        hold_base(model, recipe.adapter.base_dtype, acc.mixed_precision)
    ema = EMA(model, recipe.train.ema_decay, recipe.train.ema_warmup)
    lr = recipe.learning_rate(acc.num_processes)
    optimizer = build_optimizer(recipe.optim, (p for p in model.parameters() if p.requires_grad), lr, acc.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(recipe.optim, recipe.train.steps))
    io = state_io(acc)

    def resume_from_checkpoint(model: nn.Module) -> tuple[Path, Position] | None:
        return resume_training(
            resume, recipe, resolved, model, ema, optimizer, scheduler, lr, acc.is_main_process, base=base, io=io
        )

    resumed = None if io.sharded else resume_from_checkpoint(model)  # sharded: into the shards, below
    if recipe.model.compile:
        for block in model.blocks:
            block.compile()
    ema.params = [p.to(acc.device) for p in ema.params]
    model, optimizer = acc.prepare(model, optimizer)
    raw_model = acc.unwrap_model(model)
    if io.sharded:
        shard_ema_like(ema, raw_model)
        logger.info("FSDP: %s", describe_shards(raw_model, acc.num_processes))
        resumed = resume_from_checkpoint(raw_model)
    start, position = resumed if resumed is not None else (None, Position())
    already_done = position.step >= recipe.train.steps
    diffusion = GaussianDiffusion.for_model(raw_model.config, NUM_TIMESTEPS)
    accumulation = recipe.train.grad_accumulation
    rank, world, device, seed = acc.process_index, acc.num_processes, acc.device, recipe.train.seed
    metrics_path = output / METRICS_FILE
    existing = checkpoint_dirs(output)
    last = start if start is not None else existing[-1][1] if existing else None
    validation_path = output / VALIDATION_FILE
    for path in (metrics_path, validation_path):  # forget what was logged after the checkpoint we resume
        if acc.is_main_process and path.exists():
            kept = [line for line in path.read_text().splitlines() if _step_of(line) <= position.step]
            path.write_text("".join(line + "\n" for line in kept))
    trained = False  # any step taken by this call (loss.png is drawn only then)
    logged = _read_losses(metrics_path) if start is not None else []
    last_logged = logged[-1][1] if logged else math.nan  # what the run logged last, also when nothing is left to do
    window_images, window_start = 0, time.perf_counter()
    if on_step and acc.is_main_process:
        on_step(position.step)

    reseed_dropout = recipe.adapter is not None and recipe.adapter.dropout > 0
    data = batches.iterate(position.epoch, position.batch, device)
    with _StopFlag() as stop, contextlib.ExitStack() as stack:
        metrics = stack.enter_context(open(metrics_path, "a")) if acc.is_main_process else None
        start_trackers(acc, recipe, resolved)
        stack.callback(finish_trackers, acc)
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
                if reseed_dropout:  # the adapter's dropout draws from the global generator: make it a function
                    torch.manual_seed(hash((seed, step, micro, rank)) & (2**63 - 1))  # of the step, as resume needs
                x_t = diffusion.q_sample(x0, t, noise)
                sync = contextlib.nullcontext() if micro == accumulation - 1 else acc.no_sync(model)
                with sync, acc.autocast():
                    output_ = _forward(model, batch, x_t, t, drop)
                    losses = diffusion.training_losses(output_, x0, t, noise)["loss"]
                    # Per-sample weights where the batch has them (DreamBooth's prior preservation), else the mean.
                    loss = (losses * batch["loss_weight"]).sum() if "loss_weight" in batch else losses.mean()
                acc.backward(loss / accumulation)
                step_loss += loss.detach() / accumulation
                position.epoch, position.batch = epoch, next_batch
                position.images += b * acc.num_processes
                step_images += b * acc.num_processes
            grad_norm = acc.clip_grad_norm_(model.parameters(), recipe.optim.grad_clip or math.inf)
            if hasattr(grad_norm, "full_tensor"):  # FSDP: a replicated DTensor
                grad_norm = grad_norm.full_tensor()
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
                    acc.log({f"train/{key}": value for key, value in record.items() if key != "step"}, position.step)
                    if on_log:
                        on_log(record)
                window_images, window_start = 0, time.perf_counter()

            if on_step and acc.is_main_process:
                on_step(position.step)
            at_end = position.step == recipe.train.steps
            if position.step % recipe.output.save_every == 0 or at_end or stopping:
                if not io.sharded:
                    _check_replicas(acc, raw_model)
                save_training_checkpoint(
                    output, recipe, resolved, raw_model, ema, optimizer, scheduler, position, base=base, io=io,
                    main=acc.is_main_process,
                )  # fmt: skip
                acc.wait_for_everyone()
                last = checkpoint_dirs(output)[-1][1]
            if validation and (position.step % recipe.validation.every == 0 or at_end):
                val_loss = validation_loss(model, validation(), diffusion, acc, seed)
                if acc.is_main_process:
                    with open(validation_path, "a") as f:
                        f.write(json.dumps({"step": position.step, "val_loss": val_loss}) + "\n")
                    acc.log({"validation/loss": val_loss}, position.step)
                    logger.info("step %d: validation loss %.4f", position.step, val_loss)
            if on_sample and recipe.log.sample_every and position.step % recipe.log.sample_every == 0:
                averaged = io.ema(raw_model, ema) if io.sharded else None  # gathered by every process
                if acc.is_main_process:
                    on_sample(_ema_model(raw_model, ema, averaged, acc.device), position.step)
                acc.wait_for_everyone()
            if stopping and not at_end:
                raise Interrupted(stop.signal or signal.SIGTERM, position.step, last)

    if acc.is_main_process and trained and validation:
        measured = _read_losses(validation_path, "val_loss")
        line_plot([s for s, _ in measured], {"validation": [v for _, v in measured]}, output / "val_loss.png",
                  title=f"{recipe.name}: held-out loss at fixed timesteps and noise")  # fmt: skip
    if acc.is_main_process and trained:
        history = _read_losses(metrics_path)
        line_plot(
            [s for s, _ in history],
            {"loss": [v for _, v in history], "smoothed": smooth([v for _, v in history])},
            output / "loss.png",
            title=recipe.name,
        )
    acc.wait_for_everyone()
    leave_process_group()  # not accelerate's end_training: it tears gloo down while its threads still run
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


def _ema_model(
    model: nn.Module, ema: EMA, state_dict: dict | None = None, device: torch.device | None = None
) -> nn.Module:
    """A plain model with the EMA weights (an adapter's EMA folded into its base), on ``device`` (default: the
    EMA's); ``state_dict``: the EMA's whole state dict where it was gathered from shards (onto the CPU)."""
    if any(".lora_" in name for name in ema.names):
        return merged_model(model, state_dict=ema.state_dict(model))
    copy = build_model(model.config).to(device or ema.params[0].device)
    copy.load_state_dict(state_dict if state_dict is not None else ema.state_dict(model), strict=True)
    return copy.eval()


def hold_base(model: nn.Module, base_dtype: str, mixed_precision: str) -> None:
    """Store an adapter run's frozen base in half precision where ``adapter.base_dtype`` asks for it; its autocast
    must compute in that precision (the base's layers would otherwise meet fp32 inputs)."""
    if base_dtype == "fp32":
        return
    if mixed_precision != base_dtype:
        resolved = "fp32" if mixed_precision == "no" else mixed_precision
        raise PixartError(
            f"adapter.base_dtype: {base_dtype} needs train.mixed_precision {base_dtype} (this run computes in "
            f"{resolved}); set both, or adapter.base_dtype=fp32"
        )
    hold_base_in(model, {"bf16": torch.bfloat16, "fp16": torch.float16}[base_dtype])


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return 1 << 62


def _read_losses(path: Path, key: str = "loss") -> list[tuple[int, float]]:
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        with contextlib.suppress(json.JSONDecodeError, KeyError):
            record = json.loads(line)
            out.append((record["step"], record[key]))
    return out


# Key of the validation noise generators: apart from every training draw.
_VALIDATION_STREAM = 2


@torch.no_grad()
def validation_loss(model: nn.Module, batches: list[dict], diffusion: GaussianDiffusion, acc: Any, seed: int) -> float:
    """The mean loss over the held-out batches at fixed timesteps (spread evenly over [0, T) within each batch) and
    fixed noise (from (seed, batch)): a function of the weights alone. Averaged over processes."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=acc.device)
    for index, cpu_batch in enumerate(batches):
        batch = {k: v.to(acc.device) for k, v in cpu_batch.items()}
        x0 = batch["x0"]
        b = x0.shape[0]
        t = ((torch.arange(b, device=x0.device) + 0.5) * (diffusion.num_timesteps / b)).long()
        g = step_generator(seed, index, acc.process_index, _VALIDATION_STREAM, device=x0.device)
        noise = torch.randn(x0.shape, generator=g, device=x0.device, dtype=x0.dtype)
        with acc.autocast():
            output = _forward(model, batch, diffusion.q_sample(x0, t, noise), t, None)
            total += diffusion.training_losses(output, x0, t, noise)["loss"].mean().float()
    model.train(was_training)
    mean = total / max(len(batches), 1)
    if acc.num_processes > 1:
        mean = acc.reduce(mean, "mean")
    return float(mean)
