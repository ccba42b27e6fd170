"""The paper's claims in miniature, on ShapesWorld: train each arm for the same number of steps, score ShapesBench.

Arms (all recipes/shapes/stage2.yaml with overrides, so each differs from its baseline in one thing). The recipe
itself predicts v, draws logit-normal timesteps and decays the lr by a cosine; the ε arms put back the paper's
choices (``PAPER``: ε prediction, uniform timesteps, constant lr) and then change one thing each.
``--stage1`` names the stage-1 DiT of the ``dit-*`` arms (default: the shipped builtin:shapes-dit, a v model).

* ``dit-dense``     ε, stage 2 from the stage-1 DiT (init-from-dit re-parameterisation), dense captions. The
  2026-11-27 rows used the ε DiT shipped then; from a v DiT the run switches the prediction type (logged).
* ``scratch-dense`` the same from a fresh initialisation (claim a: starting from stage 1 pays).
* ``scratch-dense-official`` from scratch with the official caption-projection init instead of the recipe's xavier.
* ``dit-sparse``    from the DiT, sparse alt-text-like captions of the same scenes (claim b: dense captions pay).
* ``scratch-sparse`` sparse captions from a fresh initialisation (claim b without the stage-1 DiT).
* ``scratch-dense-cosine`` from scratch with the lr annealed by a cosine to 0 at the last step (beyond the paper).
* ``scratch-dense-logitnormal-cosine`` the same with logit-normal(0, 1) training timesteps instead of uniform.
* ``scratch-dense-v-cosine``, ``scratch-dense-v-logitnormal-cosine``: the same predicting v instead of ε (the
  latter is the recipe from scratch: the shipped demo's settings).
* ``dit-v-dense``   the recipe as it is: claim (a) with the v-prediction recipe, from ``--stage1``.
* ``scratch-adaln-block`` the recipe from scratch with DiT's per-block adaLN instead of adaLN-single (claim c;
  compare with ``scratch-dense-v-logitnormal-cosine``).

Every ``--eval-every`` steps the checkpoint is scored on the first ``--limit`` held-out prompts (one image each,
20 DPM-Solver steps, CFG 4.5), which gives accuracy against training time. Results are appended to
``OUT/results.jsonl`` (one line per arm, seed and checkpoint) and summarised as Markdown tables in
``OUT/results.md``; reruns skip what is done and resume interrupted training (``--resume auto``).

It also prints the parameter count of adaLN-single against per-block adaLN (``model.config.adaln``) at the
shapes size and at XL/2 (claim c). Run from the repository root; the first command trains every arm (about 30
minutes of training an arm on one core):

    python experiments/shapesworld/shapes_experiments.py --steps 2000 --eval-every 500 --limit 200 --threads 1
    python experiments/shapesworld/shapes_experiments.py --arms dit-dense --steps 3000     # one longer arm
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pixart_cli.training.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]  # the repository root
RECIPE = ROOT / "recipes" / "shapes" / "stage2.yaml"

SPARSE = [
    "data.shapes.caption_style=sparse",
    "data.path=data/shapes/train-32-sparse/manifest.jsonl",
    "data.cache=data/shapes/train-32-sparse-cache",
]
# Every table in experiments/shapesworld/LOG.md was measured with the random T5; the recipe now reads the pre-trained
# one (builtin:shapes-t5-roles), so the arms pin the encoder they were measured with (and its cache).
RANDOM_T5 = ["data.text_encoder=builtin:shapes-t5", "data.cache=data/shapes/train-32-cache"]
PAPER = ["model.config.prediction_type=epsilon", "train.timesteps=uniform", "optim.decay=none"]
SCRATCH = ["model.init=null"]
ARMS: dict[str, list[str]] = {  # "model.init" of the dit-* arms: --stage1
    "dit-dense": PAPER,
    "scratch-dense": [*SCRATCH, *PAPER],
    "scratch-dense-official": [*SCRATCH, *PAPER, "model.caption_init=official"],
    "dit-sparse": [*PAPER, *SPARSE],
    "scratch-sparse": [*SCRATCH, *PAPER, *SPARSE],
    "scratch-dense-cosine": [*SCRATCH, *PAPER, "optim.decay=cosine"],
    "scratch-dense-logitnormal-cosine": [*SCRATCH, *PAPER, "optim.decay=cosine", "train.timesteps=logit-normal"],
    "scratch-dense-v-cosine": [*SCRATCH, "train.timesteps=uniform"],
    "scratch-dense-v-logitnormal-cosine": SCRATCH,
    "dit-v-dense": [],
    "scratch-adaln-block": [*SCRATCH, "model.config.adaln=block"],
}
REPORTED = ("color", "shape", "spatial", "complex")


def pixart(*args: str, threads: int | None = None) -> None:
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    subprocess.run([sys.executable, "-m", "pixart_cli", *args], check=True, cwd=ROOT, env=env)


def sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def training_seconds(metrics: Path, upto: int) -> float:
    """Seconds spent training up to step ``upto``, summed from the logged windows' throughput."""
    seconds, previous = 0.0, 0
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if "images_per_s" not in row or row["step"] > upto:
            continue
        seconds += (row["images"] - previous) / row["images_per_s"]
        previous = row["images"]
    return seconds


