"""What a recipe will do before it runs: sizes, batches, estimates of memory and time, what is missing, and the
launch command."""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch

from pixart_cli.adapters.lora import add_adapter
from pixart_cli.checkpoints.format import build_model, latest_in_run
from pixart_cli.config import to_dict
from pixart_cli.data.sources import expand_braces, is_shard_pattern
from pixart_cli.errors import PixartError
from pixart_cli.models import DiTConfig, PixArtConfig
from pixart_cli.models.layers import SelfAttention
from pixart_cli.models.pixart_sigma import KVCompressAttention
from pixart_cli.precision import choose_precision, describe_cpu
from pixart_cli.training.optimizers import STATE_BYTES_PER_PARAM as OPTIMIZER_STATE_BYTES
from pixart_cli.training.recipe import Recipe

GIB = 1024**3
# Bytes of saved activations per image token per unit of width in one transformer block under bf16/fp16
# autocast (norm/modulate outputs, q/k/v, attention output, the 4× MLP hidden twice, fp32 residual copies).
# An estimate from counting the saved tensors; see docs/training.md for how it compares with measurements.
ACTIVATION_BYTES_PER_TOKEN_WIDTH = 60
# Persistent bytes per trained parameter besides the optimiser's state: fp32 weights, gradients and EMA.
STATE_BYTES_PER_PARAM = 12


@dataclass(frozen=True)
class Throughput:
    """A measured training throughput, as FLOP/s by :func:`training_flops_per_image` (so it carries over to other
    model sizes, roughly)."""

    device: str  # what it was measured on, in words
    images_per_s: float
    flops_per_image: float  # of the measured model, by training_flops_per_image
    measured: str  # the measurement: model, date, where it is written down

    @property
    def flops_per_s(self) -> float:
        return self.images_per_s * self.flops_per_image


# XL/2 at 512 px (1,024 tokens, 610,856,096 parameters, 120 caption tokens) and the quick ShapesWorld model
# (64 tokens, 6,132,336 parameters, 64 caption tokens), counted by training_flops_per_image.
_XL2_512_FLOPS, _QUICK_FLOPS = 4.2065e12, 2.4964e9
_QUICK = "recipes/shapes/quick.yaml on 2 cores of an AMD EPYC, 2026-12-07"
MEASURED = {
    "gpu": Throughput("H200", 68.7, _XL2_512_FLOPS, "XL/2 512 px, bf16, uncompiled (docs/performance.md, 2026-11-27)"),
    "cpu-bf16": Throughput("AVX512, native bf16", 84.0, _QUICK_FLOPS, _QUICK),
    "cpu-fp32": Throughput("fp32", 55.5, _QUICK_FLOPS, _QUICK),
    "cpu-bf16-emulated": Throughput("AVX2, bf16 emulated", 3.3, _QUICK_FLOPS, _QUICK),
}


def training_flops_per_image(parameters: int, depth: int, width: int, tokens: int, caption_tokens: int) -> float:
    """Forward + backward FLOPs of one training image: 6 per parameter per token, plus self- and cross-attention
    scores (12 · depth · width · tokens · (tokens + caption tokens)); the usual transformer estimate."""
    return 6 * parameters * tokens + 12 * depth * width * tokens * (tokens + caption_tokens)


@dataclass(frozen=True)
class Plan:
    parameters: int
    trainable: int
    tokens: int  # image tokens per sample at the base resolution
    world_size: int
    per_gpu_batch: int
    grad_accumulation: int
    global_batch: int
    steps: int
    images: int
    learning_rate: float
    memory_gib: float  # estimate per GPU, with the recipe's cluster.strategy
    memory_gib_by_strategy: dict[str, float]  # the same estimate for ddp and for fsdp
    launch: str
    precision: str  # what train.mixed_precision means where the recipe runs
    time: str  # an estimate of the wall-clock time, naming the measurement it scales
    missing: tuple[str, ...]  # inputs that are not there yet, each in one line


