"""PixArt-Σ's weak-to-strong training in miniature: adapt the shipped demo, or train from scratch for the same steps.

Arms (each a recipes/shapes recipe with overrides):

* ``tokens-adapt``   recipes/shapes/sigma-tokens.yaml: the demo (64-token captions) reads 128 tokens; every weight
  carries over, the null caption is rebuilt as T5("") over 128 tokens (PixArt-Σ's 120 → 300).
* ``tokens-scratch`` the same model and data from a fresh initialisation.
* ``kv-adapt``       recipes/shapes/sigma-kvcompress.yaml: the demo at 128 px (4× the tokens) with keys and values
  compressed 2× per side in its last three layers (PixArt-Σ's resolution step with KV compression).
* ``kv-none``        the same without compression (the speed and quality reference).
* ``kv-scratch``     the compressed model from a fresh initialisation.
* ``vae-adapt``      recipes/shapes/sigma-vae.yaml: the demo (pixel space) moved into the latent space of a small
  AutoencoderKL (3 channels, 2× downsampling, ``--vae``), 128-px scenes as 64 × 64 latents: the same token grid,
  every weight carries over (PixArt-Σ's SD VAE → SDXL VAE step).
* ``vae-scratch``    the same latent-space model from a fresh initialisation.

Step 0 of the adapt arms is the demo itself (64 tokens, 64 px). Every ``--eval-every`` steps the checkpoint
is scored on the first ``--limit`` held-out ShapesBench prompts (one image each, 20 DPM-Solver steps, CFG 4.5).
Rows go to ``OUT/results.jsonl`` (training images/s from the run's metrics), a table to ``OUT/results.md`` and
ShapesBench shape and spatial scores against steps, one panel per pair, to ``OUT/results.png``; reruns skip what
is done. ``--seeds 0,1`` repeats each arm with another training seed (batch order, noise, the scratch initialisation).

    python experiments/shapesworld/shapes_autoencoder.py -o outputs/shapes-vae-f2c3 --levels 1 --latent-channels 3 \
        --width 16 --resolution 64 --steps 1200        # the vae arms' autoencoder
    python experiments/shapesworld/sigma_w2s.py --steps 300 --eval-every 150 --limit 100 --seeds 0,1
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
# The demo predicts v (an adapted model keeps its target): the scratch arms learn the same one.
SCRATCH = ["model.init=null", "model.config.prediction_type=v_prediction"]
ARMS: dict[str, tuple[str, list[str]]] = {
    "tokens-adapt": ("sigma-tokens.yaml", []),
    "tokens-scratch": ("sigma-tokens.yaml", [*SCRATCH, "model.rebuild_null_caption=false"]),
    "kv-adapt": ("sigma-kvcompress.yaml", []),
    "kv-none": ("sigma-kvcompress.yaml", [KV_OFF]),
    "kv-scratch": ("sigma-kvcompress.yaml", SCRATCH),
    "vae-adapt": ("sigma-vae.yaml", []),
    "vae-scratch": ("sigma-vae.yaml", SCRATCH),
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


def run_arm(arm: str, seed: int, args: argparse.Namespace, done: set[tuple], results: Path) -> None:
    recipe, overrides = ARMS[arm]
    out = args.out / (arm if seed == 0 else f"{arm}-seed{seed}")
    data = args.out / "data" / recipe.removesuffix(".yaml")
    if recipe == "sigma-vae.yaml":
        overrides = [*overrides, f"data.vae={args.vae}"]
    common = [
        f"train.seed={seed}",
        f"data.path={data / 'manifest.jsonl'}", f"data.cache={data / 'cache'}", f"data.shapes.n={args.scenes}",
        "validation.every=0", f"train.steps={args.steps}", f"train.batch_size={args.batch}",
        f"output.dir={out}", f"output.save_every={args.eval_every}", "output.keep_last=1000", "log.every=25",
        "log.sample_every=0",
    ]  # fmt: skip
    if arm.endswith("adapt") and (arm, 0, 0) not in done:
        # The demo as it is: 64-token captions, 64 px (a multi-scale model samples its own buckets).
        row = {
            "arm": arm,
            "seed": 0,
            "step": 0,
            "batch": args.batch,
            "images_per_s": None,
            **score("builtin:shapes-demo", out / "eval-demo", args.limit),
        }
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
    pixart("train", str(SHAPES / recipe), *sets([*common, *overrides]), "--resume", "auto")
    for step in range(args.eval_every, args.steps + 1, args.eval_every):
        if (arm, seed, step) in done:
            continue
        checkpoint = out / "checkpoints" / f"step-{step:07d}"
        row = {"arm": arm, "seed": seed, "step": step, "batch": args.batch,
               "images_per_s": round(images_per_second(out / "metrics.jsonl"), 2),
               **score(str(checkpoint), out / "eval" / f"step-{step:07d}", args.limit)}  # fmt: skip
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")


def table(rows: list[dict]) -> str:
    lines = [
        "| arm | seed | step × batch | train img/s | colour | shape | spatial | complex |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speed = "" if r["images_per_s"] is None else f"{r['images_per_s']:.1f}"
        scores = " | ".join(f"{r[k]:.3f}" for k in REPORTED)
        lines.append(f"| {r['arm']} | {r['seed']} | {r['step']} × {r['batch']} | {speed} | {scores} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """ShapesBench shape score (mean over seeds) against steps, one panel per adapt/scratch (or none) pair,
    stacked; the scratch arms start at 0, the others at the demo."""
    import tempfile

    from PIL import Image

    from pixart_cli.training.plot import line_plot

    scratch = Path(tempfile.mkdtemp())  # the panels, before they are stacked
    panels = []
    for pair in ("tokens", "kv", "vae"):
        arms = sorted({r["arm"] for r in rows if r["arm"].startswith(pair + "-")})
        steps = sorted({r["step"] for r in rows if r["arm"] in arms})
        demo = [r["shape"] for r in rows if r["arm"].startswith(pair) and r["step"] == 0]
        series = {}
        for arm in arms:
            means = {s: statistics.mean(r["shape"] for r in rows if r["arm"] == arm and r["step"] == s) for s in steps
                     if any(r["arm"] == arm and r["step"] == s for r in rows)}  # fmt: skip
            means.setdefault(0, 0.0 if "scratch" in arm or not demo else demo[0])
            if len(means) == len(steps):
                seeds = len({r["seed"] for r in rows if r["arm"] == arm})
                series[f"{arm} ({seeds} seed{'s' if seeds > 1 else ''})"] = [means[s] for s in steps]
        if series:
            panel = scratch / f"{pair}.png"
            title = f"{pair}: ShapesBench shape score"
            line_plot(steps, series, panel, title=title, size=(900, 280), ylabel="shape")
            panels.append(Image.open(panel))
    if panels:
        sheet = Image.new("RGB", (max(p.width for p in panels), sum(p.height for p in panels)), "white")
        for i, panel in enumerate(panels):
            sheet.paste(panel, (0, sum(p.height for p in panels[:i])))
        sheet.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of: {', '.join(ARMS)}")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=150)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--scenes", type=int, default=4000, help="generated training scenes per recipe")
    parser.add_argument("--limit", type=int, default=100, help="held-out prompts per evaluation")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
    parser.add_argument("--vae", default="outputs/shapes-vae-f2c3", help="the vae arms' AutoencoderKL directory")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "sigma-w2s")
    args = parser.parse_args()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if unknown := [a for a in arms if a not in ARMS]:
        parser.error(f"unknown arm {unknown[0]!r}; known: {', '.join(ARMS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    read = lambda: [{"seed": 0, **json.loads(line)} for line in results.read_text().splitlines()]  # noqa: E731
    done = {(r["arm"], r["seed"], r["step"]) for r in (read() if results.is_file() else [])}
    started = time.monotonic()
    for seed in seeds:
        for arm in arms:
            run_arm(arm, seed, args, done, results)
    rows = sorted(read(), key=lambda r: (r["arm"], r["seed"], r["step"]))
    (args.out / "results.md").write_text(table(rows) + "\n")
    plot(rows, args.out / "results.png")
    print(table(rows))
    print(f"({(time.monotonic() - started) / 60:.1f} min)")


if __name__ == "__main__":
    main()
