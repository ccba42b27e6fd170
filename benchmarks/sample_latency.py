"""Sampling latency: `pixart_cli.sampling.Pipeline` vs diffusers' `PixArtAlphaPipeline`, same weights and settings.

Both get the same transformer weights (ours converted with `pixart convert`'s diffusers writer), the same random
T5 and AutoencoderKL (built here: no downloads), DPM-Solver++ with 20 steps, CFG 4.5, T5("") as the negative
caption, the same prompts and batch. Prints the median wall time of the whole call (text encoding, denoising,
decoding) for each and the ratio ours / reference (< 1: we are faster; the issue's goal is ≤ 0.8).

    python benchmarks/sample_latency.py                   # CPU: a small model at 256 px (latent 32, 256 tokens)
    python benchmarks/sample_latency.py --preset shapes   # the ShapesWorld size: 32-px pixel space, 64 tokens
    python benchmarks/sample_latency.py --preset xl-512 --device cuda --dtype bf16     # XL/2 (GPU goal: ≤ 0.8)
    python benchmarks/sample_latency.py --preset xl-1024ms --device cuda --dtype bf16

The XL presets time the real transformer with a one-block T5 of T5-XXL's width and the tiny VAE: the
transformer's share, which is what differs between the two pipelines.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pixart_cli.checkpoints.convert import read_any, write_diffusers
from pixart_cli.models import PixArtConfig, pixart_config
from pixart_cli.precision import describe_device
from pixart_cli.sampling.guidance import seeded_noise
from pixart_cli.sampling.pipeline import Pipeline
from pixart_cli.sampling.solvers import make_scheduler
from pixart_cli.tiny import make_tiny_pixart, make_tiny_t5, make_tiny_vae
from pixart_cli.training.recipe import load_recipe

# The model of the ShapesWorld CPU recipes, from the recipe itself.
SHAPES_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "shapes" / "stage2.yaml"
SHAPES_MODEL = load_recipe(SHAPES_RECIPE)[0].model_config()
PROMPTS = ["a red circle to the left of a blue square", "a photo of a cat on a sofa"]
PRESETS = {
    # name: (config, image side in pixels, uses a VAE)
    "small": (
        PixArtConfig(depth=6, hidden_size=384, num_heads=6, patch_size=2, input_size=32, caption_channels=64),
        256,
        True,
    ),
    "shapes": (
        SHAPES_MODEL,
        32,
        False,
    ),
    "xl-512": (pixart_config("PixArt-XL/2", input_size=64), 512, True),
    "xl-1024ms": (pixart_config("PixArt-XL/2", input_size=128, multi_scale=True), 1024, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="small")
    parser.add_argument("--images", type=int, default=2, help="images per prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device = torch.device(args.device)
    from diffusers import PixArtAlphaPipeline  # after pixart_cli: its torchvision fix must come first

    config, side, with_vae = PRESETS[args.preset]
    root = Path(tempfile.mkdtemp(prefix="sample-latency-"))
    xl = args.preset.startswith("xl")
    t5 = make_tiny_t5(
        root / "t5", PROMPTS * 50, d_model=config.caption_channels, num_layers=1 if xl else 2, num_heads=64 if xl else 4
    )
    vae = make_tiny_vae(root / "vae") if with_vae else None
    ours_dir = make_tiny_pixart(
        root / "ours", config, text_encoder=str(t5), vae=str(vae) if vae else "none", null_caption="t5-empty"
    )
    ours = Pipeline.from_pretrained(ours_dir, device=device, dtype=dtype, clean_captions=False)
    batch = len(PROMPTS) * args.images  # one forward for all images, as diffusers does

    def run_ours():
        return ours(PROMPTS, num_images_per_prompt=args.images, steps=args.steps, cfg=4.5, seed=0, batch_size=batch)

    runs = {"ours": run_ours}
    if with_vae:
        reference = PixArtAlphaPipeline.from_pretrained(
            str(write_diffusers(read_any(ours_dir), root / "diffusers", t5=str(t5), vae=str(vae))), torch_dtype=dtype
        ).to(device)
        reference.scheduler = make_scheduler("dpm-solver")
        reference.set_progress_bar_config(disable=True)
        latent = side // 8
        seeds = [j for _ in PROMPTS for j in range(args.images)]  # image j of each prompt: seed j, as ours draws
        noise, _ = seeded_noise(seeds, (config.in_channels, latent, latent))
        noise = noise.to(device, dtype)
        runs["diffusers"] = lambda: reference(
            PROMPTS, num_images_per_prompt=args.images, num_inference_steps=args.steps, guidance_scale=4.5,
            latents=noise,
            clean_caption=False, use_resolution_binning=False, max_sequence_length=config.max_length,
            output_type="pil",
        )  # fmt: skip
    else:
        print("(pixel space: PixArtAlphaPipeline needs a VAE, so only our time is printed)")
    times: dict[str, list[float]] = {name: [] for name in runs}
    peaks: dict[str, float] = {}
    with torch.inference_mode():
        for run in runs.values():
            run()  # warm-up
        for _ in range(args.repeats):
            for name, run in runs.items():  # interleaved, so load changes hit both
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                run()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    peaks[name] = torch.cuda.max_memory_allocated() / 1024**3
                times[name].append(time.perf_counter() - start)
    images = len(PROMPTS) * args.images
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else describe_device()
    print(f"{args.preset}: {side} px, {images} images, DPM-Solver++ {args.steps} steps, CFG 4.5, {args.dtype}; {where}")
    base = statistics.median(times["diffusers"]) if "diffusers" in times else None
    for name, values in times.items():
        seconds = statistics.median(values)
        ratio = f"  ours/diffusers {seconds / base:.2f}" if base and name == "ours" else ""
        peak = f"  peak {peaks[name]:.2f} GiB" if name in peaks else ""
        print(f"{name:<10} {seconds:7.2f} s  ({images / seconds:.2f} img/s){ratio}{peak}")


if __name__ == "__main__":
    main()
