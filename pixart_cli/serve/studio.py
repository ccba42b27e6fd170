"""The library side of `pixart serve`, without the web page: requests, one generation at a time, the history.

A request is validated as `pixart sample` validates its flags (``SampleSettings``, the pipeline's size and memory
checks) plus the server's own bounds (``ServeSettings``). Each request is written into a folder of its own under
the output directory, exactly as `pixart sample -o FOLDER` writes one (one PNG per image with its settings,
``manifest.jsonl``), with ``request.json`` beside them: so the history survives restarts, a request stopped halfway
keeps every finished image, and the "reproduce" command (``request.json``'s ``command``) makes the same pixels: into
another folder (``-o``), or into this one, where `pixart sample` makes only the images a stop left undone.

No request names a path: folders are made by the server, adapters are picked from the ones it was started with.
"""

from __future__ import annotations

import json
import re
import secrets
import shlex
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pixart_cli.errors import PixartError
from pixart_cli.io import atomic_file
from pixart_cli.sampling.settings import SampleSettings
from pixart_cli.sampling.solvers import DEFAULT_CFG, MAX_STEPS
from pixart_cli.sampling.writer import MANIFEST, read_manifest

REQUEST_FILE = "request.json"
FOLDER_NAME = re.compile(r"\d{8}-\d{6}-\d{3,}")  # a request's folder: UTC date-time and a counter
MAX_PROMPT_CHARS = 2_000  # T5 reads at most 300 tokens; anything far longer is a mistake or an attack
MAX_SEED = 2**32 - 1  # drawn seeds, and the seed field's range: what a person can type back in

# The request fields, with their JSON types: the page and the API send the same object.
FIELDS: dict[str, tuple[type, ...]] = {
    "prompts": (str, list),
    "negative_prompt": (str, type(None)),
    "sampler": (str,),
    "steps": (int, type(None)),
    "cfg": (int, float),
    "seed": (int, type(None)),
    "num_images": (int,),
    "width": (int, type(None)),
    "height": (int, type(None)),
    "lora": (str, type(None)),
}


class Cancelled(Exception):
    """The request was cancelled between two solver steps; the images finished before are kept."""


@dataclass(frozen=True)
class ServeSettings:
    """How `pixart serve` runs; constructing one validates it (``PixartError`` naming the flag)."""

    model: str
    output: Path
    host: str = "127.0.0.1"
    port: int = 7860
    adapters: tuple[tuple[str, float], ...] = ()  # the adapters a request may pick (one at a time, or none)
    device: str = "cpu"  # resolved: the reproduce command names it, so that it runs where (and in the dtype) we ran
    t5: str | None = None  # overrides of the checkpoint's components, as `pixart sample --t5/--vae`
    vae: str | None = None
    max_images: int = 16  # per request, over all its prompts
    queue_size: int = 8  # requests waiting beyond the one being made; more are refused as busy

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65_535:
            raise PixartError(f"--port must be in [0, 65535], got {self.port}")
        if self.max_images < 1:
            raise PixartError(f"--max-images must be at least 1, got {self.max_images}")
        if self.queue_size < 1:
            raise PixartError(f"--queue-size must be at least 1, got {self.queue_size}")
        if self.output.exists() and not self.output.is_dir():
            raise PixartError(f"{self.output}: exists and is not a directory (-o)")

    def adapter_names(self) -> list[str]:
        """How the page and the API name the offered adapters: the path, with ``:SCALE`` unless 1."""
        return [adapter_name(a) for a in self.adapters]

    def adapter(self, name: str | None) -> tuple[str, float] | None:
        """The offered adapter called ``name`` (``adapter_names``), None for none."""
        if name in (None, "", "none"):
            return None
        for adapter in self.adapters:
            if adapter_name(adapter) == name:
                return adapter
        offered = ", ".join(self.adapter_names()) or "none is offered"
        raise PixartError(f"lora: {name!r} is not one of this server's adapters ({offered})")


def adapter_name(adapter: tuple[str, float]) -> str:
    return adapter[0] if adapter[1] == 1 else f"{adapter[0]}:{adapter[1]!r}"


