"""Sampling latency: `pixart_cli.sampling.Pipeline` vs diffusers' `PixArtAlphaPipeline`, same weights and settings.

Both get the same transformer weights (ours converted with `pixart convert`'s diffusers writer), the same random
T5 and AutoencoderKL (built here: no downloads), DPM-Solver++ with 20 steps, CFG 4.5, T5("") as the negative
caption, the same prompts and batch. Prints the median wall time of the whole call (text encoding, denoising,
decoding) for each and the ratio ours / reference (< 1: we are faster; the issue's goal is ≤ 0.8).

    python benchmarks/sample_latency.py                   # CPU: a small model at 256 px (latent 32, 256 tokens)
    python benchmarks/sample_latency.py --preset shapes   # the ShapesWorld size: 32-px pixel space, 64 tokens
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pixart_cli.checkpoints.convert import read_any, write_diffusers
from pixart_cli.models import PixArtConfig
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
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="small")
    parser.add_argument("--images", type=int, default=2, help="images per prompt")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from diffusers import PixArtAlphaPipeline  # after pixart_cli: its torchvision fix must come first

    config, side, with_vae = PRESETS[args.preset]
    root = Path(tempfile.mkdtemp(prefix="sample-latency-"))
    t5 = make_tiny_t5(root / "t5", PROMPTS * 50, d_model=config.caption_channels)
    vae = make_tiny_vae(root / "vae") if with_vae else None
    ours_dir = make_tiny_pixart(
        root / "ours", config, text_encoder=str(t5), vae=str(vae) if vae else "none", null_caption="t5-empty"
    )
    ours = Pipeline.from_pretrained(ours_dir, device="cpu", clean_captions=False)
    batch = len(PROMPTS) * args.images  # one forward for all images, as diffusers does

    def run_ours():
        return ours(PROMPTS, num_images_per_prompt=args.images, steps=20, cfg=4.5, seed=0, batch_size=batch)

    runs = {"ours": run_ours}
    if with_vae:
        reference = PixArtAlphaPipeline.from_pretrained(
            str(write_diffusers(read_any(ours_dir), root / "diffusers", t5=str(t5), vae=str(vae)))
        )
        reference.scheduler = make_scheduler("dpm-solver")
        reference.set_progress_bar_config(disable=True)
        latent = side // 8
        noise, _ = seeded_noise([0, 1] * len(PROMPTS), (config.in_channels, latent, latent))
        runs["diffusers"] = lambda: reference(
            PROMPTS, num_images_per_prompt=args.images, num_inference_steps=20, guidance_scale=4.5, latents=noise,
            clean_caption=False, use_resolution_binning=False, max_sequence_length=config.max_length,
            output_type="pil",
        )  # fmt: skip
    else:
        print("(pixel space: PixArtAlphaPipeline needs a VAE, so only our time is printed)")
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for run in runs.values():
            run()  # warm-up
        for _ in range(args.repeats):
            for name, run in runs.items():  # interleaved, so load changes hit both
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    images = len(PROMPTS) * args.images
    print(f"{args.preset}: {side} px, {images} images, DPM-Solver++ 20 steps, CFG 4.5; {describe_device()}")
    base = statistics.median(times["diffusers"]) if "diffusers" in times else None
    for name, values in times.items():
        seconds = statistics.median(values)
        ratio = f"  ours/diffusers {seconds / base:.2f}" if base and name == "ours" else ""
        print(f"{name:<10} {seconds:7.2f} s  ({images / seconds:.2f} img/s){ratio}")


if __name__ == "__main__":
    main()
