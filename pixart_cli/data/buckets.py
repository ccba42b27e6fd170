"""Aspect-ratio buckets and a batch sampler that keeps every batch inside one bucket.

Multi-scale training (PixArt's 1024-px ``PixArtMS`` recipe) resizes each image to the bucket whose aspect ratio
(height / width) is nearest to its own; a batch must hold one bucket so that its latents stack. Sampling a
multi-scale model snaps the requested size the same way, to the same table (``make_bucket_table``: one rule for
both). The official tables for 256/512/1024/2048 px are diffusers' ``ASPECT_RATIO_{256,...,2048}_BIN``; other base sizes
(e.g. 32 or 64 px for miniature experiments) are the 1024 table scaled down and rounded to a multiple the model can
take (VAE downsampling × patch size).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pixart_cli.data.sources import Record
from pixart_cli.data.transforms import DEFAULT_MAX_PIXELS, BadImage, image_size
from pixart_cli.errors import PixartError

logger = logging.getLogger(__name__)

BucketTable = dict[str, tuple[int, int]]  # nominal ratio "h/w" → (height, width) in pixels

# The official PixArt-α 1024-px table (diffusers' ASPECT_RATIO_1024_BIN), kept here so that training and sampling
# need no private diffusers module for it; tests check it against diffusers.
ASPECT_RATIO_1024: BucketTable = {
    "0.25": (512, 2048), "0.28": (512, 1856), "0.32": (576, 1792), "0.33": (576, 1728), "0.35": (576, 1664),
    "0.4": (640, 1600), "0.42": (640, 1536), "0.48": (704, 1472), "0.5": (704, 1408), "0.52": (704, 1344),
    "0.57": (768, 1344), "0.6": (768, 1280), "0.68": (832, 1216), "0.72": (832, 1152), "0.78": (896, 1152),
    "0.82": (896, 1088), "0.88": (960, 1088), "0.94": (960, 1024), "1.0": (1024, 1024), "1.07": (1024, 960),
    "1.13": (1088, 960), "1.21": (1088, 896), "1.29": (1152, 896), "1.38": (1152, 832), "1.46": (1216, 832),
    "1.67": (1280, 768), "1.75": (1344, 768), "2.0": (1408, 704), "2.09": (1472, 704), "2.4": (1536, 640),
    "2.5": (1600, 640), "3.0": (1728, 576), "4.0": (2048, 512),
}  # fmt: skip
# PixArt-Σ's 2K table (diffusers' ASPECT_RATIO_2048_BIN): not the 1024 table doubled — seven more ratios.
ASPECT_RATIO_2048: BucketTable = {
    "0.25": (1024, 4096), "0.26": (1024, 3968), "0.27": (1024, 3840), "0.28": (1024, 3712), "0.32": (1152, 3584),
    "0.33": (1152, 3456), "0.35": (1152, 3328), "0.4": (1280, 3200), "0.42": (1280, 3072), "0.48": (1408, 2944),
    "0.5": (1408, 2816), "0.52": (1408, 2688), "0.57": (1536, 2688), "0.6": (1536, 2560), "0.68": (1664, 2432),
    "0.72": (1664, 2304), "0.78": (1792, 2304), "0.82": (1792, 2176), "0.88": (1920, 2176), "0.94": (1920, 2048),
    "1.0": (2048, 2048), "1.07": (2048, 1920), "1.13": (2176, 1920), "1.21": (2176, 1792), "1.29": (2304, 1792),
    "1.38": (2304, 1664), "1.46": (2432, 1664), "1.67": (2560, 1536), "1.75": (2688, 1536), "2.0": (2816, 1408),
    "2.09": (2944, 1408), "2.4": (3072, 1280), "2.5": (3200, 1280), "2.89": (3328, 1152), "3.0": (3456, 1152),
    "3.11": (3584, 1152), "3.62": (3712, 1024), "3.75": (3840, 1024), "3.88": (3968, 1024), "4.0": (4096, 1024),
}  # fmt: skip
OFFICIAL_BASES = (256, 512, 1024, 2048)


def _scaled(base: int, multiple: int) -> list[tuple[int, int]]:
    """The 1024 table's sizes scaled by ``base / 1024``, each side rounded to a multiple of ``multiple``."""
    scale = base / 1024
    return [
        (max(multiple, round(h * scale / multiple) * multiple), max(multiple, round(w * scale / multiple) * multiple))
        for h, w in ASPECT_RATIO_1024.values()
    ]


