"""``caption_dataset``, the library side of `pixart caption`: a dataset → a JSONL manifest with dense captions.

Each line of the output is a manifest line (``pixart prepare`` and ``pixart train`` read it as a dataset) holding
the image's ``path`` (relative to the output's folder where possible), its ``key`` (the path within the dataset),
the source's own ``caption`` when it has one, and the generated caption under ``settings.field``::

    {"key": "a/0001.jpg", "path": "../data/a/0001.jpg", "caption": "alt text", "caption_vlm": "A photo of ..."}

An image inside a container (a tar shard, a datasets directory or parquet file) is its container's ``path`` and its
``member``; its key is the container's path within the dataset, then the member (the member alone for a datasets
directory, which is the dataset itself)::

    {"key": "00001.tar/000123.jpg", "path": "../shards/00001.tar", "member": "000123.jpg", "caption_vlm": "..."}
    {"key": "train/17", "path": "../laion-subset", "member": "train/17", "caption_vlm": "..."}

Work is cut into shards of ``settings.shard_size`` images in the source's order. Under ``torchrun`` /
``accelerate launch`` each process takes whole shards (shard s goes to rank s mod world size), so every image is
captioned once, by one process. Captions are appended to ``<output>.parts/<shard>.jsonl.partial`` batch by batch
and the file is renamed when its shard is complete; a killed run resumes from the last whole line (a line cut short
by the kill is dropped and redone). When every shard is done, one process merges the shards and any earlier output
into ``<output>`` in the source's order (atomically), and the parts are removed. A rerun skips every image the
output already holds, so it never duplicates a line; images that cannot be read are counted and skipped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pixart_cli.captioning.settings import CaptionSettings
from pixart_cli.captioning.vlm import VisionLanguageModel, model_path, resolve_dtype
from pixart_cli.data.sources import Record, SourceKind, read_source
from pixart_cli.data.transforms import BadImage, load_image
from pixart_cli.distributed import Dist
from pixart_cli.errors import PixartError
from pixart_cli.io import atomic_file, exclusive_output, fault_point

logger = logging.getLogger(__name__)

FORMAT = "pixart-captions"
VERSION = 1


@dataclass(frozen=True)
class Progress:
    images_done: int  # this process's images, counting those found done (and bad ones)
    images_total: int  # this process's images in all
    bad_images: int


@dataclass
class CaptionReport:
    output: Path
    settings_file: Path
    images: int  # lines in the output
    captioned: int  # written by this run (all processes)
    already_done: int  # found in the output or in finished shards
    bad_images: list[BadImage] = field(default_factory=list)
    seconds: float = 0.0
    processes: int = 1


def settings_path(output: Path) -> Path:
    return output.with_name(output.name + ".settings.json")


def parts_dir(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def _key(record: Record, root: Path) -> str:
    """The image's name within the dataset: unique, and the same in every run over the same data."""
    try:
        key = record.path.relative_to(root).as_posix()
    except ValueError:  # a manifest line naming an image outside the manifest's folder
        key = record.path.as_posix()
    if record.member is None:
        return key
    return record.member if key == "." else f"{key}/{record.member}"


def _line(record: Record, key: str, output: Path, field_name: str, text: str) -> str:
    try:
        path = os.path.relpath(record.path, output.parent)
    except ValueError:  # another drive (Windows)
        path = str(record.path)
    entry = {"key": key, "path": Path(path).as_posix()}
    if record.member is not None:
        entry["member"] = record.member
    if record.caption:
        entry["caption"] = record.caption
    entry[field_name] = text
    return json.dumps(entry, ensure_ascii=False) + "\n"


def _read_keys(path: Path) -> dict[str, tuple[int, int]]:
    """key → (offset, length) of each whole line of a captions file; a last line cut short is not a line."""
    found: dict[str, tuple[int, int]] = {}
    offset = 0
    with open(path, "rb") as f:
        for raw in f:
            if raw.endswith(b"\n"):
                with contextlib.suppress(ValueError, UnicodeDecodeError):
                    entry = json.loads(raw)
                    if isinstance(entry, dict) and isinstance(entry.get("key"), str):
                        found[entry["key"]] = (offset, len(raw))
            offset += len(raw)
    return found


