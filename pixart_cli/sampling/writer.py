"""``write_samples``, the library side of `pixart sample`: PNGs with their settings and a JSONL manifest.

Resumable: an image whose file already holds the same settings is skipped; one writer per folder at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, PngImagePlugin

from pixart_cli.errors import PixartError
from pixart_cli.io import atomic_file, exclusive_output, png_is_complete, remove_stale_temporaries
from pixart_cli.sampling.pipeline import Pipeline
from pixart_cli.sampling.settings import Job, SampleSettings

logger = logging.getLogger(__name__)


MANIFEST = "manifest.jsonl"
GRID = "grid.png"
PNG_KEY = "pixart"  # PNG text chunk holding the JSON record of the image's settings
MAX_GRID_IMAGES = 256


def image_name(job: Job) -> str:
    return f"p{job.prompt_index:05d}-s{job.seed}.png"


@dataclass
class SampleReport:
    output_dir: Path
    manifest: Path
    size: tuple[int, int]  # (height, width), the tensors' order; print it as width×height
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    grid: Path | None = None


def _png_record(path: Path) -> dict | None:
    """The settings stored in one of our PNGs; None when the file is not one (or not readable, or cut short)."""
    if not png_is_complete(path):  # the settings chunk comes before the pixels: a truncated file still has it
        return None
    try:
        with Image.open(path) as image:
            return json.loads(image.info[PNG_KEY])
    except (OSError, KeyError, ValueError, SyntaxError):
        return None


def _save_png(image: Image.Image, path: Path, record: dict) -> None:
    """Write atomically (temporary file + rename): a file with the final name is always complete."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_KEY, json.dumps(record, ensure_ascii=False))
    for key in ("prompt", "seed", "sampler", "steps", "cfg", "model"):  # readable in any PNG viewer
        info.add_text(key, str(record[key]))
    with atomic_file(path, overwrite=True) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def read_manifest(path: Path) -> dict[str, dict]:
    """The manifest's records by file name, in order; a later record for a file supersedes an earlier one, and
    lines that are not records (one cut short by a kill) are dropped."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise PixartError(f"{path}: cannot read the manifest ({exc.strerror})") from None
    found: dict[str, dict] = {}
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            name = record.get("file") if isinstance(record, dict) else None
            if isinstance(name, str) and name == Path(name).name:  # an image of this directory
                found[name] = record
    return found


class _Manifest:
    """JSONL, one record per finished image: rewritten at the start of a run, then appended to image by image."""

    def __init__(self, path: Path, records: dict[str, dict]) -> None:
        self.path = path
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records.values())
        try:
            current = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            current = ""
        if text != current:  # atomic: a kill leaves the old manifest or the new one
            with atomic_file(path, overwrite=True) as tmp:
                tmp.write_text(text, encoding="utf-8")

    def add(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_samples(
    pipeline: Pipeline,
    prompts: Sequence[str],
    output_dir: str | os.PathLike,
    settings: SampleSettings,
    *,
    grid: bool = False,
    progress: Callable[[float, int], None] | None = None,
) -> SampleReport:
    """Generate ``settings.num_images_per_prompt`` images per prompt into ``output_dir``: one PNG per image (its
    settings in its text chunk, ``SampleSettings.record``) and ``manifest.jsonl``.

    Resumable: an image whose file already holds the same settings is skipped; one that holds different settings
    is an error (nothing is written then). Everything is validated before the first file is written.
    ``progress(images_done, images_to_make)`` is called as sampling advances.
    """
    jobs = settings.jobs(prompts)
    if grid and len(jobs) > MAX_GRID_IMAGES:
        raise PixartError(f"--grid is for at most {MAX_GRID_IMAGES} images, this run makes {len(jobs)}")
    h, w = pipeline.image_size(settings.height, settings.width)
    pipeline.check_memory(h, w, min(settings.batch_size, len(jobs)), settings.cfg)
    shared = settings.record((h, w), pipeline.name)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise PixartError(f"{out}: exists and is not a directory")
    records = {
        j: {"file": image_name(j), "prompt_index": j.prompt_index, "prompt": j.prompt, "seed": j.seed, **shared}
        for j in jobs
    }
    for job, record in records.items():  # what the model read, where prompt completion changed it
        if (text := pipeline.caption(job)) != job.prompt:
            record["caption"] = text
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PixartError(f"{out}: cannot create the output directory ({exc.strerror})") from None
    if not os.access(out, os.W_OK):
        raise PixartError(f"{out}: output directory is not writable")
    # One writer at a time (a second `pixart sample` into this folder is refused, naming the holder); the folder's
    # state is read under the lock, so two runs never both decide to make the same image.
    with exclusive_output(out, "sample"):
        todo, skipped = [], []
        for job in jobs:
            path = out / image_name(job)
            if not path.exists():
                todo.append(job)
                continue
            found = _png_record(path)
            if found == records[job]:
                skipped.append(job)
            elif found is None:
                todo.append(job)  # not one of ours, or unreadable: replace it
            else:
                differ = sorted(k for k in records[job] if found.get(k) != records[job][k])
                raise PixartError(
                    f"{path}: exists from a run with different settings ({', '.join(differ)}); use another "
                    "output directory"
                )
        # One record per finished image: an image made again loses its old record (it gets a new one when written),
        # and one written by a run stopped before recording it gets its record now.
        redo = {image_name(j) for j in todo}
        kept = {
            name: record
            for name, record in read_manifest(out / MANIFEST).items()
            if name not in redo and png_is_complete(out / name)
        }
        kept.update({image_name(j): records[j] for j in skipped})

        remove_stale_temporaries(out, redo | {MANIFEST})  # what a killed run was writing
        manifest = _Manifest(out / MANIFEST, kept)
        report = SampleReport(out, manifest.path, (h, w), skipped=[out / image_name(j) for j in skipped])

        def advance(images: float) -> None:
            if progress is not None:
                progress(images, len(todo))

        advance(0.0)
        # The size resolved above, so that generating does not resolve (and warn about a snapped size) again.
        made = pipeline.generate(todo, dataclasses.replace(settings, height=h, width=w), progress=advance)
        for job, image in made:
            path = out / image_name(job)
            _save_png(image, path, records[job])
            manifest.add(records[job])
            report.written.append(path)
        if grid:
            report.grid = _write_grid([out / image_name(j) for j in jobs], settings.num_images_per_prompt, out / GRID)
        return report


def _write_grid(paths: list[Path], columns: int, dst: Path) -> Path:
    """One row per prompt, one column per image."""
    images = [Image.open(p).convert("RGB") for p in paths]
    w, h = images[0].size
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * w, rows * h))
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * w, (i // columns) * h))
    with atomic_file(dst, overwrite=True) as tmp:
        sheet.save(tmp, format="PNG")
    return dst
