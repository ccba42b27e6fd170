"""PixArt-Σ (arXiv 2403.04692): key/value token compression in self-attention.

Everything else PixArt-Σ changes is configuration of the PixArt-α transformer (``pixart.py``): captions of up to
300 T5 tokens (``max_length``), the SDXL autoencoder (its own scaling factor, read from the VAE), positional
embeddings interpolated for 2K/4K (``interpolation_scale``), and no size/aspect-ratio conditioning in its
multi-aspect models (``multi_scale: false``). This module adds the one new layer.

Official code (PixArt-alpha/PixArt-sigma, ``diffusion/model/nets/PixArt_blocks.py``, ``AttentionKVCompress``):
in the layers ``kv_compress_layer`` (14–27 of 28 in the released 1024/2K configs) keys and values are reduced by
``scale_factor`` along each side of the patch grid before attention; queries keep every token. Sampling:

* ``conv``: a depthwise ``Conv2d`` with kernel = stride = factor (``attn.sr``), initialised to the average of each
  window, then an affine LayerNorm (``attn.norm``, eps 1e-5). The only method with weights.
* ``ave``: ``F.interpolate(..., scale_factor=1/factor, mode="nearest")`` — despite its name, one token per window.
* ``uniform``: every factor-th row and column (``[::f, ::f]``).

diffusers' ``PixArtTransformer2DModel`` has no KV compression.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pixart_cli.models.layers import SelfAttention, attention

KVSampling = Literal["conv", "ave", "uniform"]
KV_SAMPLINGS: tuple[str, ...] = typing.get_args(KVSampling)

# The released PixArt-Σ 1024/2K KV-compression configs: the second half of the 28 layers, factor 2, conv.
SIGMA_KV_LAYERS: tuple[int, ...] = tuple(range(14, 28))


@dataclass(frozen=True)
class KVCompress:
    """Which self-attention layers compress their keys and values, how, and by how much per side."""

    layers: tuple[int, ...] = SIGMA_KV_LAYERS
    sampling: KVSampling = "conv"
    scale_factor: int = 2

    def __post_init__(self) -> None:
        if self.sampling not in KV_SAMPLINGS:
            raise ValueError(f"sampling: must be one of {KV_SAMPLINGS}, got {self.sampling!r}")
        if self.scale_factor < 2:
            raise ValueError(f"scale_factor: must be 2 or more (1 compresses nothing), got {self.scale_factor}")
        if not self.layers:
            raise ValueError("layers: name at least one layer (or leave kv_compress out)")
        if min(self.layers) < 0 or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers: must be distinct layer indices from 0, got {list(self.layers)}")
        object.__setattr__(self, "layers", tuple(sorted(self.layers)))  # one config for one model, in any order

    def check_depth(self, depth: int) -> None:
        if max(self.layers) >= depth:
            raise ValueError(f"kv_compress.layers: layer {max(self.layers)} does not exist in a {depth}-layer model")


class KVCompressAttention(SelfAttention):
    """Self-attention whose keys and values are reduced on the patch grid (``SelfAttention``'s keys, plus
    ``sr``/``norm`` for conv sampling)."""

    def __init__(self, hidden_size: int, num_heads: int, sampling: KVSampling, scale_factor: int) -> None:
        super().__init__(hidden_size, num_heads)
        self.sampling, self.scale_factor = sampling, scale_factor
        if sampling == "conv":
            f = scale_factor
            self.sr = nn.Conv2d(hidden_size, hidden_size, kernel_size=f, stride=f, groups=hidden_size)
            self.norm = nn.LayerNorm(hidden_size)
            self.reset_compression()

    def reset_compression(self) -> None:
        """The official start: each window averaged; the norm's weight one, its bias zero."""
        if self.sampling == "conv":
            nn.init.constant_(self.sr.weight, 1 / self.scale_factor**2)
            nn.init.zeros_(self.sr.bias)
            self.norm.reset_parameters()

    def compress(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, h·w, C) → (B, h'·w', C), h' = ⌊h/f⌋ (conv, ave) or ⌈h/f⌉ (uniform)."""
        b, _, c = tokens.shape
        f = self.scale_factor
        image = tokens.transpose(1, 2).reshape(b, c, *grid)
        if self.sampling == "conv":
            return self.norm(self.sr(image).flatten(2).transpose(1, 2))
        if self.sampling == "ave":
            image = F.interpolate(image, scale_factor=1 / f, mode="nearest")
        else:
            image = image[:, :, ::f, ::f]
        return image.flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        b, n, c = x.shape
        if grid is None:  # the official fixed-size model's assumption: a square grid
            side = int(n**0.5)
            grid = (side, side)
        h, d = self.num_heads, c // self.num_heads
        q, k, v = self.qkv(x).view(b, n, 3, c).unbind(2)
        k, v = self.compress(k, grid), self.compress(v, grid)
        q = q.reshape(b, n, h, d).transpose(1, 2)
        k, v = (t.reshape(b, t.shape[1], h, d).transpose(1, 2) for t in (k, v))
        out = attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


__all__ = ["KV_SAMPLINGS", "SIGMA_KV_LAYERS", "KVCompress", "KVCompressAttention", "KVSampling"]
