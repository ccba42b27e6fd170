"""The exponential moving average of the weights that training keeps and checkpoints save."""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


class EMA:
    """Exponential moving average of the parameters (float32), updated after every optimiser step.

    With ``warmup`` the decay of update n is min(decay, (1 + n) / (10 + n)): without it an EMA of a model trained
    from scratch keeps decay^n of its random initial weights (37% after 10k steps at 0.9999), which ruins it.
    The official PixArt recipes start from trained weights and use no warm-up. Only trained parameters are
    averaged: with an adapter, the adapter's (frozen weights would average to themselves).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        self.decay, self.warmup = decay, warmup
        trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in trained]
        self.params = [p.detach().float().clone() for _, p in trained]

    def decay_at(self, update: int) -> float:
        return min(self.decay, (1 + update) / (10 + update)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, update: int) -> None:
        """Fold in the current weights; ``update`` counts from 0 (the optimiser steps done before this one)."""
        current = [p.detach().float() for p in model.parameters() if p.requires_grad]
        torch._foreach_lerp_(self.params, current, 1.0 - self.decay_at(update))

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with EMA parameters (buffers such as the null caption are the model's)."""
        out = {k: v.detach() for k, v in model.state_dict().items()}
        out.update(dict(zip(self.names, self.params, strict=True)))
        return out

    def load(self, state_dict: dict[str, torch.Tensor]) -> None:
        for name, param in zip(self.names, self.params, strict=True):
            value = state_dict[name]
            if hasattr(param, "device_mesh"):  # sharded (FSDP): take this process's shard of the whole tensor
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
            param.copy_(value)

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        """Take the model's current trained parameters as the average."""
        for param, current in zip(self.params, (p for p in model.parameters() if p.requires_grad), strict=True):
            param.copy_(current)
