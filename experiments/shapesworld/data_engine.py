"""PixArt-α's data engine in miniature: alt-text, a captioner trained on a few labelled scenes, and ground truth.

PixArt-α trains on SA-1B re-captioned by LLaVA because alt-text names little of what an image shows. Here the
training scenes come with alt-text only (``sparse`` captions: "red circle", "two shapes", "circle and square"),
a few percent of them (``--labelled``, the first scenes) also with ground-truth dense captions; a tiny LLaVA
trained on that subset (``train_captioner.py``) captions every scene through ``pixart caption``, as a real VLM
would. Stage 2 (``recipes/shapes/stage2.yaml``) then trains for equal steps on each caption set, and ShapesBench
scores each model on the same held-out prompts.

Steps, in order (each resumes or skips what is done):

    python experiments/shapesworld/data_engine.py data                       # scenes, alt.jsonl, labelled.jsonl
    python experiments/shapesworld/train_captioner.py data/shapes/data-engine-32/labelled.jsonl \
        -o outputs/data-engine/captioner --hidden 128 --layers 2 --patch 8 --steps 1200 --threads 2
    python experiments/shapesworld/data_engine.py caption outputs/data-engine/captioner   # + caption accuracy
    python experiments/shapesworld/data_engine.py train --seeds 0,1 --steps 1000 --threads 2
    python experiments/shapesworld/data_engine.py report
    python experiments/shapesworld/data_engine.py accuracy                    # read the captions again

Arms: ``alt`` (alt-text only: ``alt.jsonl``), ``captioner`` (the captioner's captions: ``pixart caption``'s
``captions.jsonl``, its ``caption_vlm`` field read through the recipe's ``data.captions``), ``dense`` (ground-truth
dense captions: ``manifest.jsonl``), manifests over the same images in ``data/shapes/data-engine-32/``. Rows go to
``experiments/shapesworld/results/data_engine.jsonl``; ``report`` prints the table and draws the plot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts
from shapes_experiments import pixart, scores, sets, training_seconds

from pixart_cli.shapesworld.dataset import write_dataset
from pixart_cli.shapesworld.prompts import caption
from pixart_cli.shapesworld.world import Scene, Split, sample_scene

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "shapes" / "stage2.yaml"
DATA = ROOT / "data" / "shapes" / "data-engine-32"
# Scenes of the whole world (held-out combinations included; another seed): does the captioner generalise?
WORLD = ROOT / "data" / "shapes" / "data-engine-32-world"
RESULTS = ROOT / "experiments" / "shapesworld" / "results" / "data_engine.jsonl"
CAPTION_RESULTS = RESULTS.with_name("data_engine_captions.jsonl")  # caption_accuracy.py's readings
PROMPT = "Describe this image and its style in a very detailed manner"  # the paper's LLaVA prompt
# Each arm: its manifest in DATA and the recipe keys that pick its caption field. The captioner's arm reads
# `pixart caption`'s output as it is, through the recipe's caption mix (`data.captions`), one field at proportion 1.
ARMS = {
    "alt": ("alt.jsonl", []),
    "captioner": ("captions.jsonl", ["data.captions={caption_vlm: 1.0}"]),
    "dense": ("manifest.jsonl", []),
}
REPORTED = ("color", "shape", "spatial", "complex", "color_one_object", "shape_one_object", "both_objects")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def scene_record(path: str, scene: Scene) -> dict:
    """A scene as JSON: what caption_accuracy.py reads the captions against."""
    n = len(scene.objects)
    return {
        "path": path,
        "background": scene.background,
        "objects": [
            {"shape": o.shape, "colour": o.colour, "size": o.size, "centre": [round(c, 4) for c in o.centre]}
            for o in scene.objects
        ],
        "relations": [[i, scene.relation(i, j), j] for i in range(n) for j in range(n) if i != j],
    }


def make_data(directory: Path, n: int, labelled: int, seed: int, workers: int, split: Split = "train") -> None:
    """The images with dense ground-truth captions (``manifest.jsonl``, by ``write_dataset``), then the same
    scenes' alt-text (``alt.jsonl``), the labelled subset (``labelled.jsonl``) and the scenes (``scenes.jsonl``)."""
    if not (directory / "manifest.jsonl").is_file():
        log(f"writing {n} scenes to {directory}")
        write_dataset(
            directory, n, resolution=32, seed=seed, caption_style="dense", fmt="jsonl", split=split, workers=workers
        )
    rows = [json.loads(line) for line in (directory / "manifest.jsonl").read_text().splitlines()]
    alt, scenes = [], []
    for i, row in enumerate(rows):
        # write_dataset draws scene i and then its caption from default_rng([seed, i]): the same draws give the
        # scene back and, in the sparse style, the alt-text a sparse dataset of these scenes would have.
        rng = np.random.default_rng([seed, i])
        scene = sample_scene(rng, aspect=1.0, split=split)
        state = rng.bit_generator.state
        if caption(scene, "dense", rng) != row["caption"]:
            raise SystemExit(
                f"scene {i} does not match {directory / 'manifest.jsonl'}: was it written with seed {seed}?"
            )
        rng.bit_generator.state = state
        alt.append({**row, "caption": caption(scene, "sparse", rng)})
        scenes.append(scene_record(row["path"], scene))
    write_jsonl(directory / "alt.jsonl", alt)
    write_jsonl(directory / "labelled.jsonl", rows[:labelled])
    write_jsonl(directory / "scenes.jsonl", scenes)
    log(f"{directory}: {len(rows)} scenes, {labelled} labelled; alt.jsonl, labelled.jsonl, scenes.jsonl")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def caption_data(directory: Path, captioner: str, threads: int | None, max_new_tokens: int, batch: int) -> None:
    """``pixart caption`` over the alt-text manifest: ``captions.jsonl`` keeps the alt-text as ``caption`` and adds
    the captioner's as ``caption_vlm``."""
    pixart(
        "caption", str(directory / "alt.jsonl"), "-m", captioner, "-o", str(directory / "captions.jsonl"),
        "--prompt", PROMPT, "--max-new-tokens", str(max_new_tokens), "--batch-size", str(batch), "--device", "cpu",
        threads=threads,
    )  # fmt: skip


