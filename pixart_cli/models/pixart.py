"""PixArt-α (arXiv 2310.00426): DiT with cross-attention to T5 caption features and adaLN-single.

PixArt-Σ (arXiv 2403.04692) is this transformer configured for 300-token captions, with optional key/value
compression in some layers (``kv_compress``, ``pixart_sigma.py``).

State-dict keys follow the official repository exactly (``x_embedder``, ``t_embedder``, ``t_block``,
``y_embedder``, ``blocks.i.{attn,cross_attn,mlp,scale_shift_table}``, ``final_layer``), so official checkpoints
load strictly. Two differences from the official module, both invisible in the weights:

* ``pos_embed`` is not stored: it is a fixed function of the patch grid, recomputed (and cached) for any h×w.
  Conversion from official files checks the stored buffer against it instead of silently dropping it.
* Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` with a boolean caption mask per
  sample, rather than xFormers over a packed sequence with a host-side ``mask.sum().tolist()``.

Names (ours → official → diffusers): ``interpolation_scale`` → ``lewei_scale`` → ``interpolation_scale``;
``learn_sigma`` → ``pred_sigma`` → ``out_channels = 2 * in_channels``; ``max_length`` → ``model_max_length``
→ (tokenizer ``max_sequence_length``); ``input_size`` → ``input_size`` → ``sample_size`` (latent side);
``multi_scale`` → class ``PixArtMS`` → ``use_additional_conditions``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pixart_cli.models.layers import (
    FAMILY_SIZES,
    FREQUENCY_EMBEDDING_SIZE,
    Mlp,
    PatchEmbed,
    PredictionType,
    SelfAttention,
    TimestepEmbedder,
    attention,
    check_transformer_shape,
    layer_norm,
    modulate,
    sincos_pos_embed_2d,
    timestep_embedding,
    unpatchify,
)
from pixart_cli.models.pixart_sigma import KVCompress, KVCompressAttention

#################################################################################
#                                  Config                                       #
#################################################################################


AdaLNKind = Literal["single", "block"]
ADALN_KINDS: tuple[str, ...] = typing.get_args(AdaLNKind)

_POSITIVE = ("depth", "hidden_size", "num_heads", "patch_size", "input_size", "in_channels", "caption_channels",
             "max_length")  # fmt: skip


@dataclass(frozen=True)
class PixArtConfig:
    """Everything that defines a PixArt transformer's shape; saved as ``model:`` in a checkpoint's config."""

    depth: int = 28
    hidden_size: int = 1152
    num_heads: int = 16
    patch_size: int = 2
    input_size: int = 32  # side of the model's input grid at its base resolution (latents: pixels / 8)
    in_channels: int = 4
    learn_sigma: bool = True  # output 2×in_channels: epsilon and the learned-range variance
    prediction_type: PredictionType = "epsilon"  # or "v_prediction"; the learned variance is unaffected
    mlp_ratio: float = 4.0
    caption_channels: int = 4096  # T5-XXL width
    max_length: int = 120  # caption tokens (T5 padding length, rows of the null caption)
    interpolation_scale: float = 1.0  # positional-embedding scale: 1 for 256/512 models, 2 for 1024
    multi_scale: bool = False  # PixArtMS: image-size and aspect-ratio conditioning
    # "single": the paper's adaLN-single (one shared t_block, a learned table per block). "block": DiT's
    # per-block adaLN MLP in every block instead — the paper's baseline, for ablations only (no official or
    # diffusers equivalent).
    adaln: AdaLNKind = "single"
    # PixArt-Σ's key/value token compression in some self-attention layers (pixart_sigma.py); None: none.
    kv_compress: KVCompress | None = None
    variant: str | None = None  # informational name, e.g. "PixArt-XL/2"

    def __post_init__(self) -> None:
        check_transformer_shape(self, _POSITIVE)
        if self.multi_scale and self.hidden_size % 3:
            raise ValueError(f"a multi-scale model needs hidden_size divisible by 3, got {self.hidden_size}")
        if self.mlp_ratio <= 0 or self.interpolation_scale <= 0:
            raise ValueError("mlp_ratio and interpolation_scale must be positive")
        if self.adaln not in ADALN_KINDS:
            raise ValueError(f"adaln must be one of {ADALN_KINDS}, got {self.adaln!r}")
        if self.kv_compress is not None:
            self.kv_compress.check_depth(self.depth)

    def compresses(self, layer: int) -> bool:
        """Whether self-attention layer ``layer`` compresses its keys and values (PixArt-Σ)."""
        return self.kv_compress is not None and layer in self.kv_compress.layers

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def base_size(self) -> int:
        """Patch-grid side at the base resolution; positional coordinates are measured against it."""
        return self.input_size // self.patch_size

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


PIXART_VARIANTS: dict[str, PixArtConfig] = {
    f"PixArt-{size}/{patch}": PixArtConfig(
        depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch, variant=f"PixArt-{size}/{patch}"
    )
    for size, (depth, hidden, heads) in FAMILY_SIZES.items()
    for patch in (2, 4, 8)
}


def pixart_config(variant: str, **overrides: object) -> PixArtConfig:
    """A named variant ("PixArt-XL/2", ...) with field overrides, e.g. ``input_size=64`` for 512 px."""
    if variant not in PIXART_VARIANTS:
        raise ValueError(f"unknown PixArt variant {variant!r}; known: {', '.join(PIXART_VARIANTS)}")
    return dataclasses.replace(PIXART_VARIANTS[variant], **overrides)


def heads_for_width(hidden_size: int) -> int | None:
    """Attention heads of the DiT/PixArt family member with this width (checkpoints do not store heads)."""
    return {hidden: heads for _, hidden, heads in FAMILY_SIZES.values()}.get(hidden_size)


#################################################################################
#                       Embedding layers for captions and sizes                 #
#################################################################################


class CaptionEmbedder(nn.Module):
    """Projects T5 features to the model width; holds the learned-free null caption used for CFG dropout.

    ``y_embedding`` is a fixed random buffer (as in the official code): the unconditional input during training
    (caption dropout) and sampling.
    """

    def __init__(self, caption_channels: int, hidden_size: int, max_length: int) -> None:
        super().__init__()
        self.y_proj = Mlp(caption_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(max_length, caption_channels) / caption_channels**0.5)

    def forward(self, caption: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        if drop is not None:
            null = self.y_embedding.to(caption.dtype)[: caption.shape[1]]
            caption = torch.where(drop[:, None, None], null[None], caption)
        return self.y_proj(caption)


class SizeEmbedder(TimestepEmbedder):
    """Embeds each of ``dims`` scalars like a timestep and concatenates them (image size, aspect ratio)."""

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        b = s.shape[0]
        s = s.reshape(b, -1)
        emb = super().forward(s.reshape(-1))
        return emb.reshape(b, -1)


#################################################################################
#                                 Core PixArt model                             #
#################################################################################


class CrossAttention(nn.Module):
    """Queries from image tokens, fused keys/values (``kv_linear``) from caption tokens, caption padding mask."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(hidden_size, hidden_size)
        self.kv_linear = nn.Linear(hidden_size, 2 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape
        h, d = self.num_heads, c // self.num_heads
        q = self.q_linear(x).view(b, n, h, d).transpose(1, 2)
        k, v = (t.transpose(1, 2) for t in self.kv_linear(y).view(b, y.shape[1], 2, h, d).unbind(2))
        out = attention(q, k, v, mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class PixArtBlock(nn.Module):
    """Self-attention, cross-attention (no norm, no gate) and MLP, modulated by adaLN-single.

    With ``adaln="block"`` the block computes its own modulation from the conditioning vector with DiT's
    per-block MLP (``adaLN_modulation``) instead of adding its table to the shared ``t_block`` output.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_hidden: int,
        adaln: AdaLNKind = "single",
        kv_compress: KVCompress | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = layer_norm(hidden_size)
        if kv_compress is None:
            self.attn = SelfAttention(hidden_size, num_heads)
        else:
            self.attn = KVCompressAttention(hidden_size, num_heads, kv_compress.sampling, kv_compress.scale_factor)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = layer_norm(hidden_size)
        self.mlp = Mlp(hidden_size, mlp_hidden, hidden_size)
        if adaln == "single":
            self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)
        else:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def modulation(self, t0: torch.Tensor) -> torch.Tensor:
        """(B, 6, hidden): shift, scale and gate of the attention and MLP branches."""
        if hasattr(self, "adaLN_modulation"):
            return self.adaLN_modulation(t0).reshape(t0.shape[0], 6, -1)
        return self.scale_shift_table[None] + t0.reshape(t0.shape[0], 6, -1)

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        t0: torch.Tensor,
        mask: torch.Tensor | None,
        grid: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """``t0``: the shared ``t_block`` output (B, 6·hidden), or the conditioning vector (B, hidden) for
        per-block adaLN. ``grid``: the patch grid (h, w), which KV compression reduces."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(t0).chunk(6, dim=1)
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        x = x + gate_msa * (self.attn(h, grid) if isinstance(self.attn, KVCompressAttention) else self.attn(h))
        x = x + self.cross_attn(x, y, mask)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """Modulated norm (table + timestep embedding, not t0) and a linear map to patch pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = layer_norm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class PixArt(nn.Module):
    """The fixed-size PixArt-α transformer (256 and 512 px models)."""

    def __init__(self, config: PixArtConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.gradient_checkpointing = False
        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, c.hidden_size)
        self.t_embedder = TimestepEmbedder(c.hidden_size)
        if c.adaln == "single":
            self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(c.hidden_size, 6 * c.hidden_size))
        self.y_embedder = CaptionEmbedder(c.caption_channels, c.hidden_size, c.max_length)
        self.blocks = nn.ModuleList(
            [
                PixArtBlock(
                    c.hidden_size, c.num_heads, c.mlp_hidden, c.adaln, c.kv_compress if c.compresses(i) else None
                )
                for i in range(c.depth)
            ]
        )
        self.final_layer = FinalLayer(c.hidden_size, c.patch_size, c.out_channels)
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        self.initialize_weights()

    # -- initialisation ---------------------------------------------------------------------------------------
    def initialize_weights(self) -> None:
        """The official initialisation: xavier-uniform linears, N(0, 0.02) embedders, zero output projections.

        Per-block adaLN starts at zero as in DiT (adaLN-Zero: every gate closed, each block the identity).
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        # The official order (it fixes which random numbers each layer draws from a seed).
        embedders = [self.t_embedder.mlp[0], self.t_embedder.mlp[2]]
        if self.config.adaln == "single":
            embedders.append(self.t_block[1])
        embedders += [self.y_embedder.y_proj.fc1, self.y_embedder.y_proj.fc2]
        for linear in embedders:
            nn.init.normal_(linear.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
            if self.config.adaln == "block":
                nn.init.zeros_(block.adaLN_modulation[1].weight)
                nn.init.zeros_(block.adaLN_modulation[1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    # -- conditioning -----------------------------------------------------------------------------------------
    def pos_embed(self, grid_h: int, grid_w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Positional embedding (1, h*w, hidden) for an h×w patch grid, cached per shape, device and dtype."""
        key = (grid_h, grid_w, device, dtype)
        if key not in self._pos_cache:
            c = self.config
            emb = sincos_pos_embed_2d(c.hidden_size, grid_h, grid_w, c.base_size, c.interpolation_scale)
            self._pos_cache[key] = emb[None].to(device=device, dtype=dtype)
        return self._pos_cache[key]

    def condition(
        self, timestep: torch.Tensor, resolution: torch.Tensor | None, aspect_ratio: torch.Tensor | None
    ) -> torch.Tensor:
        """The shared conditioning vector fed to ``t_block`` and the final layer."""
        return self.t_embedder(timestep)

    # -- forward ----------------------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        caption: torch.Tensor,
        caption_mask: torch.Tensor | None = None,
        *,
        drop_caption: torch.Tensor | None = None,
        resolution: torch.Tensor | None = None,
        aspect_ratio: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict (epsilon[, variance]) for latents ``x`` (B, C, H, W).

        Args:
            timestep: (B,) or scalar diffusion step(s) in [0, 1000).
            caption: (B, L, caption_channels) T5 features (L ≤ max_length).
            caption_mask: (B, L), nonzero where a caption token is real; None attends to all L tokens.
            drop_caption: (B,) bool; True replaces that caption by the null caption (CFG dropout).
            resolution, aspect_ratio: (B, 2) image height/width and (B, 1) height/width ratio; multi-scale only.
        """
        b, _, height, width = x.shape
        p = self.config.patch_size
        if height % p or width % p:
            raise ValueError(f"input {width}×{height} (W×H) is not a multiple of the patch size {p}")
        gh, gw = height // p, width // p
        if timestep.ndim == 0:
            timestep = timestep.expand(b)
        x = self.x_embedder(x) + self.pos_embed(gh, gw, x.device, x.dtype)
        t = self.condition(timestep, resolution, aspect_ratio)
        t0 = self.t_block(t) if self.config.adaln == "single" else t
        y = self.y_embedder(caption.to(x.dtype), drop_caption)
        mask = None
        if caption_mask is not None:
            mask = caption_mask.bool()
            # A caption with no real token would make softmax undefined; attend to all tokens instead (the
            # same result diffusers' additive -10000 bias gives).
            mask = (mask | ~mask.any(dim=1, keepdim=True))[:, None, None, :]
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, y, t0, mask, (gh, gw), use_reentrant=False)
            else:
                x = block(x, y, t0, mask, (gh, gw))
        x = self.final_layer(x, t)
        return unpatchify(x, self.config.out_channels, p, gh, gw)


class PixArtMS(PixArt):
    """Multi-scale PixArt-α (1024 px, any aspect ratio): adds image-size and aspect-ratio conditioning."""

    def __init__(self, config: PixArtConfig) -> None:
        if not config.multi_scale:
            raise ValueError("PixArtMS needs a config with multi_scale=True")
        super().__init__(config)
        self.csize_embedder = SizeEmbedder(config.hidden_size // 3)
        self.ar_embedder = SizeEmbedder(config.hidden_size // 3)
        for embedder in (self.csize_embedder, self.ar_embedder):
            nn.init.normal_(embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(embedder.mlp[2].weight, std=0.02)
            nn.init.zeros_(embedder.mlp[0].bias)
            nn.init.zeros_(embedder.mlp[2].bias)

    def condition(
        self, timestep: torch.Tensor, resolution: torch.Tensor | None, aspect_ratio: torch.Tensor | None
    ) -> torch.Tensor:
        if resolution is None or aspect_ratio is None:
            raise ValueError("a multi-scale model needs resolution (B, 2) and aspect_ratio (B, 1)")
        t = self.t_embedder(timestep)
        b = t.shape[0]
        resolution = resolution.to(t.device).reshape(-1, 2).expand(b, 2)
        aspect_ratio = aspect_ratio.to(t.device).reshape(-1, 1).expand(b, 1)
        return t + torch.cat([self.csize_embedder(resolution), self.ar_embedder(aspect_ratio)], dim=1)


def build_pixart(config: PixArtConfig) -> PixArt:
    """The model class the config describes (``PixArtMS`` when ``multi_scale``)."""
    return PixArtMS(config) if config.multi_scale else PixArt(config)


__all__ = [
    "FREQUENCY_EMBEDDING_SIZE",
    "PIXART_VARIANTS",
    "PixArt",
    "PixArtConfig",
    "PixArtMS",
    "build_pixart",
    "heads_for_width",
    "pixart_config",
    "timestep_embedding",
]
