"""Conversion between checkpoint formats: ours, the official PixArt-α ``.pth`` and diffusers.

Every conversion is data: an explicit key table, every source key popped, leftovers and shape mismatches reported
by name. Formats:

* ``pixart``: our checkpoint directory (``config.yaml`` + ``model.safetensors`` [+ ``ema.safetensors``]).
* ``official``: a ``.pth`` holding ``{"state_dict": ..., "state_dict_ema"?: ...}`` (or a bare state dict), keys as
  in the official repository, including the stored ``pos_embed`` buffer.
* ``diffusers``: a ``PixArtTransformer2DModel`` directory (with the ``scheduler_config.json`` that samples it:
  its prediction type), or a ``PixArtAlphaPipeline``/``PixArtSigmaPipeline`` directory (its ``transformer/`` and
  ``scheduler/``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from pixart_cli.checkpoints.format import (
    Checkpoint,
    CheckpointMeta,
    check_state_dict,
    is_checkpoint_dir,
    latest_in_run,
    load_checkpoint,
    read_weights,
    save_checkpoint,
)
from pixart_cli.components.autoencoders import load_vae
from pixart_cli.components.t5 import load_t5
from pixart_cli.errors import PixartError
from pixart_cli.io import atomic_directory, atomic_file, load_torch_file
from pixart_cli.models import KVCompress, PixArtConfig, heads_for_width
from pixart_cli.models.layers import PREDICTION_TYPES, sincos_pos_embed_2d

SourceFormat = Literal["pixart", "official", "diffusers-transformer", "diffusers-pipeline", "dit"]
TargetFormat = Literal["pixart", "official", "diffusers"]
StateDict = dict[str, torch.Tensor]

logger = logging.getLogger(__name__)

# Official keys that are not weights of ours, and why they are dropped on import.
OFFICIAL_DROPPED = {"pos_embed": "fixed sin-cos buffer; recomputed, and checked against the stored copy"}
# Official keys with no diffusers counterpart, and why they are dropped on export.
DIFFUSERS_DROPPED = {
    "y_embedder.y_embedding": "diffusers keeps no null caption; PixArtAlphaPipeline encodes the negative prompt",
}
# Keys diffusers lacks that our format needs, and what they become on import.
DIFFUSERS_CREATED = {
    "y_embedder.y_embedding": "fresh N(0, 1/C) null caption (seed 0); sampling uses T5('') (meta.null_caption)",
}

#################################################################################
#          The official ↔ diffusers key table (docs/reference.md §1)            #
#################################################################################

_GLOBAL_PAIRS = [
    ("x_embedder.proj", "pos_embed.proj"),
    ("t_embedder.mlp.0", "adaln_single.emb.timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "adaln_single.emb.timestep_embedder.linear_2"),
    ("t_block.1", "adaln_single.linear"),
    ("y_embedder.y_proj.fc1", "caption_projection.linear_1"),
    ("y_embedder.y_proj.fc2", "caption_projection.linear_2"),
    ("final_layer.linear", "proj_out"),
]
_MULTI_SCALE_PAIRS = [
    ("csize_embedder.mlp.0", "adaln_single.emb.resolution_embedder.linear_1"),
    ("csize_embedder.mlp.2", "adaln_single.emb.resolution_embedder.linear_2"),
    ("ar_embedder.mlp.0", "adaln_single.emb.aspect_ratio_embedder.linear_1"),
    ("ar_embedder.mlp.2", "adaln_single.emb.aspect_ratio_embedder.linear_2"),
]
# Within block i: official "blocks.i.<a>" ↔ diffusers "transformer_blocks.i.<b>"; a tuple splits along dim 0.
_BLOCK_PAIRS: list[tuple[str, str | tuple[str, ...]]] = [
    ("attn.qkv", ("attn1.to_q", "attn1.to_k", "attn1.to_v")),
    ("attn.proj", "attn1.to_out.0"),
    ("cross_attn.q_linear", "attn2.to_q"),
    ("cross_attn.kv_linear", ("attn2.to_k", "attn2.to_v")),
    ("cross_attn.proj", "attn2.to_out.0"),
    ("mlp.fc1", "ff.net.0.proj"),
    ("mlp.fc2", "ff.net.2"),
]


def official_diffusers_modules(depth: int, multi_scale: bool) -> list[tuple[str, tuple[str, ...]]]:
    """Every official layer with the diffusers layer(s) it becomes (several: its outputs split in order)."""
    table = [(official, (theirs,)) for official, theirs in _GLOBAL_PAIRS + (_MULTI_SCALE_PAIRS if multi_scale else [])]
    for i in range(depth):
        for official, theirs in _BLOCK_PAIRS:
            parts = (theirs,) if isinstance(theirs, str) else theirs
            table.append((f"blocks.{i}.{official}", tuple(f"transformer_blocks.{i}.{p}" for p in parts)))
    return table


def official_diffusers_table(depth: int, multi_scale: bool) -> list[tuple[str, tuple[str, ...]]]:
    """Every official key with the diffusers key(s) it becomes (several: split along dim 0, in order)."""
    table = [
        (f"{official}.{s}", tuple(f"{p}.{s}" for p in theirs))
        for official, theirs in official_diffusers_modules(depth, multi_scale)
        for s in ("weight", "bias")
    ]
    table.append(("final_layer.scale_shift_table", ("scale_shift_table",)))
    table += [(f"blocks.{i}.scale_shift_table", (f"transformer_blocks.{i}.scale_shift_table",)) for i in range(depth)]
    return table


def _leftovers(remaining: StateDict, what: str) -> None:
    if remaining:
        keys = sorted(remaining)
        shown = ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
        raise PixartError(f"{what}: unexpected keys no conversion rule consumes: {shown}")


def _pop(sd: StateDict, key: str, what: str) -> torch.Tensor:
    if key not in sd:
        raise PixartError(f"{what}: missing key {key}")
    return sd.pop(key)


def ours_to_diffusers(state_dict: StateDict, config: PixArtConfig) -> StateDict:
    """Our (official-layout) weights → ``PixArtTransformer2DModel`` weights."""
    src = dict(state_dict)
    out: StateDict = {}
    for official, theirs in official_diffusers_table(config.depth, config.multi_scale):
        tensor = _pop(src, official, "our weights")
        if len(theirs) > 1 and tensor.shape[0] % len(theirs):
            raise PixartError(f"our weights: {official} {tuple(tensor.shape)} cannot be split in {len(theirs)}")
        for key, part in zip(theirs, tensor.chunk(len(theirs), dim=0), strict=True):
            out[key] = part.clone()
    for key in DIFFUSERS_DROPPED:
        src.pop(key, None)
    _leftovers(src, "our weights")
    return out


def diffusers_to_ours(state_dict: StateDict, config: PixArtConfig, seed: int = 0) -> StateDict:
    """``PixArtTransformer2DModel`` weights → ours, creating the keys diffusers lacks (``DIFFUSERS_CREATED``)."""
    src = dict(state_dict)
    out: StateDict = {}
    for official, theirs in official_diffusers_table(config.depth, config.multi_scale):
        parts = [_pop(src, key, "diffusers weights") for key in theirs]
        out[official] = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    _leftovers(src, "diffusers weights")
    generator = torch.Generator().manual_seed(seed)
    null = torch.randn(config.max_length, config.caption_channels, generator=generator) / config.caption_channels**0.5
    out["y_embedder.y_embedding"] = null.to(out["t_block.1.weight"].dtype)
    return out


#################################################################################
#                   Inferring the model config from the weights                 #
#################################################################################


def _block_count(state_dict: StateDict, pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in state_dict if (m := regex.match(k))})


def _num_heads(hidden: int, num_heads: int | None, what: str) -> int:
    heads = num_heads or heads_for_width(hidden)
    if heads is None:
        raise PixartError(
            f"{what}: checkpoints do not record the number of attention heads and width {hidden} is not a "
            "DiT/PixArt family size; pass --num-heads"
        )
    return heads


def infer_interpolation_scale(pos_embed: torch.Tensor, hidden: int, what: str = "checkpoint") -> float:
    """Read the scale back from a stored sin-cos embedding: token 1 encodes column 1/scale in channels 0 and h/4."""
    angle = math.atan2(float(pos_embed[0, 1, 0]), float(pos_embed[0, 1, hidden // 4]))
    if angle <= 0:
        raise PixartError(f"{what}: pos_embed is not a sin-cos positional embedding")
    return round(1.0 / angle, 4)


def official_config(
    state_dict: StateDict, num_heads: int | None = None, what: str = "official checkpoint"
) -> PixArtConfig:
    """Infer a ``PixArtConfig`` from official-layout PixArt weights (and their stored ``pos_embed``)."""
    for key in (
        "x_embedder.proj.weight",
        "final_layer.linear.weight",
        "y_embedder.y_proj.fc1.weight",
        "y_embedder.y_embedding",
        "blocks.0.mlp.fc1.weight",
    ):
        if key not in state_dict:
            raise PixartError(f"{what}: missing key {key} (is this a PixArt checkpoint?)")
    try:
        return _official_config(state_dict, num_heads, what)
    except (ValueError, IndexError, ZeroDivisionError) as exc:  # shapes that no PixArt has
        raise PixartError(f"{what}: inconsistent shapes ({str(exc).splitlines()[0][:160]})") from None


def _official_config(state_dict: StateDict, num_heads: int | None, what: str) -> PixArtConfig:
    hidden, in_channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
    out_channels = state_dict["final_layer.linear.weight"].shape[0] // (patch * patch)
    if out_channels not in (in_channels, 2 * in_channels):
        raise PixartError(f"{what}: final_layer.linear has {out_channels} channels for {in_channels} inputs")
    max_length, caption_channels = state_dict["y_embedder.y_embedding"].shape
    input_size, scale = None, 1.0
    if "pos_embed" in state_dict:
        tokens = state_dict["pos_embed"].shape[1]
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise PixartError(f"{what}: pos_embed has {tokens} tokens, not a square grid")
        input_size = side * patch
        scale = infer_interpolation_scale(state_dict["pos_embed"].float(), hidden, what)
    if input_size is None:
        raise PixartError(f"{what}: missing key pos_embed (needed to know the model's base resolution)")
    return PixArtConfig(
        depth=_block_count(state_dict, r"blocks\.(\d+)\.attn\.qkv\.weight$"),
        hidden_size=hidden,
        num_heads=_num_heads(hidden, num_heads, what),
        patch_size=patch,
        input_size=input_size,
        in_channels=in_channels,
        learn_sigma=out_channels == 2 * in_channels,
        mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        caption_channels=caption_channels,
        max_length=max_length,
        interpolation_scale=scale,
        multi_scale="csize_embedder.mlp.0.weight" in state_dict,
        kv_compress=_official_kv_compress(state_dict),
    )


def _official_kv_compress(state_dict: StateDict) -> KVCompress | None:
    """PixArt-Σ's conv KV compression, read from its layers' ``attn.sr`` weights. The weightless samplings (ave,
    uniform) leave no trace in a checkpoint: a recipe states them (``model.config.kv_compress``)."""
    pattern = re.compile(r"blocks\.(\d+)\.attn\.sr\.weight$")
    layers = sorted(int(m.group(1)) for k in state_dict if (m := pattern.match(k)))
    if not layers:
        return None
    factors = {state_dict[f"blocks.{i}.attn.sr.weight"].shape[-1] for i in layers}
    if len(factors) != 1:
        raise ValueError(f"KV-compression layers with different factors {sorted(factors)}")
    return KVCompress(tuple(layers), "conv", factors.pop())


def expected_pos_embed(config: PixArtConfig) -> torch.Tensor:
    g = config.base_size
    return sincos_pos_embed_2d(config.hidden_size, g, g, g, config.interpolation_scale)[None]


def official_to_ours(state_dict: StateDict, config: PixArtConfig, what: str) -> StateDict:
    """Drop (after checking) the stored ``pos_embed``; the rest is our layout already."""
    sd = dict(state_dict)
    stored = sd.pop("pos_embed", None)
    if stored is not None:
        expected = expected_pos_embed(config)
        if stored.shape != expected.shape or (stored.float() - expected).abs().max() > 1e-3:
            raise PixartError(
                f"{what}: stored pos_embed differs from the sin-cos embedding for input_size {config.input_size}, "
                f"interpolation_scale {config.interpolation_scale}"
            )
    check_state_dict(sd, config, what)
    return sd


def check_adaln_single(config: PixArtConfig, target: str) -> None:
    """Official and diffusers PixArt models are adaLN-single; per-block adaLN exists only for ablations here."""
    if config.adaln != "single":
        raise PixartError(f"{target} has no per-block adaLN (model.adaln={config.adaln!r}); only adaLN-single converts")


def ours_to_official(state_dict: StateDict, config: PixArtConfig) -> StateDict:
    check_adaln_single(config, "the official PixArt layout")
    dtype = state_dict["t_block.1.weight"].dtype
    return {**state_dict, "pos_embed": expected_pos_embed(config).to(dtype)}


#################################################################################
#                                 diffusers configs                             #
#################################################################################


def diffusers_transformer_config(config: PixArtConfig) -> dict:
    """The ``PixArtTransformer2DModel`` constructor arguments for a PixArt config."""
    check_adaln_single(config, "diffusers' PixArtTransformer2DModel")
    if config.kv_compress is not None:
        kv = config.kv_compress
        raise PixartError(
            f"diffusers' PixArtTransformer2DModel has no KV compression (this model compresses keys and values "
            f"{kv.scale_factor}x by {kv.sampling} in layers {_span(kv.layers)}); convert to pixart or official"
        )
    if config.mlp_ratio != 4.0:
        raise PixartError(f"diffusers' PixArtTransformer2DModel only supports mlp_ratio 4, not {config.mlp_ratio}")
    scale = config.interpolation_scale
    return {
        "num_attention_heads": config.num_heads,
        "attention_head_dim": config.hidden_size // config.num_heads,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "num_layers": config.depth,
        "cross_attention_dim": config.hidden_size,
        "attention_bias": True,
        "sample_size": config.input_size,
        "patch_size": config.patch_size,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": 1000,
        "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "caption_channels": config.caption_channels,
        "interpolation_scale": int(scale) if scale == int(scale) else scale,
        "use_additional_conditions": config.multi_scale,
    }


def _span(layers: tuple[int, ...]) -> str:
    """14–27 for a contiguous run of layers, else the list."""
    if list(layers) == list(range(min(layers), max(layers) + 1)) and len(layers) > 2:
        return f"{min(layers)}-{max(layers)}"
    return ", ".join(map(str, layers))


def config_from_diffusers(cfg: dict, max_length: int = 120, what: str = "diffusers config") -> PixArtConfig:
    try:
        heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
        sample_size = cfg.get("sample_size", 128)
        scale = cfg.get("interpolation_scale") or max(sample_size // 64, 1)
        multi_scale = cfg.get("use_additional_conditions")
        if multi_scale is None:
            multi_scale = sample_size == 128
        in_channels = cfg.get("in_channels", 4)
        out_channels = cfg.get("out_channels") or in_channels
        if cfg.get("norm_type", "ada_norm_single") != "ada_norm_single":
            raise PixartError(f"{what}: norm_type {cfg['norm_type']!r} is not a PixArt-α transformer")
        return PixArtConfig(
            depth=cfg.get("num_layers", 28),
            hidden_size=heads * head_dim,
            num_heads=heads,
            patch_size=cfg.get("patch_size", 2),
            input_size=sample_size,
            in_channels=in_channels,
            learn_sigma=out_channels == 2 * in_channels,
            caption_channels=cfg.get("caption_channels", 4096),
            max_length=max_length,
            interpolation_scale=float(scale),
            multi_scale=bool(multi_scale),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise PixartError(f"{what}: not a usable PixArtTransformer2DModel config ({exc})") from None


#################################################################################
#                                   Reading                                     #
#################################################################################

_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
SCHEDULER_CONFIG = "scheduler_config.json"  # diffusers' name (SchedulerMixin.config_name)


def detect_format(path: str | Path) -> SourceFormat:
    path = latest_in_run(path)
    if not path.exists():
        raise PixartError(f"{path}: no such file or directory")
    if path.is_dir():
        if is_checkpoint_dir(path):
            return "pixart"
        if (path / "model_index.json").is_file() and (path / "transformer").is_dir():
            return "diffusers-pipeline"
        if (path / "config.json").is_file():
            return "diffusers-transformer"
        raise PixartError(
            f"{path}: unknown checkpoint directory (expected ours with config.yaml, a diffusers transformer with "
            "config.json, or a diffusers pipeline with model_index.json)"
        )
    obj = load_torch_file(path)
    return _classify_pickle(obj, path)


def _classify_pickle(obj: object, path: Path) -> SourceFormat:
    if isinstance(obj, dict):
        if "state_dict" in obj:
            return "official"
        if "ema" in obj and "model" in obj:
            return "dit"
        if any(k.startswith("y_embedder.embedding_table") for k in obj if isinstance(k, str)):
            return "dit"
        if any(k.startswith("y_embedder.y_proj") for k in obj if isinstance(k, str)):
            return "official"
    raise PixartError(f"{path}: unknown checkpoint format (not a PixArt, DiT or diffusers checkpoint)")


def _tensor_dict(obj: object, what: str) -> StateDict:
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PixartError(f"{what}: expected a mapping of names to tensors")
    return dict(obj)


def read_official(path: str | Path, num_heads: int | None = None) -> Checkpoint:
    path = Path(path)
    obj = load_torch_file(path)
    if _classify_pickle(obj, path) != "official":
        raise PixartError(f"{path}: a DiT checkpoint, not a PixArt one (use `pixart init-from-dit`)")
    raw = obj.get("state_dict", obj)
    state_dict = _tensor_dict(raw, f"{path} state_dict")
    config = official_config(state_dict, num_heads, str(path))
    ours = official_to_ours(state_dict, config, f"{path} state_dict")
    ema = None
    if obj.get("state_dict_ema") is not None:
        ema = official_to_ours(_tensor_dict(obj["state_dict_ema"], f"{path} ema"), config, f"{path} state_dict_ema")
    return Checkpoint(config, ours, ema, CheckpointMeta(source=f"official checkpoint {path.name}"))


def _read_diffusers_weights(directory: Path) -> StateDict:
    index = next(directory.glob("diffusion_pytorch_model*.safetensors.index.json"), None)
    if index is not None:
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PixartError(f"{index}: not a safetensors index ({type(exc).__name__})") from None
        state_dict: StateDict = {}
        for shard in shards:
            state_dict.update(read_weights(directory / str(shard)))
        return state_dict
    for name in _DIFFUSERS_WEIGHTS:
        if (directory / name).is_file():
            file = directory / name
            return read_weights(file) if name.endswith(".safetensors") else _tensor_dict(load_torch_file(file), name)
    raise PixartError(f"{directory}: no diffusers weights ({' or '.join(_DIFFUSERS_WEIGHTS)})")


# Caption tokens each diffusers pipeline encodes by default (its __call__'s max_sequence_length).
PIPELINE_MAX_LENGTH = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}


def _pipeline_class(path: Path) -> str | None:
    """``_class_name`` of a pipeline's model_index.json (None: not a pipeline, or unreadable)."""
    try:
        index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return index.get("_class_name") if isinstance(index, dict) else None


