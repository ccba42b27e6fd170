"""Datasets and the DataLoader for training: cached features (``CachedDataset``) or images decoded on the fly.

Both datasets expose ``bucket_of`` (the bucket of every item) and ``buckets`` so that ``make_loader`` can batch
them with a ``BucketBatchSampler``. Items are dicts; ``collate`` stacks them.

Latents are *not* sampled in the dataset: a cached item carries the posterior (mean, std), and the trainer draws
``mean + std · ε`` per step with ``step_generator(seed, step)`` (a fresh draw every time an item is read, as in the
official loader: docs/reference.md §4). Drawing in the training process, after the batch is on its device, keeps
runs reproducible whatever the number of loader workers and avoids shipping random numbers between processes.
``collate`` can draw too, given a generator, for single-process use.

Caption mixing (a recipe's ``data.captions``): each item reads one of several caption fields, chosen with the given
proportions by ``caption_choices`` as a pure function of (seed, epoch, item index) — the same on a resumed run and
whatever the number of loader workers or processes. The choice is made where the batch of indices is drawn
(``make_loader``'s sampler, in the training process, which knows the epoch) and travels with each index, so a
dataset reads (or, on the fly, encodes) only the chosen field; both datasets take such ``(index, field)`` keys.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pixart_cli.components.autoencoders import Autoencoder, draw_latents
from pixart_cli.components.text import trim_padding
from pixart_cli.data.buckets import BucketBatchSampler, Buckets, assign_buckets
from pixart_cli.data.cache import FORMAT, INDEX, PLAN, SHARDS, VERSION, caption_arrays
from pixart_cli.data.sources import DEFAULT_CAPTION_FIELDS, Record, Source, caption_of
from pixart_cli.data.transforms import DEFAULT_MAX_PIXELS, BadImage, Resample, image_label, load_pixels
from pixart_cli.errors import PixartError

logger = logging.getLogger(__name__)

_FIELDS = ("index", "latent_mean", "latent_std", "label")

# (field, proportion) pairs: the caption fields items read and how often (``DataSection.caption_mix``).
CaptionMix = Sequence[tuple[str, float]]
# A dataset key: an item index, or (index, caption field) when the sampler chose the field.
ItemKey = int | tuple[int, str]


def caption_choices(seed: int, epoch: int, indices: Sequence[int], mix: CaptionMix) -> list[str]:
    """The caption field each item of ``indices`` reads in ``epoch``, drawn with the proportions of ``mix``.

    A pure function of (seed, epoch, index) — a hash, not a random stream — so a resumed run makes the same choices,
    and so do any number of loader workers or processes (an item is read at most once an epoch, so each read of it
    draws afresh). The fields are taken in sorted order: how the mix is written changes nothing.
    """
    mix = sorted(mix)
    names = [name for name, _ in mix]
    bounds = np.cumsum([share for _, share in mix], dtype=np.float64)
    bounds /= bounds[-1]
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as the hash intends
        key = _mix64(np.array([seed & _U64], dtype=np.uint64)) ^ _CAPTION_STREAM
        key = _mix64(key + np.uint64(epoch & _U64))
        key = _mix64(key ^ np.asarray(indices, dtype=np.uint64).reshape(-1))
    uniform = (key >> np.uint64(11)).astype(np.float64) * 2.0**-53  # 53 random bits → [0, 1)
    chosen = np.minimum(np.searchsorted(bounds, uniform, side="right"), len(names) - 1)
    return [names[c] for c in chosen]


_U64 = 0xFFFFFFFFFFFFFFFF
_CAPTION_STREAM = np.uint64(0x63617074696F6E73)  # "captions": keeps these draws apart from other uses of the seed


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection of uint64 that spreads every input bit over the output."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _key(key: ItemKey) -> tuple[int, str | None]:
    return key if isinstance(key, tuple) else (key, None)


def read_cache_index(cache_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``index.json`` of a finished cache; a clear error for a missing, unfinished or foreign directory."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise PixartError(f"{cache_dir}: no such feature cache directory")
    path = cache_dir / INDEX
    if not path.is_file():
        if (cache_dir / PLAN).is_file():
            raise PixartError(f"{cache_dir}: unfinished feature cache (rerun `pixart prepare` to complete it)")
        raise PixartError(f"{cache_dir}: not a feature cache (no {INDEX}; make one with `pixart prepare`)")
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PixartError(f"{path}: unreadable ({exc})") from None
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise PixartError(f"{path}: not a version-{VERSION} {FORMAT} index")
    return index


class CachedDataset(torch.utils.data.Dataset):
    """Items of a feature cache, read from memory-mapped shards (only the pages an item touches are read).

    Each item: ``latent_mean``/``latent_std`` (C, h, w) in the storage dtype (std zeros for pixel space),
    ``caption`` (max_length, D) + ``caption_mask`` (max_length,) int64 — captions are zero-padded back to
    ``max_length`` — or ``label`` (int64), ``resolution`` (2,) = bucket (H, W) in pixels, ``aspect_ratio`` (1,)
    = H / W of the bucket size (what diffusers' pipeline passes at inference), ``index`` and ``bucket``.

    Captions come from the ``caption`` field, or, for an ``(index, field)`` key (``make_loader`` with a caption
    mix), from that field, named in the item's ``caption_field``. ``caption_fields``: the fields the cache holds.
    """

    def __init__(self, cache_dir: str | os.PathLike) -> None:
        self.cache_dir = Path(cache_dir)
        self.info = read_cache_index(self.cache_dir)
        self.buckets = Buckets.from_json(self.info["buckets"])
        self.max_length = self.info.get("max_length")
        self.conditioning = self.info["conditioning"]
        self.class_names = self.info.get("class_names")
        # Caches made before caption fields were recorded hold the `caption` field alone.
        fields = self.info.get("caption_fields", DEFAULT_CAPTION_FIELDS if self.conditioning == "caption" else [])
        self.caption_fields: tuple[str, ...] = tuple(fields or ())
        self._shards = [s for s in self.info["shards"] if s["count"] > 0]
        counts = [s["count"] for s in self._shards]
        self._offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).tolist()
        self.bucket_of: list[int] = np.repeat([s["bucket"] for s in self._shards], counts).astype(int).tolist()
        self._maps: dict[int, dict[str, np.ndarray]] = {}

    def __len__(self) -> int:
        return self._offsets[-1]

    def __getstate__(self) -> dict[str, Any]:
        # Each worker process maps the files itself; pickling the maps would copy their data.
        return {**self.__dict__, "_maps": {}}

    def _arrays(self, s: int) -> dict[str, np.ndarray]:
        arrays = self._maps.get(s)
        if arrays is None:
            directory = self.cache_dir / SHARDS / self._shards[s]["name"]
            arrays = {}
            for name in (*_FIELDS, *(name for field in self.caption_fields for name in caption_arrays(field))):
                path = directory / f"{name}.npy"
                if path.exists():
                    arrays[name] = np.load(path, mmap_mode="r")
            if len(arrays.get("index", ())) != self._shards[s]["count"]:
                raise PixartError(f"{directory}: shard does not match {INDEX} (was the cache modified?)")
            self._maps[s] = arrays
        return arrays

    def __getitem__(self, key: ItemKey) -> dict[str, Any]:
        index, field = _key(key)
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} out of range for a cache of {len(self)} items")
        s = bisect.bisect_right(self._offsets, index) - 1
        j = index - self._offsets[s]
        arrays = self._arrays(s)
        bucket = self._shards[s]["bucket"]
        height, width = self.buckets.sizes[bucket]
        mean = torch.from_numpy(np.array(arrays["latent_mean"][j]))
        std = torch.from_numpy(np.array(arrays["latent_std"][j])) if "latent_std" in arrays else torch.zeros_like(mean)
        item: dict[str, Any] = {
            "latent_mean": mean,
            "latent_std": std,
            "resolution": torch.tensor([height, width], dtype=torch.float32),
            "aspect_ratio": torch.tensor([height / width], dtype=torch.float32),
            "index": index,
            "bucket": bucket,
        }
        if self.caption_fields:
            name, mask_name = caption_arrays(field or "caption")
            if name not in arrays:
                raise PixartError(
                    f"{self.cache_dir}: no caption field {field or 'caption'!r} in this cache (it holds "
                    f"{', '.join(self.caption_fields)}); `pixart prepare` with that field makes one"
                )
            stored = arrays[name][j]
            caption = np.zeros((self.max_length, stored.shape[-1]), dtype=stored.dtype)
            caption[: len(stored)] = stored
            mask = np.zeros((self.max_length,), dtype=np.int64)
            mask[: len(stored)] = arrays[mask_name][j]
            item["caption"], item["caption_mask"] = torch.from_numpy(caption), torch.from_numpy(mask)
            if field is not None:
                item["caption_field"] = field
        else:
            item["label"] = int(arrays["label"][j])
        return item


class OnTheFlyDataset(torch.utils.data.Dataset):
    """Images decoded, resized to their bucket and returned as pixels, with their caption (str) or label.

    The trainer encodes each batch with the same encoders ``prepare`` would use. An image that turns out to be
    unreadable when read is replaced by the next item of its bucket (batches keep their size), with a warning;
    images whose header is unreadable are dropped up front (listed in ``bad``).
    """

    def __init__(
        self,
        records: Sequence[Record],
        buckets: Buckets,
        *,
        resample: Resample = "lanczos",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        max_replacements: int = 8,
    ) -> None:
        bucket_of, self.bad = assign_buckets(records, buckets, max_pixels)
        self.records = [r for r, b in zip(records, bucket_of, strict=True) if b >= 0]
        self.bucket_of: list[int] = [b for b in bucket_of if b >= 0]
        if not self.records:
            raise PixartError("no readable images in the dataset")
        self.buckets, self.resample, self.max_pixels = buckets, resample, max_pixels
        self.max_replacements = max_replacements
        # The next item of the same bucket (cyclically): the stand-in for an image that fails to decode.
        self._next = list(range(len(self.records)))
        for bucket in set(self.bucket_of):
            members = [i for i, b in enumerate(self.bucket_of) if b == bucket]
            for a, b in zip(members, members[1:] + members[:1], strict=True):
                self._next[a] = b

    @classmethod
    def from_source(cls, source: Source, buckets: Buckets, **kwargs: Any) -> OnTheFlyDataset:
        return cls(source.records, buckets, **kwargs)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: ItemKey) -> dict[str, Any]:
        index, field = _key(key)
        bucket = self.bucket_of[index]
        height, width = self.buckets.sizes[bucket]
        tried, unreadable = index, []
        for _ in range(self.max_replacements + 1):
            record = self.records[tried]
            pixels = load_pixels(record, (height, width), resample=self.resample, max_pixels=self.max_pixels)
            if not isinstance(pixels, BadImage):
                break
            logger.warning("skipping unreadable image %s (%s)", pixels.path, pixels.reason)
            unreadable.append((str(pixels.path), pixels.reason))
            tried = self._next[tried]
        else:
            raise PixartError(
                f"{image_label(self.records[index])}: this and {self.max_replacements} more images are unreadable"
            )
        item: dict[str, Any] = {
            "pixels": pixels,
            "resolution": torch.tensor([height, width], dtype=torch.float32),
            "aspect_ratio": torch.tensor([height / width], dtype=torch.float32),
            "index": tried,
            "bucket": bucket,
            "unreadable": unreadable,  # (path, reason) of the images this item stands in for: counted by the trainer
        }
        if field is not None:  # the caption field the sampler chose (a caption mix)
            item["caption"], item["caption_field"] = caption_of(record, field) or "", field
        elif record.label is not None and record.caption is None:
            item["label"] = record.label
        else:
            item["caption"] = record.caption or ""
        return item


def step_generator(seed: int, *keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from (seed, *keys), e.g. (seed, rank, epoch, batch): the same draws for the same position,
    whatever the number of loader workers, and nothing to save for a resume."""
    entropy = [seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, *keys]
    state = np.random.SeedSequence(entropy).generate_state(2, np.uint32)
    return torch.Generator(device).manual_seed(int(state[0]) << 32 | int(state[1]))


def collate(items: list[dict[str, Any]], generator: torch.Generator | None = None) -> dict[str, Any]:
    """Stack items into a batch: tensors stacked, ints → int64 tensors, captions (str) → a list.

    Caption features lose the padding columns no item of the batch uses (``trim_padding``: same loss, less work).

    Given a ``generator`` and cached posteriors, also draws ``latents = mean + std · ε`` (float32).
    """
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], int):
            batch[key] = torch.tensor(values, dtype=torch.int64)
        else:
            batch[key] = values
    if isinstance(batch.get("caption_mask"), torch.Tensor):
        batch["caption"], batch["caption_mask"] = trim_padding(batch["caption"], batch["caption_mask"])
    if generator is not None and "latent_mean" in batch:
        batch["latents"] = draw_latents(batch["latent_mean"], batch["latent_std"], generator)
    return batch


