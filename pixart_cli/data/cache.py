"""The feature cache: caption features and image-latent posteriors extracted once, read memory-mapped in training.

Running T5-XXL and the VAE inside the training step costs more than the transformer at 256 px (docs/reference.md §7), so
``prepare`` runs them once over a dataset and writes a *sharded* cache: a few large ``.npy`` files per shard rather
than the official layout's two small files per image.

Layout of a cache directory::

    index.json                 written last: its presence means the cache is complete (see below)
    plan.json                  the shard plan (record → bucket, shard → records); lets an interrupted run resume
    shards/00000/              one directory per shard, written atomically; all items of a shard share one bucket
        meta.json              bucket, size (H, W) px, count, caption_length, source paths, bad images
        index.npy              int64 (n,): each item's record number in the dataset
        latent_mean.npy        (n, C, H/f, W/f) scaled posterior mean   [fp16 by default]
        latent_std.npy         (n, C, H/f, W/f) scaled posterior std    [absent for pixel space: std is 0]
        caption.npy            (n, L, D) T5 features                    [caption datasets; fp16 by default]
        caption_mask.npy       uint8 (n, L), 1 on real tokens           [caption datasets]
        caption__F.npy, caption_mask__F.npy    the same for caption field F [manifests, other caption fields]
        label.npy              int64 (n,)                               [class-folder datasets]

Choices:

* Storage is float16 by default (``storage_dtype``): T5 features and scaled latents are well inside its range,
  and it halves the disk and page-cache footprint (a full 120×4096 caption is 0.98 MB in fp16). Values that would
  overflow raise an error rather than turning into ``inf``.
* Captions are trimmed per shard to the longest real token count in that shard, and padding positions are stored
  as zeros; the loader pads back with zeros (mask 0) to ``max_length``. Padded positions are masked out of
  cross-attention, so this changes no result, and it typically saves 2-5× on disk.
* Each shard holds one bucket, so latents in a shard stack into one array.
* Resume: the plan is fixed when a run starts; each finished shard is a complete directory (renamed into place),
  so a rerun with the same settings skips those and encodes only the rest. Encoders are deterministic, so an
  interrupted-and-resumed cache equals an uninterrupted one.
* Many processes (``torchrun``/``accelerate launch``): process 0 makes the plan, the shards still to do are dealt
  out whole (the k-th to process k mod world size), and process 0 writes the index when all are done. A shard's
  batches do not depend on who makes it, so the cache is the same bytes as one process's (at the same thread count
  per process), and a rerun after a kill of any process resumes as above.
* Caption fields: a manifest's other caption fields (``caption_vlm`` written by ``pixart caption``) are encoded
  beside ``caption`` when the settings name them; the index lists them (``caption_fields``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pixart_cli.components.autoencoders import Autoencoder, load_autoencoder
from pixart_cli.components.resolve import BUILTIN, resolve_builtin
from pixart_cli.components.t5 import T5Quantization
from pixart_cli.components.text import TextEncoder
from pixart_cli.data.buckets import Buckets, assign_buckets
from pixart_cli.data.sources import (
    DEFAULT_CAPTION_FIELDS,
    Record,
    Source,
    SourceKind,
    caption_of,
    check_caption_field,
    read_source,
)
from pixart_cli.data.transforms import DEFAULT_MAX_PIXELS, BadImage, Resample, image_label, load_pixels
from pixart_cli.distributed import Dist
from pixart_cli.errors import PixartError
from pixart_cli.io import atomic_directory, atomic_file, remove_stale_temporaries

logger = logging.getLogger(__name__)

FORMAT = "pixart-feature-cache"
VERSION = 1
INDEX = "index.json"
PLAN = "plan.json"
SHARDS = "shards"
STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass(frozen=True)
class PrepareSettings:
    """How ``prepare`` turns a dataset into a cache; validated when built, so a bad value fails before anything loads.

    The encoders, device, compute dtype and ``overwrite`` are ``prepare``'s own arguments: objects or choices of
    this run. Most fields here are recorded in the cache's index (a rerun with other values is refused); the batch
    size, worker count and bad-image limit are not (they change nothing in the cache).

    Args:
        resolution: image side in pixels; with ``multi_scale`` the base of the aspect-ratio bucket table.
        kind: dataset layout (``"auto"``: detected; see ``sources``).
        batch_size: images (and captions) per encoder call. shard_size: items per shard (at most).
        max_length: caption tokens (120 for PixArt-α). storage_dtype: dtype on disk.
        keep_empty_captions: keep images without a caption (empty caption) instead of skipping them.
        clean_captions: apply ``text.clean_caption`` (else only lower-case + strip).
        bucket_multiple: bucket sides are multiples of this (default: VAE downsampling × 2, the patch size).
        resample: the resize filter. max_pixels: larger images are refused as unreadable (decompression bombs).
        max_bad_fraction: abort once more than this fraction of the dataset's images has proved unreadable.
        num_workers: processes decoding images (0: in this process).
        caption_fields: the caption fields of a manifest to encode, each into its own arrays (``caption_arrays``);
            kept sorted, so the order they are named in makes no other cache.
    """

    resolution: int
    multi_scale: bool = False
    kind: SourceKind | Literal["auto"] = "auto"
    batch_size: int = 32
    shard_size: int = 1024
    max_length: int = 120
    storage_dtype: Literal["float16", "float32"] = "float16"
    keep_empty_captions: bool = False
    clean_captions: bool = True
    bucket_multiple: int | None = None
    resample: Resample = "lanczos"
    max_bad_fraction: float = 0.01
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    num_workers: int = 0
    caption_fields: tuple[str, ...] = DEFAULT_CAPTION_FIELDS

    def __post_init__(self) -> None:
        # In the order `pixart prepare` reported them before the settings were one object.
        if self.num_workers < 0:
            raise PixartError("--workers must be 0 or more")
        if self.batch_size <= 0 or self.shard_size <= 0 or self.max_length <= 0 or self.resolution <= 0:
            raise PixartError("batch size, shard size, max length and resolution must be positive")
        if not 0 <= self.max_bad_fraction <= 1:
            raise PixartError(f"max bad fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise PixartError(f"storage dtype must be one of {', '.join(STORAGE_DTYPES)}, got {self.storage_dtype!r}")
        fields = tuple(self.caption_fields)
        if not fields or len(set(fields)) != len(fields):
            raise PixartError(f"caption fields must be one or more distinct names, got {list(fields)}")
        for name in fields:
            check_caption_field(name)
        object.__setattr__(self, "caption_fields", tuple(sorted(fields)))


@dataclass(frozen=True)
class PrepareProgress:
    """Passed to ``prepare``'s progress callback at the start and after each shard is written (in process 0 of a
    launch, counting the shards every process has finished).

    ``items_done`` counts cached items; ``items_done + bad_images`` reaches ``items_total`` at the end.
    """

    shards_done: int
    shards_total: int
    items_done: int
    items_total: int
    bad_images: int


@dataclass
class PrepareReport:
    """What ``prepare`` did. ``resumed_shards``: shards found already finished on disk."""

    cache_dir: Path
    items: int
    shards: int
    resumed_shards: int
    records: int
    bad_images: list[BadImage]
    missing_captions: int
    skipped_captions: int
    bucket_counts: dict[tuple[int, int], int] = field(default_factory=dict)
    seconds: float = 0.0


def caption_arrays(field: str) -> tuple[str, str]:
    """The names of a caption field's arrays in a shard (features, mask): ``caption``/``caption_mask`` for the
    ``caption`` field, as in every cache, and ``caption__FIELD``/``caption_mask__FIELD`` for another field."""
    if field == "caption":
        return "caption", "caption_mask"
    return f"caption__{field}", f"caption_mask__{field}"


def _identity_of(value: object) -> str:
    """What a component is recorded as: an absolute path for a local directory, else its id or name."""
    if isinstance(value, Autoencoder):
        value = value.name
    value = getattr(value, "source", value)  # a text.TextEncoder records where it loads from
    if isinstance(value, str | os.PathLike):
        text = os.fspath(value)
        return os.path.abspath(text) if os.path.isdir(text) else text
    return type(value).__name__


def same_component(recorded: str | None, named: str | None) -> bool:
    """Whether a cache's recorded text encoder or VAE is the one a recipe names (``builtin:X`` and its asset path
    are the same; a local directory compares by absolute path). Unrecorded or unnamed: nothing to compare."""
    return recorded is None or named is None or _canonical(recorded) == _canonical(named)


def _canonical(name: str) -> str:
    if name.startswith(BUILTIN):
        try:
            name = resolve_builtin(name)
        except PixartError:  # an asset this install lacks: compare by name
            return name
    return _identity_of(name)  # as `prepare` records it


def _records_digest(records: Sequence[Record]) -> str:
    digest = hashlib.sha256()
    for r in records:
        fields = [str(r.path), r.caption, r.label, r.width, r.height]
        if r.member is not None:  # a container's member (files keep the digest they always had)
            fields.append(r.member)
        digest.update(json.dumps([*fields, r.captions] if r.captions else fields).encode())
    return digest.hexdigest()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PixartError(f"{path}: unreadable ({exc})") from None


def _write_json(path: Path, data: Any) -> None:
    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(data, indent=1))


def _check_output(output: Path) -> None:
    """Refuse an output that is not ours, before anything is loaded or written.

    What process 0 of the same launch may be making meanwhile (the shards folder, the plan's temporary) is ours.
    """
    if output.exists() and not output.is_dir():
        raise PixartError(f"{output}: exists and is not a directory")
    if (output / INDEX).exists() or (output / PLAN).exists():
        return
    ours = (INDEX, PLAN, SHARDS)
    try:
        names = [p.name for p in output.iterdir()] if output.is_dir() else []
    except FileNotFoundError:  # being replaced (--overwrite) by process 0
        return
    if any(name not in ours and not name.startswith(tuple(f".{n}." for n in ours)) for name in names):
        raise PixartError(f"{output}: exists and is not a feature cache (choose a new output directory)")


def _prepare_output(output: Path, overwrite: bool) -> None:
    _check_output(output)
    is_cache = (output / INDEX).exists() or (output / PLAN).exists()
    if overwrite and is_cache:
        shutil.rmtree(output)
    try:
        (output / SHARDS).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PixartError(f"{output}: cannot create the cache directory ({exc.strerror})") from None
    if not os.access(output / SHARDS, os.W_OK):
        raise PixartError(f"{output}: cache directory is not writable")


def _plan_shards(bucket_of: Sequence[int], num_buckets: int, shard_size: int) -> list[dict[str, Any]]:
    """Shards of at most ``shard_size`` records of one bucket, buckets in order, records in dataset order."""
    shards = []
    for bucket in range(num_buckets):
        members = [i for i, b in enumerate(bucket_of) if b == bucket]
        shards.extend(
            {"bucket": bucket, "records": members[i : i + shard_size]} for i in range(0, len(members), shard_size)
        )
    return shards


class _ShardPixels(torch.utils.data.Dataset):
    """Record number → (record number, pixels or the reason the image is unusable); runs in loader workers."""

    def __init__(self, records, size_of: dict[int, tuple[int, int]], resample: Resample, max_pixels) -> None:
        self.records, self.size_of, self.resample, self.max_pixels = records, size_of, resample, max_pixels

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | str]:
        pixels = load_pixels(
            self.records[index], self.size_of[index], resample=self.resample, max_pixels=self.max_pixels
        )
        return index, pixels.reason if isinstance(pixels, BadImage) else pixels

    def __len__(self) -> int:
        return len(self.records)


def _as_list(batch: list) -> list:
    return batch


def _to_storage(tensor: torch.Tensor, dtype: type, what: str) -> np.ndarray:
    array = tensor.detach().float().cpu().numpy().astype(dtype)
    if not np.isfinite(array).all():
        raise PixartError(f"{what} overflow {np.dtype(dtype).name} storage (use storage dtype float32)")
    return array


def prepare(
    data: str | os.PathLike,
    output: str | os.PathLike,
    settings: PrepareSettings,
    *,
    t5: str | Any | None,
    vae: str | Autoencoder,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: Callable[[PrepareProgress], None] | None = None,
    dist: Dist | None = None,
    t5_quant: T5Quantization = "none",
) -> PrepareReport | None:
    """Extract caption features (or labels) and latent posteriors of a dataset into a sharded cache at ``output``.

    Under ``torchrun``/``accelerate launch`` the processes share the work: every process checks the inputs and
    loads the encoders, process 0 makes (or reads) the plan, the shards still to do are dealt out whole (each item
    is encoded once, by one process), and process 0 writes the index once every shard is on disk. The cache holds
    the same bytes whatever the number of processes (at the same threads per process): a shard's batches and their
    encoding do not depend on which process makes it.

    Args:
        data: dataset path (folder + .txt captions, .jsonl manifest, or class-folder tree; see ``sources``).
        output: cache directory. An unfinished cache with the same settings is resumed; a finished one is left as
            it is (its report is returned); different settings are an error unless ``overwrite``.
        settings: what the cache holds and how it is made (``PrepareSettings``).
        t5: T5 directory / hub id, or a ready ``text.TextEncoder``; unused (may be None) for class-folder data.
        vae: VAE directory / hub id, ``"none"`` for pixel space, or a ready ``Autoencoder``.
        device: where the encoders run; a bare ``cuda`` is each process's own GPU (``cuda:LOCAL_RANK``).
        dtype: encoder compute dtype (default: as stored; T5 v1.1 overflows in fp16, prefer bf16 or fp32).
        progress: called in process 0 with a ``PrepareProgress`` of the whole job at the start and after each of
            its shards.
        dist: this process among those launched together (default: from the launcher's environment).
        t5_quant: "int8" or "nf4": T5's linear layers quantised (``components.t5.load_t5``); recorded in the index.

    Returns the report of the whole job in process 0, None in the others.
    """
    dist = dist or Dist.from_environment()
    try:
        return _prepare(
            data, output, settings, t5, vae, dist.device(device), dtype, overwrite, progress, dist, t5_quant
        )
    finally:
        dist.close()  # also where another step of the launch opened the group (a recipe's dataset)


def _prepare(
    data: str | os.PathLike,
    output: str | os.PathLike,
    settings: PrepareSettings,
    t5: str | Any | None,
    vae: str | Autoencoder,
    device: torch.device,
    dtype: torch.dtype | None,
    overwrite: bool,
    progress: Callable[[PrepareProgress], None] | None,
    dist: Dist,
    t5_quant: T5Quantization = "none",
) -> PrepareReport | None:
    start_time = time.perf_counter()
    output = Path(output)
    source = read_source(
        data, settings.kind, keep_empty_captions=settings.keep_empty_captions, caption_fields=settings.caption_fields
    )
    # Images whose caption file is not text count as unreadable images; known now, so too many is an error before
    # anything is written.
    source_bad = [BadImage(path, reason) for path, reason in source.bad]
    total = len(source.records) + len(source_bad)
    limit = settings.max_bad_fraction * total

    def check_bad(bad: list[BadImage]) -> None:
        if len(bad) > limit:
            raise PixartError(
                f"{len(bad)} of {total} images are unreadable, more than {settings.max_bad_fraction:.1%} "
                f"(e.g. {bad[0].path}: {bad[0].reason}); fix the data or raise --max-bad-fraction"
            )

    check_bad(source_bad)
    captioned = source.conditioning == "caption"
    if captioned and t5 is None:
        raise PixartError(f"{source.path}: a captioned ({source.kind}) dataset needs a T5 text encoder (--t5)")
    caption_fields = settings.caption_fields if captioned else ()

    # What the index records, and a rerun must match: these keys and values are the cache's format.
    recorded = {
        "format": FORMAT,
        "version": VERSION,
        "kind": source.kind,
        "source": str(source.path.resolve()),
        "conditioning": source.conditioning,
        "resolution": settings.resolution,
        "multi_scale": settings.multi_scale,
        "bucket_multiple": settings.bucket_multiple,
        "shard_size": settings.shard_size,
        "text_encoder": _identity_of(t5) if captioned else None,
        "max_length": settings.max_length if captioned else None,
        "clean_captions": settings.clean_captions if captioned else None,
        "keep_empty_captions": settings.keep_empty_captions,
        "vae": _identity_of(vae),
        "compute_dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "storage_dtype": settings.storage_dtype,
        "resample": settings.resample,
        "max_pixels": settings.max_pixels,
    }
    if caption_fields and caption_fields != DEFAULT_CAPTION_FIELDS:  # recorded only then: older caches still match
        recorded["caption_fields"] = list(caption_fields)
    if captioned and t5_quant != "none":  # likewise
        recorded["t5_quantization"] = t5_quant
    index_path = output / INDEX
    if index_path.exists() and not overwrite:
        index = _read_json(index_path)
        if index.get("settings") != recorded:
            raise PixartError(
                f"{output}: holds a cache made with other settings ({_diff(index.get('settings'), recorded)}); "
                "pass --overwrite to replace it"
            )
        if not dist.is_main:
            return None
        logger.info("%s: cache already complete", output)
        plan = output / PLAN
        if plan.exists() and _read_json(plan).get("records_digest") != _records_digest(source.records):
            logger.warning("%s: the dataset has changed since this cache was made (--overwrite rebuilds it)", output)
        return _report_from_index(output, index, source, time.perf_counter() - start_time)
    _check_output(output)

    # Everything that can fail on the user's input (encoders, buckets) fails before the first write, so that a
    # failed start leaves no half-made cache behind for the next run to refuse; and in every process before the
    # first barrier, so that a refusal is the same error everywhere rather than a process left waiting.
    encoder = vae if isinstance(vae, Autoencoder) else load_autoencoder(str(vae), dtype=dtype, device=device)
    multiple = settings.bucket_multiple or encoder.downsample * 2
    if multiple % encoder.downsample:
        raise PixartError(f"bucket multiple {multiple} is not divisible by the VAE downsampling {encoder.downsample}")
    try:
        buckets = Buckets.for_resolution(settings.resolution, settings.multi_scale, multiple)
    except ValueError as exc:
        raise PixartError(f"{exc} (bucket sides must be multiples of the VAE downsampling × patch size 2)") from None
    text_encoder = (
        _text_encoder(t5, settings.max_length, dtype, device, settings.clean_captions, t5_quant) if captioned else None
    )
    digest = _records_digest(source.records)
    shard_root = output / SHARDS
    # Shards an earlier run finished, listed by every process before any process writes one (after the barrier a
    # fast process may already be adding its own): all of them then deal out the same shards still to do.
    finished: set[str] = set()
    if not overwrite:
        if (output / PLAN).exists():
            _check_plan(output, _read_json(output / PLAN), recorded, digest)
        finished = _finished_shards(shard_root)
    plan: dict[str, Any] = {}
    if dist.is_main:
        _prepare_output(output, overwrite)
        plan = _load_or_make_plan(output, recorded, source, buckets, settings.shard_size, settings.max_pixels, digest)
        for path in remove_stale_temporaries(shard_root):
            logger.info("removed a half-written shard left by an interrupted run: %s", path.name)
    dist.barrier()
    plan = plan or _read_json(output / PLAN)
    records, shards = source.records, plan["shards"]
    known_bad = source_bad + [BadImage(image_label(records[i]), reason) for i, reason in plan["header_bad"]]

    # Tally shards finished by an earlier run.
    done = [s for s in range(len(shards)) if _shard_name(s) in finished]
    bad = list(known_bad)
    items = 0
    for s in done:
        meta = _read_json(shard_root / _shard_name(s) / "meta.json")
        items += meta["count"]
        bad.extend(BadImage(Path(p), reason) for p, reason in meta["bad"])
    check_bad(bad)
    pending = sorted(set(range(len(shards))) - set(done))
    mine = pending[dist.rank :: dist.world]  # whole shards: s-th pending shard → process s mod world size
    if done and dist.is_main:
        logger.info("%s: resuming, %d of %d shards already done", output, len(done), len(shards))
    items_total = sum(len(s["records"]) for s in shards) + len(known_bad)
    counted = set(done)

    def report_progress() -> None:
        nonlocal items
        if progress is None or not dist.is_main:
            return
        # Shards the other processes finished since the last report count too: the report is the whole job's.
        for s in pending:
            if s not in counted and (shard_root / _shard_name(s)).is_dir():
                meta = _read_json(shard_root / _shard_name(s) / "meta.json")
                items += meta["count"]
                bad.extend(BadImage(Path(p), reason) for p, reason in meta["bad"])
                counted.add(s)
        progress(PrepareProgress(len(counted), len(shards), items, items_total, len(bad)))

    report_progress()
    store = STORAGE_DTYPES[settings.storage_dtype]
    for s, parts, shard_bad in _encode_shards(
        mine, shards, records, buckets, settings, encoder, text_encoder, caption_fields, device, store
    ):
        check_bad(bad + shard_bad)
        if s is None:  # a batch, not yet a whole shard: only the check above
            continue
        directory = shard_root / _shard_name(s)
        items += _write_shard(directory, shards[s], buckets, parts, shard_bad, source, encoder, caption_fields)
        bad.extend(shard_bad)
        counted.add(s)
        report_progress()
    dist.barrier()  # every shard is on disk
    if not dist.is_main:
        return None
    index = _make_index(recorded, source, buckets, encoder, shards, output, known_bad, caption_fields)
    check_bad([BadImage(Path(p), reason) for p, reason in index["bad_images"]])  # all processes' together
    _write_json(index_path, index)
    report_progress()
    return _report_from_index(output, index, source, time.perf_counter() - start_time, resumed=len(done))


def _encode_shards(
    mine: list[int],
    shards: list[dict[str, Any]],
    records: Sequence[Record],
    buckets: Buckets,
    settings: PrepareSettings,
    encoder: Autoencoder,
    text_encoder: Any | None,
    caption_fields: Sequence[str],
    device: torch.device,
    store: type,
) -> Iterator[tuple[int | None, list[dict[str, Any]], list[BadImage]]]:
    """Encode the shards ``mine`` batch by batch: yields ``(None, parts, bad)`` when a batch is decoded (before it
    is encoded: the caller checks the bad images so far) and ``(shard, parts, bad)`` when a shard is complete.
    Decoded images live only as long as their batch (and the loader's prefetch): the dataset is streamed."""
    if not mine:
        return
    size_of = {i: buckets.sizes[shards[s]["bucket"]] for s in mine for i in shards[s]["records"]}
    batches, batch_shard = [], []
    for s in mine:
        members = shards[s]["records"]
        for i in range(0, len(members), settings.batch_size):
            batches.append(members[i : i + settings.batch_size])
            batch_shard.append(s)
    loader = torch.utils.data.DataLoader(
        _ShardPixels(records, size_of, settings.resample, settings.max_pixels),
        batch_sampler=batches,
        num_workers=settings.num_workers,
        collate_fn=_as_list,
    )
    parts: list[dict[str, Any]] = []
    shard_bad: list[BadImage] = []
    for b, batch in enumerate(loader):
        s = batch_shard[b]
        good = [(i, x) for i, x in batch if isinstance(x, torch.Tensor)]
        shard_bad.extend(BadImage(image_label(records[i]), x) for i, x in batch if isinstance(x, str))
        yield None, parts, shard_bad
        if good:
            part: dict[str, Any] = {"index": np.array([i for i, _ in good], dtype=np.int64)}
            mean, std = encoder.encode(torch.stack([x for _, x in good]).to(device))
            part["latent_mean"] = _to_storage(mean, store, "latents")
            if encoder.stochastic:
                part["latent_std"] = _to_storage(std, store, "latent stds")
            for name in caption_fields:
                captions = text_encoder.encode([caption_of(records[i], name) or "" for i, _ in good])
                # Zero the padding positions, so an item's stored features do not depend on its shard's
                # trimmed length (they are masked out of attention either way).
                features = captions.embeddings * captions.mask[..., None].to(captions.embeddings.dtype)
                key, mask_key = caption_arrays(name)
                part[key] = _to_storage(features, store, "caption features")
                part[mask_key] = captions.mask.cpu().numpy().astype(np.uint8)
            if not caption_fields:
                part["label"] = np.array([records[i].label for i, _ in good], dtype=np.int64)
            parts.append(part)
        if b + 1 == len(batches) or batch_shard[b + 1] != s:
            yield s, parts, shard_bad
            parts, shard_bad = [], []


def _shard_name(s: int) -> str:
    return f"{s:05d}"


def _finished_shards(shard_root: Path) -> set[str]:
    """Names of the finished shards on disk (temporaries are hidden: ``.00003.tmp-…``)."""
    try:
        return {p.name for p in shard_root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    except FileNotFoundError:
        return set()


def _diff(old: dict | None, new: dict) -> str:
    if not isinstance(old, dict):
        return "no settings recorded"
    changed = [f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in {**old, **new} if old.get(k) != new.get(k)]
    return "; ".join(changed[:3]) or "unknown difference"


def _text_encoder(t5, max_length: int, dtype, device, clean: bool, quantize: T5Quantization = "none"):
    if isinstance(t5, TextEncoder):
        if t5.max_length != max_length:
            raise PixartError(f"the text encoder pads to {t5.max_length} tokens, but max length is {max_length}")
        return t5
    return TextEncoder(
        os.fspath(t5), max_length=max_length, dtype=dtype, device=device, clean=clean, quantize=quantize
    ).load()


def _check_plan(output: Path, plan: dict[str, Any], settings: dict, digest: str) -> None:
    """Refuse the plan of an unfinished cache made with other settings or from other data."""
    if plan.get("settings") != settings:
        raise PixartError(
            f"{output}: holds an unfinished cache made with other settings "
            f"({_diff(plan.get('settings'), settings)}); pass --overwrite to start over"
        )
    if plan.get("records_digest") != digest:
        raise PixartError(f"{output}: the dataset changed since this cache was started; pass --overwrite to start over")


def _load_or_make_plan(
    output: Path,
    settings: dict,
    source: Source,
    buckets: Buckets,
    shard_size: int,
    max_pixels: int | None,
    digest: str,
) -> dict[str, Any]:
    """The saved plan of an interrupted run (checked against settings and data), or a new one, saved."""
    path = output / PLAN
    if path.exists():
        plan = _read_json(path)
        _check_plan(output, plan, settings, digest)
        return plan
    if len(buckets) > 1:
        logger.info("reading %d image headers to assign aspect-ratio buckets", len(source.records))
    bucket_of, bad = assign_buckets(source.records, buckets, max_pixels)
    unreadable = [i for i, b in enumerate(bucket_of) if b < 0]  # in the same order as ``bad``
    header_bad = [[i, b.reason] for i, b in zip(unreadable, bad, strict=True)]
    plan = {
        "settings": settings,
        "records_digest": digest,
        "buckets": buckets.to_json(),
        "bucket_of": bucket_of,
        "header_bad": header_bad,
        "shards": _plan_shards(bucket_of, len(buckets), shard_size),
    }
    _write_json(path, plan)
    return plan


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _write_shard(
    directory: Path,
    shard: dict[str, Any],
    buckets: Buckets,
    parts: list[dict[str, Any]],
    bad: list[BadImage],
    source: Source,
    encoder: Autoencoder,
    caption_fields: Sequence[str] = DEFAULT_CAPTION_FIELDS,
) -> int:
    """Write one shard atomically; returns its item count. Each caption field is trimmed to its longest caption."""
    bucket = shard["bucket"]
    height, width = buckets.sizes[bucket]
    root = source.path if source.path.is_dir() else source.path.parent
    fields: dict[str, np.ndarray] = {}
    names = parts[0].keys() if parts else []
    for name in names:
        fields[name] = np.concatenate([p[name] for p in parts])
    count = len(fields["index"]) if fields else 0
    if not fields:  # every image of the shard was bad: keep the (empty) shard so a resume knows it is done
        fields["index"] = np.zeros((0,), dtype=np.int64)
    lengths = {}
    for name in caption_fields:
        key, mask_key = caption_arrays(name)
        if mask_key in fields:
            lengths[name] = max(1, int(fields[mask_key].sum(axis=1).max(initial=0)))
            fields[key] = fields[key][:, : lengths[name]]
            fields[mask_key] = fields[mask_key][:, : lengths[name]]
    meta = {
        "bucket": bucket,
        "size": [height, width],
        "latent_shape": list(encoder.latent_shape(height, width)),
        "count": count,
        "caption_length": lengths.get("caption"),
        **({"caption_lengths": lengths} if set(lengths) - {"caption"} else {}),
        "paths": [_relative(image_label(source.records[i]), root) for i in fields["index"].tolist()],
        "bad": [[str(b.path), b.reason] for b in bad],
    }
    with atomic_directory(directory) as tmp:
        for name, array in fields.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(array))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return count


def _make_index(
    settings: dict,
    source: Source,
    buckets: Buckets,
    encoder: Autoencoder,
    shards: list[dict[str, Any]],
    output: Path,
    known_bad: list[BadImage],
    caption_fields: Sequence[str] = DEFAULT_CAPTION_FIELDS,
) -> dict[str, Any]:
    """``known_bad``: images found unusable before decoding (caption file not text, header unreadable)."""
    shard_entries, bad, bucket_counts = [], [[str(b.path), b.reason] for b in known_bad], [0] * len(buckets)
    caption_channels = None
    for s, shard in enumerate(shards):
        directory = output / SHARDS / _shard_name(s)
        meta = _read_json(directory / "meta.json")
        bad.extend(meta["bad"])
        bucket_counts[shard["bucket"]] += meta["count"]
        shard_entries.append({"name": _shard_name(s), "bucket": shard["bucket"], "count": meta["count"]})
        first = directory / f"{caption_arrays(caption_fields[0])[0]}.npy" if caption_fields else None
        if caption_channels is None and meta["count"] and first is not None and first.exists():
            caption_channels = int(np.load(first, mmap_mode="r").shape[-1])
    return {
        "format": FORMAT,
        "version": VERSION,
        "settings": settings,
        "kind": source.kind,
        "source": settings["source"],
        "conditioning": source.conditioning,
        "class_names": source.class_names,
        "buckets": buckets.to_json(),
        "text_encoder": settings["text_encoder"],
        "max_length": settings["max_length"],
        "caption_fields": list(caption_fields) if source.conditioning == "caption" else None,
        "caption_channels": caption_channels,
        "vae": settings["vae"],
        "latent_channels": encoder.channels,
        "downsample": encoder.downsample,
        "scaling_factor": encoder.scaling_factor,
        "latent_std": encoder.stochastic,
        "storage_dtype": settings["storage_dtype"],
        "counts": {
            "records": len(source.records) + len(source.bad),  # the images considered, those skipped included
            "items": sum(e["count"] for e in shard_entries),
            "bad_images": len(bad),
            "missing_captions": source.missing_captions,
            "skipped_captions": source.skipped_captions,
            "per_bucket": bucket_counts,
        },
        "shards": shard_entries,
        "bad_images": bad,
    }


def _report_from_index(
    output: Path, index: dict, source: Source, seconds: float, resumed: int | None = None
) -> PrepareReport:
    sizes = [tuple(s) for s in index["buckets"]["sizes"]]
    counts = index["counts"]
    return PrepareReport(
        cache_dir=output,
        items=counts["items"],
        shards=len(index["shards"]),
        resumed_shards=len(index["shards"]) if resumed is None else resumed,
        records=counts["records"],
        bad_images=[BadImage(Path(p), reason) for p, reason in index["bad_images"]],
        missing_captions=source.missing_captions,
        skipped_captions=source.skipped_captions,
        bucket_counts={sizes[b]: n for b, n in enumerate(counts["per_bucket"]) if n},
        seconds=seconds,
    )