def official_bucket_table(base: int) -> BucketTable:
    """The official PixArt table for 256, 512, 1024 or 2048 px (diffusers' ``ASPECT_RATIO_{base}_BIN``, as ints).

    The 256 and 512 tables are exactly the 1024 table scaled by ``base / 1024`` and rounded to 16 px, under the
    same nominal ratios; 2048 is PixArt-Σ's own. Tests check all four against diffusers.
    """
    if base not in OFFICIAL_BASES:
        raise ValueError(f"no official bucket table for {base} px (there are tables for 256, 512, 1024 and 2048)")
    if base == 2048:
        return dict(ASPECT_RATIO_2048)
    return dict(zip(ASPECT_RATIO_1024, _scaled(base, 16), strict=True))


def make_bucket_table(base: int, multiple: int = 16) -> BucketTable:
    """Buckets around ``base``×``base`` pixels: the official table when it exists and fits ``multiple``, else the
    1024 table scaled by ``base / 1024`` with each side rounded to a multiple of ``multiple``.

    The one rule for multi-scale training data and for sampling. At small bases several ratios round to the same
    size; each size is kept once, keyed by its real ratio h / w.
    """
    if base <= 0 or multiple <= 0:
        raise ValueError(f"base and multiple must be positive, got {base} and {multiple}")
    if base in OFFICIAL_BASES:
        table = official_bucket_table(base)
        if all(h % multiple == 0 and w % multiple == 0 for h, w in table.values()):
            return table
    # Rounding moves the ratios (at 32 px, nominal 0.68 becomes 32×32), so each size is keyed by its real ratio.
    sizes = set(_scaled(base, multiple))
    return {f"{h / w:.2f}": (h, w) for h, w in sorted(sizes, key=lambda s: s[0] / s[1])}


