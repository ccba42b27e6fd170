"""The miniature ShapesWorld assets that ship with the package (see docs/shapes.md).

* ``builtin:shapes-t5``: a T5 v1.1-shaped encoder (2 layers, width 64) with random weights from a fixed seed and
  a sentencepiece tokenizer trained on the world's captions. It is frozen, like T5-XXL for real PixArt: the
  transformer learns to read its features. ``build_shapes_t5`` remakes it exactly.
* ``builtin:shapes-t5-roles``: the same tokenizer with an encoder pre-trained on text alone so that its features
  say which object of a caption is where (``pixart_cli.shapes_t5``); ``build_shapes_t5(dir, pretrain_steps=
  PRETRAIN_STEPS)`` remakes it (bit for bit on one CPU thread).
* ``builtin:shapes-demo``: the demo PixArt model, the default of ``pixart sample`` (when present).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from pixart_cli.components.resolve import ASSETS
from pixart_cli.shapesworld.prompts import caption, complete_prompt
from pixart_cli.shapesworld.text_encoder import pretrain_shapes_t5
from pixart_cli.shapesworld.world import SHAPES, sample_scene
from pixart_cli.tiny import make_tiny_t5

SHAPES_T5 = "builtin:shapes-t5"
SHAPES_T5_ROLES = "builtin:shapes-t5-roles"
SHAPES_DEMO = "builtin:shapes-demo"
T5_WIDTH = 64


def build_shapes_t5(directory: str | Path, seed: int = 0, pretrain_steps: int = 0) -> Path:
    """(Re)make a shipped ShapesWorld T5: tokenizer from 4,000 captions of every style and split, a random
    encoder from ``seed`` (``builtin:shapes-t5``), then ``pretrain_steps`` of text-only pre-training
    (``pixart_cli.shapes_t5``; ``PRETRAIN_STEPS`` makes ``builtin:shapes-t5-roles``, about 13 minutes on one
    CPU thread)."""
    sentences = [
        caption(sample_scene(i, split="all"), style, seed=i) for i in range(2000) for style in ("dense", "sparse")
    ]
    directory = make_tiny_t5(directory, sentences, d_model=T5_WIDTH, num_layers=2, num_heads=4, d_ff=128, seed=seed)
    return pretrain_shapes_t5(directory, pretrain_steps, seed=seed) if pretrain_steps else directory


@functools.cache
def vocabulary() -> frozenset[str]:
    """Every word the world's captions use (every style, all combinations)."""
    words: set[str] = set()
    for i in range(3000):
        for style in ("dense", "sparse", "varied"):
            words.update(_words(caption(sample_scene(i, split="all"), style, seed=i)))
    return frozenset(words)


def unknown_words(prompt: str) -> list[str]:
    """Words of ``prompt`` the demo model never saw in a caption (it knows shapes, colours and positions)."""
    known = vocabulary()
    return [w for w in dict.fromkeys(_words(prompt)) if w not in known]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


# The demo's captions name one to three objects, each in the singular with an article and no (colour, shape) twice
# in a scene: it never saw a plural shape or a count of objects, and draws such prompts as merged blobs.
COUNTS_MESSAGE = (
    "the demo model draws single objects named in the singular ('a red square'), one to three per image and no "
    "two alike; plurals and counts ('two red squares') are outside what it learned (asked for here: {words}). Name "
    "each object instead: 'a red square to the left of a blue square'."
)
_COUNT_WORDS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "dozen", "several", "many")


@functools.cache
def _count_patterns() -> tuple[re.Pattern, re.Pattern]:
    plurals = [s + ("es" if s.endswith(("s", "x", "ch", "sh")) else "s") for s in SHAPES]  # "crosses"
    nouns = "|".join(sorted((*SHAPES, *plurals), key=len, reverse=True))
    # A count before a shape noun, up to two words (size, colour) apart: "two red squares", "3 big circles". The
    # sparse captions' "two shapes" is not one: the demo saw it.
    counted = re.compile(rf"\b({'|'.join(_COUNT_WORDS)}|\d+)\s+(?:[a-z]+\s+){{0,2}}(?:{nouns})\b", re.IGNORECASE)
    return counted, re.compile(rf"\b(?:{'|'.join(plurals)})\b", re.IGNORECASE)


def counted_words(prompt: str) -> list[str]:
    """Words of ``prompt`` that ask the demo for several objects of a kind: counts and plural shape names."""
    counted, plural = _count_patterns()
    found = [(m.start(1), m[1]) for m in counted.finditer(prompt)]
    found += [(m.start(), m[0]) for m in plural.finditer(prompt)]
    return list(dict.fromkeys(w.lower() for _, w in sorted(found)))


def demo_warnings(prompts: Sequence[str]) -> list[str]:
    """What the demo model cannot draw in ``prompts``: counts and plurals, then words it never saw."""
    warnings = []
    counted = list(dict.fromkeys(w for p in prompts for w in counted_words(p)))
    if counted:
        warnings.append(COUNTS_MESSAGE.format(words=", ".join(counted[:8])))
    unknown = sorted({w for p in prompts for w in unknown_words(p)}.difference(counted))
    if unknown:
        warnings.append(
            f"unknown to the demo model: {', '.join(unknown[:8])}. This demo model knows shapes and colours; pass "
            "--model for a real PixArt checkpoint."
        )
    return warnings


def prompt_completion(name: str | None) -> Callable[[str, int], str] | None:
    """The prompt completion a checkpoint's ``meta.prompt_completion`` names: ``complete_prompt`` for
    "shapesworld" (models trained on captions that always name sizes and background), else None."""
    return complete_prompt if name == "shapesworld" else None  # CheckpointMeta admits no other name


def demo_model() -> str | None:
    """The shipped demo model, when this installation has one."""
    return SHAPES_DEMO if (ASSETS / "shapes-demo" / "config.yaml").is_file() else None
