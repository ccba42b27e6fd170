"""The ``pixart`` command line: each command parses, validates, prints with rich and calls one library function.

Commands live one module per command and register themselves on the shared Typer ``app`` when imported here.
"""

from pixart_cli.cli import (
    convert,  # noqa: F401
    evaluate,  # noqa: F401  (registers eval-fid, eval-compbench)
    init_from_dit,  # noqa: F401
    prepare,  # noqa: F401
    sample,  # noqa: F401
    selfcheck,  # noqa: F401
    train,  # noqa: F401
)
from pixart_cli.cli.common import app


def main() -> None:
    app()


__all__ = ["app", "main"]
