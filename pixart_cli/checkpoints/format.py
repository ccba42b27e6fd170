"""Our checkpoint directory: safetensors weights beside a YAML config that says what they are.

    my-model/
      config.yaml          format, architecture, model shape, text encoder / VAE references, provenance
      model.safetensors    the trained weights (official PixArt / DiT key names)
      ema.safetensors      EMA weights, when there are any

Loading is strict: every key the architecture expects must be present with the right shape, and nothing else.
Writing is atomic (a hidden temporary directory renamed into place), so a killed write leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import pixart_cli
from pixart_cli.checkpoints.sharded import is_sharded_dir, read_sharded_weights
from pixart_cli.components.resolve import resolve_builtin
from pixart_cli.config import ConfigError, from_dict, to_dict
from pixart_cli.errors import PixartError
from pixart_cli.io import atomic_directory
from pixart_cli.models import DiT, DiTConfig, PixArtConfig, build_pixart

FORMAT = "pixart-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
CHECKPOINTS = "checkpoints"  # a training run's checkpoints: <run>/checkpoints/step-NNNNNNN/
STATE_FILE = "training_state.pt"  # in training checkpoints: optimiser and LR schedule state (tensors only)
POSITION_FILE = "position.json"  # in training checkpoints: step and data position (small, read to find the latest)
# An adapter's weights and their EMA (pixart_cli.adapters.format): an adapter run's checkpoints hold these instead of
# the model's.
ADAPTER_FILE = "adapter.safetensors"
ADAPTER_EMA_FILE = "adapter_ema.safetensors"

logger = logging.getLogger(__name__)

Architecture = Literal["PixArt", "DiT"]
# Known ways of rewording prompts into the form a model's training captions took (pixart_cli.shapesworld.demo).
PromptCompletionName = Literal["shapesworld"]
StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class CheckpointMeta:
    """What, besides the weights, a user needs to run the model."""

    text_encoder: str | None = None  # T5 directory or hub id (PixArt only)
    vae: str | None = None  # AutoencoderKL directory or hub id, or "none" for a pixel-space model
    # Unconditional caption for CFG: the stored null-caption embedding (official weights, our training) or T5("")
    # (weights that came from diffusers, which keeps no null caption).
    null_caption: Literal["embedding", "t5-empty"] = "embedding"
    source: str | None = None  # provenance, e.g. "converted from PixArt-XL-2-512x512.pth"
    # How prompts are completed before encoding, by default: "shapesworld" for a model trained on ShapesWorld
    # captions, which always name sizes and background. A property of the training data, so it is recorded here
    # rather than guessed from the text encoder. Absent (older checkpoints) or None: prompts are encoded as given.
    prompt_completion: PromptCompletionName | None = None


@dataclass(frozen=True)
class _ConfigFile:
    format: str
    format_version: int
    architecture: Architecture
    model: dict
    meta: CheckpointMeta = field(default_factory=CheckpointMeta)
    pixart_version: str | None = None


@dataclass
class Checkpoint:
    """Weights plus the config that builds the model they belong to."""

    config: PixArtConfig | DiTConfig
    state_dict: StateDict
    ema_state_dict: StateDict | None = None
    meta: CheckpointMeta = field(default_factory=CheckpointMeta)

    @property
    def architecture(self) -> Architecture:
        return "DiT" if isinstance(self.config, DiTConfig) else "PixArt"

    def weights(self, ema: bool | None = None) -> StateDict:
        """EMA weights when asked (``ema=True``) or by default when present; else the raw weights."""
        if ema is True and self.ema_state_dict is None:
            raise PixartError("this checkpoint has no EMA weights (use --no-ema)")
        use_ema = self.ema_state_dict is not None if ema is None else ema
        return self.ema_state_dict if use_ema else self.state_dict

    def to_dtype(self, dtype: torch.dtype) -> Checkpoint:
        def cast(sd: StateDict | None) -> StateDict | None:
            if sd is None:
                return None
            return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}

        return dataclasses.replace(self, state_dict=cast(self.state_dict), ema_state_dict=cast(self.ema_state_dict))


def build_model(config: PixArtConfig | DiTConfig) -> nn.Module:
    return DiT(config) if isinstance(config, DiTConfig) else build_pixart(config)


def expected_shapes(config: PixArtConfig | DiTConfig) -> dict[str, torch.Size]:
    """Every state-dict key the architecture has, with its shape (built on the meta device: no memory)."""
    with torch.device("meta"):
        return {k: v.shape for k, v in build_model(config).state_dict().items()}


def check_state_dict(state_dict: StateDict, config: PixArtConfig | DiTConfig, what: str) -> None:
    """Raise a PixartError naming missing, unexpected, wrongly shaped and non-floating-point keys.

    Every weight of both architectures is real floating point (any precision); integer, boolean or complex tensors
    would fail deep inside ``load_state_dict`` or silently lose their imaginary part.
    """
    expected = expected_shapes(config)
    problems = []
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} (expected {tuple(s)})"
        for k, s in expected.items()
        if k in state_dict and state_dict[k].shape != s
    ]
    dtypes = [
        f"{k} {str(state_dict[k].dtype).removeprefix('torch.')}"
        for k in expected
        if k in state_dict and not state_dict[k].is_floating_point()
    ]
    for label, keys in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("wrong shapes", wrong),
        ("not floating point", dtypes),
    ):
        if keys:
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise PixartError(f"{what}: does not match the model config ({'; '.join(problems)})")


def _meta_dict(meta: CheckpointMeta) -> dict:
    """``meta`` for config.yaml; no ``prompt_completion: null``, so that a checkpoint without one stays as it was
    (readable by versions that predate the key)."""
    data = to_dict(meta)
    if data["prompt_completion"] is None:
        del data["prompt_completion"]
    return data


def write_checkpoint_files(checkpoint: Checkpoint, directory: Path) -> None:
    """Write config and weights into an existing (temporary) directory; see :func:`save_checkpoint`."""
    check_state_dict(checkpoint.state_dict, checkpoint.config, "model weights")
    if checkpoint.ema_state_dict is not None:
        check_state_dict(checkpoint.ema_state_dict, checkpoint.config, "EMA weights")
    weights = {MODEL_FILE: checkpoint.state_dict, EMA_FILE: checkpoint.ema_state_dict}
    write_weight_files(directory, weights, CONFIG_FILE, config_file(checkpoint.config, checkpoint.meta))


def config_file(config: PixArtConfig | DiTConfig, meta: CheckpointMeta) -> dict:
    """The contents of ``config.yaml``: what the weights beside it are."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": "DiT" if isinstance(config, DiTConfig) else "PixArt",
        "model": to_dict(config),
        "meta": _meta_dict(meta),
        "pixart_version": pixart_cli.__version__,
    }


