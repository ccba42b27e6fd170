"""The adapter directory: a small, self-describing record of an adapter and the base it belongs to.

    my-adapter/
      adapter.yaml              format, the adapter's settings, the base's model config, and the base: where it
                                was read (path) and what it is (sha256 of its weights, so a copy in another
                                format or precision still matches and a different model never does)
      adapter.safetensors       the adapter's weights (peft's layout: blocks.0.attn.qkv.lora_A.weight, ...)
      adapter_ema.safetensors   their EMA, when trained here

Applying an adapter to a base whose weights hash differently is an error naming both. Writing is atomic.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

import pixart_cli
from pixart_cli.adapters.lora import (
    adapter_state_dict,
    add_adapter,
    check_adapter_weights,
    load_adapter_weights,
    merged_state_dict,
    scale_adapter,
    weights_hash,
)
from pixart_cli.adapters.settings import AdapterSection
from pixart_cli.checkpoints.format import (
    ADAPTER_EMA_FILE,
    ADAPTER_FILE,
    Checkpoint,
    StateDict,
    build_model,
    latest_in_run,
    read_weights,
    write_weight_files,
)
from pixart_cli.config import ConfigError, from_dict, read_yaml_mapping, to_dict
from pixart_cli.errors import PixartError
from pixart_cli.io import atomic_directory
from pixart_cli.models import PixArtConfig

ADAPTER_FORMAT = "pixart-adapter"
ADAPTER_FORMAT_VERSION = 1
ADAPTER_CONFIG = "adapter.yaml"


@dataclass(frozen=True)
class BaseReference:
    """The model an adapter was trained on."""

    path: str  # as the recipe named it (a checkpoint directory or file, a hub id, builtin:NAME)
    sha256: str  # weights_hash of the weights trained on
    weights: Literal["model", "ema"] = "ema"  # which of the base's weight sets that was


@dataclass(frozen=True)
class _AdapterFile:
    format: str
    format_version: int
    adapter: AdapterSection
    base: BaseReference
    model: dict  # the base's PixArtConfig
    source: str | None = None
    pixart_version: str | None = None


@dataclass
class Adapter:
    settings: AdapterSection
    base: BaseReference
    config: PixArtConfig  # the base model's shape
    state_dict: StateDict
    ema_state_dict: StateDict | None = None
    source: str | None = None  # provenance, e.g. "lora-shapes step 300"

    def weights(self, ema: bool | None = None) -> StateDict:
        """The EMA weights when present (or asked for), else the trained ones."""
        if ema is True and self.ema_state_dict is None:
            raise PixartError("this adapter has no EMA weights")
        use_ema = self.ema_state_dict is not None if ema is None else ema
        return self.ema_state_dict if use_ema else self.state_dict


def is_adapter_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and (path / ADAPTER_FILE).is_file()


def expected_adapter_weights(settings: AdapterSection, config: PixArtConfig) -> StateDict:
    """The adapter's keys and shapes, from a model built on the meta device (no memory)."""
    with torch.device("meta"):
        model = build_model(config)
        add_adapter(model, settings)
        return adapter_state_dict(model)


def write_adapter_files(adapter: Adapter, directory: Path) -> None:
    """Write ``adapter`` into an existing (temporary) directory; see :func:`save_adapter`."""
    record = {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_FORMAT_VERSION,
        "adapter": to_dict(adapter.settings),
        "base": to_dict(adapter.base),
        "model": to_dict(adapter.config),
        "source": adapter.source,
        "pixart_version": pixart_cli.__version__,
    }
    weights = {ADAPTER_FILE: adapter.state_dict, ADAPTER_EMA_FILE: adapter.ema_state_dict}
    write_weight_files(directory, weights, ADAPTER_CONFIG, record, dtype=torch.float32)


def save_adapter(adapter: Adapter, directory: str | Path, overwrite: bool = False) -> Path:
    directory = Path(directory)
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        write_adapter_files(adapter, tmp)
    return directory


def read_adapter_config(directory: Path) -> _AdapterFile:
    path = directory / ADAPTER_CONFIG
    raw = read_yaml_mapping(path, "adapter description")
    try:
        record = from_dict(_AdapterFile, raw)
        if record.format != ADAPTER_FORMAT:
            raise ConfigError(f"format: expected {ADAPTER_FORMAT!r}, got {record.format!r}")
        if record.format_version > ADAPTER_FORMAT_VERSION:
            raise ConfigError(f"format_version: {record.format_version} is newer than this pixart understands")
        from_dict(PixArtConfig, record.model, "model")
    except ConfigError as exc:
        raise PixartError(f"{path}: {exc}") from None
    return record


