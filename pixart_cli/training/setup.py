"""The model a stage trains: fresh, or initialised from the previous stage's checkpoint (or a DiT)."""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import NamedTuple

import torch
from torch import nn

from pixart_cli.adapters.format import BaseReference
from pixart_cli.adapters.lora import add_adapter, weights_hash
from pixart_cli.checkpoints.convert import detect_format, read_any
from pixart_cli.checkpoints.format import (
    build_model,
    expected_shapes,
    latest_in_run,
    read_config,
)
from pixart_cli.checkpoints.init_from_dit import read_dit, reparameterise
from pixart_cli.data.cache import same_component
from pixart_cli.errors import PixartError
from pixart_cli.models import DiTConfig, PixArtConfig
from pixart_cli.training.recipe import (
    Recipe,
)

logger = logging.getLogger(__name__)


# Keys a stage may add to what it starts from; anything else missing from `model.init` is an error.
NEW_IN_MULTI_SCALE = ("csize_embedder.", "ar_embedder.")
# PixArt-Σ's conv KV compression, added to a model that had none: starts as the window average (official init).
_NEW_KV_COMPRESSION = re.compile(r"blocks\.(\d+)\.attn\.(sr|norm)\.")
NULL_CAPTION = "y_embedder.y_embedding"


def may_start_fresh(key: str, config: PixArtConfig) -> bool:
    """Whether a stage may initialise ``key`` fresh: size embedders of a model turning multi-scale, compression
    layers of a model gaining KV compression (PixArt-Σ's weak-to-strong step)."""
    if config.multi_scale and key.startswith(NEW_IN_MULTI_SCALE):
        return True
    match = _NEW_KV_COMPRESSION.match(key)
    return match is not None and config.compresses(int(match.group(1)))


def fit_null_caption(
    weights: dict, config: PixArtConfig, recipe: Recipe, init: str, placeholder: bool = False
) -> tuple[dict, str]:
    """Weights whose null caption has the recipe's caption length, and what was done (empty: nothing).

    The null caption (``y_embedding``, the unconditional input) has one row per caption token. Moving to another
    length (PixArt-α's 120 → PixArt-Σ's 300) needs a new one: as PixArt-Σ's code does on every load
    (``diffusion/utils/checkpoint.py``), T5("") padded to the new length, through ``data.text_encoder``.
    ``placeholder``: the source kept none (diffusers weights: conversion filled in random values, and their
    pipelines guide with T5("")), so it is built that way whatever the length: caption dropout then trains the
    unconditional input the model was trained with, not a random one.
    """
    null = weights.get(NULL_CAPTION)
    if null is None or (null.shape[0] == config.max_length and not placeholder):
        return weights, ""
    rows = null.shape[0]
    if not placeholder and not recipe.model.rebuild_null_caption:
        raise PixartError(
            f"model.init: {init} reads {rows}-token captions, the recipe's model {config.max_length} "
            f"(model.config.max_length); set model.rebuild_null_caption: true to start from it with the null caption "
            f'rebuilt as T5("") over {config.max_length} tokens, as PixArt-Σ\'s code does'
        )
    from pixart_cli.components.text import TextEncoder  # lazy: loads transformers
    from pixart_cli.distributed import Dist

    # On this process's GPU in bf16 where there is one (T5-XXL: ~9.5 GB, released after), as the official code
    # encodes it (fp16, on the GPU); the CPU in fp32 otherwise.
    gpu = torch.cuda.is_available()
    device = Dist.from_environment().device("cuda" if gpu else "cpu")
    text = TextEncoder(
        recipe.data.text_encoder, max_length=config.max_length, dtype=torch.bfloat16 if gpu else None, device=device
    )
    rebuilt = text.encode([""]).embeddings[0].float().cpu()
    text.release()
    if rebuilt.shape != (config.max_length, null.shape[1]):
        raise PixartError(
            f"model.rebuild_null_caption: data.text_encoder gives {rebuilt.shape[1]}-wide features, the model "
            f"takes {null.shape[1]}"
        )
    if placeholder:
        done = f'; null caption built as T5("") over {config.max_length} tokens (diffusers weights keep none)'
    else:
        done = f'; null caption rebuilt as T5("") over {config.max_length} tokens (it had {rows})'
    return {**weights, NULL_CAPTION: rebuilt.detach()}, done  # float32: the buffer's own dtype


