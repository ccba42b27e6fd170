"""Shared fixtures: tiny random components built once per test run (seconds, no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest

# Enough text for a sentencepiece vocabulary that covers typical test prompts.
TINY_SENTENCES = [
    "a photo of a cat sitting on a red chair",
    "a red cube on top of a blue sphere",
    "an astronaut riding a horse on the moon",
    "the quick brown fox jumps over the lazy dog",
    "a bowl of fruit on a wooden table",
    "two dogs playing in the snow",
    "a green triangle left of a yellow circle",
    "a watercolor painting of a lighthouse at sunset",
    "three small birds on a wire",
    "a city street at night with neon lights",
] * 10


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> Path:
    """A tiny random T5 encoder (d_model 32) with its sentencepiece tokenizer, in one directory."""
    from pixart_cli.tiny import make_tiny_t5

    return make_tiny_t5(tmp_path_factory.mktemp("tiny-t5"), TINY_SENTENCES, seed=0)


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory) -> Path:
    """A tiny random ``AutoencoderKL`` with 8× downsampling and 4 latent channels."""
    from pixart_cli.tiny import make_tiny_vae

    return make_tiny_vae(tmp_path_factory.mktemp("tiny-vae"), seed=0)