def scores(report: Path) -> dict[str, float]:
    categories = json.loads(report.read_text())["categories"]
    out = {name: categories[name]["mean"] for name in REPORTED}
    out["color_one_object"] = categories["color"].get("one_object", float("nan"))
    out["shape_one_object"] = categories["shape"].get("one_object", float("nan"))
    out["both_objects"] = categories["spatial"].get("both_objects", float("nan"))
    return out


def run_arm(arm: str, seed: int, args: argparse.Namespace, done: set[tuple], results: Path) -> None:
    out = args.out / f"{arm}-seed{seed}"
    batch = load_recipe(RECIPE)[0].train.batch_size
    init = [f"model.init={args.stage1}"] if arm.startswith("dit-") else []
    overrides = [
        *RANDOM_T5, *init, *ARMS[arm], f"train.seed={seed}", f"train.steps={args.steps}", f"output.dir={out}",
        f"output.save_every={args.eval_every}", "output.keep_last=1000", "log.every=25",
    ]  # fmt: skip
    if args.prepare:
        pixart("prepare", str(RECIPE), *sets([o for o in overrides if o.startswith("data.")]), threads=args.threads)
    pixart("train", str(RECIPE), *sets(overrides), "--resume", "auto", threads=args.threads)
    for step in range(args.eval_every, args.steps + 1, args.eval_every):
        if (arm, seed, step) in done:
            continue
        checkpoint = out / "checkpoints" / f"step-{step:07d}"
        evaluation = out / "eval" / f"step-{step:07d}"
        pixart(
            "eval-compbench", "--bench", "shapes", "-m", str(checkpoint), "--limit", str(args.limit),
            "--images-per-prompt", "1", "-o", str(evaluation), threads=args.threads,
        )  # fmt: skip
        row = {
            "arm": arm,
            "seed": seed,
            "step": step,
            "images": step * batch,
            "train_minutes": round(training_seconds(out / "metrics.jsonl", step) / 60, 2),
            "prompts": args.limit,
            **scores(evaluation / "compbench_report.json"),
        }
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")


def table(rows: list[dict]) -> str:
    head = "| arm | seed | step | CPU-min | colour | shape | spatial | complex | 1-obj colour | 1-obj shape | 2 obj |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        lines.append(
            f"| {r['arm']} | {r['seed']} | {r['step']} | {r['train_minutes']:.1f} | {r['color']:.3f} | {r['shape']:.3f}"
            f" | {r['spatial']:.3f} | {r['complex']:.3f} | {r['color_one_object']:.3f} | {r['shape_one_object']:.3f}"
            f" | {r['both_objects']:.3f} |"
        )
    return "\n".join(lines)


def adaln_parameters() -> str:
    """Parameters of the adaLN conditioning: one shared MLP + per-block tables vs one MLP per block (DiT)."""
    import dataclasses

    import torch

    from pixart_cli.models import build_pixart, pixart_config

    def count(config, adaln: str) -> tuple[int, int]:
        with torch.device("meta"):
            model = build_pixart(dataclasses.replace(config, adaln=adaln))
        named = dict(model.named_parameters())
        per_block = ("scale_shift_table", "adaLN_modulation")  # blocks.i.<one of these>
        modulation = sum(
            p.numel()
            for k, p in named.items()
            if k.startswith("t_block.") or (k.startswith("blocks.") and k.split(".")[2] in per_block)
        )
        return modulation, sum(p.numel() for p in named.values())

    lines = ["| model | adaLN-single | per-block adaLN | whole model, single | whole model, per-block | saved |"]
    lines.append("|---|---|---|---|---|---|")
    shapes = load_recipe(RECIPE)[0].model_config()
    for name, config in (("shapes (6 × 240)", shapes), ("XL/2", pixart_config("PixArt-XL/2"))):
        (single, total), (per_block, total_block) = count(config, "single"), count(config, "block")
        lines.append(
            f"| {name} | {single:,} | {per_block:,} | {total:,} | {total_block:,} | {1 - total / total_block:.1%} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of: {', '.join(ARMS)}")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
    parser.add_argument("--steps", type=int, default=1000, help="training steps per arm (equal compute)")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--limit", type=int, default=96, help="held-out prompts per evaluation")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for each command")
    parser.add_argument("--stage1", default="builtin:shapes-dit", help="the stage-1 DiT of the dit-* arms")
    parser.add_argument("--no-prepare", dest="prepare", action="store_false", help="encode on the fly instead")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "shapes-experiments")
    args = parser.parse_args()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arm {unknown[0]!r}; known: {', '.join(ARMS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    done = {(r["arm"], r["seed"], r["step"]) for r in rows}
    started = time.monotonic()
    for seed in (int(s) for s in args.seeds.split(",")):
        for arm in arms:
            run_arm(arm, seed, args, done, results)
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    rows.sort(key=lambda r: (r["arm"], r["seed"], r["step"]))
    report = f"{table(rows)}\n\nadaLN parameters (claim c):\n\n{adaln_parameters()}\n"
    (args.out / "results.md").write_text(report)
    print(report)
    print(f"({(time.monotonic() - started) / 60:.1f} min)")


if __name__ == "__main__":
    main()