def _truncate_to_whole_lines(path: Path) -> None:
    """Drop a last line a kill cut short, so appending continues on a line of its own."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with open(path, "r+b") as f:
            f.truncate(end)


def _check_settings(output: Path, recorded: dict) -> None:
    path = settings_path(output)
    if path.exists():
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            raise PixartError(f"{path}: unreadable; delete it (and {output}) to caption again") from None
        if found != recorded:
            differ = sorted(k for k in {*found, *recorded} if found.get(k) != recorded.get(k))
            raise PixartError(
                f"{output}: holds captions made with other settings ({', '.join(differ)}); use another output"
            )
    elif output.exists() or parts_dir(output).exists():
        raise PixartError(f"{output}: exists but was not written by `pixart caption` (no {path.name}); use another")


def caption_dataset(
    data: str | os.PathLike,
    output: str | os.PathLike,
    settings: CaptionSettings,
    *,
    kind: SourceKind | str = "auto",
    device: torch.device | str = "cpu",
    progress: Callable[[Progress], None] | None = None,
    dist: Dist | None = None,
) -> CaptionReport | None:
    """Caption every image of ``data`` into ``output`` (resumable; see the module docstring).

    Returns the report in the process that merged (rank 0), None in the others.
    """
    started = time.monotonic()
    dist = dist or Dist.from_environment()
    output = Path(output)
    if output.suffix != ".jsonl":
        raise PixartError(f"{output}: the output is a JSONL manifest; give a name ending in .jsonl")
    if output.is_dir():
        raise PixartError(f"{output}: is a directory; give a .jsonl file name")
    source = read_source(data, kind, expect_captions=False)  # every image, with its own caption or none
    if source.conditioning != "caption":
        raise PixartError(f"{source.path}: class folders have no captions to keep; read it as kind 'captions'")
    root = source.path if source.path.is_dir() else source.path.parent
    records = source.records
    device = dist.device(device)  # a bare cuda: this process's own GPU
    dtype = resolve_dtype(settings.dtype, device)
    recorded = {
        "format": FORMAT,
        "version": VERSION,
        **settings.record(),
        "dtype": str(dtype).removeprefix("torch."),
        "model_path": str(model_path(settings.model) or settings.model),
        "source": str(source.path),
    }
    _check_settings(output, recorded)
    keys = [_key(r, root) for r in records]
    if len(set(keys)) != len(keys):
        raise PixartError(f"{source.path}: names an image twice; each image is captioned once")
    done = _read_keys(output) if output.exists() else {}
    # Load the model before anything is written: a directory that is not a vision-language model is one error
    # line and leaves nothing behind. Nothing left to caption: no model at all.
    model = None
    if any(k not in done for k in keys):
        model = VisionLanguageModel(settings.model, dtype=dtype, device=device)
    run = _Run(output, settings, records, keys, set(done), model, dist, progress)
    with contextlib.ExitStack() as stack:
        if dist.rank == 0:  # one run per output (its other processes wait at the barrier until this one holds it)
            stack.enter_context(exclusive_output(parts_dir(output), "caption", label=str(output)))
            if not settings_path(output).exists():
                with atomic_file(settings_path(output)) as tmp:
                    tmp.write_text(json.dumps(recorded, indent=2) + "\n", encoding="utf-8")
        dist.barrier()
        for shard in run.mine:
            run.caption_shard(shard)
        dist.barrier()
        dist.close()
        if dist.rank != 0:
            return None
        bad = [b for s in range(len(run.shards)) for b in _read_bad(run.final(s))]
        lines = _merge(output, run.parts, keys, len(run.shards))
        shutil.rmtree(run.parts, ignore_errors=True)
    return CaptionReport(
        output=output,
        settings_file=settings_path(output),
        images=lines,
        captioned=lines - len(done),
        already_done=len(done),
        bad_images=bad,
        seconds=time.monotonic() - started,
        processes=dist.world,
    )


class _Run:
    """One process's share of a captioning run: whole shards (s mod world size = rank), resumed line by line."""

    def __init__(self, output, settings, records, keys, done, model, dist, progress) -> None:
        self.output, self.settings, self.records, self.keys, self.done = output, settings, records, keys, done
        self.model, self.progress = model, progress
        self.parts = parts_dir(output)
        size = settings.shard_size
        self.shards = [range(s, min(s + size, len(records))) for s in range(0, len(records), size)]
        self.mine = [s for s in range(len(self.shards)) if s % dist.world == dist.rank]
        self.total = sum(len(self.shards[s]) for s in self.mine)
        self.images_done = self.bad_images = 0
        self._report()

    def final(self, shard: int) -> Path:
        return self.parts / f"{shard:06d}.jsonl"

    def _report(self, images: int = 0, bad: int = 0) -> None:
        self.images_done += images
        self.bad_images += bad
        if self.progress is not None:
            self.progress(Progress(self.images_done, self.total, self.bad_images))

    def caption_shard(self, s: int) -> None:
        final = self.final(s)
        if final.exists():  # finished by an earlier run
            self._report(len(self.shards[s]), len(_read_bad(final)))
            return
        partial = final.with_name(final.name + ".partial")
        if partial.exists():
            _truncate_to_whole_lines(partial)
        have = self.done | set(_read_keys(partial) if partial.exists() else ())
        pending = [i for i in self.shards[s] if self.keys[i] not in have]
        self._report(len(self.shards[s]) - len(pending))
        bad: list[BadImage] = []
        size = self.settings.batch_size
        batches = [pending[k : k + size] for k in range(0, len(pending), size)]
        # On a GPU the next batch is decoded and pre-processed in a thread while the device generates this one. On
        # a CPU the same cores would do both: measured no faster there (benchmarks/caption.py), so no thread.
        overlap = self.model is not None and self.model.device.type != "cpu"
        with open(partial, "a", encoding="utf-8") as f, ThreadPoolExecutor(1) as prefetch:
            load = prefetch.submit if overlap else _done
            ahead = load(self._load, batches[0]) if batches else None
            for n, batch in enumerate(batches):
                good, batch_bad, inputs = ahead.result()
                if n + 1 < len(batches):
                    ahead = load(self._load, batches[n + 1])
                bad += batch_bad
                if good:
                    texts = self.model.generate(inputs, self.settings.max_new_tokens)
                    f.write("".join(self._line(i, text) for i, text in zip(good, texts, strict=True)))
                    f.flush()  # what is written survives a kill
                    fault_point("after-batch", partial)
                self._report(len(batch), len(batch_bad))
        _write_bad(final, bad)
        os.replace(partial, final)  # the shard is complete

    def _load(self, batch: list[int]) -> tuple[list[int], list[BadImage], Any]:
        """A batch's readable images (indices), its unreadable ones, and the processor's inputs for the former."""
        loaded = {i: load_image(self.records[i]) for i in batch}
        good = [i for i in batch if not isinstance(loaded[i], BadImage)]
        bad = [image for image in loaded.values() if isinstance(image, BadImage)]
        inputs = self.model.inputs([loaded[i] for i in good], self.settings.prompt) if good else None
        return good, bad, inputs

    def _line(self, i: int, text: str) -> str:
        return _line(self.records[i], self.keys[i], self.output, self.settings.field, text)


