"""The ``adapter:`` section of a recipe: which low-rank adapter to train on which layers of a frozen base."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

# Every linear layer of every block: self-attention qkv/proj, cross-attention q/kv/proj, the MLP (our default).
BLOCK_TARGETS = (
    "attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj", "mlp.fc1", "mlp.fc2",
)  # fmt: skip
# The official LoRA script (PixArt-alpha train_scripts/train_pixart_lora_hf.py) targets, in diffusers' names, to_q,
# to_k, to_v, to_out.0, ff.net.0.proj, ff.net.2, proj, proj_in, proj_out, linear, linear_1, linear_2: every
# linear and the patch embedding. The same layers in our names (docs/adapters.md):
OFFICIAL_TARGETS = (
    *BLOCK_TARGETS, "x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2", "t_block.1", "y_embedder.y_proj.fc1",
    "y_embedder.y_proj.fc2", "final_layer.linear", "csize_embedder.mlp.0", "csize_embedder.mlp.2",
    "ar_embedder.mlp.0", "ar_embedder.mlp.2",  # multi-scale models only
)  # fmt: skip
PRESETS = {"blocks": BLOCK_TARGETS, "official": OFFICIAL_TARGETS}


@dataclass(frozen=True)
class AdapterSection:
    """A LoRA (Hu et al. 2021) or DoRA (Liu et al. 2024) adapter: W + (alpha / rank) · B A on each target layer."""

    type: Literal["lora", "dora"] = "lora"
    rank: int = 16
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input, during training
    # Module names or dotted suffixes of them (peft's rule), in our (official) key layout, or a preset: "blocks"
    # (the default's layers) or "official" (the official LoRA script's layers, OFFICIAL_TARGETS).
    targets: tuple[str, ...] = BLOCK_TARGETS
    # How the frozen base is held during training: fp32, or half precision to save memory (needs the same
    # train.mixed_precision, whose autocast computes in it anyway). The adapter always trains in fp32.
    base_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"rank: must be positive, got {self.rank}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha: must be a positive number, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")
        if not self.targets or any(not t or t != t.strip() for t in self.targets):
            raise ValueError(f"targets: name at least one layer, without blanks, got {list(self.targets)}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank
