"""Pieces every command shares: the Typer app, the stderr console, clean failures, dtype choices."""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from typing import TypeVar

import typer
from rich.console import Console

from pixart_cli.errors import PixartError

app = typer.Typer(
    name="pixart",
    help="Train, sample, convert and evaluate PixArt-α text-to-image diffusion transformers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True, highlight=False)

F = TypeVar("F", bound=Callable[..., object])


def fails_cleanly(func: F) -> F:
    """Turn a PixartError into one red line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except PixartError as exc:
            console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


class DType(str, enum.Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"

    @property
    def torch(self):
        import torch

        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.value]