def _done(function: Callable[..., Any], *args: Any) -> Future:
    """``function(*args)`` run now, as a finished future (the no-thread twin of ``ThreadPoolExecutor.submit``)."""
    future: Future = Future()
    try:
        future.set_result(function(*args))
    except Exception as exc:  # re-raised by .result(), as a thread's would be
        future.set_exception(exc)
    return future


def _bad_path(final: Path) -> Path:
    return final.with_name(final.stem + ".bad.json")


def _write_bad(final: Path, bad: list[BadImage]) -> None:
    with atomic_file(_bad_path(final), overwrite=True) as tmp:
        tmp.write_text(json.dumps([[str(b.path), b.reason] for b in bad]), encoding="utf-8")


def _read_bad(final: Path) -> list[BadImage]:
    try:
        return [BadImage(Path(p), reason) for p, reason in json.loads(_bad_path(final).read_text(encoding="utf-8"))]
    except (OSError, ValueError):
        return []


def _merge(output: Path, parts: Path, keys: list[str], shards: int) -> int:
    """Write ``output`` from the earlier output and the shards' lines, in the source's order; returns the lines."""
    sources: list[tuple[Path, dict[str, tuple[int, int]]]] = []
    if output.exists():
        sources.append((output, _read_keys(output)))
    sources += [(p, _read_keys(p)) for s in range(shards) if (p := parts / f"{s:06d}.jsonl").exists()]
    where = {key: (path, span) for path, found in sources for key, span in found.items()}
    lines = 0
    with contextlib.ExitStack() as stack:
        files = {path: stack.enter_context(open(path, "rb")) for path, _ in sources}
        with atomic_file(output, overwrite=True) as tmp, open(tmp, "wb") as out:
            for key in _in_order(keys, where):
                path, (offset, length) = where[key]
                files[path].seek(offset)
                out.write(files[path].read(length))
                lines += 1
    return lines


def _in_order(keys: list[str], where: dict) -> Iterator[str]:
    """The source's keys that have a caption, in the source's order, then captioned keys the source no longer
    holds (an image removed since an earlier run keeps its line)."""
    seen = set(keys)
    yield from (k for k in keys if k in where)
    yield from (k for k in where if k not in seen)
