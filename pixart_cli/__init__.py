"""pixart: train, sample, convert and evaluate PixArt-α text-to-image diffusion transformers."""

from pixart_cli import _torchvision_compat  # noqa: F401  (must run before anything imports torchvision)

__version__ = "0.1.0"
