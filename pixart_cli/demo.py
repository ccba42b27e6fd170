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
import os
import re
from collections.abc import Callable
from pathlib import Path

from pixart_cli.components import ASSETS, resolve_builtin

SHAPES_T5 = "builtin:shapes-t5"
SHAPES_T5_ROLES = "builtin:shapes-t5-roles"
SHAPES_DEMO = "builtin:shapes-demo"
T5_WIDTH = 64


def build_shapes_t5(directory: str | Path, seed: int = 0, pretrain_steps: int = 0) -> Path:
    """(Re)make a shipped ShapesWorld T5: tokenizer from 4,000 captions of every style and split, a random
    encoder from ``seed`` (``builtin:shapes-t5``), then ``pretrain_steps`` of text-only pre-training
    (``pixart_cli.shapes_t5``; ``PRETRAIN_STEPS`` makes ``builtin:shapes-t5-roles``, about 13 minutes on one
    CPU thread)."""
    from pixart_cli.data.shapes import caption, sample_scene
    from pixart_cli.shapes_t5 import pretrain_shapes_t5
    from pixart_cli.tiny import make_tiny_t5

    sentences = [
        caption(sample_scene(i, split="all"), style, seed=i) for i in range(2000) for style in ("dense", "sparse")
    ]
    directory = make_tiny_t5(directory, sentences, d_model=T5_WIDTH, num_layers=2, num_heads=4, d_ff=128, seed=seed)
    return pretrain_shapes_t5(directory, pretrain_steps, seed=seed) if pretrain_steps else directory


@functools.cache
def vocabulary() -> frozenset[str]:
    """Every word the world's captions use (every style, all combinations)."""
    from pixart_cli.data.shapes import caption, sample_scene

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


def prompt_completion(text_encoder: str) -> Callable[[str, int], str] | None:
    """How to word prompts for a model that reads ``text_encoder``: ``complete_prompt`` for the ShapesWorld T5s
    (their models were trained on captions that always name sizes and background), None for any other."""
    from pixart_cli.data.shapes import complete_prompt

    shapes_t5s = {os.path.realpath(resolve_builtin(name)) for name in (SHAPES_T5, SHAPES_T5_ROLES)}
    return complete_prompt if os.path.realpath(resolve_builtin(text_encoder)) in shapes_t5s else None


def demo_model() -> str | None:
    """The shipped demo model, when this installation has one."""
    return SHAPES_DEMO if (ASSETS / "shapes-demo" / "config.yaml").is_file() else None
