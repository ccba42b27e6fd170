"""pixart: train, sample, convert and evaluate PixArt-α text-to-image diffusion transformers.

The common entry points are importable from here (``from pixart_cli import Pipeline``); they load on first use,
so importing the package (and ``pixart --help``) stays free of torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

try:  # installed: the start-up hook applies the torchvision fix when torchvision is first imported, by anyone
    import _pixart_torchvision_hook

    _pixart_torchvision_hook.install()
except ImportError:  # a source tree used without installing: apply the fix now (this imports torch)
    from pixart_cli import _torchvision_compat  # noqa: F401

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    "Pipeline": "pixart_cli.sampling.pipeline",
    "SampleSettings": "pixart_cli.sampling.settings",
    "write_samples": "pixart_cli.sampling.writer",
    "load_checkpoint": "pixart_cli.checkpoints.format",
    "save_checkpoint": "pixart_cli.checkpoints.format",
    "Checkpoint": "pixart_cli.checkpoints.format",
    "convert": "pixart_cli.checkpoints.convert",
    "init_from_dit": "pixart_cli.checkpoints.init_from_dit",
    "load_recipe": "pixart_cli.training.recipe",
    "Recipe": "pixart_cli.training.recipe",
    "train": "pixart_cli.training.loop",
    "PixArt": "pixart_cli.models.pixart",
    "PixArtConfig": "pixart_cli.models.pixart",
    "DiT": "pixart_cli.models.dit",
}

if TYPE_CHECKING:
    from pixart_cli.checkpoints.convert import convert
    from pixart_cli.checkpoints.format import Checkpoint, load_checkpoint, save_checkpoint
    from pixart_cli.checkpoints.init_from_dit import init_from_dit
    from pixart_cli.models.dit import DiT
    from pixart_cli.models.pixart import PixArt, PixArtConfig
    from pixart_cli.sampling.pipeline import Pipeline
    from pixart_cli.sampling.settings import SampleSettings
    from pixart_cli.sampling.writer import write_samples
    from pixart_cli.training.loop import train
    from pixart_cli.training.recipe import Recipe, load_recipe


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pixart_cli' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [  # the names of _EXPORTS, written out so that tools can read them
    "Checkpoint",
    "DiT",
    "Pipeline",
    "PixArt",
    "PixArtConfig",
    "Recipe",
    "SampleSettings",
    "__version__",
    "convert",
    "init_from_dit",
    "load_checkpoint",
    "load_recipe",
    "save_checkpoint",
    "train",
    "write_samples",
]
