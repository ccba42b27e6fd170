"""Writing ShapesWorld datasets to disk, in the layouts real data comes in."""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import json
import multiprocessing
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from pixart_cli.errors import PixartError
from pixart_cli.shapesworld.prompts import caption
from pixart_cli.shapesworld.world import (
    CAPTION_STYLES,
    COLOUR_NAMES,
    MAX_OBJECTS,
    NUM_CLASSES,
    CaptionStyle,
    DatasetFormat,
    Split,
    check_colours,
    class_folder,
    render,
    sample_scene,
    scene_label,
    sizes_of,
)


def _write_items(
    items: range,
    *,
    directory: Path,
    image_dir: Path,
    seed: int,
    sizes: list[tuple[int, int]],
    split: Split,
    objects: int | None,
    antialias: bool,
    caption_style: CaptionStyle,
    fmt: DatasetFormat,
    digits: int,
    colours: Sequence[str] | None = None,
) -> list[str]:
    """Write scenes ``items`` (each seeded by (seed, i)); return their manifest lines (jsonl format)."""
    manifest = []
    for i in items:
        rng = np.random.default_rng([seed, i])
        width, height = sizes[int(rng.integers(len(sizes)))] if len(sizes) > 1 else sizes[0]
        scene = sample_scene(rng, aspect=width / height, split=split, num_objects=objects, colours=colours)
        image = render(scene, (width, height), antialias=antialias)
        name = f"{i:0{digits}d}.png"
        if fmt == "imagefolder":
            image.save(directory / class_folder(scene_label(scene)) / name, format="PNG")
            continue
        text = caption(scene, caption_style, rng)
        image.save(image_dir / name, format="PNG")
        if fmt == "folder":
            (directory / name).with_suffix(".txt").write_text(text + "\n")
        else:
            record = {"path": f"images/{name}", "caption": text, "width": width, "height": height}
            manifest.append(json.dumps(record, ensure_ascii=False))
    return manifest


def check_dataset_args(
    n: int,
    resolution: int | tuple[int, int] | Sequence,
    caption_style: str,
    fmt: str,
    objects: int | None = None,
    colours: Sequence[str] | None = None,
) -> list[tuple[int, int]]:
    """Validate ``write_dataset``'s arguments (ValueError naming the bad one); return the (width, height) sizes."""
    if colours is not None:
        check_colours(colours)
        if fmt == "imagefolder" and any(c not in COLOUR_NAMES for c in colours):
            raise ValueError("colours: concept colours have no class label, so no imagefolder (use jsonl or folder)")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if objects is not None and (isinstance(objects, bool) or objects not in range(1, MAX_OBJECTS + 1)):
        raise ValueError(f"objects must be between 1 and {MAX_OBJECTS} (or null for a mix), got {objects!r}")
    if fmt not in ("folder", "jsonl", "imagefolder"):
        raise ValueError(f"fmt must be 'folder', 'jsonl' or 'imagefolder', got {fmt!r}")
    if caption_style not in CAPTION_STYLES:
        raise ValueError(f"caption_style must be one of {CAPTION_STYLES}, got {caption_style!r}")
    return sizes_of(resolution)


def write_dataset(
    directory: str | Path,
    n: int,
    *,
    resolution: int | tuple[int, int] | Sequence[tuple[int, int]] = 32,
    seed: int = 0,
    caption_style: CaptionStyle = "dense",
    fmt: DatasetFormat = "folder",
    split: Split = "train",
    objects: int | None = None,
    antialias: bool = True,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
    colours: Sequence[str] | None = None,
) -> Path:
    """Write ``n`` scenes to ``directory`` (created; must be absent or empty) and return it.

    Formats:

    * ``"folder"``: ``000000.png`` with its caption in ``000000.txt``.
    * ``"jsonl"``: ``images/000000.png`` plus ``manifest.jsonl``, one ``{"path", "caption", "width", "height"}``
      per line with ``path`` relative to the manifest.
    * ``"imagefolder"``: ``<class folder>/000000.png`` (ImageNet layout, class of the primary object) plus
      ``classes.txt`` listing all 48 class folders in label order. Every class has a folder, empty where no scene
      has it (with ``split="train"``, the 6 held-out classes), so a folder's rank among the sorted folders, which
      is how ImageNet-style readers assign labels, is its label.

    ``objects`` fixes the number of objects in every scene (None: 1–3, uniform), e.g. 1 for a quick first model.
    ``colours`` restricts the objects' colours; it may name concept colours (``CONCEPT_COLOURS``: data to teach a
    trained model a new colour word).
    ``resolution`` is a side, a (width, height), or a list of (width, height) sizes: then each scene draws its
    size (hence its aspect ratio) uniformly from the list, for multi-aspect training.

    Item ``i`` is drawn from ``numpy.random.default_rng([seed, i])``: the same seed writes byte-identical files and
    a smaller ``n`` writes a prefix of a larger one, whatever the number of ``workers`` (processes).
    ``progress(done, n)`` is called as items are done.
    """
    sizes = check_dataset_args(n, resolution, caption_style, fmt, objects, colours)
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise PixartError(f"{directory}: already exists and is not an empty directory")
    image_dir = directory / "images" if fmt == "jsonl" else directory
    image_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "imagefolder":
        (directory / "classes.txt").write_text("".join(f"{class_folder(k)}\n" for k in range(NUM_CLASSES)))
        for k in range(NUM_CLASSES):
            (directory / class_folder(k)).mkdir()

    digits = max(6, len(str(max(n - 1, 0))))
    job = functools.partial(
        _write_items, directory=directory, image_dir=image_dir, seed=seed, sizes=sizes, split=split,
        objects=objects, antialias=antialias, caption_style=caption_style, fmt=fmt, digits=digits, colours=colours,
    )  # fmt: skip
    chunk = 1 if workers <= 1 else max(1, min(1000, -(-n // workers)))  # serial: progress after every item
    ranges = [range(start, min(n, start + chunk)) for start in range(0, n, chunk)]
    manifest: list[str] = []
    done = 0
    with contextlib.ExitStack() as stack:
        if workers > 1 and len(ranges) > 1:
            # Spawned, not forked: a fork of a process whose other threads hold locks (torch's, logging's) can hang
            # forever, holding the caller's pipes open.
            context = multiprocessing.get_context("spawn")
            pool = stack.enter_context(concurrent.futures.ProcessPoolExecutor(workers, mp_context=context))
            results = pool.map(job, ranges)
        else:
            results = map(job, ranges)
        for lines, items in zip(results, ranges, strict=True):  # in order: the manifest matches a serial run
            manifest += lines
            done += len(items)
            if progress is not None:
                progress(done, n)
    if fmt == "jsonl":
        (directory / "manifest.jsonl").write_text("".join(line + "\n" for line in manifest))
    return directory