def write_weight_files(
    directory: Path,
    weights: dict[str, StateDict | None],
    config_name: str,
    config: dict,
    dtype: torch.dtype | None = None,
) -> None:
    """Safetensors files (those not None; cast to ``dtype`` when given) and the YAML file that describes them."""
    for name, sd in weights.items():
        if sd is not None:
            tensors = {
                k: (v.detach() if dtype is None else v.detach().to(dtype)).contiguous().cpu() for k, v in sd.items()
            }
            save_file(tensors, str(directory / name), metadata={"format": "pt"})
    (directory / config_name).write_text(yaml.safe_dump(config, sort_keys=False))


def save_checkpoint(checkpoint: Checkpoint, directory: str | Path, overwrite: bool = False) -> Path:
    """Write ``checkpoint`` as a self-describing directory, atomically."""
    directory = Path(directory)
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        write_checkpoint_files(checkpoint, tmp)
    return directory


def is_checkpoint_dir(path: str | Path) -> bool:
    """Ours: config.yaml with model.safetensors, or with the shards of an FSDP run (``checkpoints.sharded``)."""
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and ((path / MODEL_FILE).is_file() or is_sharded_dir(path))


def read_config(directory: str | Path) -> tuple[PixArtConfig | DiTConfig, CheckpointMeta]:
    """Validate ``config.yaml`` of a checkpoint directory into typed objects."""
    path = Path(directory) / CONFIG_FILE
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PixartError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise PixartError(f"{path}: not a text file") from None
    except yaml.YAMLError as exc:
        raise PixartError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    try:
        cfg = from_dict(_ConfigFile, raw or {})
        if cfg.format != FORMAT:
            raise ConfigError(f"format: expected {FORMAT!r}, got {cfg.format!r}")
        if cfg.format_version > FORMAT_VERSION:
            raise ConfigError(f"format_version: {cfg.format_version} is newer than this pixart understands")
        model_cls = DiTConfig if cfg.architecture == "DiT" else PixArtConfig
        model = from_dict(model_cls, cfg.model, "model")
    except ConfigError as exc:
        raise PixartError(f"{path}: {exc}") from None
    return model, cfg.meta


