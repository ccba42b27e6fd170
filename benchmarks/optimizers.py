"""Optimiser state per parameter and step time of `optim.name`'s choices on a real PixArt, against torch's AdamW.

Builds the model (PixArt-XL/2 by default: 610.9 M parameters), gives it one random gradient, and for each optimiser
takes a few steps, then counts the bytes its state holds (what `--dry-run` charges per trained parameter) and times
a step. Ratios are against AdamW measured in the same run. CPU or GPU (whichever torch sees).

    python benchmarks/optimizers.py [--variant PixArt-XL/2] [--steps 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from pixart_cli.models import build_pixart, pixart_config
from pixart_cli.precision import describe_cpu
from pixart_cli.training.optimizers import build_optimizer, state_bytes
from pixart_cli.training.recipe import OptimSection

CHOICES = {
    "adamw": OptimSection(name="adamw"),
    "adamw8bit": OptimSection(name="adamw8bit", eps=1e-8),
    "came": OptimSection(name="came", betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16), weight_decay=0.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="PixArt-XL/2")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({describe_cpu()})"
    torch.manual_seed(0)
    model = build_pixart(pixart_config(args.variant)).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    print(f"{args.variant}: {n:,} parameters, {where}, torch {torch.__version__}")
    print(f"{'optimiser':<10} {'state B/param':>13} {'state GiB':>10} {'s/step':>8} {'× adamw':>8}")
    reference = None
    for name, settings in CHOICES.items():
        optimizer = build_optimizer(settings, params, lr=1e-5, device=device)
        times = []
        for _ in range(args.steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        seconds = min(times[1:] or times)  # the first step allocates the state
        reference = reference or seconds
        size = state_bytes(optimizer)
        print(f"{name:<10} {size / n:>13.3f} {size / 1024**3:>10.2f} {seconds:>8.3f} {seconds / reference:>8.2f}")
        del optimizer


if __name__ == "__main__":
    main()