class CaptionMixSampler(BucketBatchSampler):
    """A ``BucketBatchSampler`` whose batches carry each item's caption field: ``[(index, field), ...]``, the
    fields from ``caption_choices(seed, epoch, indices, mix)``."""

    def __init__(self, bucket_of: Sequence[int], batch_size: int, *, mix: CaptionMix, **kwargs: Any) -> None:
        super().__init__(bucket_of, batch_size, **kwargs)
        self.mix = tuple(mix)

    def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[list[tuple[int, str]]]:  # type: ignore[override]
        for batch in super().iterate(epoch, start_batch):
            yield list(zip(batch, caption_choices(self.seed, epoch, batch, self.mix), strict=True))


def make_loader(
    dataset: CachedDataset | OnTheFlyDataset,
    batch_size: int,
    *,
    seed: int,
    num_replicas: int = 1,
    rank: int = 0,
    num_workers: int = 0,
    drop_last: bool = True,
    pin_memory: bool | None = None,
    persistent_workers: bool | None = None,
    prefetch_factor: int | None = None,
    captions: CaptionMix | None = None,
) -> torch.utils.data.DataLoader:
    """A DataLoader yielding this rank's bucketed batches (``loader.batch_sampler`` is the ``BucketBatchSampler``:
    call its ``set_epoch`` each epoch, and use its ``state_dict``/``load_state_dict`` to resume).

    ``pin_memory`` defaults to whether CUDA is available; ``persistent_workers`` to ``num_workers > 0`` (workers
    and their memory maps survive across epochs). ``captions``: a caption mix, (field, proportion) pairs; each
    item then reads the field ``caption_choices`` picks for it (None: the ``caption`` field).
    """
    sampler_args = {"seed": seed, "num_replicas": num_replicas, "rank": rank, "drop_last": drop_last}
    if captions:
        sampler: BucketBatchSampler = CaptionMixSampler(dataset.bucket_of, batch_size, mix=captions, **sampler_args)
    else:
        sampler = BucketBatchSampler(dataset.bucket_of, batch_size, **sampler_args)
    extra = {"prefetch_factor": prefetch_factor} if num_workers > 0 and prefetch_factor is not None else {}
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        worker_init_fn=_ignore_stop_signals,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=num_workers > 0 if persistent_workers is None else persistent_workers and num_workers > 0,
        **extra,
    )


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGINT/SIGTERM to the main process, which saves a checkpoint before it stops.

    Ctrl-C and schedulers' TERM reach the whole process group; a worker dying of it would crash the trainer.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@dataclass
