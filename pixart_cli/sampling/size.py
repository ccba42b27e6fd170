"""The image size to sample: the model's base size, aspect-ratio buckets, and what a batch needs in memory."""

from __future__ import annotations

import logging
import math
import os

import torch

from pixart_cli.data.buckets import Buckets
from pixart_cli.errors import PixartError
from pixart_cli.models import PixArtConfig

logger = logging.getLogger(__name__)


MAX_TOKEN_FACTOR = 16  # a sampled patch grid may hold 16× the model's trained one (4× each side of a square)


def resolve_size(config: PixArtConfig, downsample: int, height: int | None, width: int | None) -> tuple[int, int]:
    """The image size to sample: the model's base size by default; multi-scale models snap to the buckets they were
    trained on (``make_bucket_table``: the official tables at 256/512/1024 px, the same generated rule elsewhere).

    Raises PixartError when a side is not a multiple of downsample × patch (the model's token grid).
    """
    base = config.input_size * downsample
    if height is None and width is None:
        height = width = base
    height, width = (width if height is None else height), (height if width is None else width)  # one side: square
    if height <= 0 or width <= 0:
        raise PixartError(f"image size must be positive, got {width}×{height} (width×height)")
    multiple = downsample * config.patch_size
    if config.multi_scale:
        # Training buckets its images with this table and this multiple (training.batches, `pixart prepare`).
        snapped = Buckets.for_resolution(base, True, multiple).nearest(height, width)
        if snapped != (height, width):
            logger.warning(
                "size %d×%d snapped to %d×%d (width×height), the nearest aspect-ratio bucket of this multi-scale model",
                width,
                height,
                snapped[1],
                snapped[0],
            )
        height, width = snapped
    if height % multiple or width % multiple:
        what = f"{downsample} (VAE) × {config.patch_size} (patch)" if downsample > 1 else "the patch size"
        raise PixartError(f"image size {width}×{height}: each side must be a multiple of {multiple} ({what})")
    kv = config.kv_compress
    if kv is not None and kv.sampling != "uniform" and min(height, width) < kv.scale_factor * multiple:
        side = kv.scale_factor * multiple
        raise PixartError(
            f"image size {width}×{height}: this model compresses keys and values {kv.scale_factor}x per side, so "
            f"each side must be at least {side}"
        )
    # Far beyond the trained grid a model draws nothing useful, and the tensors can outgrow any machine: refuse
    # before anything is allocated (multi-scale models never get here: their buckets are smaller).
    patches = (height // multiple) * (width // multiple)
    limit = MAX_TOKEN_FACTOR * config.base_size**2
    if patches > limit:
        side = math.isqrt(limit) * multiple
        raise PixartError(
            f"image size {width}×{height} is {patches:,} patches, over this model's limit of {limit:,} "
            f"({MAX_TOKEN_FACTOR} × its trained {config.base_size}×{config.base_size} grid; {side}×{side} for a square)"
        )
    return height, width


def available_memory(device: torch.device) -> int | None:
    """Bytes ``device`` could give this process at most: a GPU's memory less what other processes hold, the
    machine's RAM otherwise (the CPU; MPS shares it); None where unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device)  # what this process holds could be freed for sampling
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system that reports it
        return None


def activation_bytes(config: PixArtConfig, height: int, width: int, downsample: int, rows: int, itemsize: int) -> int:
    """A lower bound on one transformer forward's activations for ``rows`` images (2 per image with guidance):
    the residual stream and the MLP's hidden tensor before and after GELU, which coexist in every block."""
    multiple = downsample * config.patch_size
    patches = (height // multiple) * (width // multiple)
    return rows * patches * (config.hidden_size + 2 * config.mlp_hidden) * itemsize
