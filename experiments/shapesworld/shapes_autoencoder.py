"""Pixel space or a tiny VAE for ShapesWorld? Train a small diffusers ``AutoencoderKL`` and measure what it keeps.

A latent-space model can never draw better than its autoencoder reconstructs, so the first measurement is the
ceiling: ShapesWorld scenes of the whole world (held-out combinations included, seeds never trained on) are encoded
(posterior mean), decoded, and read by the exact detector, against the same detector on the original pixels
(~100%, `tests/shapesworld/test_world.py`). Reported per checkpoint: scenes read entirely right, object colour /
shape / size, relations, count, PSNR; plus parameters, encode + decode time per image, and the denoiser's token
count at each patch size (the transformer's cost is set by tokens, not by pixels).

The autoencoder: ``--levels`` encoder levels (2 → 4× downsampling, 3 → 8×), ``--latent-channels`` channels,
L1 reconstruction + ``--kl-weight`` × KL (the SD VAE's recipe without its LPIPS and GAN terms, whose weights cannot
be had offline). Training scenes are drawn from the training split, ``default_rng([seed, i])``. The saved directory
is a normal ``AutoencoderKL`` with ``scaling_factor`` = 1 / (std of the latent means), so it works as ``data.vae``:

    python experiments/shapesworld/shapes_autoencoder.py -o outputs/shapes-vae-f4 --levels 2 --steps 3000 --threads 1
    pixart prepare recipes/shapes/quick.yaml --set data.vae=outputs/shapes-vae-f4 ...   # a latent-space arm

Results go to ``OUT/results.jsonl`` (one line per evaluation) and the console.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pixart_cli.data.transforms import to_tensor
from pixart_cli.sampling.guidance import to_pil
from pixart_cli.shapesworld import world as shapes
from pixart_cli.shapesworld.detect import compare_with_scene, detect

EVAL_SEED = 1_000_003  # scenes for evaluation: a seed stream no training scene uses


def scene_batch(seed: int, start: int, count: int, resolution: int, split: str) -> tuple[list, torch.Tensor]:
    """Scenes ``start … start+count-1`` of stream ``seed`` and their pixels in [-1, 1], (count, 3, H, W)."""
    scenes = [shapes.sample_scene(np.random.default_rng([seed, i]), split=split) for i in range(start, start + count)]
    return scenes, torch.stack([to_tensor(shapes.render(s, resolution)) for s in scenes])


def build_autoencoder(levels: int, latent_channels: int, width: int, resolution: int, seed: int):
    from diffusers import AutoencoderKL

    channels = tuple(width * min(2**i, 2) for i in range(levels + 1))  # e.g. 32, 64, 64
    torch.manual_seed(seed)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=min(32, width),
        sample_size=resolution,
    )


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] → (N, H, W, 3) uint8, rounded as sampled images are."""
    return np.stack([np.asarray(image) for image in to_pil(pixels)])


def detector_scores(scenes: list, images: np.ndarray) -> dict[str, float]:
    """The exact detector on uint8 images (N, H, W, 3) against the scenes they should show."""
    totals = dict(objects=0, colour=0, shape=0, size=0, relations=0, relation=0, count=0, all=0)
    for scene, image in zip(scenes, images, strict=True):
        c = compare_with_scene(detect(image), scene)
        right = c.count_ok and c.objects == c.colour_ok == c.shape_ok == c.size_ok and c.relation_ok == c.relations
        for key, value in (
            ("objects", c.objects),
            ("colour", c.colour_ok),
            ("shape", c.shape_ok),
            ("size", c.size_ok),
            ("relations", c.relations),
            ("relation", c.relation_ok),
            ("count", c.count_ok),
            ("all", right),
        ):
            totals[key] += value
    return {
        "scenes_all_right": totals["all"] / len(scenes),
        "colour": totals["colour"] / totals["objects"],
        "shape": totals["shape"] / totals["objects"],
        "size": totals["size"] / totals["objects"],
        "relation": totals["relation"] / max(totals["relations"], 1),
        "count": totals["count"] / len(scenes),
    }