@dataclass(frozen=True)
class GenerationRequest:
    """One request: prompts, how to sample them (``SampleSettings``, as `pixart sample` builds it), an adapter."""

    prompts: tuple[str, ...]
    settings: SampleSettings
    lora: tuple[str, float] | None = None

    @classmethod
    def from_fields(cls, fields: Mapping[str, object], serve: ServeSettings) -> GenerationRequest:
        """Validate a request object (from the page or the API); ``PixartError`` names the field."""
        if not isinstance(fields, Mapping):
            raise PixartError(f"a request is a JSON object with fields {', '.join(FIELDS)}")
        if unknown := sorted(set(fields) - set(FIELDS)):
            raise PixartError(f"unknown field {unknown[0]!r}; fields: {', '.join(FIELDS)}")
        for name, value in fields.items():
            if not isinstance(value, FIELDS[name]) or (isinstance(value, bool) and bool not in FIELDS[name]):
                kinds = " or ".join("null" if t is type(None) else t.__name__ for t in FIELDS[name])
                raise PixartError(f"{name}: expected {kinds}, got {type(value).__name__}")
        prompts = _prompts(fields.get("prompts", ""))
        count = int(fields.get("num_images", 1))
        if not 1 <= count * len(prompts) <= serve.max_images:
            raise PixartError(
                f"num_images: {len(prompts)} prompt(s) × {count} image(s) is {count * len(prompts)}; this server "
                f"makes 1 to {serve.max_images} images a request"
            )
        cfg = fields.get("cfg", DEFAULT_CFG)
        if not 0 <= cfg <= 100:  # NaN fails too; int-float comparisons are exact (no overflow for huge ints)
            raise PixartError(f"cfg must be a number from 0 to 100, got {str(cfg)[:24]}")
        cfg = float(cfg)
        seed = fields.get("seed")
        if seed is None:  # random: drawn here, so it is recorded and reproducible
            seed = secrets.randbelow(MAX_SEED + 1)
        elif not 0 <= seed <= MAX_SEED:
            raise PixartError(f"seed must be in [0, {MAX_SEED}] (empty: random), got {seed}")
        negative = fields.get("negative_prompt")
        negative = _text(negative, "negative_prompt") if negative and negative.strip() else None
        width, height = fields.get("width"), fields.get("height")
        for name, side in (("width", width), ("height", height)):
            if side is not None and not 1 <= side <= 16_384:
                raise PixartError(f"{name} must be in [1, 16384] pixels (null: the model's size), got {side}")
        steps = fields.get("steps")
        if steps is not None and not 1 <= steps <= MAX_STEPS:
            raise PixartError(f"steps must be in [1, {MAX_STEPS}] (null: the sampler's default), got {steps}")
        settings = SampleSettings(
            sampler=str(fields.get("sampler", "dpm-solver")), steps=steps, cfg=cfg, seed=seed,
            num_images_per_prompt=count, negative_prompt=negative, height=height, width=width,
        )  # fmt: skip
        return cls(prompts, settings, serve.adapter(fields.get("lora")))  # type: ignore[arg-type]

    def command(self, serve: ServeSettings, folder: Path, size: tuple[int, int]) -> str:
        """The `pixart sample` command that makes the same pixels into ``folder`` (or completes them there): every
        setting that decides them, the device (and with it the dtype) included; the batch size is both defaults'."""
        s = self.settings
        args = ["pixart", "sample", "-m", serve.model, "-n", str(s.num_images_per_prompt), "--seed", str(s.seed)]
        args += ["--sampler", s.sampler, "--steps", str(s.steps), "--cfg", repr(s.cfg)]
        args += ["--height", str(size[0]), "--width", str(size[1]), "--device", serve.device]
        if s.negative_prompt:
            args += ["--negative-prompt", s.negative_prompt]
        if self.lora is not None:
            args += ["--lora", f"{self.lora[0]}:{self.lora[1]!r}"]
        for flag, value in (("--t5", serve.t5), ("--vae", serve.vae)):
            if value:
                args += [flag, value]
        return shlex.join([*args, "-o", str(folder), "--", *self.prompts])  # "--": a prompt may start with "-"


def load_pipeline(settings: ServeSettings, adapter: tuple[str, float] | None = None):
    """The server's ``Pipeline``: its model (with ``adapter`` merged) as `pixart sample` would load it."""
    from pixart_cli.sampling.pipeline import Pipeline

    adapters = [adapter] if adapter else []
    return Pipeline.from_pretrained(
        settings.model, t5=settings.t5, vae=settings.vae, device=settings.device, adapters=adapters
    )


