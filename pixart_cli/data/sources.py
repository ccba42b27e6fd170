"""Datasets on disk → a list of ``Record``\\ s (image path + caption or class label).

Six layouts are read:

* ``captions``: a folder of images, each with a same-name ``.txt`` caption beside it (searched recursively);
* ``manifest``: a JSONL file, one JSON object per line with ``path`` (relative to the manifest's folder, or absolute),
  ``caption`` and optionally ``width``/``height`` (pixels, saves reading image headers) and ``label``; ``member``
  names an image inside a container ``path`` (a tar member, a datasets row: see below);
* ``classes``: an ImageNet-style tree ``root/<class_name>/*.jpg``; labels index the sorted class names;
* ``webdataset``: tar shards as img2dataset writes them, ``{key}.jpg`` with ``{key}.txt`` and/or ``{key}.json``
  (its ``caption`` when there is no ``.txt``, and ``width``/``height``): one ``.tar``, a folder of them (sorted), or
  a brace pattern ``shards/{00000..00009}.tar``;
* ``hf-dataset``: a Hugging Face ``datasets`` directory written by ``save_to_disk`` (a ``DatasetDict``: its
  ``train`` split), with an image column (the ``Image``-typed one) and a caption column (``caption``, ``text``, ...);
* ``parquet``: one ``.parquet`` file or a folder of them, with such columns (``datasets`` writes them with
  ``to_parquet``; img2dataset's parquet holds the bytes in ``jpg``).

Records of the last three point into their container: ``path`` is the tar, the datasets directory or the parquet
file and ``member`` the tar member or the row (``"123"``, ``"train/123"``); ``containers`` reads them.

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
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pixart_cli.data import containers
from pixart_cli.data.containers import PARQUET_SUFFIX, TAR_SUFFIX, image_name, is_dataset_dir
from pixart_cli.errors import PixartError

logger = logging.getLogger(__name__)

SourceKind = Literal["captions", "manifest", "classes", "webdataset", "hf-dataset", "parquet"]
SOURCE_KINDS: tuple[str, ...] = ("captions", "manifest", "classes", "webdataset", "hf-dataset", "parquet")

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

# The caption fields read by default: ``caption`` alone. A manifest line may hold others (``caption_vlm``).
DEFAULT_CAPTION_FIELDS: tuple[str, ...] = ("caption",)
# Field names end up in file names (a cache's ``caption__FIELD.npy``); a manifest's own keys are not captions.
_FIELD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_NOT_CAPTIONS = frozenset({"path", "key", "member"})


@dataclass(frozen=True)
class Record:
    """One training example. ``width``/``height`` are known only when the source states them."""

    path: Path  # the image file; for a tar shard or a datasets directory, the file or folder holding it
    caption: str | None = None
    label: int | None = None
    width: int | None = None
    height: int | None = None
    member: str | None = None  # where the image is inside ``path`` (a tar member, a datasets row); None: a file
    # Other caption fields of the example by name (e.g. {"caption_vlm": ...}), for recipes that mix captions.
    captions: dict[str, str] = field(default_factory=dict)


def caption_of(record: Record, field: str) -> str | None:
    """The record's caption in ``field``: ``Record.caption`` for ``caption``, else ``Record.captions[field]``."""
    return record.caption if field == "caption" else record.captions.get(field)


def check_caption_field(name: str) -> str:
    """``name`` if it can be a caption field (letters, digits, ``_ . -``; not a manifest's own key), else an error."""
    if not isinstance(name, str) or not _FIELD_NAME.fullmatch(name) or name in _NOT_CAPTIONS:
        not_ours = ", ".join(sorted(_NOT_CAPTIONS))
        raise PixartError(f"{name!r} cannot be a caption field (letters, digits, _ . -; not {not_ours})")
    return name


