"""Images inside containers: members of WebDataset tar shards and rows of Hugging Face datasets (arrow or parquet).

A ``Record`` of such an image names its container (``path``: the ``.tar``, the ``save_to_disk`` directory or the
``.parquet`` file) and where the image is inside it (``member``: the tar member's name, or the row: ``"123"``, or
``"train/123"`` in a ``DatasetDict``). ``open_member`` gives what PIL reads for it; ``transforms`` opens every image,
in a file or in a container, through it.

Random access, in any order and in any process: the prepare plan reads images by index in bucket order, and
DataLoader workers read them in processes of their own.

* Tars: the member offsets are indexed once per process (``index_tar``; the index built while the source is read is
  inherited by forked workers) and a member is read with ``os.pread`` at its offset. ``tarfile`` is used rather than
  the ``webdataset`` package because that package only streams shards from the start: random access by member needs
  the offsets, which ``tarfile`` reports. ``pread`` reads at an offset without moving a shared file position, so one
  descriptor serves every thread of a process; descriptors are opened lazily per process (those inherited through
  ``fork`` are dropped in the child) and at most ``MAX_OPEN`` at a time.
* Datasets: ``datasets.load_from_disk`` / ``Dataset.from_parquet`` memory-map the arrow data; a row is one slice.
  Each process opens a dataset lazily, once. A parquet file is converted once into the datasets cache
  (``HF_DATASETS_CACHE``), as ``datasets`` does; parquet itself has no random access by row.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pixart_cli.errors import PixartError

logger = logging.getLogger(__name__)

TAR_SUFFIX = ".tar"
PARQUET_SUFFIX = ".parquet"
DATASET_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")  # what save_to_disk writes
MAX_OPEN = 64  # open tar descriptors / datasets kept per process (a dataset of many shards stays under ulimit -n)

# Column names tried in this order when the dataset does not say (compared case-insensitively).
IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp")
CAPTION_COLUMNS = ("caption", "text", "txt", "prompt", "alt_text", "alt", "description", "sentence")


class MemberError(OSError):
    """A container's member that cannot be read (missing, cut short, no image in the row); one line."""


def image_name(path: Path | str, member: str | None) -> str:
    """How messages name an image: its path, or ``container:member`` (``shards/00001.tar:000123.jpg``)."""
    return str(path) if member is None else f"{path}:{member}"


def is_dataset_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in DATASET_MARKERS)


# ---------------------------------------------------------------------------------------------------------------
# Tar shards
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TarIndex:
    """Where the members of one tar are: name → (offset of the data, size); what was cut short."""

    path: Path
    stamp: tuple[int, int]  # (size, mtime_ns) of the file indexed: a rewritten shard is indexed again
    members: dict[str, tuple[int, int]] = field(default_factory=dict)
    cut_short: set[str] = field(default_factory=set)  # members whose data runs past the end of the file
    ends_early: bool = False  # the file stops inside a header or lacks the end-of-archive blocks


