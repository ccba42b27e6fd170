"""Pieces every command shares: the Typer app, the two consoles, clean failures, dtype choices.

Results go to stdout (``out``, or one JSON object with ``--json``) so that ``pixart eval-fid … > fid.txt`` keeps just
the result; progress bars, log lines, warnings and errors go to stderr (``console``).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from pixart_cli.errors import PixartError


class _Flag(TyperOption):
    """An on/off option: it takes no value, so --help shows no type (typer's rich help writes ``<bool>``)."""

    def display_type_rich(self, ctx: typer.Context) -> str | None:
        return None


class _Positional(TyperArgument):
    """A positional argument shown upper-case (``SRC``) when it has no metavar, like those that have one
    (``RECIPE``); typer shows the parameter's own name (``{src}``) otherwise."""

    @property
    def display_name_raw(self) -> str:
        return self.metavar if self.metavar is not None else (self.name or "").upper()


def _tidy_help(params: list) -> list:
    """Give each parameter the help display above (the same object, re-classed: parsing is untouched)."""
    for param in params:
        if type(param) is TyperOption and param.is_flag:
            param.__class__ = _Flag
        elif type(param) is TyperArgument:
            param.__class__ = _Positional
    return params


class _Command(TyperCommand):
    def get_params(self, ctx: typer.Context) -> list:  # every use (usage line, help panels, parsing) goes here
        return _tidy_help(super().get_params(ctx))


class _Group(TyperGroup):
    def get_params(self, ctx: typer.Context) -> list:
        return _tidy_help(super().get_params(ctx))


class _Typer(typer.Typer):
    """Registers commands with the help display above unless a command names its own class."""

    def command(self, name: str | None = None, *, cls: type[TyperCommand] | None = None, **kwargs):
        return super().command(name, cls=cls or _Command, **kwargs)


app = _Typer(
    cls=_Group,
    name="pixart",
    help="Train, sample, convert and evaluate PixArt-α text-to-image diffusion transformers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True, highlight=False)
out = Console(highlight=False)  # results only; without a terminal (a pipe, a file) rich writes them without colour

JsonOpt = Annotated[
    bool,
    typer.Option("--json", help="Print the result as one JSON object on stdout (progress and logs stay on stderr)."),
]


def print_json(data: dict[str, Any]) -> None:
    """The ``--json`` result: one line, one object, paths as strings, nothing else on stdout."""
    print(json.dumps(data, default=os.fspath), flush=True)


F = TypeVar("F", bound=Callable[..., object])


# How a full disk shows itself: OSError ENOSPC/EDQUOT from Python, "os error 28" from safetensors (Rust), and from
# torch.save only "unexpected pos N vs M" or "file write failed" (its zip writer loses the errno).
_DISK_FULL_MESSAGES = ("No space left on device", "os error 28", "Disk quota exceeded", "unexpected pos",
                       "file write failed")  # fmt: skip


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a write that failed for want of space."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(text in str(exc) for text in _DISK_FULL_MESSAGES)


def fails_cleanly(func: F) -> F:
    """Turn a PixartError, or a disk that filled up, into one red line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except PixartError as exc:
            from rich.markup import escape

            # Escaped: a message quoting "pip install -e '.[lean]'" or a list must print as written, not as markup.
            console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
        except Exception as exc:
            if not disk_full(exc):
                raise
            from rich.markup import escape

            detail = escape(str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__)
            console.print(
                f"[bold red]error:[/] the disk is full ({detail}). Nothing half-written was kept: checkpoints, "
                "images and caches are written to temporaries and renamed, so everything completed before is "
                "intact. Free some space and run the same command again (pixart train: with --resume auto).",
                soft_wrap=True,
            )
            raise typer.Exit(2) from None
        finally:
            if "torch.distributed" in sys.modules:  # however a launched process ends, it leaves its group cleanly
                from pixart_cli.distributed import leave_process_group

                leave_process_group(destroy=False)  # a no-op where the command left it already

    return wrapper  # type: ignore[return-value]


class DType(str, enum.Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"

    @property
    def torch(self):
        import torch

        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.value]


class T5Quant(str, enum.Enum):
    """--t5-quant: T5's linear layers as stored, or 8-/4-bit weights (bitsandbytes; components/t5.py)."""

    none = "none"
    int8 = "int8"
    nf4 = "nf4"


T5QuantOpt = Annotated[
    T5Quant,
    typer.Option(
        "--t5-quant", help="Load T5's weights in 8 (int8) or 4 bits (nf4): about 1/2 or 1/3.5 of the bf16 memory."
    ),
]


class ConsoleHandler(logging.Handler):
    """Library log records as console lines (warnings in yellow), printed through the command's console."""

    def emit(self, record: logging.LogRecord) -> None:
        from rich.text import Text

        style = "yellow" if record.levelno >= logging.WARNING else "dim"
        console.print(Text(record.getMessage(), style=style), soft_wrap=True)


@contextlib.contextmanager
def library_logging(level: int = logging.INFO) -> Iterator[None]:
    """Show the library's log lines (resume notes, skipped images) on the console while the command runs.

    ``level``: the least severe shown (``logging.ERROR`` for the processes of a launch other than the first, which
    would repeat its lines).
    """
    logger = logging.getLogger("pixart_cli")
    handler = ConsoleHandler(level)
    previous, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
        logger.propagate = propagate


def quiet_hub_libraries() -> None:
    """transformers/diffusers print their own progress bars while loading; the command has its own."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for module in (transformers_logging, diffusers_logging):
        module.disable_progress_bar()
        module.set_verbosity_error()


def resolve_device(name: str | None):
    """``--device``: a torch device that exists here (default: CUDA when available)."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PixartError(f"--device {name!r}: not a device (e.g. cpu, cuda, cuda:1)") from None
    if device.type not in ("cpu", "cuda", "mps"):  # meta, xla, ...: tensors there hold no numbers or need a backend
        raise PixartError(f"--device {name}: not a device pixart runs on (cpu, cuda, cuda:1, mps)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PixartError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise PixartError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise PixartError(f"--device {name}: MPS is not available on this machine")
    return device