def read_diffusers(path: str | Path, max_length: int | None = None) -> Checkpoint:
    """A transformer or pipeline directory; ``max_length`` (which diffusers does not record) defaults to the
    pipeline's own (300 for ``PixArtSigmaPipeline``, else 120)."""
    path = Path(path)
    directory = path / "transformer" if (path / "model_index.json").is_file() else path
    max_length = max_length or PIPELINE_MAX_LENGTH.get(_pipeline_class(path) or "", 120)
    try:
        cfg = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8
        raise PixartError(f"{directory / 'config.json'}: cannot read ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(cfg, dict):
        raise PixartError(f"{directory / 'config.json'}: not a diffusers model config (not a JSON object)")
    if cfg.get("_class_name", "PixArtTransformer2DModel") != "PixArtTransformer2DModel":
        raise PixartError(f"{directory}: a {cfg.get('_class_name')}, not a PixArtTransformer2DModel")
    config = config_from_diffusers(cfg, max_length, str(directory / "config.json"))
    # The scheduler says what the transformer predicts: a pipeline's scheduler/, or the one we write beside a
    # transformer (none: diffusers' default, epsilon).
    scheduler = path / "scheduler" if directory != path else directory
    config = dataclasses.replace(config, prediction_type=_scheduler_prediction_type(scheduler / SCHEDULER_CONFIG))
    ours = diffusers_to_ours(_read_diffusers_weights(directory), config)
    check_state_dict(ours, config, str(directory))
    meta = CheckpointMeta(null_caption="t5-empty", source=f"diffusers {path.name}")
    if directory != path:  # a pipeline also says which text encoder and VAE go with it
        meta = CheckpointMeta(
            text_encoder=str(path / "text_encoder"),
            vae=str(path / "vae"),
            null_caption="t5-empty",
            source=f"diffusers pipeline {path.name}",
        )
    return Checkpoint(config, ours, None, meta)


def _scheduler_prediction_type(path: Path) -> str:
    try:
        prediction_type = json.loads(path.read_text(encoding="utf-8")).get("prediction_type", "epsilon")
    except (OSError, ValueError, AttributeError):  # no scheduler, or not a JSON object: diffusers' default
        return "epsilon"
    if prediction_type not in PREDICTION_TYPES:
        raise PixartError(f"{path}: prediction_type {prediction_type!r} is not supported (expected {PREDICTION_TYPES})")
    return prediction_type


def read_any(
    path: str | Path, num_heads: int | None = None, max_length: int | None = None, fmt: SourceFormat | None = None
) -> Checkpoint:
    """Read a PixArt checkpoint in any supported format (``fmt``, or detected from the files)."""
    path = latest_in_run(path)
    fmt = fmt or detect_format(path)
    if fmt == "pixart":
        ckpt = load_checkpoint(path)
        if not isinstance(ckpt.config, PixArtConfig):
            raise PixartError(f"{path}: a DiT checkpoint, not a PixArt one (use `pixart init-from-dit`)")
        return ckpt
    if fmt == "official":
        return read_official(path, num_heads)
    if fmt == "dit":
        raise PixartError(f"{path}: a DiT checkpoint, not a PixArt one (use `pixart init-from-dit`)")
    return read_diffusers(path, max_length)


#################################################################################
#                                   Writing                                     #
#################################################################################


def _check_records_prediction(checkpoint: Checkpoint, target: str) -> None:
    """Refuse a v-prediction model where ``target`` has no place to say so: it would sample as ε and fail silently."""
    if checkpoint.config.prediction_type != "epsilon":
        raise PixartError(
            f"this model predicts {checkpoint.config.prediction_type}, which {target} cannot record "
            "(it would be sampled as an epsilon model); convert to pixart or to diffusers, whose scheduler "
            "config records it"
        )


def _is_pixel_space(vae: str | None) -> bool:
    return vae is not None and vae.strip().lower() == "none"


def _check_pipeline_has_vae(checkpoint: Checkpoint, vae: str | None) -> None:
    """PixArtAlphaPipeline always decodes with a VAE, so a pixel-space model has no pipeline form (refused before
    anything is loaded: ``--vae none`` is not a hub id)."""
    if _is_pixel_space(vae) or (vae is not None and _is_pixel_space(checkpoint.meta.vae)):
        raise PixartError(
            "a pixel-space model (vae none) cannot be a diffusers PixArtAlphaPipeline, which always decodes "
            "with a VAE; drop --t5/--vae to write the transformer and its scheduler config"
        )


def write_official(checkpoint: Checkpoint, dst: str | Path, overwrite: bool = False) -> Path:
    _check_records_prediction(checkpoint, "the official .pth format")
    kv = checkpoint.config.kv_compress
    if kv is not None and kv.sampling != "conv":  # conv has weights that say so; ave and uniform leave no trace
        logger.warning(
            "%s: %s compression of keys and values has no weights, so the official file does not record it; "
            "state it again where it is loaded (official: kv_compress_config; pixart: model.config.kv_compress "
            "with layers %s)",
            dst,
            kv.sampling,
            list(kv.layers),
        )
    payload = {"state_dict": ours_to_official(checkpoint.state_dict, checkpoint.config)}
    if checkpoint.ema_state_dict is not None:
        payload["state_dict_ema"] = ours_to_official(checkpoint.ema_state_dict, checkpoint.config)
    with atomic_file(dst, overwrite=overwrite) as tmp:
        torch.save(payload, tmp)
    return Path(dst)


def _diffusers_transformer(state_dict: StateDict, config: PixArtConfig):
    from diffusers import PixArtTransformer2DModel  # lazy: diffusers adds ~5 s to start-up (docs/reference.md §8)

    with torch.device("meta"):
        model = PixArtTransformer2DModel(**diffusers_transformer_config(config))
    model.load_state_dict(ours_to_diffusers(state_dict, config), strict=True, assign=True)
    return model


def write_diffusers(
    checkpoint: Checkpoint,
    dst: str | Path,
    *,
    t5: str | None = None,
    vae: str | None = None,
    overwrite: bool = False,
) -> Path:
    """A ``PixArtTransformer2DModel`` directory, or with ``t5`` and ``vae`` a full pipeline (``pipeline_class_for``).

    The transformer alone does not know what it predicts (ε or v); diffusers' schedulers do (``prediction_type``).
    A transformer directory therefore also holds ``scheduler_config.json``, the DPM-Solver config that samples the
    model correctly: ``DPMSolverMultistepScheduler.from_pretrained(dst)`` (or any scheduler ``from_config``).
    """
    _check_pipeline_has_vae(checkpoint, vae)
    if (t5 is None) != (vae is None):
        raise PixartError("a diffusers pipeline needs both --t5 and --vae (or neither, for the transformer only)")
    from diffusers import DPMSolverMultistepScheduler  # lazy: diffusers adds ~5 s to start-up (docs/reference.md §8)

    transformer = _diffusers_transformer(checkpoint.state_dict, checkpoint.config)
    scheduler = DPMSolverMultistepScheduler(
        **{**PIXART_SCHEDULER_CONFIG, "prediction_type": checkpoint.config.prediction_type}
    )
    if t5 is None:
        with atomic_directory(dst, overwrite=overwrite) as tmp:
            transformer.save_pretrained(tmp, safe_serialization=True)
            scheduler.save_config(tmp)
        return Path(dst)
    import diffusers  # lazy: diffusers adds ~5 s to start-up (docs/reference.md §8)

    pipeline_class = getattr(diffusers, pipeline_class_for(checkpoint.config))
    tokenizer, text_encoder = load_t5(t5)
    pipeline = pipeline_class(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=load_vae(vae), transformer=transformer, scheduler=scheduler
    )
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        pipeline.save_pretrained(tmp, safe_serialization=True)
    return Path(dst)


def pipeline_class_for(config: PixArtConfig) -> str:
    """The diffusers pipeline a model is written as: PixArt-Σ's for captions longer than PixArt-α's 120 tokens
    (its default max_sequence_length is 300), PixArt-α's otherwise."""
    return (
        "PixArtSigmaPipeline"
        if config.max_length > PIPELINE_MAX_LENGTH["PixArtAlphaPipeline"]
        else "PixArtAlphaPipeline"
    )


# The training noise schedule (IDDPM: 1000 linear betas 1e-4..0.02) with the public checkpoints' sampler.
PIXART_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "solver_order": 2,
    "algorithm_type": "dpmsolver++",
}


