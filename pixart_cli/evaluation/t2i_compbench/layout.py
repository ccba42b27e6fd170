"""T2I-CompBench's categories, prompt files and image layout.

Layout (T2I-CompBench's own): ``<out>/<category>/samples/<prompt>_<index:06d>.png`` where ``index`` runs over the
whole category, prompt ``i`` owning indices ``i·n … i·n + n − 1`` (``n`` images per prompt), and image ``j`` of every
prompt uses seed ``seed + j`` (as the benchmark's reference script does with seed 42). Prompts come from
``<category>_val.txt`` files (a T2I-CompBench checkout's ``examples/dataset/``), one per line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from pixart_cli.errors import PixartError
from pixart_cli.evaluation.generate import GenItem

CATEGORIES: tuple[str, ...] = ("color", "shape", "texture", "spatial", "non_spatial", "complex")
SHAPES_CATEGORIES: tuple[str, ...] = ("color", "shape", "spatial", "complex")
EVALUATORS: dict[str, str] = {
    "color": "blip-vqa",
    "shape": "blip-vqa",
    "texture": "blip-vqa",
    "spatial": "detector",
    "non_spatial": "clip",
    "complex": "3-in-1",
}
SCORERS: tuple[str, ...] = ("auto", "clip", "vqascore")
FLAGS = {"blip": "--blip", "clip": "--clip", "detector": "--detector", "vqascore": "--vqascore-python"}
REPORT_FILE = "compbench_report.json"
SCORES_FILE = "scores.json"


def read_prompts(directory: str | os.PathLike, category: str) -> list[str]:
    """The prompts of ``<directory>/<category>_val.txt``: one per line (tab-separated extras dropped)."""
    path = Path(directory) / f"{category}_val.txt"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PixartError(f"{path}: not found; --prompts must be T2I-CompBench's examples/dataset directory") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PixartError(f"{path}: cannot read the prompts ({type(exc).__name__})") from None
    prompts = [line.split("\t")[0].strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise PixartError(f"{path}: holds no prompts")
    return prompts


def sample_name(prompt: str, index: int) -> str:
    """T2I-CompBench's file name for image ``index`` of a category."""
    if "/" in prompt or "\0" in prompt:
        raise PixartError(f"prompt {prompt!r} cannot be a file name")
    return f"{prompt}_{index:06d}.png"


def layout(category: str, prompts: Sequence[str], images_per_prompt: int, seed: int) -> list[GenItem]:
    """The images of a category: prompt i, image j → index i·n + j, seed + j."""
    if images_per_prompt <= 0:
        raise PixartError(f"--images-per-prompt must be positive, got {images_per_prompt}")
    n = images_per_prompt
    return [
        GenItem(f"{category}/samples/{sample_name(p, i * n + j)}", p, seed + j)
        for i, p in enumerate(prompts)
        for j in range(n)
    ]


_NAME = re.compile(r"^(?P<prompt>.+)_(?P<index>\d{6,})\.png$")


def discover_samples(category_dir: str | os.PathLike) -> list[tuple[Path, str]]:
    """(file, prompt) of the images in ``<category_dir>/samples`` named as T2I-CompBench names them, by index."""
    samples = Path(category_dir) / "samples"
    if not samples.is_dir():
        raise PixartError(f"{samples}: no such directory (generate with --model first)")
    found = []
    for path in samples.iterdir():
        match = _NAME.match(path.name)
        if match:
            found.append((int(match["index"]), path, match["prompt"]))
    if not found:
        raise PixartError(f"{samples}: holds no images named <prompt>_<6-digit index>.png")
    return [(path, prompt) for _, path, prompt in sorted(found)]
