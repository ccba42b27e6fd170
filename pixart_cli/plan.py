"""What a recipe will do before it runs: sizes, batches, an estimate of GPU memory, and the launch command."""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass

import torch

from pixart_cli.checkpoint import build_model
from pixart_cli.config import to_dict
from pixart_cli.errors import PixartError
from pixart_cli.models import DiTConfig
from pixart_cli.recipe import Recipe

GIB = 1024**3
# Bytes of saved activations per image token per unit of width in one transformer block under bf16/fp16
# autocast (norm/modulate outputs, q/k/v, attention output, the 4× MLP hidden twice, fp32 residual copies).
# An estimate from counting the saved tensors; see docs/training.md for how it compares with measurements.
ACTIVATION_BYTES_PER_TOKEN_WIDTH = 60
# Persistent bytes per parameter: fp32 weights (4) + fp32 gradients (4) + AdamW moments (8) + fp32 EMA (4).
STATE_BYTES_PER_PARAM = 20


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
    memory_gib: float  # estimate per GPU
    launch: str


def count_parameters(recipe: Recipe) -> tuple[int, int]:
    """(all, trainable) parameters, counted on the meta device at depths 1 and 2 (the blocks are identical): no time
    or memory for any depth, and a clear error for sizes no tensor can have."""
    config = recipe.model_config()
    counts = []
    for depth in (1, 2):
        try:
            with torch.device("meta"):
                model = build_model(dataclasses.replace(config, depth=depth))
        except (RuntimeError, TypeError, ValueError, OverflowError) as exc:  # e.g. a width whose matrices overflow
            detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise PixartError(f"model.config: cannot build this model ({detail})") from None
        params = list(model.parameters())
        counts.append((sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)))
    (one, one_trainable), (two, two_trainable) = counts
    return one + (config.depth - 1) * (two - one), one_trainable + (config.depth - 1) * (two_trainable - one_trainable)


def memory_estimate(recipe: Recipe, parameters: int) -> float:
    """Peak GiB per GPU: persistent training state plus saved activations of one micro-batch."""
    config = recipe.model_config()
    latent = recipe.data.resolution // (1 if recipe.data.vae == "none" else 8)
    tokens = (latent // config.patch_size) ** 2
    per_block = ACTIVATION_BYTES_PER_TOKEN_WIDTH * tokens * config.hidden_size
    if recipe.model.gradient_checkpointing:  # block inputs (fp32) are kept, one block is recomputed at a time
        per_sample = config.depth * tokens * config.hidden_size * 4 + per_block
    else:
        per_sample = config.depth * per_block
    return (STATE_BYTES_PER_PARAM * parameters + recipe.train.batch_size * per_sample) / GIB


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
    cmd.append(f"--mixed_precision={recipe.train.accelerate_precision}")
    return " ".join([*cmd, "-m", "pixart_cli", *map(shlex.quote, args)])


def plan(recipe: Recipe, recipe_path: str, overrides: tuple[str, ...] = ()) -> Plan:
    parameters, trainable = count_parameters(recipe)
    config = recipe.model_config()
    latent = recipe.data.resolution // (1 if recipe.data.vae == "none" else 8)
    world = recipe.cluster.world_size
    return Plan(
        parameters=parameters,
        trainable=trainable,
        tokens=(latent // config.patch_size) ** 2,
        world_size=world,
        per_gpu_batch=recipe.train.batch_size,
        grad_accumulation=recipe.train.grad_accumulation,
        global_batch=recipe.global_batch(world),
        steps=recipe.train.steps,
        images=recipe.global_batch(world) * recipe.train.steps,
        learning_rate=recipe.learning_rate(world),
        memory_gib=memory_estimate(recipe, trainable),
        launch=launch_command(recipe_path, recipe, overrides),
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


def describe_schedule(recipe: Recipe) -> str:
    """Learning-rate schedule and timestep sampling in words, for the dry run."""
    optim, train = recipe.optim, recipe.train
    lr = f"warm-up {optim.warmup_steps:,} steps, then " + (
        "constant" if optim.decay == "none" else f"{optim.decay} decay to {optim.final_lr_fraction:g} × peak"
    )
    if train.timesteps == "uniform":
        return f"{lr}; timesteps uniform"
    return f"{lr}; timesteps logit-normal({train.timestep_mean:g}, {train.timestep_std:g})"
