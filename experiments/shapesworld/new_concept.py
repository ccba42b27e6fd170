"""Teaching the shipped demo a colour it never saw ("pink"), in miniature: LoRA vs DoRA vs full fine-tuning, with
and without prior preservation, two seeds (recipes/shapes/lora-pink.yaml).

    python experiments/shapesworld/new_concept.py classes                      # the demo draws the class images
    python experiments/shapesworld/new_concept.py train --arms lora,dora --seeds 0,1 --threads 1
    python experiments/shapesworld/new_concept.py eval                         # every checkpoint (and the demo)
    python experiments/shapesworld/new_concept.py report                       # table + plot

Each arm trains recipes/shapes/lora-pink.yaml with a few overrides (ARMS) for the same steps and batch; class
images are drawn once (shared by every arm with prior preservation). ``eval`` scores each checkpoint on
(a) the new concept: ShapesBench's concept prompts (``pixart eval-compbench --bench shapes --concept pink``: one
pink object of each shape in turn, worded as the demo's captions; the detector looks for pink too) and
(b) forgetting: ShapesBench on the held-out prompts; ``--limit`` prompts each, one image per prompt.
Rows go to results/new_concept.jsonl.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts
from shapes_experiments import pixart, scores, sets, training_seconds

from pixart_cli.training.plot import line_plot
from pixart_cli.training.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "shapes" / "lora-pink.yaml"
OUT = ROOT / "outputs" / "new-concept"
RESULTS = ROOT / "experiments" / "shapesworld" / "results" / "new_concept.jsonl"
CLASSES = OUT / "class-images"
NO_PRIOR = ["dreambooth.class_prompts=[]"]
ARMS: dict[str, list[str]] = {
    "lora": [],
    "dora": ["adapter.type=dora"],
    "full": ["adapter=null", "optim.lr=1.0e-4"],
    "lora-no-prior": NO_PRIOR,
    "full-no-prior": ["adapter=null", "optim.lr=1.0e-4", *NO_PRIOR],
}


def overrides(arm: str, seed: int, steps: int) -> list[str]:
    return [
        *ARMS[arm], f"train.seed={seed}", f"train.steps={steps}", f"output.dir={OUT / f'{arm}-seed{seed}'}",
        f"dreambooth.class_dir={CLASSES}", "output.keep_last=100", "log.sample_every=0",
    ]  # fmt: skip


def train(args: argparse.Namespace) -> None:
    jobs = [(arm, seed) for seed in args.seeds for arm in args.arms]

    def run(job: tuple[str, int]) -> float:
        arm, seed = job
        start = time.monotonic()
        pixart("train", str(RECIPE), *sets(overrides(arm, seed, args.steps)), "--resume", "auto",
               threads=args.threads)  # fmt: skip
        return time.monotonic() - start

    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        for job, seconds in zip(jobs, pool.map(run, jobs), strict=True):
            print(f"{job}: {seconds / 60:.1f} min", flush=True)


def evaluate(args: argparse.Namespace) -> None:
    done = set()
    if RESULTS.is_file():
        done = {(r["arm"], r["seed"], r["step"]) for r in map(json.loads, RESULTS.read_text().splitlines())}
    batch = load_recipe(RECIPE)[0].train.batch_size
    runs = [("demo", 0, 0, None)]
    for run in sorted(OUT.glob(args.runs)):
        arm, seed = run.name.rsplit("-seed", 1)
        for checkpoint in sorted((run / "checkpoints").glob("step-*")):
            step = int(checkpoint.name.split("-")[1])
            if not args.steps or step in args.steps:
                runs.append((arm, int(seed), step, checkpoint))
    for arm, seed, step, checkpoint in runs:
        if (arm, seed, step) in done:
            continue
        full = checkpoint is not None and (checkpoint / "model.safetensors").is_file()
        model = str(checkpoint) if full else "builtin:shapes-demo"
        adapter = checkpoint if checkpoint is not None and not full else None
        row = {"arm": arm, "seed": seed, "step": step, "images": step * batch}
        if checkpoint is not None:
            row["train_minutes"] = round(training_seconds(checkpoint.parents[1] / "metrics.jsonl", step) / 60, 2)
            weights = checkpoint / ("model.safetensors" if full else "adapter.safetensors")
            row["weights_mb"] = round(weights.stat().st_size / 1e6, 2)
        lora = ["--lora", str(adapter)] if adapter is not None else []
        where = checkpoint or OUT / "demo"
        for name, extra in (("pink", ["--concept", "pink"]), ("heldout", [])):
            pixart(
                "eval-compbench", "--bench", "shapes", "-m", model, *lora, *extra, "--limit", str(args.limit),
                "--images-per-prompt", "1", "-o", str(where / f"eval-{name}"), "--json", threads=args.threads,
            )  # fmt: skip
            row.update({f"{name}_{k}": v for k, v in scores(where / f"eval-{name}" / "compbench_report.json").items()})
        print(json.dumps(row), flush=True)
        with RESULTS.open("a") as f:
            f.write(json.dumps(row) + "\n")


def report(args: argparse.Namespace) -> None:
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines()]
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["arm"], row["step"]), []).append(row)
    print("| arm | step | CPU-min | seeds | pink (colour) | pink (shape) | held-out colour | held-out shape | MB |")
    print("|---|---|---|---|---|---|---|---|---|")

    def order(item: tuple) -> tuple:
        (arm, step), _ = item
        return (list(ARMS).index(arm) if arm in ARMS else -1, step)

    def mean(group: list[dict], key: str) -> str:
        values = [r[key] for r in group if key in r]
        return f"{sum(values) / len(values):.3f}" if values else "–"

    for (arm, step), group in sorted(groups.items(), key=order):
        each = " / ".join(f"{r['pink_color']:.2f}" for r in sorted(group, key=lambda r: r["seed"]))  # per seed
        print(
            f"| {arm} | {step} | {mean(group, 'train_minutes')} | {len(group)} | {mean(group, 'pink_color')} ({each}) "
            f"| {mean(group, 'pink_shape')} | {mean(group, 'heldout_color')} | {mean(group, 'heldout_shape')} | "
            f"{mean(group, 'weights_mb')} |"
        )


def plot(rows: list[dict], key: str, path: Path, title: str) -> None:
    """``key`` (mean over seeds) against steps, one line per arm; step 0 is the demo itself."""
    demo = next(r for r in rows if r["arm"] == "demo")
    steps = sorted({r["step"] for r in rows if r["arm"] != "demo"} | {0})
    series = {}
    for arm in ARMS:
        values = []
        for step in steps:
            found = [r[key] for r in rows if r["arm"] == arm and r["step"] == step] if step else [demo[key]]
            values.append(sum(found) / len(found) if found else float("nan"))
        if len(values) > 1 and values[1] == values[1]:
            series[arm] = values
    line_plot(steps, series, path, title=title, size=(900, 480), ylabel="accuracy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("classes", help="draw the class images once (the first arm would, but arms run in parallel)")
    run = sub.add_parser("train")
    run.add_argument("--arms", type=lambda s: s.split(","), default=list(ARMS))
    run.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1])
    run.add_argument("--steps", type=int, default=300)
    run.add_argument("--threads", type=int, default=1)
    run.add_argument("--parallel", type=int, default=2)
    ev = sub.add_parser("eval")
    ev.add_argument("--limit", type=int, default=48, help="prompts of each benchmark (pink, held-out)")
    ev.add_argument("--runs", default="*-seed*", help="which runs (a glob of outputs/new-concept/ names)")
    ev.add_argument("--steps", type=lambda s: [int(x) for x in s.split(",")], default=None, help="only these steps")
    ev.add_argument("--threads", type=int, default=2)
    rep = sub.add_parser("report", help="the table, and a plot of pink and held-out colour accuracy against steps")
    rep.add_argument("--plot", type=Path, default=RESULTS.parent / "new_concept.png")
    args = parser.parse_args()
    if args.command == "classes":
        pixart("train", str(RECIPE), *sets(overrides("lora", 0, 1)), "--set", f"output.dir={OUT / 'classes-run'}")
    elif args.command == "train":
        train(args)
    elif args.command == "eval":
        evaluate(args)
    else:
        report(args)
        rows = [json.loads(line) for line in RESULTS.read_text().splitlines()]
        plot(rows, "pink_color", args.plot, "pink prompts: a pink object drawn (mean of 2 seeds; step 0: the demo)")
        plot(rows, "heldout_color", args.plot.with_name(args.plot.stem + "-heldout.png"),
             "held-out ShapesBench prompts: colour (forgetting)")  # fmt: skip


if __name__ == "__main__":
    main()
