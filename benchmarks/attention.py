"""Attention kernels on this machine: SDPA's flash and math kernels vs the explicit form, forward + backward.

Why it exists: on the CPU, ``pixart_cli.models.layers.attention`` writes attention out (two matrix products and
a float32 softmax) for short sequences instead of calling SDPA, whose CPU flash kernel is slow there, most of all
in bf16. This prints the milliseconds of each kernel per shape and dtype, the ratio flash / explicit (> 1: the
explicit form is faster) and each kernel's largest deviation from a float64 reference.

    python benchmarks/attention.py            # CPU shapes, threads as torch sets them
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pixart_cli.models.layers import explicit_attention
from pixart_cli.precision import describe_device

# (batch, heads, query tokens, key tokens, head dim): ShapesWorld's 64 tokens, captions, 16×16 and 32×32 grids.
SHAPES = [(64, 4, 64, 64, 60), (64, 4, 64, 64, 60), (16, 4, 256, 64, 60), (16, 4, 256, 256, 60), (2, 6, 1024, 1024, 64)]


def timed(fn, q, k, v, iters: int = 7) -> tuple[float, torch.Tensor]:
    times = []
    for _ in range(iters):
        for t in (q, k, v):
            t.grad = None
        start = time.perf_counter()
        out = fn(q, k, v)
        out.float().sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), out


def sdpa_with(backend):
    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def main() -> None:
    print(f"{describe_device()}; forward + backward, median ms")
    header = f"{'shape (B, H, N, M, D)':<26} {'dtype':<9} {'flash':>7} {'math':>7} {'explicit':>9} {'ratio':>6}"
    print(header + "  max |err| flash/math/explicit")
    for i, (b, h, n, m, d) in enumerate(SHAPES):
        dtype = torch.float32 if i == 0 else torch.bfloat16
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(b, h, s, d, generator=g).to(dtype).requires_grad_() for s in (n, m, m))
        reference = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
        results = {
            name: timed(fn, q, k, v)
            for name, fn in (
                ("flash", sdpa_with(SDPBackend.FLASH_ATTENTION)),
                ("math", sdpa_with(SDPBackend.MATH)),
                ("explicit", explicit_attention),
            )
        }
        errors = "/".join(f"{(out.double() - reference).abs().max().item():.0e}" for _, out in results.values())
        ms = {name: seconds * 1e3 for name, (seconds, _) in results.items()}
        print(
            f"{(b, h, n, m, d)!s:<26} {str(dtype).removeprefix('torch.'):<9} {ms['flash']:>7.1f} {ms['math']:>7.1f}"
            f" {ms['explicit']:>9.1f} {ms['flash'] / ms['explicit']:>6.2f}  {errors}"
        )


if __name__ == "__main__":
    main()
