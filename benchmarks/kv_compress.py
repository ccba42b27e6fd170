"""PixArt-Σ's KV compression: a training step and a sampling forward with and without it, timed in one run.

Why it exists: compression cuts the keys and values of the chosen layers' self-attention by factor² (4× at 2),
which pays where attention dominates: many tokens (2K/4K images). This prints the median milliseconds of the same
model with and without compression, and their ratio (< 1: compression is faster), for the ShapesWorld 128-px model
(``recipes/shapes/sigma-kvcompress.yaml``, 1,024 tokens a square image) and an XL/2 model at 2K (16,384 tokens,
forward only: one sampling step; --xl, minutes on a CPU).

    python benchmarks/kv_compress.py                  # fp32, threads as torch sets them
    python benchmarks/kv_compress.py --device cuda --dtype bf16 --xl
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from pixart_cli.models import KVCompress, PixArtConfig, build_pixart, pixart_config
from pixart_cli.precision import describe_device

SHAPES_128 = PixArtConfig(
    depth=6, hidden_size=240, num_heads=4, patch_size=4, input_size=128, in_channels=3, caption_channels=64,
    max_length=64, interpolation_scale=4.0, multi_scale=True,
)  # fmt: skip
XL_2K = pixart_config("PixArt-XL/2", input_size=256, interpolation_scale=4.0, max_length=300)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_ms(
    config: PixArtConfig, batch: int, train: bool, device: torch.device, dtype: torch.dtype, iters: int
) -> float:
    torch.manual_seed(0)
    model = build_pixart(config).to(device, dtype)
    side = config.input_size
    x = torch.randn(batch, config.in_channels, side, side, device=device, dtype=dtype)
    t = torch.randint(0, 1000, (batch,), device=device)
    caption = torch.randn(batch, config.max_length, config.caption_channels, device=device, dtype=dtype)
    mask = torch.ones(batch, config.max_length, device=device)
    extra = {}
    if config.multi_scale:
        extra = {"resolution": torch.tensor([[side * 1.0, side * 1.0]] * batch), "aspect_ratio": torch.ones(batch, 1)}
    times = []
    for _ in range(iters + 1):
        _sync(device)
        start = time.perf_counter()
        if train:
            model(x, t, caption, mask, **extra).float().square().mean().backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                model(x, t, caption, mask, **extra)
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--xl", action="store_true", help="also an XL/2 forward at 2K (a GPU's case)")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    print(f"{describe_device(args.device)}; {args.dtype}; median ms of {args.iters}")
    cases = [("ShapesWorld 128 px, layers 3-5 of 6, train step, batch 8", SHAPES_128, (3, 4, 5), 8, True),
             ("ShapesWorld 128 px, layers 3-5 of 6, forward, batch 8", SHAPES_128, (3, 4, 5), 8, False)]  # fmt: skip
    if args.xl:
        cases.append(("XL/2 2K (16,384 tokens), layers 14-27, forward, batch 1", XL_2K, tuple(range(14, 28)), 1, False))
    print(f"{'case':<58} {'none':>9} {'conv x2':>9} {'ratio':>6}")
    for label, config, layers, batch, train in cases:
        plain = step_ms(config, batch, train, device, dtype, args.iters)
        compressed = dataclasses.replace(config, kv_compress=KVCompress(layers, "conv", 2))
        kv = step_ms(compressed, batch, train, device, dtype, args.iters)
        print(f"{label:<58} {plain:9.1f} {kv:9.1f} {kv / plain:6.2f}")


if __name__ == "__main__":
    main()
