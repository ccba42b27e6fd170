"""Train-step benchmark: our PixArt vs diffusers' PixArtTransformer2DModel, same config and weights.

One step = forward + backward + AdamW on a batch of latents, captions (with padding masks) and timesteps.
Prints a table of median step times, images/s, the step's peak GPU memory (gradients, AdamW moments and
activations above the resident weights) and the ratio reference/ours (>1: we are faster).
On a GPU it also reports model FLOPs utilisation (docs/reference.md §5) against a bf16 matmul peak measured in the
same run. Timings are noisy: compare ratios, never absolute numbers across machines.

    python benchmarks/train_step.py                      # CPU: tiny and small configs
    python benchmarks/train_step.py --preset xl          # GPU: XL/2 at 256 and 512 px, bf16
    python benchmarks/train_step.py --preset xl --compile --checkpointing
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from pixart_cli.checkpoints.convert import diffusers_transformer_config, ours_to_diffusers
from pixart_cli.models import PixArtConfig, build_pixart, pixart_config
from pixart_cli.precision import describe_device
from pixart_cli.training.recipe import load_recipe

# The model of the ShapesWorld CPU recipes, from the recipe itself.
SHAPES_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "shapes" / "stage2.yaml"
SHAPES_MODEL = load_recipe(SHAPES_RECIPE)[0].model_config()
PRESETS = {
    "cpu": [
        (
            "tiny 64 tok",
            PixArtConfig(
                depth=4, hidden_size=192, num_heads=3, patch_size=2, input_size=16, caption_channels=256, max_length=32
            ),
            16,
            32,
        ),
        (
            "small 256 tok",
            PixArtConfig(
                depth=6, hidden_size=384, num_heads=6, patch_size=2, input_size=32, caption_channels=512, max_length=64
            ),
            32,
            8,
        ),
    ],
    # The ShapesWorld CPU recipe's model: 32×32 pixels, patch 4 (64 tokens), 6 blocks of width 240.
    "shapes": [
        (
            "shapes 64 tok",
            SHAPES_MODEL,
            32,
            64,
        ),
    ],
    "xl": [
        ("XL/2 256px", pixart_config("PixArt-XL/2", input_size=32), 32, 64),
        ("XL/2 512px", pixart_config("PixArt-XL/2", input_size=64), 64, 16),
    ],
    "xl-1024": [
        (
            "XL/2 1024 MS",
            pixart_config("PixArt-XL/2", input_size=128, multi_scale=True, interpolation_scale=2.0),
            128,
            12,
        ),
    ],
}


def flops_per_image(config: PixArtConfig, tokens: int, caption: int) -> float:
    """Training FLOPs per image: 3× forward (docs/reference.md §5: per-block multiply-adds × 2 FLOPs)."""
    d, n, t = config.hidden_size, tokens, caption
    per_block = 14 * n * d * d + 2 * t * d * d + 2 * n * n * d + 2 * n * t * d
    return 3 * 2 * per_block * config.depth


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    a = torch.randn(8192, 8192, device=device, dtype=dtype)
    b = torch.randn(8192, 8192, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - start)


def make_batch(config: PixArtConfig, side: int, batch: int, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, side, side, generator=g)
    caption = torch.randn(batch, config.max_length, config.caption_channels, generator=g)
    lengths = torch.randint(5, config.max_length + 1, (batch,), generator=g)
    mask = (torch.arange(config.max_length)[None] < lengths[:, None]).long()
    t = torch.randint(0, 1000, (batch,), generator=g)
    target = torch.randn(batch, config.out_channels, side, side, generator=g)
    resolution = torch.tensor([[side * 8.0, side * 8.0]]).repeat(batch, 1)
    aspect_ratio = torch.ones(batch, 1)
    return [v.to(device) for v in (x, caption, mask, t, target, resolution, aspect_ratio)]


def step_fn(model, kind, batch, autocast_dtype, device):
    x, caption, mask, t, target, resolution, aspect_ratio = batch
    multi_scale = model.config.multi_scale if kind == "ours" else model.config.use_additional_conditions
    if not multi_scale:
        resolution = aspect_ratio = None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")

    def step():
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            if kind == "ours":
                out = model(x, t, caption, mask, resolution=resolution, aspect_ratio=aspect_ratio)
            else:
                out = model(
                    x,
                    encoder_hidden_states=caption,
                    timestep=t,
                    encoder_attention_mask=mask,
                    added_cond_kwargs={"resolution": resolution, "aspect_ratio": aspect_ratio},
                ).sample
            loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure(steps: dict, device, warmup: int, iters: int) -> dict[str, tuple[float, float]]:
    """Median step time and peak memory per implementation, interleaving them so load changes hit all alike."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in steps}
    peaks: dict[str, float] = {}
    for name, step in steps.items():  # warm-up (and compilation) first, with its own peak memory
        baseline = 0
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            baseline = torch.cuda.memory_allocated()
        for _ in range(warmup):
            step()
        sync()
        # Peak above what was resident before (all models' weights, earlier optimisers' moments): this step's
        # gradients, AdamW moments and activations, comparable between implementations of the same size.
        used = torch.cuda.max_memory_allocated() - baseline if device.type == "cuda" else float("nan")
        peaks[name] = used / 2**30
    for _ in range(iters):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), peaks[name]) for name in steps}


