"""Benchmarks: COCO zero-shot FID (``fid``), T2I-CompBench and the ShapesWorld benchmark (``compbench``).

Both generate their images through ``generate`` (a folder layout, resumable, sharded across processes) and
then score them. Library functions return values and report progress through a callback
``progress(stage, done, total)`` (``Progress`` below); printing belongs to the CLI (``pixart_cli.cli.eval_fid``,
``pixart_cli.cli.eval_compbench``).

Stage names passed to ``progress``: ``"generate"`` (images), ``"features:real"`` / ``"features:fake"`` (FID
feature pass), ``"clip"`` (CLIP score) and ``"score:<category>"`` (CompBench scoring).
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, float, int], None]  # (stage, done, total) — see the module docstring


def no_progress(stage: str, done: float, total: int) -> None:
    """The default ``Progress``: report nothing."""


__all__ = ["Progress", "no_progress"]