def caption_accuracy_rows(skip: int) -> list[dict]:
    """caption_accuracy.py's reading of each caption source: on the training scenes outside the labelled subset
    (the first ``skip``), the captioner on that subset, and on the whole-world scenes."""
    from caption_accuracy import accuracy, read_pairs

    readings = [  # label, captions, their scenes' folder, field, scenes left out, scenes read (None: all)
        ("alt-text", DATA / "alt.jsonl", DATA, "caption", skip, None),
        ("captioner", DATA / "captions.jsonl", DATA, "caption_vlm", skip, None),
        ("ground truth", DATA / "manifest.jsonl", DATA, "caption", skip, None),
        ("captioner, its training scenes", DATA / "captions.jsonl", DATA, "caption_vlm", 0, skip),
        ("captioner, whole world", WORLD / "captions.jsonl", WORLD, "caption_vlm", 0, None),
        ("alt-text, whole world", WORLD / "alt.jsonl", WORLD, "caption", 0, None),
    ]
    rows = []
    for label, captions, data, field, first, limit in readings:
        if captions.is_file():
            pairs = read_pairs(captions, data / "scenes.jsonl", field, first, limit)
            rows.append({"date": "2026-12-07", "captions": label, "source": str(captions.relative_to(ROOT)),
                         **accuracy(pairs)})  # fmt: skip
    return rows