# GPU kernels by what they do (names as cuBLAS, cuDNN, FlashAttention and PyTorch's own kernels spell them).
KERNEL_KINDS = (
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "wgmma")),
    ("attention", ("flash", "fmha", "attention", "cudnn")),
    ("optimizer", ("adam", "multi_tensor")),
    ("layer norm", ("layer_norm", "layernorm")),
    ("copy / cast", ("copy", "cat", "transpose", "memcpy", "memset")),
    ("reduction", ("reduce",)),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, words in KERNEL_KINDS if any(w in lowered for w in words)), "elementwise / other")


def profile_shares(step, device: torch.device, steps: int = 3) -> tuple[dict[str, float], float]:
    """Share of the step's time per operator (CPU: self CPU time) or per kernel kind (GPU: self device time),
    and the profiled time per step in ms (GPU: the kernels' busy time, to compare with the wall-clock step)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    shares: dict[str, float] = {}
    for event in prof.key_averages():
        if device.type == "cuda":
            if event.self_device_time_total > 0 and not event.key.startswith("aten::"):
                kind = kernel_kind(event.key)
                shares[kind] = shares.get(kind, 0.0) + event.self_device_time_total
        else:
            shares[event.key] = shares.get(event.key, 0.0) + event.self_cpu_time_total
    total = sum(shares.values())
    return {k: v / total for k, v in shares.items()}, total / steps / 1e3


def print_profiles(steps: dict, device: torch.device, top: int = 12) -> None:
    """Where the time goes, per implementation: the explanation of a ratio."""
    profiles = {name: profile_shares(step, device) for name, step in steps.items()}
    shares = {name: share for name, (share, _) in profiles.items()}
    keys = sorted({k for s in shares.values() for k in s}, key=lambda k: -max(s.get(k, 0) for s in shares.values()))
    unit = "GPU kernel time" if device.type == "cuda" else "self CPU time"
    print(f"{f'share of {unit}':<40}" + "".join(f"{name:>11}" for name in shares))
    for key in keys[:top]:
        print(f"{key[:40]:<40}" + "".join(f"{s.get(key, 0.0):>11.1%}" for s in shares.values()))
    print(f"{f'{unit} per step, ms':<40}" + "".join(f"{ms:>11.1f}" for _, ms in profiles.values()))
    if device.type != "cuda":
        matmul = ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul")
        for name, share in shares.items():
            gemm = sum(v for k, v in share.items() if k in matmul)
            print(f"{name}: matrix multiplications {gemm:.1%} of the step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time ours with torch.compile per block")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on both models")
    parser.add_argument("--batch", type=int, default=None, help="override the preset's batch size")
    parser.add_argument("--profile", action="store_true", help="also print where the time goes (GPU: by kernel kind)")
    parser.add_argument(
        "--autocast", choices=["auto", "none", "bf16"], default="auto", help="auto: bf16 on CUDA, none on CPU"
    )
    args = parser.parse_args()
    from diffusers import PixArtTransformer2DModel  # after pixart_cli: its torchvision fix must come first

    preset = "xl" if args.preset == "cuda" else args.preset
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    default = torch.bfloat16 if device.type == "cuda" else None
    autocast = {"none": None, "bf16": torch.bfloat16}.get(args.autocast, default)
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = matmul_peak(device, torch.bfloat16) if device.type == "cuda" else None
    print(f"device: {describe_device(str(device))}  autocast {autocast}  checkpointing {args.checkpointing}")
    if peak:
        print(f"measured bf16 matmul peak: {peak / 1e12:.0f} TFLOP/s")
    header = f"{'config':<14} {'batch':>5} {'impl':<10} {'step ms':>9} {'img/s':>8} {'step GiB':>9} {'ratio':>6}"
    print(header + ("  MFU" if peak else ""))
    for name, config, side, batch in PRESETS[preset]:
        batch = args.batch or batch
        torch.manual_seed(0)
        ours = build_pixart(config).to(device)
        with torch.no_grad():
            for p in ours.parameters():
                p.normal_(0, 0.02)
        theirs = PixArtTransformer2DModel(**diffusers_transformer_config(config))
        theirs.load_state_dict(ours_to_diffusers(ours.state_dict(), config), strict=True)
        theirs = theirs.to(device)
        if args.checkpointing:
            ours.enable_gradient_checkpointing()
            theirs.enable_gradient_checkpointing()
        data = make_batch(config, side, batch, device, autocast)
        runs = [("diffusers", theirs, "diffusers"), ("ours", ours, "ours")]
        if args.compile:
            compiled = build_pixart(config).to(device)
            compiled.load_state_dict(ours.state_dict())
            compiled.enable_gradient_checkpointing(args.checkpointing)
            for block in compiled.blocks:
                block.compile()
            runs.append(("ours+comp", compiled, "ours"))
        steps = {label: step_fn(model, kind, data, autocast, device) for label, model, kind in runs}
        results = measure(steps, device, args.warmup, args.iters)
        tokens = (side // config.patch_size) ** 2
        reference = results["diffusers"][0]
        for label, (seconds, mem) in results.items():
            line = (
                f"{name:<14} {batch:>5} {label:<10} {seconds * 1e3:>9.1f} {batch / seconds:>8.1f} {mem:>9.2f}"
                f" {reference / seconds:>6.2f}"
            )
            if peak:
                line += f"  {flops_per_image(config, tokens, config.max_length) * batch / seconds / peak:5.1%}"
            print(line, flush=True)
        if args.profile:
            print_profiles(steps, device)
        del ours, theirs, steps
        runs.clear()


if __name__ == "__main__":
    main()
