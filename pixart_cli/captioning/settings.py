"""What a captioning run is: the vision-language model, the prompt, the field written and the generation settings.

One frozen ``CaptionSettings``, validated once and recorded as-is beside the captions, so that a rerun with other
settings is refused instead of mixing captions of two kinds in one file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pixart_cli.config import ConfigError, from_dict, read_yaml_mapping
from pixart_cli.errors import PixartError

# PixArt-α §3.3: LLaVA auto-labels SA-1B with this prompt (arXiv 2310.00426).
PAPER_PROMPT = "Describe this image and its style in a very detailed manner"
DEFAULT_FIELD = "caption_vlm"
# Keys a manifest line already uses: a generated caption written under one of them would replace the source's own.
RESERVED_FIELDS = frozenset({"key", "path", "caption", "label", "width", "height"})
MAX_NEW_TOKENS = 4096

CaptionDType = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class CaptionSettings:
    """Greedy decoding (deterministic) with at most ``max_new_tokens`` per caption, ``batch_size`` images per call."""

    model: str
    prompt: str = PAPER_PROMPT
    field: str = DEFAULT_FIELD
    batch_size: int = 8
    max_new_tokens: int = 300
    dtype: CaptionDType = "auto"  # bf16 on a GPU that has it, else fp32
    shard_size: int = 256  # images per unit of work: processes take whole shards; a shard is resumed as a whole

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise PixartError("--prompt must not be empty")
        if not self.field or not self.field.isidentifier():
            raise PixartError(f"--field must be a name made of letters, digits and _, got {self.field!r}")
        if self.field in RESERVED_FIELDS:
            raise PixartError(
                f"--field {self.field!r} is a key of the manifest itself (the source's own caption is kept under "
                f"'caption'); choose another name, e.g. {DEFAULT_FIELD!r}"
            )
        if self.batch_size <= 0:
            raise PixartError(f"--batch-size must be positive, got {self.batch_size}")
        if not 0 < self.max_new_tokens <= MAX_NEW_TOKENS:
            raise PixartError(f"--max-new-tokens must be in [1, {MAX_NEW_TOKENS}], got {self.max_new_tokens}")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise PixartError(f"--dtype must be auto, fp32, bf16 or fp16, got {self.dtype!r}")
        if self.shard_size <= 0:
            raise PixartError(f"--shard-size must be positive, got {self.shard_size}")

    def record(self) -> dict[str, Any]:
        """What decides the captions' text (the batch size does not: each image is decoded as if alone)."""
        data = dataclasses.asdict(self)
        del data["batch_size"]
        return {**data, "decoding": "greedy"}


def load_caption_settings(config: str | Path | None, given: Mapping[str, Any]) -> CaptionSettings:
    """Settings from a YAML file of ``CaptionSettings`` keys (e.g. ``recipes/caption/sam-llava.yaml``), with ``given``
    (command-line options; None: not given) over it. Errors name the key."""
    data = read_yaml_mapping(config, "captioning settings") if config is not None else {}
    data = {**data, **{key: value for key, value in given.items() if value is not None}}
    if "model" not in data:
        raise PixartError("no vision-language model: give --model (or `model:` in the --config file)")
    try:
        return from_dict(CaptionSettings, data)
    except ConfigError as exc:
        raise PixartError(f"{config}: {exc}" if config is not None else str(exc)) from None