@dataclass
class ConvertReport:
    source_format: SourceFormat
    target: TargetFormat
    destination: Path
    weights: str  # which weights were written
    dropped: dict[str, str] = field(default_factory=dict)
    created: dict[str, str] = field(default_factory=dict)


def convert(
    src: str | Path,
    dst: str | Path,
    to: TargetFormat = "pixart",
    *,
    ema: bool | None = None,
    dtype: torch.dtype | None = None,
    t5: str | None = None,
    vae: str | None = None,
    num_heads: int | None = None,
    max_length: int | None = None,
    overwrite: bool = False,
    transform: Callable[[Checkpoint], Checkpoint] | None = None,
) -> ConvertReport:
    """Convert ``src`` (format detected) to ``to`` at ``dst``.

    ``ema``: None keeps both weight sets where the target can hold both (ours, official) and takes the EMA weights
    for diffusers; True/False write only the EMA / only the raw weights. ``num_heads`` and ``max_length`` fill
    in what a source does not record (heads: official weights of a non-family width; caption length: diffusers).
    ``transform`` changes the checkpoint after reading (e.g. merging adapters into it).
    """
    fmt = detect_format(src)
    if Path(dst).resolve() == Path(src).resolve() or Path(dst).resolve() == Path(latest_in_run(src)).resolve():
        # Writing over the source would replace it with what the target format keeps, and drop the rest (a
        # training checkpoint's optimiser state and recipe, a run's other checkpoints).
        raise PixartError(f"-o {dst}: that is the checkpoint being converted; write the conversion elsewhere")
    checkpoint = read_any(src, num_heads, max_length)
    if transform is not None:
        checkpoint = transform(checkpoint)
    if dtype is not None:
        checkpoint = checkpoint.to_dtype(dtype)
    report = ConvertReport(fmt, to, Path(dst), weights="model")
    if fmt == "official":
        report.dropped.update(OFFICIAL_DROPPED)
    if fmt.startswith("diffusers"):
        report.created.update(DIFFUSERS_CREATED)
    if ema is not None or to == "diffusers":
        weights = checkpoint.weights(ema)
        report.weights = "EMA" if weights is checkpoint.ema_state_dict else "model"
        checkpoint = Checkpoint(checkpoint.config, weights, None, checkpoint.meta)
    elif checkpoint.ema_state_dict is not None:
        report.weights = "model and EMA"
    if to == "pixart":
        if t5 or vae:
            checkpoint.meta = dataclasses.replace(
                checkpoint.meta, text_encoder=t5 or checkpoint.meta.text_encoder, vae=vae or checkpoint.meta.vae
            )
        save_checkpoint(checkpoint, dst, overwrite=overwrite)
    elif to == "official":
        write_official(checkpoint, dst, overwrite=overwrite)
    elif to == "diffusers":
        report.dropped.update(DIFFUSERS_DROPPED)
        write_diffusers(checkpoint, dst, t5=t5, vae=vae, overwrite=overwrite)
    else:
        raise PixartError(f"unknown target format {to!r} (expected pixart, official or diffusers)")
    return report
