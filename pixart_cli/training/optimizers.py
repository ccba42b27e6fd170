"""The optimisers a recipe chooses with ``optim.name``, from well-kept packages.

- ``adamw``: torch's AdamW (the PixArt-α recipes): two fp32 moments, 8 bytes of state per parameter.
- ``adamw8bit``: bitsandbytes' AdamW8bit (Dettmers et al. 2022, arXiv 2110.02861): both moments block-wise
  quantised to 8 bits, ~2 bytes per parameter (tensors under 4,096 elements keep fp32 moments). The optimiser
  diffusers' training scripts offer as ``--use_8bit_adam``; runs on CPU and GPU.
- ``came``: CAME (Luo et al. 2023, arXiv 2307.02047) from ``came-pytorch``, the package the official PixArt-Σ code
  imports (its ``CAMEWrapper`` config: betas (0.9, 0.999, 0.9999), eps (1e-30, 1e-16), weight decay 0): the first
  moment in fp32 and factored second moments, ~4 bytes per parameter of a matrix.

Each optimiser's state is plain tensors, so ``training_state.pt`` saves and restores it exactly (``weights_only``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from pixart_cli.errors import PixartError
from pixart_cli.training.recipe import OptimSection

# Optimiser-state bytes per trained parameter, for `--dry-run`'s memory estimate: measured on PixArt-XL/2 by
# benchmarks/optimizers.py (2026-12-07, docs/performance.md). 8-bit: 2 moments of 1 byte + an fp32 scale per block
# of 256; CAME: the fp32 first moment + factored rows and columns.
STATE_BYTES_PER_PARAM = {"adamw": 8.0, "adamw8bit": 2.035, "came": 4.013}

_PACKAGES = {"adamw8bit": ("bitsandbytes", "bitsandbytes"), "came": ("came_pytorch", "came-pytorch")}


def _import(name: str):
    module, package = _PACKAGES[name]
    try:
        return __import__(module)
    except ImportError:
        raise PixartError(
            f"optim.name: {name} needs the {package} package: pip install -e '.[lean]' (or pip install {package})"
        ) from None


def check_optimizer_available(optim: OptimSection) -> None:
    """Fail now, naming the package to install, rather than after the data and model are loaded."""
    if optim.name in _PACKAGES:
        _import(optim.name)


def build_optimizer(
    optim: OptimSection, params: Iterable[torch.nn.Parameter], lr: float, device: torch.device
) -> torch.optim.Optimizer:
    """The recipe's optimiser over ``params`` at peak learning rate ``lr``."""
    params = list(params)
    if optim.name == "adamw":
        return torch.optim.AdamW(
            params, lr=lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay,
            fused=device.type == "cuda",
        )  # fmt: skip
    if optim.name == "adamw8bit":
        bnb = _import("adamw8bit")
        return bnb.optim.AdamW8bit(params, lr=lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay)
    came = _import("came").CAME
    return came(params, lr=lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes the optimiser's state holds now (after at least one step)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total
