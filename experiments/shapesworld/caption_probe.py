"""Does a text-to-image checkpoint use its captions? Prediction error with the right captions against shuffled ones.

The same cached training items, noise and timesteps are denoised twice: once with each item's own caption and once
with the caption of its neighbour in the batch. A model that reads its captions predicts better with the right
ones; the gap (in % of the shuffled error) is a cheap, sampling-free reading of text alignment, useful long before
ShapesBench accuracies leave chance level.

    python experiments/shapesworld/caption_probe.py outputs/shapes-stage2 data/shapes/train-32-cache
    python experiments/shapesworld/caption_probe.py RUN CACHE --items 512 --timesteps 300,600
"""

from __future__ import annotations

import argparse

import torch

from pixart_cli.checkpoints.format import instantiate, latest_in_run, load_checkpoint
from pixart_cli.data.loader import CachedDataset, collate
from pixart_cli.diffusion import GaussianDiffusion


def caption_gap(
    run: str, cache: str, items: int = 256, timesteps: tuple[int, ...] = (300, 600), seed: int = 0
) -> dict[int, tuple[float, float]]:
    """{t: (mse with the right captions, mse with shuffled captions)} over ``items`` cached items."""
    checkpoint = load_checkpoint(latest_in_run(run))
    model = instantiate(checkpoint).float().eval()
    dataset = CachedDataset(cache)
    generator = torch.Generator().manual_seed(seed)
    picked = torch.randperm(len(dataset), generator=generator)[:items].tolist()
    batch = collate([dataset[i] for i in picked])
    x0 = batch["latent_mean"].float()
    channels = x0.shape[1]
    shuffled = torch.roll(torch.arange(len(picked)), 1)  # every item gets another item's caption
    diffusion = GaussianDiffusion.for_model(model.config)
    results = {}
    for step in timesteps:
        t = torch.full((len(picked),), step)
        noise = torch.randn(x0.shape, generator=generator)
        x_t = diffusion.q_sample(x0, t, noise)
        target = diffusion.target(x0, t, noise)  # ε, or v for a v-prediction model
        errors = []
        for order in (torch.arange(len(picked)), shuffled):
            with torch.no_grad():
                out = model(x_t, t, batch["caption"][order].float(), batch["caption_mask"][order])[:, :channels]
            errors.append(((out - target) ** 2).mean().item())
        results[step] = (errors[0], errors[1])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="checkpoint directory or training run (its latest checkpoint)")
    parser.add_argument("cache", help="a prepared feature cache with captions (pixart prepare)")
    parser.add_argument("--items", type=int, default=256)
    parser.add_argument("--timesteps", default="300,600")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    steps = tuple(int(t) for t in args.timesteps.split(","))
    for step, (right, wrong) in caption_gap(args.run, args.cache, args.items, steps, args.seed).items():
        print(f"t={step}: mse right {right:.5f}  shuffled {wrong:.5f}  gap {100 * (wrong - right) / wrong:.1f}%")


if __name__ == "__main__":
    main()
