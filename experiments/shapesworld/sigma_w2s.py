"""PixArt-Σ's weak-to-strong training in miniature: adapt the shipped demo, or train from scratch for the same steps.

Arms (each a recipes/shapes recipe with overrides):

* ``tokens-adapt``   recipes/shapes/sigma-tokens.yaml: the demo (64-token captions) reads 128 tokens; every weight
  carries over, the null caption is rebuilt as T5("") over 128 tokens (PixArt-Σ's 120 → 300).
* ``tokens-scratch`` the same model and data from a fresh initialisation.
* ``kv-adapt``       recipes/shapes/sigma-kvcompress.yaml: the demo at 128 px (4× the tokens) with keys and values
  compressed 2× per side in its last three layers (PixArt-Σ's resolution step with KV compression).
* ``kv-none``        the same without compression (the speed and quality reference).
* ``kv-scratch``     the compressed model from a fresh initialisation.

Step 0 of the adapt arms is the demo itself (64 tokens, 64 px). Every ``--eval-every`` steps the checkpoint
is scored on the first ``--limit`` held-out ShapesBench prompts (one image each, 20 DPM-Solver steps, CFG 4.5).
Rows go to ``OUT/results.jsonl`` (training images/s from the run's metrics) and a table to ``OUT/results.md``;
reruns skip what is done.

    python experiments/shapesworld/sigma_w2s.py --steps 300 --eval-every 150 --limit 100
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHAPES = ROOT / "recipes" / "shapes"
REPORTED = ("color", "shape", "spatial", "complex")
KV_OFF = (
    "model.config={depth: 6, hidden_size: 240, num_heads: 4, patch_size: 4, input_size: 128, in_channels: 3, "
    "caption_channels: 64, max_length: 64, interpolation_scale: 4.0}"
)
ARMS: dict[str, tuple[str, list[str]]] = {
    "tokens-adapt": ("sigma-tokens.yaml", []),
    "tokens-scratch": ("sigma-tokens.yaml", ["model.init=null", "model.rebuild_null_caption=false"]),
    "kv-adapt": ("sigma-kvcompress.yaml", []),
    "kv-none": ("sigma-kvcompress.yaml", [KV_OFF]),
    "kv-scratch": ("sigma-kvcompress.yaml", ["model.init=null"]),
}


def pixart(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pixart_cli", *args], check=True, cwd=ROOT)


def sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def images_per_second(metrics: Path) -> float:
    """Median training throughput over the logged windows after the first (which includes start-up)."""
    rates = [json.loads(line).get("images_per_s") for line in metrics.read_text().splitlines()]
    rates = [r for r in rates if r]
    return statistics.median(rates[1:] or rates)


def score(model: str, out: Path, limit: int) -> dict[str, float]:
    pixart("eval-compbench", "--bench", "shapes", "-m", model, "--limit", str(limit), "--images-per-prompt", "1",
           "-o", str(out))  # fmt: skip
    categories = json.loads((out / "compbench_report.json").read_text())["categories"]
    return {name: categories[name]["mean"] for name in REPORTED}


def run_arm(arm: str, args: argparse.Namespace, done: set[tuple], results: Path) -> None:
    recipe, overrides = ARMS[arm]
    out = args.out / arm
    data = args.out / "data" / recipe.removesuffix(".yaml")
    common = [
        f"data.path={data / 'manifest.jsonl'}", f"data.cache={data / 'cache'}", f"data.shapes.n={args.scenes}",
        "validation.every=0", f"train.steps={args.steps}", f"train.batch_size={args.batch}",
        f"output.dir={out}", f"output.save_every={args.eval_every}", "output.keep_last=1000", "log.every=25",
        "log.sample_every=0",
    ]  # fmt: skip
    if arm.endswith("adapt") and (arm, 0) not in done:
        # The demo as it is: 64-token captions, 64 px (a multi-scale model samples its own buckets).
        row = {
            "arm": arm,
            "step": 0,
            "batch": args.batch,
            "images_per_s": None,
            **score("builtin:shapes-demo", out / "eval-demo", args.limit),
        }
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
    pixart("train", str(SHAPES / recipe), *sets([*common, *overrides]), "--resume", "auto")
    for step in range(args.eval_every, args.steps + 1, args.eval_every):
        if (arm, step) in done:
            continue
        checkpoint = out / "checkpoints" / f"step-{step:07d}"
        row = {"arm": arm, "step": step, "batch": args.batch,
               "images_per_s": round(images_per_second(out / "metrics.jsonl"), 2),
               **score(str(checkpoint), out / "eval" / f"step-{step:07d}", args.limit)}  # fmt: skip
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")


def table(rows: list[dict]) -> str:
    lines = [
        "| arm | step × batch | train img/s | colour | shape | spatial | complex |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speed = "" if r["images_per_s"] is None else f"{r['images_per_s']:.1f}"
        scores = " | ".join(f"{r[k]:.3f}" for k in REPORTED)
        lines.append(f"| {r['arm']} | {r['step']} × {r['batch']} | {speed} | {scores} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of: {', '.join(ARMS)}")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=150)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--scenes", type=int, default=4000, help="generated training scenes per recipe")
    parser.add_argument("--limit", type=int, default=100, help="held-out prompts per evaluation")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "sigma-w2s")
    args = parser.parse_args()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if unknown := [a for a in arms if a not in ARMS]:
        parser.error(f"unknown arm {unknown[0]!r}; known: {', '.join(ARMS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    done = {(r["arm"], r["step"]) for r in rows}
    started = time.monotonic()
    for arm in arms:
        run_arm(arm, args, done, results)
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    rows.sort(key=lambda r: (r["arm"], r["step"]))
    (args.out / "results.md").write_text(table(rows) + "\n")
    print(table(rows))
    print(f"({(time.monotonic() - started) / 60:.1f} min)")


if __name__ == "__main__":
    main()