class InitialWeights(NamedTuple):
    weights: dict | None  # None: a fresh initialisation
    fresh: list[str]  # keys the weights lack, initialised fresh (multi-scale embedders)
    description: str  # one line for the log
    new_caption_path: bool  # the caption projection starts fresh (from scratch, or from a DiT)
    prediction_type: str | None = None  # what the source model predicts (None: a fresh initialisation)
    weight_set: str = "model"  # "ema" or "model": which of the source's weight sets


class TrainingModel(NamedTuple):
    model: nn.Module
    description: str  # one line for the log
    base: BaseReference | None = None  # adapter runs: the frozen base the adapter trains on


def initial_weights(recipe: Recipe, config: PixArtConfig | DiTConfig) -> InitialWeights:
    """Weights to start from, the keys initialised fresh, and a one-line description."""
    if recipe.model.init is None:
        return InitialWeights(None, [], "fresh initialisation", True)
    init = str(latest_in_run(recipe.model.init))
    if isinstance(config, DiTConfig):
        weights, source_config = read_dit(init, num_heads=config.num_heads)
        if source_config.num_classes != config.num_classes:
            raise PixartError(
                f"model.init: {init} has {source_config.num_classes} classes, the recipe {config.num_classes}"
            )
        return InitialWeights(weights, [], f"DiT weights from {init}", False, source_config.prediction_type)

    fmt = detect_format(init)  # read once: for a .pth file it means loading the whole file
    from_dit = fmt == "dit" or (fmt == "pixart" and isinstance(read_config(init)[0], DiTConfig))
    if from_dit:
        # Stage 2 straight from a stage-1 DiT: what `pixart init-from-dit` would write, done here.

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
        # Not under an adapter: its base must stay the weights it was read as (the adapter records their hash).
        placeholder = checkpoint.meta.null_caption == "t5-empty" and recipe.adapter is None
        weights, rebuilt = fit_null_caption(weights, config, recipe, init, placeholder)
        source += rebuilt
    expected = expected_shapes(config)
    fresh = [k for k in expected if k not in weights]
    not_allowed = [k for k in fresh if not may_start_fresh(k, config)]
    unexpected = [k for k in weights if k not in expected]
    wrong = [k for k in expected if k in weights and weights[k].shape != expected[k]]
    if not_allowed or unexpected or wrong:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
            for label, keys in (("missing", not_allowed), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        )
        hint = ""
        if any(_NEW_KV_COMPRESSION.match(k) for k in unexpected):
            hint = (
                "; it compresses keys and values by conv (PixArt-Σ): model.config.kv_compress must name its layers "
                "with sampling conv"
            )
        raise PixartError(f"model.init: {init} does not fit the recipe's model ({detail}){hint}")
    return InitialWeights(weights, fresh, source, from_dit, prediction_type, "ema" if use_ema else "model")


def build_training_model(recipe: Recipe) -> TrainingModel:
    """The model a recipe trains, from its initial weights; with ``adapter``, the frozen base with a fresh adapter."""
    config = recipe.model_config()
    weights, fresh, description, new_caption_path, source_prediction, weight_set = initial_weights(recipe, config)
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
    if recipe.adapter is None:
        return TrainingModel(model, description)
    if new_caption_path:
        raise PixartError(f"adapter: {recipe.model.init} is not a PixArt model; an adapter fine-tunes a trained PixArt")
    if fresh:
        raise PixartError(
            f"adapter: {recipe.model.init} lacks layers the recipe's model has ({', '.join(sorted(fresh)[:3])}); an "
            "adapter trains on a complete base"
        )
    init = recipe.model.init
    where = init if init.startswith("builtin:") else str(latest_in_run(init).resolve())  # a run: its checkpoint
    base = BaseReference(where, weights_hash(model.state_dict()), weight_set)  # type: ignore[arg-type]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.train.seed)  # the same adapter initialisation on every process
        layers = add_adapter(model, recipe.adapter)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    description += (
        f"; frozen, with a {recipe.adapter.type.upper()} adapter of rank {recipe.adapter.rank} on {len(layers)} "
        f"layers ({trained:,} parameters trained)"
    )
    return TrainingModel(model, description, base)
