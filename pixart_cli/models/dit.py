"""DiT (arXiv 2212.09748): the class-conditional diffusion transformer PixArt-α starts from.

State-dict keys follow facebookresearch/DiT (``y_embedder.embedding_table``, ``blocks.i.adaLN_modulation.1``,
``final_layer.adaLN_modulation.1``, a stored ``pos_embed``), so its released checkpoints load strictly. Used to
train stage 1 and as the source of ``pixart init-from-dit``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pixart_cli.models.layers import (
    FAMILY_SIZES,
    Mlp,
    PatchEmbed,
    PredictionType,
    SelfAttention,
    TimestepEmbedder,
    check_transformer_shape,
    layer_norm,
    modulate,
    sincos_pos_embed_2d,
    unpatchify,
)


@dataclass(frozen=True)
class DiTConfig:
    depth: int = 28
    hidden_size: int = 1152
    num_heads: int = 16
    patch_size: int = 2
    input_size: int = 32  # latent side (256 px / 8)
    in_channels: int = 4
    learn_sigma: bool = True
    prediction_type: PredictionType = "epsilon"  # or "v_prediction"; the learned variance is unaffected
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # the embedding table has one more row: the null class used for CFG
    variant: str | None = None

    def __post_init__(self) -> None:
        check_transformer_shape(
            self, ("depth", "hidden_size", "num_heads", "patch_size", "input_size", "in_channels", "num_classes")
        )

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size


DIT_VARIANTS: dict[str, DiTConfig] = {
    f"DiT-{size}/{patch}": DiTConfig(
        depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch, variant=f"DiT-{size}/{patch}"
    )
    for size, (depth, hidden, heads) in FAMILY_SIZES.items()
    for patch in (2, 4, 8)
}


def dit_config(variant: str, **overrides: object) -> DiTConfig:
    if variant not in DIT_VARIANTS:
        raise ValueError(f"unknown DiT variant {variant!r}; known: {', '.join(DIT_VARIANTS)}")
    return dataclasses.replace(DIT_VARIANTS[variant], **overrides)


class LabelEmbedder(nn.Module):
    """Class labels → vectors; row ``num_classes`` is the null class (classifier-free guidance)."""

    def __init__(self, num_classes: int, hidden_size: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        if drop is not None:
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class DiTBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm1 = layer_norm(hidden_size)
        self.attn = SelfAttention(hidden_size, num_heads)
        self.norm2 = layer_norm(hidden_size)
        self.mlp = Mlp(hidden_size, mlp_hidden, hidden_size)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c)[:, None].chunk(
            6, dim=-1
        )
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class DiTFinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = layer_norm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.gradient_checkpointing = False
        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, c.hidden_size)
        self.t_embedder = TimestepEmbedder(c.hidden_size)
        self.y_embedder = LabelEmbedder(c.num_classes, c.hidden_size)
        # Stored in DiT's checkpoints (a frozen parameter there), so kept as a persistent buffer here.
        pos = sincos_pos_embed_2d(c.hidden_size, c.grid_size, c.grid_size, base_size=c.grid_size)
        self.register_buffer("pos_embed", pos[None])
        mlp_hidden = int(c.hidden_size * c.mlp_ratio)
        self.blocks = nn.ModuleList([DiTBlock(c.hidden_size, c.num_heads, mlp_hidden) for _ in range(c.depth)])
        self.final_layer = DiTFinalLayer(c.hidden_size, c.patch_size, c.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier linears, N(0, 0.02) label and timestep embedders, zeroed adaLN/output."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [
            *(b.adaLN_modulation[1] for b in self.blocks),
            self.final_layer.adaLN_modulation[1],
            self.final_layer.linear,
        ]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    def forward(
        self, x: torch.Tensor, timestep: torch.Tensor, labels: torch.Tensor, *, drop_label: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict (epsilon[, variance]) for latents ``x`` (B, C, H, W) of class ``labels`` (B,)."""
        b = x.shape[0]
        if timestep.ndim == 0:
            timestep = timestep.expand(b)
        x = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(timestep) + self.y_embedder(labels, drop_label)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)
        x = self.final_layer(x, c)
        g = self.config.grid_size
        return unpatchify(x, self.config.out_channels, self.config.patch_size, g, g)