class UnknownCaptionField(PixartError):
    """A caption field asked for that no example of the dataset has; ``found`` lists the fields it does have."""

    def __init__(self, path: Path, field: str, found: Sequence[str]) -> None:
        self.path, self.field, self.found = path, field, sorted(found)
        super().__init__(f"{path}: no example has the caption field {field!r} (fields found: {self.fields_found})")

    @property
    def fields_found(self) -> str:
        return ", ".join(self.found) or "none"


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


@dataclass
class _MissingCaptions:
    """Counts images without a caption while a source is read: kept with "" or skipped, by ``keep``."""

    keep: bool
    missing: int = 0
    skipped: int = 0

    def caption(self, text: str | None) -> str | None:
        """``text``; for a missing one (None), "" when kept and None when skipped (either way counted)."""
        if text is not None:
            return text
        self.missing += 1
        if self.keep:
            return ""
        self.skipped += 1
        return None


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
    """``manifest`` for a ``.jsonl`` file; ``webdataset`` for a ``.tar``, a brace pattern or a folder of tars (and
    no images beside them); ``hf-dataset`` for a ``save_to_disk`` folder; ``parquet`` for a ``.parquet`` file or a
    folder of them; ``classes`` for a folder whose sub-folders hold the images and that has no ``.txt`` files;
    ``captions`` otherwise."""
    if _BRACES.search(os.fspath(path)):
        return "webdataset"
    path = Path(path)
    if not path.exists():
        raise PixartError(f"{path}: no such dataset file or directory")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return "manifest"
        if suffix == TAR_SUFFIX:
            return "webdataset"
        if suffix == PARQUET_SUFFIX:
            return "parquet"
        raise PixartError(
            f"{path}: not a dataset (expected a folder of images, a .jsonl manifest, a .tar shard or a .parquet file)"
        )
    if is_dataset_dir(path):
        return "hf-dataset"
    top = [p for p in path.iterdir() if not p.name.startswith(".")]
    # img2dataset writes a .parquet of metadata beside each .tar: tars decide.
    if any(p.suffix.lower() == TAR_SUFFIX and p.is_file() for p in top) and not any(map(is_image_file, top)):
        return "webdataset"
    if any(p.suffix.lower() == PARQUET_SUFFIX and p.is_file() for p in top) and not any(map(is_image_file, top)):
        return "parquet"
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
    caption_column: str | None = None,
    caption_fields: Sequence[str] = DEFAULT_CAPTION_FIELDS,
) -> Source:
    """Read a dataset of the given ``kind`` (``"auto"``: see ``detect_kind``).

    ``expect_captions=False`` (captioning a dataset): images without a caption are kept, without a warning.
    ``caption_fields``: the caption fields each example needs; those other than ``caption`` (a manifest's, e.g.
    ``caption_vlm`` from ``pixart caption``) fill ``Record.captions``. A field no example has is an
    ``UnknownCaptionField`` error.
    ``caption_column``: the caption column of an ``hf-dataset`` or ``parquet`` source (default: detected).
    """
    keep_empty_captions = keep_empty_captions or not expect_captions
    path = Path(path)
    pattern = _BRACES.search(str(path)) is not None
    if not pattern and not path.exists():
        raise PixartError(f"{path}: no such dataset file or directory")
    path = Path(os.path.abspath(path))  # absolute records: a resume from another working directory matches
    if kind == "auto":
        kind = detect_kind(path)
    if pattern and kind != "webdataset":
        raise PixartError(f"{path}: a brace pattern names tar shards (kind webdataset), not a {kind} dataset")
    if kind != "manifest" and (other := [f for f in caption_fields if f != "caption"]):
        raise UnknownCaptionField(path, other[0], [] if kind == "classes" else ["caption"])  # one caption each
    if kind == "manifest":
        source = read_manifest(path, keep_empty_captions=keep_empty_captions, caption_fields=caption_fields)
    elif kind == "classes":
        source = read_class_tree(path)
    elif kind == "captions":
        source = read_image_folder(path, keep_empty_captions=keep_empty_captions)
    elif kind == "webdataset":
        source = read_webdataset(path, keep_empty_captions=keep_empty_captions)
    elif kind in ("hf-dataset", "parquet"):
        source = read_arrow_dataset(
            path,
            kind,
            keep_empty_captions=keep_empty_captions,
            expect_captions=expect_captions,
            caption_column=caption_column,
        )
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
    return _caption_of_bytes(txt.name, data)


