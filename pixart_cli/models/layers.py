"""Building blocks shared by the PixArt-α and DiT transformers (same maths, same state-dict names)."""

from __future__ import annotations

import math
import typing
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

# The DiT model family, shared by DiT and PixArt: name → (depth, width, heads); each comes with patch sizes 2, 4, 8.
FAMILY_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}

FREQUENCY_EMBEDDING_SIZE = 256
# On the CPU in bf16, attention written out as two matrix products and a float32 softmax beats SDPA's kernels up
# to this many query × key positions (forward + backward, torch 2.13, 2 threads): 3.3× flash attention at 64 × 64
# tokens, 2.4× at 256 × 64, as accurate (benchmarks/attention.py). In fp32 it does not pay in a whole training step
# (0.95–0.96× against SDPA's 0.97–0.99× of diffusers), so fp32 keeps SDPA.
_CPU_EXPLICIT_ATTENTION_MAX = 128 * 128

# What a model's first in_channels outputs predict: the noise ε (PixArt-α and DiT), or the velocity
# v = √ᾱ_t·ε − √(1 − ᾱ_t)·x_0 (Salimans & Ho 2022, arXiv 2202.00512); names as in diffusers' schedulers.
PredictionType = Literal["epsilon", "v_prediction"]
PREDICTION_TYPES: tuple[str, ...] = typing.get_args(PredictionType)


def check_transformer_shape(config: object, positive: tuple[str, ...]) -> None:
    """Checks shared by the DiT and PixArt configs (raise ValueError naming the field)."""
    for name in positive:
        if getattr(config, name) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(config, name)}")
    hidden, heads = config.hidden_size, config.num_heads
    if hidden % heads:
        raise ValueError(f"hidden_size {hidden} is not divisible by num_heads {heads}")
    if hidden % 4:
        raise ValueError(f"hidden_size {hidden} must be divisible by 4 (2-D sin-cos embedding)")
    if config.input_size % config.patch_size:
        raise ValueError(f"input_size {config.input_size} is not a multiple of patch_size {config.patch_size}")
    check_prediction_type(config.prediction_type)


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention over (B, heads, tokens, dim) with an optional boolean mask (True = attend): SDPA, except for short
    bf16 sequences on the CPU, where the explicit form is faster."""
    if (
        q.device.type == "cpu"
        and q.dtype == torch.bfloat16
        and q.shape[-2] * k.shape[-2] <= _CPU_EXPLICIT_ATTENTION_MAX
    ):
        return explicit_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q kᵀ / √d) v with scores and softmax in float32: rounding the scores to bf16 would double the error
    of SDPA's kernels, which accumulate them in float32 too."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1).to(v.dtype) @ v


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps, ordered [cos, sin] as in DiT and PixArt."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepEmbedder(nn.Module):
    """Scalar → sinusoidal features → Linear–SiLU–Linear (keys ``mlp.0``, ``mlp.2``)."""

    def __init__(self, hidden_size: int, frequency_size: int = FREQUENCY_EMBEDDING_SIZE) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_size).to(self.mlp[0].weight.dtype))


class PatchEmbed(nn.Module):
    """Non-overlapping patches through a conv with kernel = stride = patch (key ``proj``)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # B, C, H, W -> B, H*W, C, made contiguous once: elementwise ops keep their first operand's layout, so a
        # transposed view here would carry through every residual add, and every LayerNorm and linear layer of
        # every block would copy it (forward and backward).
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class Mlp(nn.Module):
    """fc1 → GELU(tanh) → fc2, the transformer MLP of DiT and PixArt (and PixArt's caption projection)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection, through ``scaled_dot_product_attention``."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # Split on the q/k/v axis, then move heads forward: the backward stacks the three gradients straight into
        # the projection's (b, n, 3c) layout (a split after a permute needed one more copy of them per block).
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).unbind(2))
        out = attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


def sincos_pos_embed_2d(
    hidden_size: int, grid_h: int, grid_w: int, base_size: int, interpolation_scale: float = 1.0
) -> torch.Tensor:
    """Fixed 2-D sin-cos positional embedding for an h×w patch grid, shape (h*w, hidden_size), float32.

    Grid coordinate = ``arange(n) / (n / base_size) / interpolation_scale`` (PixArt's convention: a grid of
    ``base_size`` spans the same coordinate range at any resolution). Tokens are row-major; the first half of the
    channels encodes the column coordinate, the second half the row coordinate, each as [sin, cos]. Coordinates
    are float32 and the trigonometry float64, matching the official numpy code and diffusers to the last bit.
    """
    if hidden_size % 4:
        raise ValueError(f"hidden_size {hidden_size} must be divisible by 4 for a 2-D sin-cos embedding")
    rows = torch.arange(grid_h, dtype=torch.float32) / (grid_h / base_size) / interpolation_scale
    cols = torch.arange(grid_w, dtype=torch.float32) / (grid_w / base_size) / interpolation_scale
    row_coord, col_coord = torch.meshgrid(rows, cols, indexing="ij")

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(hidden_size // 4, dtype=torch.float64) / (hidden_size / 4))
        out = pos.reshape(-1).double()[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([embed_1d(col_coord), embed_1d(row_coord)], dim=1).float()


def unpatchify(x: torch.Tensor, channels: int, patch_size: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """(B, h*w, p*p*C) tokens → (B, C, h*p, w*p) image."""
    b = x.shape[0]
    x = x.reshape(b, grid_h, grid_w, patch_size, patch_size, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, channels, grid_h * patch_size, grid_w * patch_size)


def layer_norm(hidden_size: int) -> nn.LayerNorm:
    """LayerNorm without affine parameters (so it has no state-dict keys), eps 1e-6."""
    return nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
