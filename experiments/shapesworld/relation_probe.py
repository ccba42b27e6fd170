"""Does a ShapesWorld model follow relation words, or place colour pairs where training put them?

ShapesBench's spatial prompts use held-out arrangements: "an A object left of a B object" never occurs in training,
but its mirror (B left of A) does. A model that follows the words places A as asked for both prompts; a model that
learned where each colour pair usually sits places A as in training, so it follows the mirrored (seen) prompt and
inverts the held-out one. For each of the 8 held-out arrangements this asks both ways, "a {A} {shape} {relation} a
{B} {shape}", with ``--images`` seeds each (ShapesBench's sampler settings), and the detector reads the relation
of the largest A-coloured object to the largest B-coloured one as ShapesBench does (along the dominant axis;
images missing either colour are skipped).

    python experiments/shapesworld/relation_probe.py builtin:shapes-demo
    python experiments/shapesworld/relation_probe.py outputs/shapes-stage2 --images 16
    python experiments/shapesworld/relation_probe.py --complete-prompts      # worded as `pixart sample` words them
"""

from __future__ import annotations

import argparse

from pixart_cli.sampling.pipeline import Pipeline
from pixart_cli.sampling.settings import SampleSettings
from pixart_cli.shapesworld import world as shapes
from pixart_cli.shapesworld.detect import Detections, detect

# How each relation reads in a prompt.
WORDING = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}


def seen_shape(colour: str, avoid: str = "") -> str:
    """A shape that colour is drawn in during training (not a held-out shape-colour pair)."""
    return next(s for s in shapes.SHAPES if s != avoid and (s, colour) not in shapes.HELDOUT_SHAPE_COLOURS)


def placed_as_asked(detections: Detections, a: str, b: str, relation: str) -> bool | None:
    """Whether the largest ``a`` object stands ``relation`` the largest ``b`` one; None when either is missing."""
    colours = [o.colour for o in detections.objects]  # largest first
    if a not in colours or b not in colours:
        return None
    return detections.relation(colours.index(a), colours.index(b)) == relation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="builtin:shapes-demo")
    parser.add_argument("--images", type=int, default=8, help="seeds per prompt")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=4.5)
    parser.add_argument(
        "--complete-prompts",
        action="store_true",
        help="complete the prompts with sizes and background as `pixart sample` does (default: as written, as the "
        "documented numbers were measured)",
    )
    args = parser.parse_args()
    settings = SampleSettings(steps=args.steps, cfg=args.cfg, seed=0, num_images_per_prompt=args.images)
    pipeline = Pipeline.from_pretrained(args.model, device="cpu", complete_prompts=args.complete_prompts)
    print(f"{'held-out arrangement':<26}{'asked as held out':>20}{'asked mirrored (seen)':>24}")
    totals = {"held out": [0, 0], "mirrored": [0, 0]}
    for a, relation, b in sorted(shapes.HELDOUT_ARRANGEMENTS):
        cells = []
        mirror = shapes.INVERSE_RELATION[relation]
        for kind, asked in (("held out", relation), ("mirrored", mirror)):
            shape_a = seen_shape(a)
            prompt = f"a {a} {shape_a} {WORDING[asked]} a {b} {seen_shape(b, avoid=shape_a)}"
            images = [image for _, image in pipeline.generate(settings.jobs([prompt]), settings)]
            verdicts = [v for v in (placed_as_asked(detect(im), a, b, asked) for im in images) if v is not None]
            totals[kind][0] += sum(verdicts)
            totals[kind][1] += len(verdicts)
            cells.append(f"{sum(verdicts)}/{len(verdicts)}")
        print(f"{f'{a} {relation} {b}':<26}{cells[0]:>20}{cells[1]:>24}")
    (held, held_n), (seen, seen_n) = totals["held out"], totals["mirrored"]
    print(
        f"{'all':<26}{f'{held / max(held_n, 1):.2f} ({held}/{held_n})':>20}"
        f"{f'{seen / max(seen_n, 1):.2f} ({seen}/{seen_n})':>24}"
    )
    print("placed as asked; a model that follows the words scores high in both columns, one that keeps the layout")
    print("training showed for each colour pair scores near 1 on the right and near 0 on the left (chance 0.5)")


if __name__ == "__main__":
    main()