def _caption_of_bytes(name: str, data: bytes) -> tuple[str | None, str | None]:
    """``_read_caption`` of a caption file ``name`` holding ``data``."""
    decoded = _decode_caption(data)
    if isinstance(decoded, tuple):
        reason, byte, offset = decoded
        return None, f"{reason} ({name}: byte 0x{byte:02x} at offset {offset})"
    return _caption_or_none(decoded), None


def read_image_folder(root: str | os.PathLike, *, keep_empty_captions: bool = False) -> Source:
    """Images with same-name ``.txt`` captions (``a/b.jpg`` ↔ ``a/b.txt``), recursively."""
    root = Path(root)
    if not root.is_dir():
        raise PixartError(f"{root}: not a directory")
    listing = _walk(root)
    text_of = {p.with_suffix(""): p for p in listing.texts}
    records, bad, tally = [], [], _MissingCaptions(keep_empty_captions)
    for image in listing.images:
        txt = text_of.get(image.with_suffix(""))
        caption, problem = _read_caption(txt) if txt else (None, None)
        if problem is not None:
            bad.append((image, problem))
            continue
        if (caption := tally.caption(caption)) is None:
            continue
        records.append(Record(path=image, caption=caption))
    source = Source("captions", root, records, missing_captions=tally.missing, skipped_captions=tally.skipped, bad=bad)
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


def read_manifest(
    manifest: str | os.PathLike,
    *,
    keep_empty_captions: bool = False,
    caption_fields: Sequence[str] = DEFAULT_CAPTION_FIELDS,
) -> Source:
    """A JSONL manifest: ``{"path", "caption", "width"?, "height"?, "label"?, "member"?}`` per line.

    ``member``: the image is inside the container ``path`` (``{"path": "shards/00001.tar", "member": "000123.jpg"}``,
    ``{"path": "dataset", "member": "train/123"}``); ``pixart caption`` writes such lines for such sources.

    ``caption_fields``: the caption fields each line needs (a line without one of them counts as a missing
    caption); those other than ``caption`` fill ``Record.captions``.
    """
    fields = [check_caption_field(f) for f in caption_fields]
    others = [f for f in fields if f != "caption"]
    seen: set[str] = set()  # string fields of the lines, for the error naming an unknown field
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
        member = entry.get("member")
        if member is not None and (not isinstance(member, str) or not member):
            raise PixartError(f'{where}: "member" must be a non-empty string (a tar member or a row), got {member!r}')
        label = entry.get("label")
        if label is not None and (isinstance(label, bool) or not isinstance(label, int) or label < 0):
            raise PixartError(f"{where}: label must be a non-negative integer, got {label!r}")
        width = _positive_int(entry.get("width"), "width", where)
        height = _positive_int(entry.get("height"), "height", where)
        texts = {f: _caption_or_none(entry.get(f)) for f in {"caption", *fields}}
        if others:
            seen.update(k for k, v in entry.items() if isinstance(v, str) and k not in _NOT_CAPTIONS)
        if any(texts[f] is None for f in fields):
            missing += 1
            if not keep_empty_captions:
                skipped += 1
                continue
            texts = {f: "" if text is None and f in fields else text for f, text in texts.items()}
        path = Path(os.path.expanduser(entry["path"]))
        captions = {f: texts[f] for f in others}
        # base / absolute = absolute
        records.append(Record(base / path, texts["caption"], label, width, height, member, captions=captions))
    if unknown := [f for f in others if f not in seen]:
        raise UnknownCaptionField(manifest, unknown[0], seen)
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


# ---------------------------------------------------------------------------------------------------------------
# Containers: WebDataset tar shards, Hugging Face datasets (save_to_disk directories, parquet files)
# ---------------------------------------------------------------------------------------------------------------

