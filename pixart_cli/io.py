"""File-system helpers: safe loading of PyTorch pickles and atomic writes of files and directories."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import pickletools
import shutil
import socket
import time
import uuid
import warnings
import zipfile
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import torch

from pixart_cli.errors import PixartError

# Classes a checkpoint may hold beyond tensors and plain containers. DiT's train.py saves its command line as
# ``"args": argparse.Namespace``; rebuilding one only sets attributes, whose values pass the same allow-list.
SAFE_CLASSES = (argparse.Namespace,)


def load_torch_file(path: str | os.PathLike) -> Any:
    """``torch.load`` with ``weights_only=True``: tensors, plain containers and :data:`SAFE_CLASSES` only, never
    arbitrary code."""
    path = Path(path)
    if not path.is_file():
        raise PixartError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of files we reject anyway
            warnings.simplefilter("ignore")
            with torch.serialization.safe_globals(list(SAFE_CLASSES)):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError:
        foreign = [name for name in _pickle_globals(path) if _runs_code(name)]
        if foreign:
            raise PixartError(
                f"{path}: refusing to load: this pickle would run code ({foreign[0]}); only tensors and plain "
                "containers are accepted (convert it to safetensors with a tool you trust)"
            ) from None
        raise PixartError(f"{path}: not a PyTorch checkpoint file") from None
    except Exception as exc:  # any malformed file: pickle raises KeyError, EOFError, ... depending on the bytes
        detail = str(exc).strip().splitlines()[0][:200] if len(str(exc).strip()) > 8 else ""
        raise PixartError(f"{path}: not a PyTorch checkpoint file{f' ({detail})' if detail else ''}") from None


_SAFE_MODULES = ("torch", "collections", "_codecs", "numpy")
# Builtins a tensor pickle may name (types and containers); any other (eval, exec, getattr, __import__) runs code.
_SAFE_BUILTINS = frozenset(
    {"set", "frozenset", "slice", "range", "complex", "bytearray", "bytes", "int", "float", "bool", "str", "tuple",
     "list", "dict"}
)  # fmt: skip


def _runs_code(name: str) -> bool:
    """Whether a pickle global would run code of its own choosing (for the message; nothing is ever unpickled)."""
    module, _, attribute = name.rpartition(".")
    if any(name == f"{cls.__module__}.{cls.__qualname__}" for cls in SAFE_CLASSES):
        return False
    if module == "builtins":
        return attribute not in _SAFE_BUILTINS
    return not any(module == safe or module.startswith(safe + ".") for safe in _SAFE_MODULES)


def _pickle_globals(path: Path) -> list[str]:
    """The importable names a pickle refers to (what it would run), read without unpickling anything."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                data = archive.read(member) if member else b""
        else:
            data = path.read_bytes()
        names, strings = [], []
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
                strings.append(arg)
            elif opcode.name == "GLOBAL":
                names.append(str(arg).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
        return names
    except Exception:  # not a pickle at all
        return []


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())


def _temp_sibling(dst: Path, kind: str) -> Path:
    return dst.parent / f".{dst.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _writer_is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # a live process of another user
        return False
    return False


def remove_stale_temporaries(directory: str | os.PathLike, names: Collection[str] | None = None) -> list[Path]:
    """Delete the hidden temporaries (``.NAME.tmp-PID-…``) that a killed :func:`atomic_file` or
    :func:`atomic_directory` left in ``directory``; returns what was removed.

    With ``names``, the temporaries of those final names are removed whoever wrote them: for callers that are the
    only writer of those names (a shard of a generation run, possibly on another host of a shared file system).
    Without, those whose writing process no longer exists on this host.
    """
    directory = Path(directory)
    removed = []
    for path in directory.glob(".*.tmp-*") if directory.is_dir() else []:
        final, _, rest = path.name[1:].rpartition(".tmp-")
        if names is not None:
            stale = final in names
        else:
            try:
                stale = _writer_is_gone(int(rest.split("-")[0]))
            except ValueError:  # not one of ours
                stale = False
        if stale:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path)
    return removed


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk: length 0, type, CRC; always the last 12 bytes


