"""Datasets on disk → a list of ``Record``\\ s (image path + caption or class label).

Three layouts are read:

* ``captions``: a folder of images, each with a same-name ``.txt`` caption beside it (searched recursively);
* ``manifest``: a JSONL file, one JSON object per line with ``path`` (relative to the manifest's folder, or absolute),
  ``caption`` and optionally ``width``/``height`` (pixels, saves reading image headers) and ``label``;
* ``classes``: an ImageNet-style tree ``root/<class_name>/*.jpg``; labels index the sorted class names.

Records come out in a deterministic order (sorted paths, or manifest order) so that everything built from them
(bucket plans, cache shards) is reproducible. Hidden files and folders (``.name``) are ignored. Images are not
opened here: broken files are found, counted and skipped when they are decoded (``transforms.load_image``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pixart_cli.errors import PixartError

logger = logging.getLogger(__name__)

SourceKind = Literal["captions", "manifest", "classes"]
SOURCE_KINDS: tuple[str, ...] = ("captions", "manifest", "classes")

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


@dataclass(frozen=True)
class Record:
    """One training example. ``width``/``height`` are known only when the source states them."""

    path: Path
    caption: str | None = None
    label: int | None = None
    width: int | None = None
    height: int | None = None


@dataclass
class Source:
    """What a reader found: the records plus what it had to drop or patch.

    ``missing_captions``: images whose caption was absent or empty; they were dropped (``skipped_captions``)
    or kept with an empty caption, depending on ``keep_empty_captions``.
    """

    kind: SourceKind
    path: Path
    records: list[Record]
    class_names: list[str] | None = None
    missing_captions: int = 0
    skipped_captions: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def conditioning(self) -> Literal["caption", "label"]:
        return "label" if self.kind == "classes" else "caption"


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _walk(root: Path) -> tuple[list[Path], list[Path]]:
    """(image files, .txt files) under ``root``, recursively, hidden entries skipped, each sorted."""
    images, texts = [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # pruning in place stops os.walk descending
        for name in filenames:
            if name.startswith("."):
                continue
            path = Path(dirpath, name)
            if is_image_file(path):
                images.append(path)
            elif path.suffix.lower() == ".txt":
                texts.append(path)
    return sorted(images), sorted(texts)


def detect_kind(path: str | os.PathLike) -> SourceKind:
    """``manifest`` for a ``.jsonl`` file; ``classes`` for a folder whose sub-folders hold the images and that has
    no ``.txt`` files; ``captions`` otherwise."""
    path = Path(path)
    if not path.exists():
        raise PixartError(f"{path}: no such dataset file or directory")
    if path.is_file():
        if path.suffix.lower() == ".jsonl":
            return "manifest"
        raise PixartError(f"{path}: not a dataset (expected a folder of images or a .jsonl manifest)")
    images, texts = _walk(path)
    if images and not texts and all(p.parent != path for p in images):
        return "classes"
    return "captions"


def read_source(
    path: str | os.PathLike, kind: SourceKind | Literal["auto"] = "auto", *, keep_empty_captions: bool = False
) -> Source:
    """Read a dataset of the given ``kind`` (``"auto"``: see ``detect_kind``)."""
    path = Path(path)
    if not path.exists():
        raise PixartError(f"{path}: no such dataset file or directory")
    path = Path(os.path.abspath(path))  # absolute records: a resume from another working directory matches
    if kind == "auto":
        kind = detect_kind(path)
    if kind == "manifest":
        source = read_manifest(path, keep_empty_captions=keep_empty_captions)
    elif kind == "classes":
        source = read_class_tree(path)
    elif kind == "captions":
        source = read_image_folder(path, keep_empty_captions=keep_empty_captions)
    else:
        raise PixartError(f"unknown dataset kind {kind!r} (choose from {', '.join(SOURCE_KINDS)})")
    if source.missing_captions:
        action = "kept with an empty caption" if keep_empty_captions else "skipped"
        logger.warning("%s: %d image(s) without a caption (%s)", path, source.missing_captions, action)
    if not source.records and source.missing_captions:
        raise PixartError(
            f"{path}: none of the {source.missing_captions} images has a caption (read as a {kind} dataset; "
            "keep them with empty captions, or read class folders as kind 'classes')"
        )
    if not source.records:
        raise PixartError(f"{path}: no usable images found (read as a {kind} dataset)")
    return source


def _caption_or_none(text: object) -> str | None:
    if not isinstance(text, str):
        return None
    text = text.strip()
    return text or None


def read_image_folder(root: str | os.PathLike, *, keep_empty_captions: bool = False) -> Source:
    """Images with same-name ``.txt`` captions (``a/b.jpg`` ↔ ``a/b.txt``), recursively."""
    root = Path(root)
    if not root.is_dir():
        raise PixartError(f"{root}: not a directory")
    images, texts = _walk(root)
    text_of = {p.with_suffix(""): p for p in texts}
    records, missing, skipped = [], 0, 0
    for image in images:
        txt = text_of.get(image.with_suffix(""))
        caption = _caption_or_none(txt.read_text(encoding="utf-8", errors="replace")) if txt else None
        if caption is None:
            missing += 1
            if not keep_empty_captions:
                skipped += 1
                continue
            caption = ""
        records.append(Record(path=image, caption=caption))
    return Source("captions", root, records, missing_captions=missing, skipped_captions=skipped)


def _positive_int(value: object, what: str, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PixartError(f"{where}: {what} must be a positive integer, got {value!r}")
    return value


def read_manifest(manifest: str | os.PathLike, *, keep_empty_captions: bool = False) -> Source:
    """A JSONL manifest: ``{"path": ..., "caption": ..., "width"?: ..., "height"?: ..., "label"?: ...}``."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise PixartError(f"{manifest}: no such manifest file")
    base = manifest.parent
    records, missing, skipped = [], 0, 0
    with open(manifest, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{manifest}:{number}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PixartError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"]:
                raise PixartError(f'{where}: each line must be an object with a "path" string')
            label = entry.get("label")
            if label is not None and (isinstance(label, bool) or not isinstance(label, int) or label < 0):
                raise PixartError(f"{where}: label must be a non-negative integer, got {label!r}")
            width = _positive_int(entry.get("width"), "width", where)
            height = _positive_int(entry.get("height"), "height", where)
            caption = _caption_or_none(entry.get("caption"))
            if caption is None:
                missing += 1
                if not keep_empty_captions:
                    skipped += 1
                    continue
                caption = ""
            path = Path(os.path.expanduser(entry["path"]))
            records.append(Record(base / path, caption, label, width, height))  # base / absolute = absolute
    return Source("manifest", manifest, records, missing_captions=missing, skipped_captions=skipped)


def read_class_tree(root: str | os.PathLike) -> Source:
    """``root/<class_name>/**/<image>``: label = index of the class name among all sorted class folders.

    Every (non-hidden) sub-folder is a class, even an empty one, so labels do not shift when a class happens to
    have no images (the same convention as torchvision's ``ImageFolder``). A ``classes.txt`` beside the folders
    (one class per line, as ShapesWorld writes) must name exactly the folders: where a class folder is missing,
    every later label would shift.
    """
    root = Path(root)
    if not root.is_dir():
        raise PixartError(f"{root}: not a directory")
    class_names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_names:
        raise PixartError(f"{root}: no class sub-folders found")
    listed = root / "classes.txt"
    if listed.is_file():
        expected = [line.strip() for line in listed.read_text(encoding="utf-8").splitlines() if line.strip()]
        missing = [name for name in expected if name not in class_names]
        if sorted(expected) != class_names:
            raise PixartError(
                f"{root}: classes.txt names {len(expected)} classes but there are {len(class_names)} class folders"
                + (f" (no folder for {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''})" if missing else "")
                + ", so labels would not match it; create the missing folders (empty is fine)"
            )
    records, empty = [], []
    for label, name in enumerate(class_names):
        images, _ = _walk(root / name)
        if not images:
            empty.append(name)
        records.extend(Record(path=p, label=label) for p in images)
    notes = [f"{len(empty)} class(es) have no images: {', '.join(empty)}"] if empty else []
    for note in notes:
        logger.warning("%s: %s", root, note)
    return Source("classes", root, records, class_names=class_names, notes=notes)