def load_adapter(path: str | Path) -> Adapter:
    """Read and strictly check an adapter directory (or a training run: its latest checkpoint)."""
    directory = latest_in_run(path)
    if not directory.is_dir() or not is_adapter_dir(directory):
        raise PixartError(f"{path}: not an adapter directory (needs {ADAPTER_CONFIG} and {ADAPTER_FILE})")
    record = read_adapter_config(directory)
    config = from_dict(PixArtConfig, record.model, "model")
    try:
        expected = expected_adapter_weights(record.adapter, config)
    except PixartError as exc:
        raise PixartError(f"{directory / ADAPTER_CONFIG}: {exc}") from None
    weights = read_weights(directory / ADAPTER_FILE)
    check_adapter_weights(expected, weights, str(directory / ADAPTER_FILE))
    ema = None
    if (directory / ADAPTER_EMA_FILE).is_file():
        ema = read_weights(directory / ADAPTER_EMA_FILE)
        check_adapter_weights(expected, ema, str(directory / ADAPTER_EMA_FILE))
    return Adapter(record.adapter, record.base, config, weights, ema, record.source)


def parse_adapter_arg(text: str) -> tuple[str, float]:
    """``DIR`` or ``DIR:SCALE`` (scale 1 by default; a path that exists as written is a path)."""
    head, sep, tail = text.rpartition(":")
    if not sep or not head or Path(text).exists():
        return text, 1.0
    try:
        scale = float(tail)
    except ValueError:
        return text, 1.0
    if not math.isfinite(scale):
        raise PixartError(f"{text}: the scale after ':' must be a finite number")
    return head, scale


def adapter_base(path: str | Path) -> str:
    """Where the base of the adapter at ``path`` was read when it trained (the model ``--lora`` applies to by
    default)."""
    directory = latest_in_run(path)
    if not is_adapter_dir(directory):
        raise PixartError(f"{path}: not an adapter directory (needs {ADAPTER_CONFIG} and {ADAPTER_FILE})")
    return read_adapter_config(directory).base.path


def _short(digest: str) -> str:
    return digest[:12]


def _base_weights(checkpoint: Checkpoint, adapters: Sequence[tuple[str, Adapter]], base_name: str) -> StateDict:
    """The base's weight set (EMA or raw) every adapter was trained on, found by content hash."""
    sets = {k: v for k, v in (("ema", checkpoint.ema_state_dict), ("model", checkpoint.state_dict)) if v is not None}
    hashes: dict[str, str] = {}

    def hash_of(which: str) -> str:
        if which not in hashes:
            hashes[which] = weights_hash(sets[which])
        return hashes[which]

    chosen: str | None = None
    for name, adapter in adapters:
        if dataclasses.replace(adapter.config, variant=None) != dataclasses.replace(checkpoint.config, variant=None):
            raise PixartError(f"{name}: an adapter for another model shape than {base_name}'s")
        # The set it names first (cheap when right), then the other one.
        order = sorted(sets, key=lambda which: which != adapter.base.weights)
        match = next((which for which in order if hash_of(which) == adapter.base.sha256), None)
        if match is None:
            found = ", ".join(f"{hash_of(which)[:12]} ({which} weights)" for which in order)
            raise PixartError(
                f"{name}: trained on {adapter.base.path} (weights sha256 {adapter.base.sha256[:12]}), not on "
                f"{base_name} (sha256 {found}); apply it to the base it was trained on"
            )
        if chosen is not None and hash_of(match) != hash_of(chosen):
            raise PixartError(f"{name}: trained on the base's other weight set than the adapters before it")
        chosen = match
    assert chosen is not None
    return sets[chosen]


def apply_adapters(
    checkpoint: Checkpoint, adapters: Sequence[tuple[str, float]], base_name: str, *, ema: bool | None = None
) -> Checkpoint:
    """``checkpoint`` with the adapters (directory, scale) merged into its weights: a plain checkpoint that samples
    and converts like any other. Each adapter's EMA weights are used when it has them (``ema``: as
    :meth:`Adapter.weights`); scales multiply each adapter's update (0: that adapter changes nothing, for LoRA)."""
    if not isinstance(checkpoint.config, PixArtConfig):
        raise PixartError(f"{base_name}: adapters apply to PixArt models")
    loaded = [(str(path), load_adapter(path), scale) for path, scale in adapters]
    base = _base_weights(checkpoint, [(n, a) for n, a, _ in loaded], base_name)
    with torch.device("meta"):
        model = build_model(checkpoint.config)
    # Copies: the merge writes into the model's weights, and the checkpoint must stay the base.
    model.load_state_dict({k: v.to(torch.float32, copy=True) for k, v in base.items()}, strict=True, assign=True)
    names = []
    for i, (path, adapter, scale) in enumerate(loaded):
        name = f"adapter{i}"
        add_adapter(model, adapter.settings, name)
        load_adapter_weights(model, adapter.weights(ema), name, what=path)
        scale_adapter(model, name, scale)
        names.append(name)
    dtype = next(iter(base.values())).dtype  # the base's precision, as it was stored
    merged = {k: v.to(dtype) if v.is_floating_point() else v for k, v in merged_state_dict(model, names).items()}
    described = " + ".join(f"{path}:{scale:g}" for path, _, scale in loaded)
    meta = dataclasses.replace(checkpoint.meta, source=f"{base_name} with adapters {described}")
    return Checkpoint(checkpoint.config, merged, None, meta)