def png_is_complete(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a PNG that ends with its IEND chunk: a cheap test (two small reads) for a file that was
    cut short (a copy or a non-atomic writer killed half-way), which decoders would otherwise fail on later."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_PNG_SIGNATURE))
            f.seek(0, os.SEEK_END)
            if f.tell() < len(_PNG_SIGNATURE) + len(_PNG_END):
                return False
            f.seek(-len(_PNG_END), os.SEEK_END)
            return head == _PNG_SIGNATURE and f.read() == _PNG_END
    except OSError:
        return False


def _prepare_parent(dst: Path, overwrite: bool) -> None:
    if dst.exists() and not overwrite:
        raise PixartError(f"{dst}: already exists (pass --overwrite to replace it)")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PixartError(f"{dst.parent}: cannot create the output directory ({exc.strerror})") from None
    if not os.access(dst.parent, os.W_OK):
        raise PixartError(f"{dst.parent}: output directory is not writable")


def _replace(tmp: Path, dst: Path) -> None:
    """Move ``tmp`` to ``dst``; an existing ``dst`` disappears only once the new one is complete."""
    old = None
    if dst.exists():
        old = _temp_sibling(dst, "old")
        os.replace(dst, old)
    os.replace(tmp, dst)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    with contextlib.suppress(OSError):  # make the rename itself durable
        fd = os.open(dst.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``dst``; on success it is synced and renamed to ``dst``.

    An exception (or a kill) leaves ``dst`` untouched: the hidden temporary directory is removed on error and,
    after a kill, never has the final name, so nothing half-written is ever picked up.
    """
    dst = Path(dst)
    _prepare_parent(dst, overwrite)
    tmp = _temp_sibling(dst, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        fault_point("before-rename", dst)
        _fsync_tree(tmp)
        _replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# For the kill tests: ``PIXART_FAULT_POINT=NAME:TARGET:MARKER`` makes the process that reaches fault point NAME for
# the file or directory named TARGET create MARKER and wait there, so a test can kill it at exactly that moment
# (e.g. ``before-rename:step-0000004:/tmp/m``: every file of that checkpoint written, the directory not yet renamed)
# instead of polling for a window it may miss.
FAULT_POINT_VARIABLE = "PIXART_FAULT_POINT"


def fault_point(name: str, target: Path) -> None:
    spec = os.environ.get(FAULT_POINT_VARIABLE)
    if not spec:
        return
    point, _, rest = spec.partition(":")
    wanted, _, marker = rest.partition(":")
    if point == name and wanted == target.name and marker:
        Path(marker).touch()
        while True:  # until killed
            time.sleep(60)


@contextlib.contextmanager
def atomic_file(dst: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Like :func:`atomic_directory` for a single file: write to the yielded path, renamed on success."""
    dst = Path(dst)
    _prepare_parent(dst, overwrite)
    tmp = _temp_sibling(dst, "tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


LOCK_FILE = ".pixart.lock"


@contextlib.contextmanager
def exclusive_output(directory: str | os.PathLike, command: str, label: str | None = None) -> Iterator[None]:
    """Hold ``directory`` for one writer: a second ``pixart train``/``sample`` into it is refused, naming the holder.

    An advisory ``flock`` on ``directory/.pixart.lock``: the kernel releases it when the holder exits, however it
    exits (SIGKILL included), so a crashed run never leaves the folder stuck. The file records who holds it, for the
    message. Creates ``directory`` (its parents too) when needed; ``label`` names it in errors (``output.dir``).
    """
    import fcntl  # lazy: POSIX only; the rest of this module works anywhere

    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle = open(directory / LOCK_FILE, "a+")  # noqa: SIM115 - held open for the lifetime of the lock
    except OSError as exc:
        raise PixartError(f"{label + ': ' if label else ''}cannot write to {directory} ({exc.strerror})") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            try:
                holder = json.loads(handle.read() or "{}")
            except ValueError:
                holder = {}
            who = f"pixart {holder.get('command', '?')} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
            raise PixartError(
                f"{directory} is in use by another {who}, since {holder.get('since', '?')}); wait for it to finish "
                "or write elsewhere"
            ) from None
        handle.seek(0)
        handle.truncate()
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        handle.write(json.dumps({"command": command, "pid": os.getpid(), "host": socket.gethostname(), "since": since}))
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock; the file stays (removing it would race with a waiting writer)
