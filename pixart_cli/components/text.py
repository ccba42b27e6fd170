"""The caption side: light caption cleaning and the T5 encoder that turns prompts into (features, mask).

Captions are padded to the model's caption length (120 tokens for PixArt-α) and the attention mask is kept, as in
training. The encoder loads on first use and can be released (``release``) to free its memory before the
transformer runs; it then reloads from its source if asked to encode again.
"""

from __future__ import annotations

import gc
import html
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pixart_cli.components.t5 import T5Quantization, load_t5

logger = logging.getLogger(__name__)

_URL = re.compile(r"\b(?:https?://|www\.)\S+", re.IGNORECASE)
_SPACES = re.compile(r"\s+")


def clean_caption(text: str) -> str:
    """Light cleaning: unescape HTML entities, drop URLs, collapse whitespace, lower-case.

    The official pipeline's cleaner (ftfy, BeautifulSoup and ~30 regexes aimed at scraped alt-texts) is heavier;
    this keeps the parts that matter for typed prompts. Lower-casing matches both official and diffusers paths.
    """
    text = _URL.sub("", html.unescape(text))
    return _SPACES.sub(" ", text).strip().lower()


def minimal_clean(text: str) -> str:
    """What diffusers' ``PixArtAlphaPipeline`` does with ``clean_caption=False``: lower-case and strip."""
    return text.lower().strip()


def trim_padding(embeddings: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the trailing token columns (B, L, …) that no row of ``mask`` (B, L) attends to.

    Attention gives masked keys zero weight, so the model's output is unchanged (up to the order of float
    additions), while cross-attention and its key/value projections shrink from the padded length (120 for T5
    in PixArt-α) to the longest real caption of the batch: prompts are usually a fraction of it. A row with no
    real token is left alone: the model then attends to all of its tokens, so its length matters.
    """
    real = mask.bool()
    if mask.ndim != 2 or not bool(real.any(dim=1).all()):
        return embeddings, mask
    length = int(real.any(dim=0).nonzero().max()) + 1
    if length == mask.shape[1]:
        return embeddings, mask
    return embeddings[:, :length], mask[:, :length]


@dataclass
class Captions:
    """Encoded captions: T5 features (B, L, C) and the attention mask (B, L), 1 on real tokens."""

    embeddings: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def __getitem__(self, index: int | slice | list[int] | torch.Tensor) -> Captions:
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Captions(self.embeddings[index], self.mask[index])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Captions:
        return Captions(self.embeddings.to(device=device, dtype=dtype), self.mask.to(device))

    @staticmethod
    def cat(parts: list[Captions]) -> Captions:
        return Captions(torch.cat([p.embeddings for p in parts]), torch.cat([p.mask for p in parts]))

    def trimmed(self) -> Captions:
        """The same captions without the padding columns every row masks out (``trim_padding``)."""
        return Captions(*trim_padding(self.embeddings, self.mask))


class TextEncoder:
    """A T5 encoder and its tokenizer, from a directory or hub id (``source``) or given directly.

    Args:
        source: T5 directory or hub id (``load_t5``), or a function returning (tokenizer, encoder); None when
            ``tokenizer`` and ``encoder`` are given (such an encoder cannot be released).
        max_length: caption tokens; prompts are padded and truncated to it (the model config's ``max_length``).
        dtype: encoder dtype (default: as stored). T5 v1.1 is known to overflow in fp16; prefer bf16 or fp32.
        device: where the encoder runs.
        clean: apply ``clean_caption``; False applies only lower-case + strip (what diffusers does without
            ``clean_caption``), e.g. for exact comparisons with diffusers.
        quantize: "int8" or "nf4": load the encoder's linear layers quantised (``load_t5``); "none": as stored.
    """

    def __init__(
        self,
        source: str | Callable[[], tuple[Any, torch.nn.Module]] | None = None,
        *,
        tokenizer=None,
        encoder: torch.nn.Module | None = None,
        max_length: int = 120,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        clean: bool = True,
        quantize: T5Quantization = "none",
    ) -> None:
        if source is None and (tokenizer is None or encoder is None):
            raise ValueError("TextEncoder needs a source, or both a tokenizer and an encoder")
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.source = source
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.max_length = max_length
        self.dtype = dtype
        self.device = torch.device(device)
        self.clean = clean
        self.quantize = quantize
        if encoder is not None:
            self.encoder = encoder.to(device=self.device, dtype=dtype).eval().requires_grad_(False)

    def load(self) -> TextEncoder:
        """Load the tokenizer and encoder if they are not in memory (no-op otherwise)."""
        if self.encoder is None or self.tokenizer is None:
            if callable(self.source):
                self.tokenizer, encoder = self.source()
                self.encoder = encoder.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
            else:
                logger.debug("loading text encoder %s", self.source)
                self.tokenizer, self.encoder = load_t5(
                    self.source, dtype=self.dtype, device=self.device, quantize=self.quantize
                )
        return self

    @property
    def loaded(self) -> bool:
        return self.encoder is not None

    def to(self, device: torch.device | str) -> TextEncoder:
        """Run on ``device`` from now on (moves the encoder if it is loaded)."""
        self.device = torch.device(device)
        if self.encoder is not None:
            self.encoder.to(self.device)
        return self

    def release(self) -> None:
        """Free the encoder's memory (it reloads from ``source`` when needed again)."""
        if self.source is None:
            raise ValueError("a TextEncoder built from in-memory modules cannot be reloaded once released")
        self.encoder = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask (B, max_length), warning about prompts that had to be truncated."""
        self.load()
        prep = clean_caption if self.clean else minimal_clean
        texts = [prep(p) for p in prompts]
        tokens = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        for text in texts:
            n = len(self.tokenizer(text, add_special_tokens=True).input_ids)
            if n > self.max_length:
                logger.warning("prompt truncated to %d tokens (it has %d): %r", self.max_length, n, _shorten(text))
        return tokens.input_ids, tokens.attention_mask

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Captions:
        """T5 features of ``prompts`` (B, max_length, d_model) with their mask, on ``device``."""
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return Captions(out, mask)


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