@dataclass(frozen=True)
class Buckets:
    """An ordered set of (height, width) sizes with their nominal aspect ratios (h / w)."""

    sizes: tuple[tuple[int, int], ...]
    ratios: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.sizes or len(self.sizes) != len(self.ratios):
            raise ValueError("Buckets need one ratio per size, and at least one size")

    @classmethod
    def from_table(cls, table: BucketTable) -> Buckets:
        return cls(tuple(tuple(map(int, s)) for s in table.values()), tuple(float(r) for r in table))

    @classmethod
    def single(cls, height: int, width: int | None = None) -> Buckets:
        """One bucket: plain single-resolution training."""
        width = height if width is None else width
        return cls(((height, width),), (height / width,))

    @classmethod
    def for_resolution(cls, resolution: int, multi_scale: bool, multiple: int = 16) -> Buckets:
        """The multi-scale table around ``resolution`` or the single square bucket."""
        if multi_scale:
            return cls.from_table(make_bucket_table(resolution, multiple))
        if resolution % multiple:
            raise ValueError(f"resolution {resolution} is not a multiple of {multiple}")
        return cls.single(resolution)

    def __len__(self) -> int:
        return len(self.sizes)

    def assign(self, height: int, width: int) -> int:
        """Index of the bucket whose nominal ratio is nearest to height / width (diffusers' rule; first on ties)."""
        ratio = height / width
        return min(range(len(self.ratios)), key=lambda i: abs(self.ratios[i] - ratio))

    def nearest(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) of the bucket an image of height × width goes to."""
        return self.sizes[self.assign(height, width)]

    def to_json(self) -> dict[str, Any]:
        return {"sizes": [list(s) for s in self.sizes], "ratios": list(self.ratios)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Buckets:
        return cls(tuple(tuple(map(int, s)) for s in data["sizes"]), tuple(map(float, data["ratios"])))


def assign_buckets(
    records: Sequence[Record], buckets: Buckets, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> tuple[list[int], list[BadImage]]:
    """Bucket index of each record (-1 for an unreadable image, listed in the second value).

    Uses the record's stated width/height when it has them, else reads the image header (not the pixels); with a
    single bucket nothing is read and bad images are found later, when decoded.
    """
    if len(buckets) == 1:
        return [0] * len(records), []
    bucket_of, bad = [], []
    for record in records:
        if record.width is not None and record.height is not None:
            size: tuple[int, int] | BadImage = (record.width, record.height)
        else:
            size = image_size(record, max_pixels)
        if isinstance(size, BadImage):
            bad.append(size)
            bucket_of.append(-1)
        else:
            bucket_of.append(buckets.assign(height=size[1], width=size[0]))
    return bucket_of, bad


def _rng(seed: int, epoch: int) -> np.random.Generator:
    # SeedSequence mixes (seed, epoch) into independent streams: epoch 1 is not "seed + 1".
    return np.random.default_rng([seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, epoch])


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Per-rank batches of dataset indices, every batch from one bucket; deterministic given (seed, epoch).

    Each step draws one *global* batch of ``batch_size × num_replicas`` indices from a single bucket and gives rank
    ``r`` the slice ``[r·batch_size, (r+1)·batch_size)``: all ranks step in the same bucket at the same time (the
    latents of one step have one shape everywhere) and together they see each index at most once per epoch.

    An epoch shuffles each bucket, cuts it into global batches and shuffles the batch order. ``drop_last=True``
    drops each bucket's incomplete remainder (a bucket smaller than one global batch is never used);
    ``drop_last=False`` completes it by repeating indices of the same bucket.

    Resuming: ``set_epoch(epoch, start_batch)`` (or ``load_state_dict``) makes the next ``iter()`` continue from
    batch ``start_batch`` of that epoch, exactly as if the earlier batches had been consumed. ``state_dict()``
    records how many batches ``iter()`` has handed out; a DataLoader prefetches ahead of the training loop, so a
    trainer should pass the number it has really consumed: ``state_dict(consumed=steps_done_this_epoch)``.
    """

    def __init__(
        self,
        bucket_of: Sequence[int],
        batch_size: int,
        *,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = True,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_replicas <= 0 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, num_replicas={num_replicas})")
        self.bucket_of = np.asarray(bucket_of, dtype=np.int64)
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self._start = 0
        self._yielded = 0
        self._members = [np.flatnonzero(self.bucket_of == b) for b in np.unique(self.bucket_of)]
        global_size = batch_size * num_replicas
        self._num_batches = sum(
            len(m) // global_size if drop_last else math.ceil(len(m) / global_size) for m in self._members
        )
        if drop_last:
            unused = sum(len(m) % global_size for m in self._members)
            if unused:
                logger.info("%d of %d items fall in incomplete global batches each epoch", unused, len(bucket_of))
        if self._num_batches == 0:
            raise PixartError(
                f"data: no aspect-ratio bucket holds a full global batch of {global_size} items ({len(bucket_of)} "
                f"items in {len(self._members)} buckets): lower train.batch_size, or add images"
            )

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        return self._num_batches

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        """All global batches of ``epoch`` in order (each ``batch_size × num_replicas`` indices of one bucket)."""
        rng = _rng(self.seed, epoch)
        size = self.batch_size * self.num_replicas
        batches = []
        for members in self._members:  # ordered by bucket id, so the stream of draws is fixed
            order = members[rng.permutation(len(members))]
            full = len(order) // size * size
            batches.extend(order[i : i + size] for i in range(0, full, size))
            if not self.drop_last and full < len(order):
                rest = order[full:]
                batches.append(np.resize(np.concatenate([rest, order]), size))  # pad with the same bucket
        return [batches[i] for i in rng.permutation(len(batches))]

    def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[list[int]]:
        """This rank's batches of ``epoch`` from batch ``start_batch`` on."""
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        for batch in self.global_batches(epoch)[start_batch:]:
            yield batch[lo:hi].tolist()

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (and the batch to start from) that the next ``iter()`` yields."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} is outside [0, {len(self)}]")
        self.epoch, self._start, self._yielded = epoch, start_batch, start_batch

    def __iter__(self) -> Iterator[list[int]]:
        start, self._start = self._start, 0  # the start applies to one pass only
        self._yielded = start
        for batch in self.iterate(self.epoch, start):
            self._yielded += 1
            yield batch

    def state_dict(self, consumed: int | None = None) -> dict[str, int]:
        """Where to resume: ``{"seed", "epoch", "batch"}``; ``consumed`` overrides the sampler's own count."""
        return {"seed": self.seed, "epoch": self.epoch, "batch": self._yielded if consumed is None else consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']}, this sampler has seed {self.seed}")
        self.set_epoch(state["epoch"], state["batch"])