def count_parameters(recipe: Recipe) -> tuple[int, int]:
    """(all, trainable) parameters, counted on the meta device at depths 1 and 2 (the blocks are identical): no time
    or memory for any depth, and a clear error for sizes no tensor can have."""
    config = recipe.model_config()
    kv = getattr(config, "kv_compress", None)
    extra = _kv_compression_parameters(config) if kv else 0  # compressed blocks differ: counted on their own
    counts = []
    for depth in (1, 2):
        try:
            with torch.device("meta"):
                model = build_model(dataclasses.replace(config, depth=depth, **({"kv_compress": None} if kv else {})))
        except (RuntimeError, TypeError, ValueError, OverflowError) as exc:  # e.g. a width whose matrices overflow
            detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise PixartError(f"model.config: cannot build this model ({detail})") from None
        if recipe.adapter is not None:
            with torch.device("meta"):
                add_adapter(model, recipe.adapter)
        params = list(model.parameters())
        counts.append((sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)))
    (one, one_trainable), (two, two_trainable) = counts
    every, trainable = (
        one + (config.depth - 1) * (two - one),
        one_trainable + (config.depth - 1) * (two_trainable - one_trainable),
    )
    return every + extra, trainable + (extra if recipe.adapter is None else 0)


def _kv_compression_parameters(config: PixArtConfig) -> int:
    """What KV compression adds to the compressed layers' attention (conv: a depthwise conv and a norm)."""
    kv = config.kv_compress
    with torch.device("meta"):
        compressed = KVCompressAttention(config.hidden_size, config.num_heads, kv.sampling, kv.scale_factor)
        plain = SelfAttention(config.hidden_size, config.num_heads)
    added = sum(p.numel() for p in compressed.parameters()) - sum(p.numel() for p in plain.parameters())
    return len(kv.layers) * added