class DataFaults:
    """What a training run left out of its data: unreadable images (path → reason) and images without a caption."""

    unreadable: dict[str, str] = field(default_factory=dict)
    missing_captions: int = 0

    def summary(self) -> str | None:
        """One line for the end of the run (None when nothing was left out)."""
        parts = []
        if self.unreadable:
            path, reason = next(iter(self.unreadable.items()))
            parts.append(f"{len(self.unreadable)} unreadable image(s) skipped (e.g. {path}: {reason})")
        if self.missing_captions:
            parts.append(f"{self.missing_captions} image(s) without a caption skipped")
        return "data: " + "; ".join(parts) if parts else None


class LoaderBatches:
    """A bucketed DataLoader as the trainer's batch source: ``iterate(epoch, start, device)`` yields
    ``(epoch, next_batch, batch)`` forever (epoch after epoch), each batch on ``device`` with ``x0`` added.

    ``x0`` is a fresh draw ``mean + std · ε`` from the cached posterior, with ``ε`` from
    ``step_generator(seed, rank, epoch, batch)``: a pure function of the data position. For an
    ``OnTheFlyDataset`` the batch is encoded here first: pixels with ``autoencoder`` (then sampled the same way)
    and captions with ``text_encoder`` (``caption``, ``caption_mask``).
    """

    def __init__(
        self,
        loader: torch.utils.data.DataLoader,
        *,
        seed: int,
        rank: int = 0,
        autoencoder: Autoencoder | None = None,
        text_encoder: Any | None = None,
        max_unreadable: int | None = None,
    ) -> None:
        if not isinstance(loader.batch_sampler, BucketBatchSampler):
            raise ValueError("LoaderBatches needs a loader from make_loader (a BucketBatchSampler)")
        self.loader, self.seed, self.rank = loader, seed, rank
        self.autoencoder, self.text_encoder = autoencoder, text_encoder
        self.faults = DataFaults()  # this process's count (images are decoded in its loader workers)
        self.max_unreadable = max_unreadable  # more distinct unreadable images than this stop the run

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.loader.batch_sampler)

    def check_faults(self) -> None:
        """Stop once more distinct images are unreadable than ``max_unreadable``."""
        if self.max_unreadable is not None and len(self.faults.unreadable) > self.max_unreadable:
            path, reason = next(iter(self.faults.unreadable.items()))
            raise PixartError(
                f"{len(self.faults.unreadable)} images are unreadable, more than the {self.max_unreadable} allowed "
                f"(data.max_bad_fraction; e.g. {path}: {reason}); fix the data or raise data.max_bad_fraction"
            )

    def iterate(self, epoch: int, start: int, device: torch.device | str) -> Iterator[tuple[int, int, dict]]:
        device = torch.device(device)
        sampler: BucketBatchSampler = self.loader.batch_sampler
        while True:
            sampler.set_epoch(epoch, start)
            for position, batch in enumerate(self.loader, start=start + 1):
                yield epoch, position, self._prepare(_to_device(batch, device), epoch, position - 1, device)
            epoch, start = epoch + 1, 0

    def _prepare(self, batch: dict[str, Any], epoch: int, index: int, device: torch.device) -> dict[str, Any]:
        generator = step_generator(self.seed, self.rank, epoch, index, device=device)
        for unreadable in batch.pop("unreadable", ()):
            self.faults.unreadable.update(unreadable)
        self.check_faults()
        if "pixels" in batch:
            if self.autoencoder is None:
                raise ValueError("an on-the-fly dataset needs an autoencoder to make x0")
            batch["latent_mean"], batch["latent_std"] = self.autoencoder.encode(batch.pop("pixels"))
        batch["x0"] = draw_latents(batch["latent_mean"], batch["latent_std"], generator)
        if isinstance(batch.get("caption"), list):
            if self.text_encoder is None:
                raise ValueError("an on-the-fly captioned dataset needs a text_encoder")
            captions = self.text_encoder.encode(batch["caption"]).trimmed()
            batch["caption_text"] = batch["caption"]
            batch["caption"], batch["caption_mask"] = captions.embeddings.to(device), captions.mask.to(device)
        return batch