def run_arm(arm: str, seed: int, args: argparse.Namespace) -> dict | None:
    name = f"{arm}-seed{seed}-{args.steps}x{args.batch}"
    out = args.out / name
    manifest, caption_keys = DATA / ARMS[arm][0], ARMS[arm][1]
    if not manifest.is_file():
        log(f"{manifest} is missing: skipping {name}")
        return None
    overrides = [
        f"data.path={manifest.relative_to(ROOT)}", f"data.cache={(DATA / f'cache-{arm}').relative_to(ROOT)}",
        *caption_keys,
        f"train.seed={seed}", f"train.steps={args.steps}", f"train.batch_size={args.batch}",
        f"output.dir={out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}",
        f"optim.warmup_steps={args.warmup}", f"output.save_every={args.steps}", "output.keep_last=1",
        f"log.sample_every={args.steps}",
    ]  # fmt: skip
    started = time.monotonic()
    pixart("prepare", str(RECIPE), *sets([o for o in overrides if o.startswith("data.")]), threads=args.threads)
    prepared = time.monotonic()
    pixart("train", str(RECIPE), *sets(overrides), "--resume", "auto", threads=args.threads)
    trained = time.monotonic()
    checkpoint = out / "checkpoints" / f"step-{args.steps:07d}"
    evaluation = out / "eval" / f"limit{args.limit}x{args.images_per_prompt}"
    pixart(
        "eval-compbench", "--bench", "shapes", "-m", str(checkpoint), "--limit", str(args.limit),
        "--images-per-prompt", str(args.images_per_prompt), "-o", str(evaluation), threads=args.threads,
    )  # fmt: skip
    import torch

    return {
        "date": "2026-12-07",
        "arm": arm,
        "seed": seed,
        "steps": args.steps,
        "batch": args.batch,
        "images": args.steps * args.batch,
        "warmup": args.warmup,
        "train_minutes": round(training_seconds(out / "metrics.jsonl", args.steps) / 60, 2),
        "wall_minutes": {
            "prepare": round((prepared - started) / 60, 2),
            "train": round((trained - prepared) / 60, 2),
            "eval": round((time.monotonic() - trained) / 60, 2),
        },
        "prompts": args.limit,
        "images_per_prompt": args.images_per_prompt,
        "threads": args.threads,
        "cpu": f"{platform.processor() or platform.machine()}, {torch.backends.cpu.get_cpu_capability()}",
        **scores(evaluation / "compbench_report.json"),
    }


