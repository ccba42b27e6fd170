"""Does a stage-1 ShapesWorld DiT draw its classes? Sample every seen class, read the main object with the detector.

Stage 1 is meant to teach pixel dependencies: a class-conditional DiT that draws "<colour> <shape>" scenes. For
each of the 42 seen classes (the 6 held-out shape-colour pairs are never trained) ``--per-class`` images are
sampled with the ShapesBench settings (DPM-Solver++ 20 steps, CFG 4.5, clipped, seeds 0…k-1) and the exact
detector reads the largest object: colour right, shape right, both right (chance 1/8, 1/6, 1/48).

    python experiments/shapesworld/dit_class_probe.py builtin:shapes-dit
    python experiments/shapesworld/dit_class_probe.py outputs/shapes-stage1 --per-class 8 --save grid.png
"""

from __future__ import annotations

import argparse
import json

import torch

from pixart_cli.checkpoints.format import build_model
from pixart_cli.checkpoints.init_from_dit import read_dit
from pixart_cli.sampling.guidance import classifier_free_guidance, seeded_noise, to_pil
from pixart_cli.sampling.solvers import sample
from pixart_cli.shapesworld import world as shapes
from pixart_cli.shapesworld.detect import detect
from pixart_cli.training.batches import grid


def load_dit(reference: str) -> torch.nn.Module:
    """Whatever `pixart init-from-dit` reads: our DiT checkpoint or run (EMA weights), DiT's .pt, a builtin."""
    state_dict, config = read_dit(reference)
    model = build_model(config)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


@torch.no_grad()
def draw(model: torch.nn.Module, labels: list[int], seeds: list[int], *, steps: int, cfg: float) -> torch.Tensor:
    config = model.config
    noise, generators = seeded_noise(seeds, (config.in_channels, config.input_size, config.input_size))
    cond = torch.tensor(labels)
    null = torch.full_like(cond, config.num_classes)
    denoiser = classifier_free_guidance(lambda x, t, y: model(x, t, y).float(), cond, null, cfg, config.in_channels)
    return sample(
        denoiser,
        noise,
        steps=steps,
        generators=generators,
        learned_variance=config.learn_sigma,
        clip_x0=True,
        prediction_type=config.prediction_type,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="our DiT checkpoint (directory or run) or a DiT .pt / builtin:shapes-dit")
    parser.add_argument("--per-class", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=4.5)
    parser.add_argument("--save", help="write a grid (a row per class) to this PNG")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_dit(args.model)
    seen = [(s, c) for s in shapes.SHAPES for c in shapes.COLOUR_NAMES if (s, c) not in shapes.HELDOUT_SHAPE_COLOURS]
    classes = [shapes.class_label(shape, colour) for shape, colour in seen]
    labels = [label for label in classes for _ in range(args.per_class)]
    seeds = [j for _ in classes for j in range(args.per_class)]
    images = to_pil(draw(model, labels, seeds, steps=args.steps, cfg=args.cfg))
    hits = {"colour": 0, "shape": 0, "both": 0, "presence": 0}
    for (shape, colour), image in zip([kind for kind in seen for _ in range(args.per_class)], images, strict=True):
        found = detect(image).objects
        if not found:
            continue
        hits["presence"] += 1
        hits["colour"] += found[0].colour == colour
        hits["shape"] += found[0].shape == shape
        hits["both"] += found[0].colour == colour and found[0].shape == shape
    print(json.dumps({"model": args.model, "images": len(images), **{k: v / len(images) for k, v in hits.items()}}))
    if args.save:
        grid(images, columns=args.per_class).save(args.save)


if __name__ == "__main__":
    main()