_BRACES = re.compile(r"\{(\d+\.\.\d+|[^{},/]*(?:,[^{},/]*)+)\}")  # {00000..00009} or {a,b}


def expand_braces(pattern: str) -> list[str]:
    """``s/{00000..00002}.tar`` → ``s/00000.tar``, ``s/00001.tar``, ``s/00002.tar`` (numbers as wide as the first);
    ``{a,b}`` lists names; several braces multiply."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    if ".." in body:
        first, last = body.split("..")
        options = [f"{i:0{len(first)}d}" for i in range(int(first), int(last) + 1)]
    else:
        options = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [name for option in options for name in expand_braces(head + option + tail)]


def _tar_shards(path: Path) -> list[Path]:
    if _BRACES.search(str(path)):
        shards = [Path(p) for p in expand_braces(str(path))]
        missing = [p for p in shards if not p.is_file()]
        if not shards or missing:
            example = f" (e.g. {missing[0]})" if missing else ""
            raise PixartError(f"{path}: {len(missing)} of the {len(shards)} shards it names do not exist{example}")
        return shards
    if path.is_dir():
        shards = sorted(
            p for p in path.iterdir() if p.suffix.lower() == TAR_SUFFIX and p.is_file() and not p.name.startswith(".")
        )
        if not shards:
            raise PixartError(f"{path}: no .tar shards in this folder")
        return shards
    if path.suffix.lower() != TAR_SUFFIX:
        raise PixartError(f"{path}: not a .tar shard")
    return [path]


def _sample_part(name: str) -> tuple[str, str] | None:
    """WebDataset's grouping: ``dir/000123.seg.png`` → (``dir/000123``, ``seg.png``): the key ends at the first dot
    of the file name. None for hidden files and names without an extension."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    if not stem or not dot:
        return None
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def _positive_or_none(value: object) -> int | None:
    """A width or height a source states, when it is a usable one (img2dataset's json, a datasets column)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _member_caption(name: str, data: bytes | None) -> tuple[str | None, str | None]:
    """``_read_caption`` for a ``.txt`` member of a tar (``data`` None: the tar ends inside it)."""
    if data is None:
        return None, f"caption unreadable ({name}: the tar ends inside it)"
    return _caption_of_bytes(name, data)


def read_webdataset(path: str | os.PathLike, *, keep_empty_captions: bool = False) -> Source:
    """Tar shards of ``{key}.{jpg,png,...}`` + ``{key}.txt`` and/or ``{key}.json`` (img2dataset's layout): one
    ``.tar``, a folder of them or a brace pattern. Each shard's member offsets are indexed here, in one pass that
    also reads the captions. Members cut short by a truncated shard and captions that are not text are counted in
    ``bad``; a file that is not a tar is an error."""
    path = Path(path)
    records, bad, notes, tally = [], [], [], _MissingCaptions(keep_empty_captions)
    for shard in _tar_shards(path):
        index, data = containers.scan_tar(shard, lambda name: (_sample_part(name) or ("", ""))[1] in ("txt", "json"))
        samples: dict[str, dict[str, str]] = {}  # key → extension → member, in the order of the tar
        for name in index.members:
            if (part := _sample_part(name)) is not None:
                samples.setdefault(part[0], {}).setdefault(part[1], name)
        for files in samples.values():
            image = next((member for ext, member in files.items() if f".{ext}" in IMAGE_EXTENSIONS), None)
            if image is None:
                continue
            where = Path(image_name(shard, image))
            if image in index.cut_short:
                bad.append((where, "the tar ends inside this member (a shard cut short)"))
                continue
            meta = containers.read_json_object(data[files["json"]]) if files.get("json") in data else None
            if "txt" in files:
                caption, problem = _member_caption(files["txt"], data.get(files["txt"]))
            elif "json" in files and meta is None:
                caption, problem = None, f"caption unreadable ({files['json']}: not a JSON object)"
            else:
                caption, problem = _caption_or_none((meta or {}).get("caption")), None
            if problem is not None:
                bad.append((where, problem))
                continue
            if (caption := tally.caption(caption)) is None:
                continue
            meta = meta or {}
            width, height = _positive_or_none(meta.get("width")), _positive_or_none(meta.get("height"))
            records.append(Record(shard, caption, None, width, height, member=image))
        if index.ends_early:
            notes.append(f"{shard}: the tar is cut short; the members before the cut were read")
    source = Source(
        "webdataset", path, records, missing_captions=tally.missing, skipped_captions=tally.skipped, bad=bad
    )
    source.notes = notes
    for note in notes:
        logger.warning("%s", note)
    if bad:
        logger.warning("%s: %d image(s) skipped (e.g. %s: %s)", path, len(bad), *bad[0])
    return source


def read_arrow_dataset(
    path: str | os.PathLike,
    kind: Literal["hf-dataset", "parquet"],
    *,
    keep_empty_captions: bool = False,
    expect_captions: bool = True,
    caption_column: str | None = None,
) -> Source:
    """A ``save_to_disk`` directory (``hf-dataset``; a ``DatasetDict``'s ``train`` split) or ``.parquet`` files
    (one, or a folder of them: ``parquet``): one record per row, the image column and the caption column detected
    (``containers.find_image_column``/``find_caption_column``), ``width``/``height`` columns used when present.

    Only the caption and size columns are read here; images are read from the memory-mapped data when decoded.
    """
    path = Path(path)
    if kind == "hf-dataset":
        if not is_dataset_dir(path):
            raise PixartError(
                f"{path}: not a datasets directory (no {', '.join(containers.DATASET_MARKERS)}; "
                "datasets writes one with save_to_disk)"
            )
        split, dataset = containers.split_of(containers.load_dataset_dir(path), path)
        parts = [(path, f"{split}/" if split else "", dataset)]
    else:
        if path.is_dir():
            files = sorted(
                p for p in path.iterdir() if p.suffix.lower() == PARQUET_SUFFIX and not p.name.startswith(".")
            )
            if not files:
                raise PixartError(f"{path}: no .parquet files in this folder")
        elif path.suffix.lower() == PARQUET_SUFFIX:
            files = [path]
        else:
            raise PixartError(f"{path}: not a .parquet file")
        parts = [(file, "", containers.load_parquet(file)) for file in files]
    records, tally = [], _MissingCaptions(keep_empty_captions)
    for container, prefix, dataset in parts:
        columns = ", ".join(dataset.column_names) or "none"
        containers.find_image_column(dataset, container)  # no image column: an error now, not one per image
        caption = containers.find_caption_column(dataset, caption_column)
        if caption is None and (caption_column is not None or expect_captions):
            wanted = f"no column {caption_column!r}" if caption_column else "no caption column"
            raise PixartError(
                f"{container}: {wanted} (columns: {columns}; captions are read from a text column named "
                f"{', '.join(containers.CAPTION_COLUMNS)})"
            )
        lower = {name.lower(): name for name in dataset.column_names}
        wanted_columns = [c for c in (caption, lower.get("width"), lower.get("height")) if c is not None]
        table = dataset.select_columns(wanted_columns).with_format("arrow")[:] if wanted_columns else None
        rows = len(dataset)

        def values(column: str | None, table=table, rows=rows) -> list:
            return table.column(column).to_pylist() if column is not None else [None] * rows

        captions, widths, heights = values(caption), values(lower.get("width")), values(lower.get("height"))
        for row in range(rows):
            if (text := tally.caption(_caption_or_none(captions[row]))) is None:
                continue
            width, height = _positive_or_none(widths[row]), _positive_or_none(heights[row])
            records.append(Record(container, text, None, width, height, member=f"{prefix}{row}"))
    return Source(kind, path, records, missing_captions=tally.missing, skipped_captions=tally.skipped)


def is_shard_pattern(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a brace pattern of tar shards (``shards/{00000..00009}.tar``) rather than a path."""
    return _BRACES.search(os.fspath(path)) is not None
