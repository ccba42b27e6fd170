"""Loading the frozen T5 text encoder (+ tokenizer) from a local directory or a hub id."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pixart_cli.components.resolve import locate, offline_hint
from pixart_cli.errors import PixartError


def load_t5(name: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"):
    """(tokenizer, encoder) from a directory holding both (e.g. ``t5-v1_1-xxl``) or a hub id."""
    from transformers import (  # lazy: transformers adds ~4 s to start-up (docs/reference.md §8)
        AutoTokenizer,
        T5EncoderModel,
    )

    path, local_only = locate(name, "T5")
    sub = Path(path) / "tokenizer" if (Path(path) / "tokenizer").is_dir() else None
    if sub is None and Path(path).name == "text_encoder" and (Path(path).parent / "tokenizer").is_dir():
        sub = Path(path).parent / "tokenizer"  # a diffusers pipeline's text_encoder/: tokenizer is its sibling
    enc = Path(path) / "text_encoder" if (Path(path) / "text_encoder").is_dir() else None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(sub or path), local_files_only=local_only)
        encoder = T5EncoderModel.from_pretrained(str(enc or path), torch_dtype=dtype, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        if os.path.isdir(path):
            raise PixartError(f"{name}: not a T5 directory ({str(exc).splitlines()[0][:200]})") from None
        raise PixartError(offline_hint(name, "T5 text encoder")) from None
    return tokenizer, encoder.to(device).eval().requires_grad_(False)