def memory_estimate(
    recipe: Recipe, parameters: int, trainable: int | None = None, strategy: str | None = None
) -> float:
    """Peak GiB per GPU: persistent training state plus saved activations of one micro-batch. ``parameters``
    are all of them, ``trainable`` those trained (default: all); a frozen base holds only its weights, in
    ``adapter.base_dtype``. ``strategy``: ddp or fsdp (default: the recipe's ``cluster.strategy``)."""
    config = recipe.model_config()
    latent = recipe.data.resolution // (1 if recipe.data.vae == "none" else 8)
    tokens = (latent // config.patch_size) ** 2
    per_block = ACTIVATION_BYTES_PER_TOKEN_WIDTH * tokens * config.hidden_size
    if recipe.model.gradient_checkpointing:  # block inputs (fp32) are kept, one block is recomputed at a time
        per_sample = config.depth * tokens * config.hidden_size * 4 + per_block
    else:
        per_sample = config.depth * per_block
    trainable = parameters if trainable is None else trainable
    frozen_bytes = 2 if recipe.adapter is not None and recipe.adapter.base_dtype != "fp32" else 4
    per_trained = STATE_BYTES_PER_PARAM + OPTIMIZER_STATE_BYTES[recipe.optim.name]
    state = per_trained * trainable + frozen_bytes * (parameters - trainable)
    if (strategy or recipe.cluster.strategy) == "fsdp":
        # 1/N of the state each, plus whole fp32 blocks gathered as it goes (the next one prefetched).
        state = state / recipe.cluster.world_size + 2 * 4 * parameters / config.depth
    return (state + recipe.train.batch_size * per_sample) / GIB


def launch_command(recipe_path: str, recipe: Recipe, overrides: tuple[str, ...] = ()) -> str:
    """The command that runs the recipe on its cluster layout (run it on every node)."""
    c = recipe.cluster
    args = ["train", recipe_path, *(f"--set={o}" for o in overrides)]
    if c.launcher == "torchrun":
        cmd = ["torchrun", f"--nnodes={c.nodes}", f"--nproc_per_node={c.gpus_per_node}"]
        if c.nodes > 1:
            cmd += ["--node_rank=$NODE_RANK", "--master_addr=$MASTER_ADDR", "--master_port=29500"]
        return " ".join([*cmd, "-m", "pixart_cli", *map(shlex.quote, args)])
    cmd = ["accelerate", "launch", f"--num_machines={c.nodes}", f"--num_processes={c.world_size}"]
    if c.world_size > 1:
        cmd.append("--multi_gpu")
    if c.nodes > 1:
        cmd += ["--machine_rank=$NODE_RANK", "--main_process_ip=$MASTER_ADDR", "--main_process_port=29500"]
    if recipe.train.mixed_precision != "auto":  # `pixart train` resolves auto itself, on the machine it runs on
        cmd.append(
            f"--mixed_precision={'no' if recipe.train.mixed_precision == 'fp32' else recipe.train.mixed_precision}"
        )
    return " ".join([*cmd, "-m", "pixart_cli", *map(shlex.quote, args)])


def time_estimate(recipe: Recipe, parameters: int, tokens: int) -> str:
    """The run's time from a measured throughput scaled by FLOPs, naming that measurement."""
    config = recipe.model_config()
    caption_tokens = getattr(config, "max_length", 1)
    flops = training_flops_per_image(parameters, config.depth, config.hidden_size, tokens, caption_tokens)
    if recipe.model.gradient_checkpointing:
        flops *= 4 / 3  # the forward pass runs twice
    images = recipe.global_batch() * recipe.train.steps
    if recipe.cluster.gpu.upper() == "CPU":
        choice = choose_precision(recipe.train.mixed_precision, "cpu")
        key = "cpu-fp32" if choice.precision == "fp32" else "cpu-bf16"
        if choice.precision != "fp32" and choice.warning:
            key = "cpu-bf16-emulated"
        ref = MEASURED[key]
        seconds = images * flops / ref.flops_per_s / recipe.cluster.world_size
        return (
            f"≈ {_duration(seconds)} here in {choice.precision} (this CPU: {describe_cpu()}), scaled from "
            f"{ref.images_per_s:g} img/s ({ref.device}) measured on {ref.measured}"
        )
    ref = MEASURED["gpu"]
    gpu_hours = images * flops / ref.flops_per_s / 3600
    return (
        f"≈ {gpu_hours:,.0f} {ref.device}-hours ({_duration(gpu_hours * 3600 / recipe.cluster.world_size)} on "
        f"{recipe.cluster.world_size}), scaled from {ref.images_per_s:g} img/s for {ref.measured}; "
        f"{recipe.cluster.gpu} not measured"
    )


def describe_precision(recipe: Recipe) -> str:
    """train.mixed_precision as it resolves: on this CPU for a CPU recipe, in words for a GPU recipe."""
    requested = recipe.train.mixed_precision
    if recipe.cluster.gpu.upper() == "CPU":
        choice = choose_precision(requested, "cpu")
        return choice.describe() + (f"; warning: {choice.warning}" if choice.warning else "")
    if requested == "auto":
        return "auto (bf16 on GPUs that compute it, else fp16)"
    return requested


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _exists(path: str) -> bool:
    """A path, or every shard a brace pattern (``shards/{00000..00009}.tar``) names, is on disk."""
    return all(Path(p).exists() for p in expand_braces(path)) if is_shard_pattern(path) else Path(path).exists()


def missing_inputs(recipe: Recipe, recipe_path: str) -> tuple[str, ...]:
    """What the run will need that is not on disk yet (a local path that does not exist), one line each."""
    out = []
    data = recipe.data
    init = recipe.model.init
    if init is not None and not init.startswith("builtin:") and not Path(latest_in_run(init)).exists():
        previous = " (a previous stage's run?)" if recipe.stage > 1 else ""
        out.append(f"model.init: {init} does not exist{previous}")
    cache_ready = data.cache is not None and Path(data.cache).is_dir()
    if data.path is not None and not _exists(data.path) and not cache_ready:
        if data.shapes is not None:
            out.append(f"data.path: {data.path} does not exist yet (data.shapes generates it on first use)")
        else:
            out.append(f"data.path: {data.path} does not exist")
    if data.cache is not None and not cache_ready:
        out.append(
            f"data.cache: {data.cache} does not exist yet (`pixart prepare {recipe_path}` makes it; "
            "without it captions and images are encoded on the fly)"
        )
    return tuple(out)


def plan(recipe: Recipe, recipe_path: str, overrides: tuple[str, ...] = ()) -> Plan:
    parameters, trainable = count_parameters(recipe)
    config = recipe.model_config()
    latent = recipe.data.resolution // (1 if recipe.data.vae == "none" else 8)
    world = recipe.cluster.world_size
    tokens = (latent // config.patch_size) ** 2
    return Plan(
        parameters=parameters,
        trainable=trainable,
        tokens=tokens,
        world_size=world,
        per_gpu_batch=recipe.train.batch_size,
        grad_accumulation=recipe.train.grad_accumulation,
        global_batch=recipe.global_batch(world),
        steps=recipe.train.steps,
        images=recipe.global_batch(world) * recipe.train.steps,
        learning_rate=recipe.learning_rate(world),
        memory_gib=memory_estimate(recipe, parameters, trainable),
        memory_gib_by_strategy={s: memory_estimate(recipe, parameters, trainable, s) for s in ("ddp", "fsdp")},
        launch=launch_command(recipe_path, recipe, overrides),
        precision=describe_precision(recipe),
        time=time_estimate(recipe, parameters, tokens),
        missing=missing_inputs(recipe, recipe_path),
    )


def describe_model(recipe: Recipe) -> str:
    config = recipe.model_config()
    kind = (
        "DiT (class-conditional)"
        if isinstance(config, DiTConfig)
        else ("PixArtMS (multi-scale)" if config.multi_scale else "PixArt")
    )
    base = recipe.model.variants()[recipe.model.variant]
    # multi_scale follows the data, not the variant: a multi-scale run of a named variant is still that variant;
    # what the model predicts is not its shape either.
    ignored = {"multi_scale": None, "prediction_type": None}
    changed = {**to_dict(config), **ignored} != {**to_dict(base), **ignored}
    name = f"custom (from {recipe.model.variant})" if changed else recipe.model.variant
    predicts = "" if config.prediction_type == "epsilon" else f", predicts {config.prediction_type}"
    return f"{name} {kind}: depth {config.depth}, width {config.hidden_size}, patch {config.patch_size}{predicts}"


def describe_learning_rate(recipe: Recipe, world_size: int) -> str:
    lr, optim = recipe.learning_rate(world_size), recipe.optim
    if optim.lr_scaling == "none":
        return f"{lr:.3g} (not scaled with the batch)"
    return f"{lr:.3g} ({optim.lr:g} × √({recipe.global_batch(world_size):,} / {optim.reference_batch:,}))"


def describe_batch(recipe: Recipe, world_size: int) -> str:
    unit = "process" if recipe.cluster.gpu.upper() == "CPU" else "GPU"
    units = unit + ("es" if unit == "process" and world_size > 1 else "s" if world_size > 1 else "")
    return (
        f"{recipe.train.batch_size} per {unit} × {recipe.train.grad_accumulation} accumulation × {world_size} "
        f"{units} = {recipe.global_batch(world_size):,}"
    )


def describe_memory(recipe: Recipe, by_strategy: dict[str, float]) -> str:
    """The estimate for the recipe's strategy, and for the other one when more than one process shares the work."""
    chosen = recipe.cluster.strategy
    line = f"≈ {by_strategy[chosen]:.1f} GiB with {chosen} (estimate: training state + activations)"
    if recipe.cluster.world_size > 1:
        other = "fsdp" if chosen == "ddp" else "ddp"
        line += f"; ≈ {by_strategy[other]:.1f} GiB with cluster.strategy={other}"
    return line


def describe_optimizer(recipe: Recipe) -> str:
    optim = recipe.optim
    return f"{optim.name}: {OPTIMIZER_STATE_BYTES[optim.name]:g} bytes of state per trained parameter"


def describe_schedule(recipe: Recipe) -> str:
    """Learning-rate schedule and timestep sampling in words, for the dry run."""
    optim, train = recipe.optim, recipe.train
    lr = f"warm-up {optim.warmup_steps:,} steps, then " + (
        "constant" if optim.decay == "none" else f"{optim.decay} decay to {optim.final_lr_fraction:g} × peak"
    )
    if train.timesteps == "uniform":
        return f"{lr}; timesteps uniform"
    return f"{lr}; timesteps logit-normal({train.timestep_mean:g}, {train.timestep_std:g})"