def table(rows: list[dict]) -> str:
    head = "| arm | seed | steps × batch | train min | colour | shape | spatial | complex | 1-obj colour | 1-obj shape"
    head += " | 2 obj |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        values = " | ".join(f"{r[k]:.3f}" for k in REPORTED)
        lines.append(
            f"| {r['arm']} | {r['seed']} | {r['steps']} × {r['batch']} | {r['train_minutes']:.1f} | {values} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Bars of ShapesBench colour (all, one-object), shape, spatial and complex per arm (one bar per seed, the mean
    marked), drawn with PIL: matplotlib is not a dependency."""
    from PIL import Image, ImageDraw

    metrics = ("color", "color_one_object", "shape", "spatial", "complex")
    arms = [a for a in ARMS if any(r["arm"] == a for r in rows)]
    colours = {"alt": (200, 90, 60), "captioner": (60, 130, 200), "dense": (70, 160, 80)}
    width, height, left, top, plot_h = 140 + 150 * len(metrics), 360, 50, 40, 240
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    budget = f"{rows[0]['steps']} steps x {rows[0]['batch']}" if rows else ""  # the default font has no "×"
    draw.text((left, 10), f"ShapesBench by caption source ({budget}; bars: seeds, line: mean)", fill="black")
    for k in range(6):
        y = top + plot_h - k * plot_h / 5
        draw.line((left, y, width - 20, y), fill=(225, 225, 225))
        draw.text((8, y - 6), f"{k / 5:.1f}", fill="black")
    for m, metric in enumerate(metrics):
        x0 = left + 10 + m * 150
        draw.text((x0 + 10, top + plot_h + 8), metric, fill="black")
        for a, arm in enumerate(arms):
            values = [r[metric] for r in rows if r["arm"] == arm]
            for s, v in enumerate(values):
                x = x0 + a * 42 + s * (36 // max(len(values), 1))
                bar_w = 36 // max(len(values), 1) - 2
                draw.rectangle((x, top + plot_h - v * plot_h, x + bar_w, top + plot_h), fill=colours[arm])
            if values:
                y = top + plot_h - sum(values) / len(values) * plot_h
                draw.line((x0 + a * 42 - 2, y, x0 + a * 42 + 38, y), fill="black", width=2)
    for a, arm in enumerate(arms):
        draw.rectangle((left + a * 160, height - 30, left + a * 160 + 12, height - 18), fill=colours[arm])
        draw.text((left + a * 160 + 18, height - 30), arm, fill="black")
    image.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="write the scenes and their caption manifests")
    data.add_argument("--n", type=int, default=40_000)
    data.add_argument("--labelled", type=int, default=2_000, help="scenes (the first) with dense captions")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--workers", type=int, default=2)
    data.add_argument("--world", type=int, default=1_000, help="whole-world scenes to read the captioner on")
    cap = sub.add_parser("caption", help="caption the scenes with a captioner (pixart caption), read them")
    cap.add_argument("captioner", help="the captioner's directory (train_captioner.py)")
    cap.add_argument("--max-new-tokens", type=int, default=48)
    cap.add_argument("--batch-size", type=int, default=64)
    cap.add_argument("--threads", type=int, default=None)
    cap.add_argument("--labelled", type=int, default=2_000, help="the first N scenes, left out of the reading")
    acc = sub.add_parser("accuracy", help="read the captions again (results/data_engine_captions.jsonl)")
    acc.add_argument("--labelled", type=int, default=2_000, help="the first N scenes, left out of the reading")
    train = sub.add_parser("train", help="stage 2 on each caption set, scored on ShapesBench")
    train.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of: {', '.join(ARMS)}")
    train.add_argument("--seeds", default="0,1")
    train.add_argument("--steps", type=int, default=1000)
    train.add_argument("--batch", type=int, default=64)
    train.add_argument("--warmup", type=int, default=None, help="warmup steps [steps / 10, the recipe's share]")
    train.add_argument("--limit", type=int, default=100, help="held-out prompts")
    train.add_argument("--images-per-prompt", type=int, default=2)
    train.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for each command")
    train.add_argument("--out", type=Path, default=ROOT / "outputs" / "data-engine")
    report = sub.add_parser("report", help="print the table of results/data_engine.jsonl and draw its plot")
    report.add_argument("--steps", type=int, default=None, help="only rows of this many steps")
    report.add_argument("--plot", type=Path, default=RESULTS.parent / "data_engine.png")
    args = parser.parse_args()

    if args.command == "data":
        make_data(DATA, args.n, args.labelled, args.seed, args.workers)
        if args.world:
            make_data(WORLD, args.world, 0, args.seed + 1, args.workers, split="all")
    elif args.command in ("caption", "accuracy"):
        for data in (DATA, WORLD) if args.command == "caption" else ():
            if (data / "alt.jsonl").is_file():
                caption_data(data, args.captioner, args.threads, args.max_new_tokens, args.batch_size)
        rows = caption_accuracy_rows(args.labelled)
        with CAPTION_RESULTS.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        for r in rows:
            print(json.dumps(r), flush=True)
    elif args.command == "train":
        arms = [a.strip() for a in args.arms.split(",") if a.strip()]
        if unknown := [a for a in arms if a not in ARMS]:
            parser.error(f"unknown arm {unknown[0]!r}; known: {', '.join(ARMS)}")
        args.out.mkdir(parents=True, exist_ok=True)
        args.warmup = args.steps // 10 if args.warmup is None else args.warmup
        done = set()
        if RESULTS.is_file():
            rows = [json.loads(line) for line in RESULTS.read_text().splitlines()]
            done = {(r["arm"], r["seed"], r["steps"], r["batch"]) for r in rows}
        for seed in (int(s) for s in args.seeds.split(",")):
            for arm in arms:
                if (arm, seed, args.steps, args.batch) in done:
                    continue
                row = run_arm(arm, seed, args)
                if row is not None:
                    with RESULTS.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(json.dumps(row), flush=True)
    else:
        rows = [json.loads(line) for line in RESULTS.read_text().splitlines()] if RESULTS.is_file() else []
        if args.steps is not None:
            rows = [r for r in rows if r["steps"] == args.steps]
        rows.sort(key=lambda r: (r["steps"], list(ARMS).index(r["arm"]), r["seed"]))
        print(table(rows))
        for steps in sorted({r["steps"] for r in rows}):
            plot([r for r in rows if r["steps"] == steps], args.plot.with_stem(f"{args.plot.stem}-{steps}"))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