@torch.no_grad()
def evaluate(vae, scenes: list, pixels: torch.Tensor, batch: int = 100) -> dict[str, float]:
    """The detector on reconstructions (posterior mean → decoder), PSNR and the codec's time per image."""
    vae.eval()
    recon, means = [], []
    start = time.perf_counter()
    for i in range(0, len(pixels), batch):
        mean = vae.encode(pixels[i : i + batch]).latent_dist.mean
        means.append(mean)
        recon.append(vae.decode(mean).sample)
    seconds = time.perf_counter() - start
    vae.train()
    images, original = to_uint8(torch.cat(recon)), to_uint8(pixels)
    mse = ((images.astype(np.float64) - original.astype(np.float64)) ** 2).mean()
    return {
        **detector_scores(scenes, images),
        "psnr": 10 * math.log10(255**2 / max(mse, 1e-12)),
        "latent_std": torch.cat(means).std().item(),
        "ms_per_image_encode_decode": 1000 * seconds / len(scenes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--out", required=True, type=Path, help="directory for the AutoencoderKL and results")
    parser.add_argument("--levels", type=int, default=2, help="downsampling levels: 2 → 4×, 3 → 8×")
    parser.add_argument("--latent-channels", type=int, default=4)
    parser.add_argument("--width", type=int, default=32, help="channels of the first level (later levels: 2×)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-6)
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--eval-scenes", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--init", type=Path, default=None, help="continue from this saved AutoencoderKL (new lr cycle)")
    args = parser.parse_args()
    if args.steps < 1 or args.eval_scenes < 1:
        parser.error("--steps and --eval-scenes must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"

    if args.init is not None:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(str(args.init))
        vae.register_to_config(scaling_factor=1.0)  # measured again at the end
    else:
        vae = build_autoencoder(args.levels, args.latent_channels, args.width, args.resolution, args.seed)
    parameters = sum(p.numel() for p in vae.parameters())
    eval_scenes, eval_pixels = scene_batch(EVAL_SEED, 0, args.eval_scenes, args.resolution, "all")
    downsample = 2**args.levels
    side = args.resolution // downsample
    tokens = {f"patch {p}": (side // p) ** 2 for p in (1, 2) if side % p == 0}
    print(f"AutoencoderKL {downsample}× ({args.latent_channels} × {side} × {side} latents), {parameters:,} parameters")
    print(
        f"denoiser tokens at {args.resolution} px: latent {tokens}; pixel space at patch 4: "
        f"{(args.resolution // 4) ** 2}"
    )
    print("detector on the original pixels:", json.dumps(detector_scores(eval_scenes, to_uint8(eval_pixels))))

    optimiser = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s / args.steps, 1.0)))
    )
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        _, pixels = scene_batch(args.seed, (step - 1) * args.batch, args.batch, args.resolution, "train")
        posterior = vae.encode(pixels).latent_dist
        generator = torch.Generator().manual_seed(args.seed * 1_000_000 + step)
        recon = vae.decode(posterior.sample(generator)).sample
        rec_loss = F.l1_loss(recon, pixels)
        kl = posterior.kl().mean() / pixels[0].numel()
        loss = rec_loss + args.kl_weight * kl
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        if step % 100 == 0:
            print(
                f"step {step}: L1 {rec_loss.item():.4f}  KL/dim {kl.item():.3f}  "
                f"{step * args.batch / (time.perf_counter() - start):.0f} img/s",
                flush=True,
            )
        if step % args.eval_every == 0 or step == args.steps:
            row = {
                "levels": args.levels,
                "downsample": downsample,
                "latent_channels": args.latent_channels,
                "width": args.width,
                "parameters": parameters,
                "step": step,
                "images": step * args.batch,
                "train_minutes": (time.perf_counter() - start) / 60,
                "seed": args.seed,
                "tokens": tokens,
                **evaluate(vae, eval_scenes, eval_pixels),
            }
            print(json.dumps(row), flush=True)
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")

    # The latent scale a diffusion model expects (unit variance), as the SD VAE's 0.18215 does for its latents.
    vae.register_to_config(scaling_factor=1.0 / row["latent_std"])
    vae.save_pretrained(str(args.out), safe_serialization=True)
    print(f"saved {args.out} (scaling_factor {1.0 / row['latent_std']:.4f})")


if __name__ == "__main__":
    main()
