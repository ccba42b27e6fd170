"""Largest per-GPU batch for PixArt-XL/2 training at 512 px with gradient checkpointing (bf16 autocast, AdamW).

Measures the step's peak memory at two batch sizes, fits memory = resident + batch × per-sample, predicts the
largest batch that fits the card (leaving a margin), then runs that batch to confirm; when it does not fit after
all (the allocator fragments, so the linear fit is optimistic: the first H100 run ran out of memory at its
prediction), it steps down by 4% until a batch runs. Compare with the official recipe's 38 per GPU. GPU only.

    python benchmarks/max_batch.py [--side 64] [--margin-gib 2]
    python benchmarks/max_batch.py --memory-gib 80 --batches 288,312,336   # an 80 GB card on a larger one
"""

from __future__ import annotations

import argparse
import time

import torch

from pixart_cli.models import build_pixart, pixart_config


def peak_for(model, opt, side: int, batch: int) -> tuple[float, float]:
    """(peak bytes, seconds per step) of one training step at this batch."""
    config = model.config
    x = torch.randn(batch, 4, side, side, device="cuda")
    caption = torch.randn(batch, config.max_length, config.caption_channels, device="cuda")
    mask = torch.ones(batch, config.max_length, device="cuda")
    t = torch.randint(0, 1000, (batch,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, t, caption, mask).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return torch.cuda.max_memory_allocated(), min(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--side", type=int, default=64, help="latent side (64 = 512 px)")
    parser.add_argument("--margin-gib", type=float, default=2.0)
    parser.add_argument("--memory-gib", type=float, default=None, help="cap the card's memory (e.g. 80 on an H200)")
    parser.add_argument("--batches", default="", help="comma-separated batches to try instead of the fit")
    args = parser.parse_args()
    if args.memory_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_gib * 2**30 / total))
    torch.backends.cuda.matmul.allow_tf32 = True
    model = build_pixart(pixart_config("PixArt-XL/2", input_size=args.side)).cuda()
    model.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    total = torch.cuda.get_device_properties(0).total_memory
    if args.memory_gib:
        total = min(total, int(args.memory_gib * 2**30))
    for batch in [int(b) for b in args.batches.split(",") if b]:
        try:
            peak, seconds = peak_for(model, opt, args.side, batch)
            rate = batch / seconds
            print(f"batch {batch}: fits, peak {peak / 2**30:.1f} GiB, {seconds * 1e3:.0f} ms/step, {rate:.1f} img/s")
        except torch.cuda.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            print(f"batch {batch}: out of memory within {total / 2**30:.0f} GiB")
    if args.batches:
        return
    (m1, s1), (m2, s2) = peak_for(model, opt, args.side, 16), peak_for(model, opt, args.side, 48)
    per_sample = (m2 - m1) / 32
    resident = m1 - 16 * per_sample
    best = int((total - args.margin_gib * 2**30 - resident) / per_sample)
    print(
        f"{torch.cuda.get_device_name()}: {total / 2**30:.1f} GiB; resident state {resident / 2**30:.2f} GiB, "
        f"{per_sample / 2**20:.1f} MiB per sample at {args.side * 8} px with checkpointing"
    )
    print(f"batch 16: {s1 * 1e3:.0f} ms/step ({16 / s1:.1f} img/s); batch 48: {s2 * 1e3:.0f} ms ({48 / s2:.1f} img/s)")
    while True:
        try:
            peak, seconds = peak_for(model, opt, args.side, best)
            break
        except torch.cuda.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            print(f"batch {best}: out of memory, trying a smaller one")
            best = max(1, int(best * 0.96))
    print(
        f"max batch {best} (margin {args.margin_gib} GiB): peak {peak / 2**30:.1f} GiB, "
        f"{seconds * 1e3:.0f} ms/step, {best / seconds:.1f} img/s  (official recipe: 38)"
    )


if __name__ == "__main__":
    main()