def _text(value: str, name: str) -> str:
    """A prompt as T5 will read it: non-empty, bounded, encodable (JSON can carry lone surrogates)."""
    text = value.strip()
    if not text:
        raise PixartError(f"{name}: empty")
    if len(text) > MAX_PROMPT_CHARS:
        raise PixartError(f"{name}: {len(text):,} characters; at most {MAX_PROMPT_CHARS:,}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PixartError(f"{name}: not valid Unicode text") from None
    return text


def _prompts(value: str | list) -> tuple[str, ...]:
    """One prompt per non-blank line (a string) or per item (a list)."""
    items = value.splitlines() if isinstance(value, str) else value
    if not all(isinstance(p, str) for p in items):
        raise PixartError("prompts: expected text, one prompt per line, or a list of strings")
    prompts = tuple(_text(p, "prompts") for p in items if p.strip())
    if not prompts:
        raise PixartError("prompts: give at least one prompt")
    return prompts


@dataclass
class Result:
    """What a request made: its folder, each image's file and record (as in ``manifest.jsonl``), the command."""

    folder: Path | None  # None: cancelled before it started
    images: list[tuple[Path, dict]]
    command: str
    cancelled: bool = False
    size: tuple[int, int] = (0, 0)  # (height, width)


@dataclass
class Studio:
    """Loads the model once and makes one request at a time into its output folder.

    ``load(adapter)`` builds a ``Pipeline`` (with the adapter merged, or none); one pipeline is kept, so picking
    another adapter reloads. Requests wait on a lock: the web page's queue lets one through at a time, and the
    lock keeps any other caller in line too.
    """

    settings: ServeSettings
    load: Callable[[tuple[str, float] | None], object]
    _loaded: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _last_folder: str = ""

    def stop(self, timeout: float = 60.0) -> bool:
        """Stop the running request after its current solver step (its finished images are kept) and refuse new
        ones; True once nothing runs. A server calls it before exiting: torch must not be mid-step in a worker
        thread when the interpreter shuts down."""
        self._stopping.set()
        if self._lock.acquire(timeout=timeout):
            self._lock.release()
            return True
        return False

    def pipeline(self, adapter: tuple[str, float] | None):
        if adapter not in self._loaded:
            if self._loaded:  # one model in memory at a time
                import gc

                import torch

                self._loaded.clear()
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            self._loaded[adapter] = self.load(adapter)
        return self._loaded[adapter]

    def _new_folder(self) -> Path:
        """A fresh folder for one request, named by UTC time and a counter, each name after every earlier one (a
        clock set back continues the last name's counter), so that sorting by name sorts by age."""
        if not self._last_folder:
            names = (f.name for f in _request_folders(self.settings.output) if FOLDER_NAME.fullmatch(f.name))
            self._last_folder = max(names, default="")
        stamp = max(time.strftime("%Y%m%d-%H%M%S", time.gmtime()), self._last_folder[:15])
        start = int(self._last_folder[16:] or -1) + 1 if self._last_folder.startswith(stamp) else 0
        for i in range(start, start + 10_000):
            name = f"{stamp}-{i:03d}"
            folder = self.settings.output / name
            try:
                folder.mkdir(parents=True)
            except FileExistsError:
                continue
            except OSError as exc:
                raise PixartError(f"{folder}: cannot create the request's folder ({exc.strerror})") from None
            self._last_folder = name
            return folder
        raise PixartError(f"{self.settings.output}: no free folder name")

    def generate(
        self,
        request: GenerationRequest,
        progress: Callable[[float, int], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> Result:
        """Make ``request``'s images into a new folder; ``progress(images_done, images)`` after each solver step.

        A set ``cancel`` stops it at the next solver step (``Result.cancelled``; finished images are kept).
        """
        from pixart_cli.sampling.writer import write_samples

        with self._lock:
            if self._stopping.is_set():
                raise PixartError("the server is stopping")
            pipeline = self.pipeline(request.lora)
            s = request.settings
            size = pipeline.image_size(s.height, s.width)  # refused sizes and memory: before any folder exists
            pipeline.check_memory(*size, min(s.batch_size, len(request.prompts) * s.num_images_per_prompt), s.cfg)
            if cancel is not None and cancel.is_set():  # cancelled while it waited: nothing is made
                return Result(None, [], "", True, size)
            folder = self._new_folder()
            command = request.command(self.settings, folder, size)
            record = {
                "prompts": list(request.prompts),
                "num_images": s.num_images_per_prompt,
                "seed": s.seed,
                "sampler": s.sampler,
                "steps": s.steps,
                "cfg": s.cfg,
                "negative_prompt": s.negative_prompt or "",
                "height": size[0],
                "width": size[1],
                "lora": None if request.lora is None else adapter_name(request.lora),
                "model": self.settings.model,
                "command": command,
            }
            with atomic_file(folder / REQUEST_FILE) as tmp:
                tmp.write_text(json.dumps(record, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")

            def step(done: float, total: int) -> None:
                if (cancel is not None and cancel.is_set()) or self._stopping.is_set():
                    raise Cancelled
                if progress is not None:
                    progress(done, total)

            cancelled = False
            try:
                write_samples(pipeline, request.prompts, folder, s, progress=step)
            except Cancelled:
                cancelled = True
        return Result(folder, list(_images(folder)), command, cancelled, size)

    def history(self, limit: int = 200) -> list[tuple[Path, dict]]:
        """The newest ``limit`` images of the output folder's requests (newest first), with their records."""
        found: list[tuple[Path, dict]] = []
        for folder in sorted(_request_folders(self.settings.output), reverse=True):
            try:
                found += _images(folder)  # a request's images in their order
            except PixartError:  # an unreadable manifest: that request is not shown, the others are
                continue
            if len(found) >= limit:
                break
        return found[:limit]


def _request_folders(output: Path) -> Iterator[Path]:
    try:
        entries = list(output.iterdir())
    except OSError:
        return
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink() and not entry.name.startswith("."):
            yield entry


def _images(folder: Path) -> Iterator[tuple[Path, dict]]:
    """Each finished image of a request folder with its manifest record (files that are gone are skipped)."""
    for name, record in read_manifest(folder / MANIFEST).items():
        path = folder / name
        if path.is_file() and not path.is_symlink():  # a link could point anywhere: never shown or served
            yield path, record


def read_request(folder: Path) -> dict:
    """A request folder's ``request.json`` ({} when missing or unreadable)."""
    try:
        found = json.loads((folder / REQUEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}
