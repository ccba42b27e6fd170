"""Datasets on disk → a list of ``Record``\\ s (image path + caption or class label).

Three layouts are read:

* ``captions``: a folder of images, each with a same-name ``.txt`` caption beside it (searched recursively);
* ``manifest``: a JSONL file, one JSON object per line with ``path`` (relative to the manifest's folder, or absolute),
  ``caption`` and optionally ``width``/``height`` (pixels, saves reading image headers) and ``label``;
* ``classes``: an ImageNet-style tree ``root/<class_name>/*.jpg``; labels index the sorted class names.

Records come out in a deterministic order (sorted paths, or manifest order) so that everything built from them
(bucket plans, cache shards) is reproducible. Hidden files and folders (``.name``) are ignored. Symlinked folders
are followed, but each real folder is read once: a link back up the tree (``ln -s . loop``) is not a second copy of
the data. Images are not opened here: broken files are found, counted and skipped when they are decoded
(``transforms.load_image``). A ``.txt`` caption that is not UTF-8 text (binary, Latin-1) is not a caption: its image
is listed in ``Source.bad`` and counted with the unreadable images rather than trained on garbled text. A manifest
that is not UTF-8 is an error naming the line.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
from collections.abc import Iterator
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
    or kept with an empty caption, depending on ``keep_empty_captions``. ``bad``: (image, reason) of images dropped
    because their caption file is not text; callers count them with the unreadable images.
    """

    kind: SourceKind
    path: Path
    records: list[Record]
    class_names: list[str] | None = None
    missing_captions: int = 0
    skipped_captions: int = 0
    bad: list[tuple[Path, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def conditioning(self) -> Literal["caption", "label"]:
        return "label" if self.kind == "classes" else "caption"


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


@dataclass
class _Listing:
    """What ``_walk`` found: image and .txt files (each sorted) and the symlinked folders it did not read again."""

    images: list[Path]
    texts: list[Path]
    repeated: list[Path]


def _folder_key(path: str) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)  # follows links: the real folder
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _walk(root: Path, seen: set[tuple[int, int]] | None = None) -> _Listing:
    """Files under ``root``, recursively, hidden entries skipped, through symlinked folders (datasets are often
    linked in) but into each real folder once: ``os.walk(followlinks=True)`` alone reads a link back up the tree
    (``ln -s . loop``) until the OS refuses the path, 40 levels deep, and two such links make it exponential.
    ``seen``: real folders already read (shared by the class folders of one tree)."""
    seen = set() if seen is None else seen
    images, texts, repeated = [], [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        key = _folder_key(dirpath)
        if key is None or key in seen:
            if key is not None:
                repeated.append(Path(dirpath))
            dirnames[:] = []  # pruning in place stops os.walk descending
            continue
        seen.add(key)
        # Sorted, so that of two paths to one folder the same one is always read (records keep their paths).
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            path = Path(dirpath, name)
            if is_image_file(path):
                images.append(path)
            elif path.suffix.lower() == ".txt":
                texts.append(path)
    return _Listing(sorted(images), sorted(texts), repeated)


def _note_repeated(root: Path, repeated: list[Path], notes: list[str]) -> None:
    if repeated:
        note = f"{len(repeated)} symlinked folder(s) lead to folders already read, not read again (e.g. {repeated[0]})"
        logger.info("%s: %s", root, note)
        notes.append(note)


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
    listing = _walk(path)
    images = listing.images
    if images and not listing.texts and all(p.parent != path for p in images):
        return "classes"
    return "captions"


def read_source(
    path: str | os.PathLike,
    kind: SourceKind | Literal["auto"] = "auto",
    *,
    keep_empty_captions: bool = False,
    expect_captions: bool = True,
) -> Source:
    """Read a dataset of the given ``kind`` (``"auto"``: see ``detect_kind``).

    ``expect_captions=False`` (captioning a dataset): images without a caption are kept, without a warning.
    """
    keep_empty_captions = keep_empty_captions or not expect_captions
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
    if source.missing_captions and expect_captions:
        action = "kept with an empty caption" if keep_empty_captions else "skipped"
        logger.warning("%s: %d image(s) without a caption (%s)", path, source.missing_captions, action)
    if not source.records and source.missing_captions:
        raise PixartError(
            f"{path}: none of the {source.missing_captions} images has a caption (read as a {kind} dataset; "
            "keep them with empty captions, or read class folders as kind 'classes')"
        )
    if not source.records and source.bad:
        image, reason = source.bad[0]
        raise PixartError(f"{path}: none of the {len(source.bad)} images has a usable caption (e.g. {image}: {reason})")
    if not source.records:
        raise PixartError(f"{path}: no usable images found (read as a {kind} dataset)")
    return source


def _caption_or_none(text: object) -> str | None:
    if not isinstance(text, str):
        return None
    text = text.strip()
    return text or None


# C0 control characters that text files do not contain (tab, newlines, vertical tab and form feed are text).
_CONTROL_BYTES = bytes(b for b in range(32) if b not in (9, 10, 11, 12, 13))


def _decode_caption(data: bytes) -> str | tuple[str, int, int]:
    """The text of a caption file, or (why it is not text, offending byte, its offset) for a binary or non-UTF-8
    file: a Latin-1 or binary caption decoded with replacement characters would be trained on as garbage."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # a UTF-16 byte order mark
        return "caption not UTF-8 text", data[0], 0
    if b"\0" in data:  # the classic test for binary (git, grep): text files never hold NUL
        return "caption is binary", 0, data.index(b"\0")
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")  # a byte order mark (Windows editors) is no caption
    except UnicodeDecodeError as exc:
        return "caption not UTF-8 text", data[exc.start], exc.start
    if len(data.translate(None, _CONTROL_BYTES)) != len(data):  # C speed: millions of captions are read
        control = next(i for i, b in enumerate(data) if b in _CONTROL_BYTES)
        return "caption is binary", data[control], control
    return text


def _read_caption(txt: Path) -> tuple[str | None, str | None]:
    """(the stripped caption, None when blank; None), or (None, why the file is not a usable caption)."""
    try:
        data = txt.read_bytes()
    except OSError as exc:
        return None, f"caption unreadable ({txt.name}: {exc.strerror or exc})"
    decoded = _decode_caption(data)
    if isinstance(decoded, tuple):
        reason, byte, offset = decoded
        return None, f"{reason} ({txt.name}: byte 0x{byte:02x} at offset {offset})"
    return _caption_or_none(decoded), None


def read_image_folder(root: str | os.PathLike, *, keep_empty_captions: bool = False) -> Source:
    """Images with same-name ``.txt`` captions (``a/b.jpg`` ↔ ``a/b.txt``), recursively."""
    root = Path(root)
    if not root.is_dir():
        raise PixartError(f"{root}: not a directory")
    listing = _walk(root)
    text_of = {p.with_suffix(""): p for p in listing.texts}
    records, bad, missing, skipped = [], [], 0, 0
    for image in listing.images:
        txt = text_of.get(image.with_suffix(""))
        caption, problem = _read_caption(txt) if txt else (None, None)
        if problem is not None:
            bad.append((image, problem))
            continue
        if caption is None:
            missing += 1
            if not keep_empty_captions:
                skipped += 1
                continue
            caption = ""
        records.append(Record(path=image, caption=caption))
    source = Source("captions", root, records, missing_captions=missing, skipped_captions=skipped, bad=bad)
    _note_repeated(root, listing.repeated, source.notes)
    if bad:
        logger.warning("%s: %d image(s) skipped, their caption file is not text (e.g. %s: %s)", root, len(bad), *bad[0])
    return source


def _positive_int(value: object, what: str, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PixartError(f"{where}: {what} must be a positive integer, got {value!r}")
    return value


def _text_lines(path: Path, what: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, streamed; a line that is not UTF-8 is one error naming it (decoding
    the whole file as text would end in a ``UnicodeDecodeError`` traceback)."""
    try:
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, 1):
                if number == 1 and raw.startswith(codecs.BOM_UTF8):  # Windows editors start files with one
                    raw = raw[len(codecs.BOM_UTF8) :]
                try:
                    yield number, raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise PixartError(
                        f"{path}:{number}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                        f"re-encode the {what} as UTF-8"
                    ) from None
    except OSError as exc:
        raise PixartError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None


def read_manifest(manifest: str | os.PathLike, *, keep_empty_captions: bool = False) -> Source:
    """A JSONL manifest: ``{"path": ..., "caption": ..., "width"?: ..., "height"?: ..., "label"?: ...}``."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise PixartError(f"{manifest}: no such manifest file")
    base = manifest.parent
    records, missing, skipped = [], 0, 0
    for number, line in _text_lines(manifest, "manifest"):
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
        expected = [line.strip() for _, line in _text_lines(listed, "class list") if line.strip()]
        missing = [name for name in expected if name not in class_names]
        if sorted(expected) != class_names:
            raise PixartError(
                f"{root}: classes.txt names {len(expected)} classes but there are {len(class_names)} class folders"
                + (f" (no folder for {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''})" if missing else "")
                + ", so labels would not match it; create the missing folders (empty is fine)"
            )
    records, empty, repeated = [], [], []
    # One set for the whole tree, holding the root: a class folder linked to the root or to another class is not
    # a second copy of their images.
    seen = {key} if (key := _folder_key(str(root))) else set()
    for label, name in enumerate(class_names):
        listing = _walk(root / name, seen)
        repeated += listing.repeated
        if not listing.images:
            empty.append(name)
        records.extend(Record(path=p, label=label) for p in listing.images)
    notes = [f"{len(empty)} class(es) have no images: {', '.join(empty)}"] if empty else []
    for note in notes:
        logger.warning("%s: %s", root, note)
    _note_repeated(root, repeated, notes)
    return Source("classes", root, records, class_names=class_names, notes=notes)
