"""The ``pixart`` command line: each command parses, validates, prints with rich and calls one library function.

Commands live one module per command and register themselves on the shared Typer ``app`` when imported here.
"""

from pixart_cli.cli import (
    caption,  # noqa: F401
    convert,  # noqa: F401
    eval_compbench,  # noqa: F401
    eval_fid,  # noqa: F401
    init_from_dit,  # noqa: F401
    prepare,  # noqa: F401
    sample,  # noqa: F401
    selfcheck,  # noqa: F401
    serve,  # noqa: F401
    train,  # noqa: F401
)
from pixart_cli.cli.common import app


def main() -> None:
    app()


__all__ = ["app", "main"]