def read_weights(path: Path) -> StateDict:
    """A safetensors file as a state dict; a PixartError (not safetensors' own) for a damaged or foreign file."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise PixartError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0][:200]})") from None


def load_checkpoint(directory: str | Path) -> Checkpoint:
    """Read and strictly validate a checkpoint directory or ``builtin:NAME`` (weights stay on the CPU)."""
    directory = Path(resolve_builtin(str(directory)))
    if not directory.is_dir():
        raise PixartError(f"{directory}: no such checkpoint directory")
    if not is_checkpoint_dir(directory):
        raise PixartError(f"{directory}: not a pixart checkpoint (needs {CONFIG_FILE} and {MODEL_FILE})")
    config, meta = read_config(directory)
    if is_sharded_dir(directory):  # an FSDP run's checkpoint: its shards, put together
        state_dict, averaged = read_sharded_weights(directory)
        ema = {**state_dict, **averaged}  # the EMA of the trained weights; buffers are the model's
        check_state_dict(state_dict, config, f"{directory} (model shards)")
        check_state_dict(ema, config, f"{directory} (EMA shards)")
        return Checkpoint(config, state_dict, ema, meta)
    state_dict = read_weights(directory / MODEL_FILE)
    check_state_dict(state_dict, config, str(directory / MODEL_FILE))
    ema = None
    if (directory / EMA_FILE).is_file():
        ema = read_weights(directory / EMA_FILE)
        check_state_dict(ema, config, str(directory / EMA_FILE))
    return Checkpoint(config, state_dict, ema, meta)


def instantiate(
    checkpoint: Checkpoint,
    ema: bool | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Build the model and load the chosen weights strictly (no random init is ever left in place)."""
    with torch.device("meta"):
        model = build_model(checkpoint.config)
    weights = checkpoint.weights(ema)
    model.load_state_dict(weights, strict=True, assign=True)
    model.to(device=device, dtype=dtype)
    return model.eval()


def checkpoint_dirs(output: str | Path) -> list[tuple[int, Path]]:
    """Complete training checkpoints under ``output`` as (step, path), oldest first (step read from the files)."""
    root = Path(output) / CHECKPOINTS
    found = []
    for path in root.glob("step-*") if root.is_dir() else []:
        position = path / POSITION_FILE
        weights = (path / MODEL_FILE).is_file() or (path / ADAPTER_FILE).is_file() or is_sharded_dir(path)
        if path.is_dir() and position.is_file() and (path / STATE_FILE).is_file() and weights:
            try:
                found.append((int(json.loads(position.read_text())["step"]), path))
            except (OSError, KeyError, TypeError, ValueError):
                logger.warning("ignoring unreadable checkpoint %s", path)
    return sorted(found)


def latest_in_run(path: str | Path) -> Path:
    """A training run's output directory stands for its latest checkpoint, ``builtin:NAME`` for the shipped asset,
    any other path for itself."""
    path = resolve_builtin(str(path))
    found = checkpoint_dirs(path) if (Path(path) / CHECKPOINTS).is_dir() else []
    return found[-1][1] if found else Path(path)