def _stamp(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_size, stat.st_mtime_ns


def scan_tar(path: Path, read: Callable[[str], bool] = lambda name: False) -> tuple[TarIndex, dict[str, bytes]]:
    """Index the regular members of an uncompressed tar; return the data of those ``read`` selects too (small
    caption and metadata files, read in the same pass). A file that is no tar is a ``PixartError``; a tar cut
    short keeps what precedes the cut (``cut_short``, ``ends_early``)."""
    try:
        with open(path, "rb") as handle:
            index, data = _scan(path, handle, read)
    except OSError as exc:
        raise PixartError(f"{path}: cannot read the shard ({exc.strerror or exc})") from None
    with _lock:
        _tar_indexes[path] = index
    return index, data


def _scan(path: Path, handle: BinaryIO, read: Callable[[str], bool]) -> tuple[TarIndex, dict[str, bytes]]:
    size = os.fstat(handle.fileno()).st_size
    index, data = TarIndex(path, _stamp(os.fstat(handle.fileno()))), {}
    if handle.read(4)[:2] in (b"\x1f\x8b", b"BZ", b"\xfd7", b"\x28\xb5"):  # gzip, bzip2, xz, zstd magic
        raise PixartError(f"{path}: a compressed tar; shards must be uncompressed .tar files (read by offset)")
    handle.seek(0)
    try:
        tar = tarfile.open(fileobj=handle, mode="r:")  # noqa: SIM115 (closing it would close ``handle``: no need)
    except tarfile.TarError as exc:
        raise PixartError(f"{path}: not a tar file ({exc})") from None
    while True:
        try:
            info = tar.next()
        except tarfile.TarError:  # a header cut short, or garbage after the last member
            index.ends_early = True
            break
        if info is None:
            # A complete tar ends with two zero blocks after the last member (tar.offset points at them).
            index.ends_early = size < tar.offset + 2 * tarfile.BLOCKSIZE
            break
        if not info.isfile():
            continue
        if info.offset_data + info.size > size:
            index.cut_short.add(info.name)
        index.members[info.name] = (info.offset_data, info.size)
        if read(info.name) and info.name not in index.cut_short:
            handle.seek(info.offset_data)
            data[info.name] = handle.read(info.size)
        tar.members = []  # tarfile keeps every TarInfo; the index is all that is needed
    return index, data


class _Descriptor:
    """An open tar, closed when nothing refers to it any more: a reader in one thread keeps it open while another
    thread drops it from the cache (closing it there could hand its number to another file under the reader)."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))

    def __del__(self) -> None:
        if (fd := getattr(self, "fd", None)) is not None:  # None: the open failed
            with suppress(OSError):
                os.close(fd)


class _MemberFile(io.RawIOBase):
    """One member of a tar as a read-only, seekable file over a shared descriptor (``pread``: no shared position)."""

    def __init__(self, descriptor: _Descriptor, offset: int, size: int) -> None:
        self._descriptor, self._offset, self._size, self._pos = descriptor, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        want = max(0, min(len(buffer), self._size - self._pos))
        data = os.pread(self._descriptor.fd, want, self._offset + self._pos) if want else b""
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


_lock = threading.Lock()  # the caches below are shared by a process's threads (caption prefetch)
_tar_indexes: dict[Path, TarIndex] = {}
_open_tars: OrderedDict[Path, _Descriptor] = OrderedDict()  # least recently used first
_open_datasets: OrderedDict[tuple[Path, str], Any] = OrderedDict()  # (path, split) → image column


def _forget_open_files() -> None:
    """In a forked child: its own descriptors and datasets, opened when first needed. The indexes are plain data
    and stay (a DataLoader worker needs not scan the shards again)."""
    global _lock
    _lock = threading.Lock()  # another thread may have held it at the fork
    _open_tars.clear()  # closes the child's copies of the descriptors; the parent's stay open
    _open_datasets.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_open_files)


def _tar_descriptor(path: Path) -> tuple[_Descriptor, TarIndex]:
    """This process's open ``path`` and its index: scanned now if this process has none, or if the file changed
    since (one ``stat`` per read, next to decoding an image: a shard rewritten under a long run is read as it is
    now, not at stale offsets)."""
    stamp = _stamp(os.stat(path))
    with _lock:
        descriptor, index = _open_tars.get(path), _tar_indexes.get(path)
        if descriptor is not None and index is not None and index.stamp == stamp:
            _open_tars.move_to_end(path)
            return descriptor, index
    descriptor = _Descriptor(path)  # a replaced file is another inode: a new descriptor
    if index is None or index.stamp != _stamp(os.fstat(descriptor.fd)):
        index, _ = scan_tar(path)
    with _lock:
        _open_tars[path] = descriptor
        _open_tars.move_to_end(path)
        while len(_open_tars) > MAX_OPEN:
            _open_tars.popitem(last=False)
    return descriptor, index


def _tar_member(path: Path, member: str) -> BinaryIO:
    try:
        descriptor, index = _tar_descriptor(path)
    except PixartError as exc:
        raise MemberError(str(exc).removeprefix(f"{path}: ")) from None
    where = index.members.get(member)
    if where is None:
        raise MemberError(f"no member {member!r} in the tar")
    if member in index.cut_short:
        raise MemberError("the tar ends inside this member (a shard cut short)")
    if not hasattr(os, "pread"):  # Windows: read the member whole
        with open(path, "rb") as handle:
            handle.seek(where[0])
            return io.BytesIO(handle.read(where[1]))
    return io.BufferedReader(_MemberFile(descriptor, *where))


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face datasets (save_to_disk directories, parquet files)
# ---------------------------------------------------------------------------------------------------------------


@contextmanager
def _quiet_datasets() -> Iterator[Any]:
    """The ``datasets`` module with its progress bars off (converting a parquet file draws one per file)."""
    import datasets  # lazy: datasets adds ~1 s to start-up (docs/reference.md §8)

    was_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        if was_on:
            datasets.enable_progress_bars()


def load_dataset_dir(path: Path) -> Any:
    """``datasets.load_from_disk``: a ``Dataset`` or a ``DatasetDict``; a directory it cannot read is one error."""
    with _quiet_datasets() as datasets:
        try:
            return datasets.load_from_disk(str(path))
        except Exception as exc:  # FileNotFoundError, JSON and arrow errors, ...: all mean "not a dataset"
            if _no_data_files(path):  # datasets saves an empty dataset, then fails to load it (IndexError)
                raise PixartError(f"{path}: an empty dataset (no rows)") from None
            raise PixartError(f"{path}: not a readable datasets directory ({_first_line(exc)})") from None


def _no_data_files(path: Path) -> bool:
    try:
        return json.loads((path / "state.json").read_text(encoding="utf-8")).get("_data_files") == []
    except (OSError, ValueError, AttributeError):
        return False


def load_parquet(path: Path) -> Any:
    """``datasets.Dataset.from_parquet``: the file memory-mapped (converted once into the datasets cache)."""
    import pyarrow.parquet  # lazy: comes with datasets; only its footer reader is needed here

    try:  # the footer first: a clear error for a file that is not parquet or holds no rows (datasets fails on both)
        rows = pyarrow.parquet.read_metadata(path).num_rows
    except Exception as exc:  # ArrowInvalid, OSError
        raise PixartError(f"{path}: not a readable parquet file ({_first_line(exc)})") from None
    if rows == 0:
        raise PixartError(f"{path}: an empty parquet file (no rows)")
    with _quiet_datasets() as datasets:
        try:
            return datasets.Dataset.from_parquet(str(path))
        except Exception as exc:  # arrow errors for files that are not parquet, ...
            raise PixartError(f"{path}: not a readable parquet file ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


def split_of(dataset: Any, path: Path) -> tuple[str | None, Any]:
    """(split name, Dataset) of what ``load_from_disk`` returned: a ``DatasetDict`` gives its ``train`` split (or its
    only one); any other choice is an error naming the splits."""
    if not hasattr(dataset, "keys"):
        return None, dataset
    splits = list(dataset.keys())
    if "train" in splits or len(splits) == 1:
        name = "train" if "train" in splits else splits[0]
        return name, dataset[name]
    raise PixartError(
        f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(splits)}); "
        f"give one split's directory, e.g. {path / splits[0]}"
    )


def _image_rows(path: Path, split: str) -> Any:
    """This process's view of the image column of the dataset at ``path`` (split ``split``, "" for the default),
    opened once: row → a one-row arrow table."""
    key = (path, split)
    with _lock:
        view = _open_datasets.get(key)
        if view is not None:
            _open_datasets.move_to_end(key)
            return view
    dataset = load_parquet(path) if path.suffix.lower() == PARQUET_SUFFIX else load_dataset_dir(path)
    if hasattr(dataset, "keys"):
        if split and split not in dataset:
            raise MemberError(f"no split {split!r} in the dataset (splits: {', '.join(dataset.keys())})")
        dataset = dataset[split] if split else split_of(dataset, path)[1]
    elif split:
        raise MemberError(f"no split {split!r}: the dataset has no splits")
    # The arrow format skips datasets' own decoding: ``transforms`` decodes, with its checks, like any image file.
    view = dataset.select_columns([find_image_column(dataset, path)]).with_format("arrow")
    with _lock:
        _open_datasets[key] = view
        while len(_open_datasets) > MAX_OPEN:
            _open_datasets.popitem(last=False)
    return view


def column_names(dataset: Any) -> list[str]:
    return list(dataset.column_names)


def find_image_column(dataset: Any, path: Path) -> str:
    """The column holding the images: the one ``Image``-typed column, else one named like an image (``image``,
    ``jpg``, ...: img2dataset's parquet stores the bytes under ``jpg``)."""
    from datasets import Image  # lazy: datasets adds ~1 s to start-up (docs/reference.md §8)

    typed = [name for name, feature in dataset.features.items() if isinstance(feature, Image)]
    if len(typed) == 1:
        return typed[0]
    candidates = typed or column_names(dataset)
    by_name = {name.lower(): name for name in candidates}
    for name in IMAGE_COLUMNS:
        if name in by_name:
            return by_name[name]
    if typed:
        raise PixartError(f"{path}: several image columns ({', '.join(typed)}), none named 'image'")
    raise PixartError(f"{path}: no image column (columns: {', '.join(column_names(dataset)) or 'none'})")


def find_caption_column(dataset: Any, named: str | None = None) -> str | None:
    """The string column holding captions (``caption``, ``text``, ... in that order), or the one ``named``."""
    strings = [name for name, f in dataset.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    if named is not None:
        return named if named in dataset.column_names else None
    by_name = {name.lower(): name for name in strings}
    return next((by_name[name] for name in CAPTION_COLUMNS if name in by_name), None)


def _dataset_member(path: Path, member: str) -> BinaryIO | Path:
    split, _, row = member.rpartition("/")
    if not row.isdigit():
        raise MemberError(f"member {member!r} is not a row number")
    view = _image_rows(path, split)
    if int(row) >= len(view):
        raise MemberError(f"row {row} is out of range ({len(view)} rows)")
    cell = view[int(row)].column(0)[0].as_py()
    if isinstance(cell, dict):  # the Image feature's storage: {"bytes": ..., "path": ...}
        cell = cell.get("bytes") or cell.get("path")
    if isinstance(cell, bytes | bytearray):
        return io.BytesIO(cell)
    if isinstance(cell, str) and cell:  # an image stored by path: relative to the dataset, else as given
        base = path if path.is_dir() else path.parent
        return base / cell if (base / cell).is_file() else Path(cell)
    raise MemberError("no image in this row")


# ---------------------------------------------------------------------------------------------------------------
# One entry point
# ---------------------------------------------------------------------------------------------------------------


def open_member(path: Path, member: str) -> BinaryIO | Path:
    """What PIL opens for image ``member`` of the container ``path``: a file object, or the path of an image the
    container refers to. Raises ``MemberError`` (an ``OSError``) naming what is wrong."""
    if path.suffix.lower() == TAR_SUFFIX and not path.is_dir():
        return _tar_member(path, member)
    if path.suffix.lower() == PARQUET_SUFFIX or path.is_dir():
        try:
            return _dataset_member(path, member)
        except PixartError as exc:
            raise MemberError(str(exc).removeprefix(f"{path}: ")) from None
    raise MemberError(f"{path} is neither a .tar shard, a .parquet file nor a datasets directory")


def read_json_object(data: bytes) -> dict[str, Any] | None:
    """An img2dataset ``.json`` sidecar as a dict; None for anything else."""
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None
