"""Model definitions: PixArt-α (``pixart.py``), PixArt-Σ's KV compression (``pixart_sigma.py``) and DiT (``dit.py``)."""

from pixart_cli.models.dit import DIT_VARIANTS, DiT, DiTConfig, dit_config
from pixart_cli.models.pixart import (
    PIXART_VARIANTS,
    PixArt,
    PixArtConfig,
    PixArtMS,
    build_pixart,
    heads_for_width,
    pixart_config,
)
from pixart_cli.models.pixart_sigma import KVCompress

__all__ = [
    "DIT_VARIANTS",
    "PIXART_VARIANTS",
    "DiT",
    "DiTConfig",
    "KVCompress",
    "PixArt",
    "PixArtConfig",
    "PixArtMS",
    "build_pixart",
    "dit_config",
    "heads_for_width",
    "pixart_config",
]
