"""Generation for benchmarks: a list of (file, prompt, seed) items → PNG files under one root, resumable and sharded.

* Each item names its file relative to the root, so a benchmark chooses its own layout (``000123.png`` for COCO,
  ``color/samples/<prompt>_000123.png`` for T2I-CompBench).
* Resumable: files are written atomically (temporary name, then rename), so a file with its final name is complete
  and is kept as it is; only missing files are made. ``generation.json`` in the root records the generation
  settings; resuming with different settings is an error rather than a silent mix of two models.
* Sharded: process ``k`` of ``n`` makes items ``k, k + n, k + 2n, ...`` of the full list (interleaved, so every
  shard gets a similar mix of prompts). Shards are computed from the full list, never from what is on disk, so
  processes that start at different times never race for the same file. ``accelerate_shard`` reads the shard from
  accelerate's ``PartialState`` (``accelerate launch`` or ``torchrun``).
* The image maker is a plain callable, so tests and other generators can stand in for a PixArt ``Pipeline``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, PngImagePlugin

from pixart_cli.errors import PixartError
from pixart_cli.evaluation import Progress, no_progress
from pixart_cli.io import atomic_file, png_is_complete, remove_stale_temporaries

if TYPE_CHECKING:  # both import torch, which this module loads only where it samples
    from pixart_cli.sampling.pipeline import Pipeline
    from pixart_cli.sampling.settings import SampleSettings

logger = logging.getLogger(__name__)

SETTINGS_FILE = "generation.json"
PNG_KEY = "pixart"  # PNG text chunk with the item's prompt and seed (the same key ``pixart sample`` uses)


@dataclass(frozen=True)
class GenItem:
    """One image to make: ``path`` relative to the output root, the prompt and the seed of its initial noise."""

    path: str
    prompt: str
    seed: int


# make_images(items, progress) yields (item, image) for every item, in any order; progress(images_done) as it goes.
ImageMaker = Callable[[Sequence[GenItem], Callable[[float], None]], Iterable[tuple[GenItem, Image.Image]]]


@dataclass(frozen=True)
class Shard:
    """This process's part of the work: ``index`` of ``count``; ``wait`` blocks until every process gets there."""

    index: int = 0
    count: int = 1
    wait: Callable[[], None] = field(default=lambda: None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard index {self.index} out of range for {self.count} shards")

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def select(self, items: Sequence[GenItem]) -> list[GenItem]:
        return list(items[self.index :: self.count])


def accelerate_shard() -> Shard:
    """The shard of this process under ``accelerate launch`` / ``torchrun`` (one shard when run plainly).

    Its ``wait`` is the last collective call of a run: after the barrier it closes the process group, because
    scoring then runs on the main process alone (a group left open makes some runs abort at exit).
    """
    import torch  # lazy: only where this module samples (scoring a finished run needs no torch)
    from accelerate import PartialState  # lazy: accelerate adds ~1 s to start-up (docs/reference.md §8)

    from pixart_cli.distributed import leave_process_group

    # cpu=True where there is no GPU: otherwise accelerate treats a CPU multi-process launch as a single process.
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes == 1:
        return Shard()

    def wait() -> None:
        state.wait_for_everyone()
        leave_process_group()

    return Shard(state.process_index, state.num_processes, wait)


@dataclass
class GenerationReport:
    root: Path
    written: list[Path]
    kept: list[Path]  # already there from an earlier run
    shard_items: int  # items this process was responsible for


def _check_items(items: Sequence[GenItem]) -> None:
    seen: set[str] = set()
    for item in items:
        path = Path(item.path)
        if path.is_absolute() or ".." in path.parts or not item.path:
            raise ValueError(f"item path must be relative and inside the root, got {item.path!r}")
        if item.path in seen:
            raise ValueError(f"two items write the same file {item.path!r}")
        seen.add(item.path)


def check_settings(root: Path, settings: dict) -> None:
    """Raise PixartError when ``root`` holds images made with other generation settings; record them otherwise."""
    path = root / SETTINGS_FILE
    settings = json.loads(json.dumps(settings))  # normalise tuples etc. to what a JSON round trip gives
    if path.is_file():
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            found = None
        if isinstance(found, dict) and found != settings:
            differ = sorted(k for k in set(found) | set(settings) if found.get(k) != settings.get(k))
            raise PixartError(
                f"{root}: holds images generated with other settings ({', '.join(differ)}); "
                "use another output directory"
            )
        if isinstance(found, dict):
            return
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PixartError(f"{root}: cannot create the output directory ({exc.strerror})") from None
    # Every shard may write it at once: identical content and an atomic rename make that harmless.
    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_png(image: Image.Image, path: Path, item: GenItem) -> None:
    """Write ``image`` atomically with the item's prompt and seed in a PNG text chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_KEY, json.dumps({"prompt": item.prompt, "seed": item.seed}, ensure_ascii=False))
    with atomic_file(path, overwrite=True) as tmp:
        image.convert("RGB").save(tmp, format="PNG", pnginfo=info)


def missing(items: Sequence[GenItem], root: str | os.PathLike) -> list[GenItem]:
    """The items whose file is not in ``root`` yet (or is a PNG cut short, e.g. by an interrupted copy)."""
    root = Path(root)
    return [item for item in items if not _complete(root / item.path)]


def _complete(path: Path) -> bool:
    return png_is_complete(path) if path.suffix.lower() == ".png" else path.is_file()


def generate_images(
    items: Sequence[GenItem],
    root: str | os.PathLike,
    make_images: ImageMaker | None,
    *,
    settings: dict,
    shard: Shard | None = None,
    progress: Progress = no_progress,
) -> GenerationReport:
    """Make this shard's missing images under ``root`` (see the module docstring); waits for every shard at the end.

    ``make_images`` may be None when nothing is missing (scoring a finished run needs no model); otherwise a
    PixartError says how many images are missing.
    """
    shard = shard or Shard()
    _check_items(items)
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise PixartError(f"{root}: exists and is not a directory")
    mine = shard.select(items)
    todo = missing(mine, root)
    wanted = set(todo)
    report = GenerationReport(root, [], [root / i.path for i in mine if i not in wanted], len(mine))
    if make_images is not None:
        check_settings(root, settings)  # also on a finished run: its images must come from these settings
    if todo:
        if make_images is None:
            raise PixartError(f"{root}: {len(todo)} of {len(mine)} images are missing; pass --model to generate them")
        if not os.access(root, os.W_OK):
            raise PixartError(f"{root}: output directory is not writable")
        logger.info("generating %d images (%d already there)", len(todo), len(report.kept))
        for folder in {(root / item.path).parent for item in todo}:  # what a killed run of this shard was writing
            remove_stale_temporaries(folder, {Path(item.path).name for item in todo})
        progress("generate", 0, len(todo))
        for item, image in make_images(todo, lambda done: progress("generate", done, len(todo))):
            if item not in wanted:
                raise RuntimeError(f"the image maker returned an item it was not asked for: {item.path!r}")
            path = root / item.path
            path.parent.mkdir(parents=True, exist_ok=True)
            save_png(image, path, item)
            report.written.append(path)
        progress("generate", len(todo), len(todo))
        left = missing(todo, root)
        if left:
            raise RuntimeError(f"the image maker skipped {len(left)} images, e.g. {left[0].path!r}")
    shard.wait()
    return report


def pipeline_maker(load_pipeline: Callable[[], Pipeline], settings: SampleSettings) -> ImageMaker:
    """An ``ImageMaker`` backed by ``pixart_cli.sampling.Pipeline.generate`` with ``settings`` (each item brings
    its own seed: ``settings.seed`` and ``settings.num_images_per_prompt`` are not read).

    ``load_pipeline`` is called once, on the first call, so a finished (resumed) run never loads the model.
    """
    from pixart_cli.sampling.settings import Job  # lazy: imports torch (see above)

    loaded: list = []

    def make(items: Sequence[GenItem], progress: Callable[[float], None]) -> Iterable[tuple[GenItem, Image.Image]]:
        if not loaded:
            loaded.append(load_pipeline())
        pipeline = loaded[0]
        jobs = [Job(i, item.prompt, item.seed) for i, item in enumerate(items)]
        made = pipeline.generate(jobs, settings, progress=progress)
        for job, image in made:
            yield items[job.prompt_index], image

    return make
