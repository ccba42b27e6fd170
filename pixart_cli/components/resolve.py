"""Where components come from: a local directory, a built-in asset (``builtin:NAME``) or the hub cache.

Without network access a hub id that is not in the local cache fails with one line that says how to get the
weights.
"""

from __future__ import annotations

import os
from pathlib import Path

from pixart_cli.errors import PixartError


def offline_hint(name: str, what: str) -> str:
    return (
        f"{name}: cannot load the {what}: not a local directory, and not in the Hugging Face cache (no network?). "
        f"Download it where you have network (`huggingface-cli download {name}`) and pass the directory"
    )


ASSETS = Path(__file__).parents[1] / "shapesworld" / "assets"  # the ShapesWorld demo's components
BUILTIN = "builtin:"  # names an asset shipped inside the package, e.g. "builtin:shapes-t5"


def resolve_builtin(name: str) -> str:
    """``builtin:NAME`` → the path of that shipped asset (works wherever the package is installed)."""
    if name.startswith(BUILTIN):
        path = ASSETS / name[len(BUILTIN) :]
        if not path.exists():
            raise PixartError(f"{name}: no such built-in asset (in {ASSETS})")
        return str(path)
    return name


def locate(name: str, what: str) -> tuple[str, bool]:
    """(path or id, local_files_only) — a path that looks local must exist."""
    name = resolve_builtin(name)
    if os.path.isdir(name):
        return name, True
    if name.startswith((".", "/", "~")) or os.sep in name.rstrip("/").split("/", 1)[-1] or Path(name).suffix:
        raise PixartError(f"{name}: no such {what} directory")
    return name, bool(os.environ.get("HF_HUB_OFFLINE"))
