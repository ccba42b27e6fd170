"""Captioning throughput: `pixart caption`'s batched generation vs the obvious one-image-at-a-time loop.

Both run the same LLaVA-style model (random weights, built here: no downloads) on the same images with the same
greedy settings, and must write the same captions. The naive loop is what a first script does: for each image,
the processor, then ``model.generate`` on a batch of one. Ours is ``VisionLanguageModel.caption`` at
``--batch-size`` images per call (left padding, one chat-template prompt). Prints images/s of each, the ratio, and
where our time goes (pre-processing vs generation).

    python benchmarks/caption.py                       # a small model, 64 images, batch 16
    python benchmarks/caption.py --hidden 256 --layers 4 --images 128
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pixart_cli.captioning.settings import PAPER_PROMPT
from pixart_cli.captioning.vlm import VisionLanguageModel
from pixart_cli.precision import describe_device
from pixart_cli.tiny import make_tiny_llava

WORDS = "a red blue green grey black circle square triangle on background left of right above below small large"


def naive(model: VisionLanguageModel, images: list[Image.Image], max_new_tokens: int) -> list[str]:
    processor, vlm = model.processor, model.model
    text = model.conversation(PAPER_PROMPT)
    out = []
    for image in images:
        inputs = processor(images=[image], text=[text], return_tensors="pt")
        with torch.no_grad():
            ids = vlm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        out += processor.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [t.strip() for t in out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128, help="width of the vision tower and the language model")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=14)
    args = parser.parse_args()
    print(describe_device())
    root = Path(tempfile.mkdtemp(prefix="caption-bench-"))
    make_tiny_llava(
        root / "vlm",
        [WORDS] * 20,
        hidden_size=args.hidden,
        num_layers=args.layers,
        image_size=args.image_size,
        patch_size=args.patch_size,
        initializer_range=0.02,
    )
    model = VisionLanguageModel(root / "vlm", dtype=torch.float32)
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((256, 320, 3)) * 255).astype("uint8")) for _ in range(args.images)]
    print(
        f"model: LLaVA-style, width {args.hidden}, {args.layers} layers, {args.image_size}-px images "
        f"({(args.image_size // args.patch_size) ** 2} image tokens); {args.images} images, "
        f"{args.max_new_tokens} new tokens at most, greedy"
    )
    naive(model, images[:2], args.max_new_tokens)  # warm-up

    start = time.perf_counter()
    reference = naive(model, images, args.max_new_tokens)
    t_naive = time.perf_counter() - start

    start, t_pre = time.perf_counter(), 0.0
    ours = []
    for i in range(0, len(images), args.batch_size):
        batch = images[i : i + args.batch_size]
        p0 = time.perf_counter()
        model.processor(images=batch, text=[model.conversation(PAPER_PROMPT)] * len(batch), return_tensors="pt")
        t_pre += time.perf_counter() - p0  # measured separately: the processor's share of one batch
        ours += model.caption(batch, PAPER_PROMPT, args.max_new_tokens)
    t_ours = time.perf_counter() - start - t_pre
    same = sum(a == b for a, b in zip(ours, reference, strict=True))
    print(f"naive loop (1 image per generate): {args.images / t_naive:8.2f} img/s")
    print(f"pixart caption (batch {args.batch_size:>3}):        {args.images / t_ours:8.2f} img/s")
    print(f"ratio ours / naive: {t_naive / t_ours:.2f}x   (same captions: {same}/{len(images)})")
    print(f"where our time goes: pre-processing {t_pre / t_ours:.0%}, generation {1 - t_pre / t_ours:.0%}")


if __name__ == "__main__":
    main()
