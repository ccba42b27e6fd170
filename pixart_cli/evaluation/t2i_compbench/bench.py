"""A T2I-CompBench run: generate the missing images, score each category, write the report.

``complex`` is "3-in-1": the average of the BLIP-VQA score, the spatial score and the CLIP score of the prompt
with its attribute words removed. With ``complex_val_spatial.txt`` and ``complex_val_action.txt`` beside the
prompts, T2I-CompBench's rule is followed exactly (spatial-only prompts average BLIP and spatial, action-only
prompts BLIP and CLIP, the rest all three); without them, prompts that name a spatial relation average all three
and the others average BLIP and CLIP (our rule).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pixart_cli.errors import PixartError
from pixart_cli.evaluation import Progress, no_progress
from pixart_cli.evaluation.generate import SETTINGS_FILE, ImageMaker, Shard, generate_images
from pixart_cli.evaluation.t2i_compbench.layout import (
    CATEGORIES,
    EVALUATORS,
    FLAGS,
    REPORT_FILE,
    SCORES_FILE,
    discover_samples,
    layout,
    read_prompts,
)
from pixart_cli.evaluation.t2i_compbench.phrases import spatial_relation, without_attributes
from pixart_cli.evaluation.t2i_compbench.scorers import Scorers, check_categories, required
from pixart_cli.io import atomic_file


@dataclass
class CategoryResult:
    category: str
    evaluator: str
    mean: float
    images: int
    prompts: int
    extra: dict[str, float] = field(default_factory=dict)  # further means (ShapesWorld's checks)


@dataclass
class BenchReport:
    benchmark: str
    categories: dict[str, CategoryResult]
    settings: dict
    path: Path | None


def complex_split(prompts_dir: Path) -> tuple[set[str], set[str]] | None:
    """T2I-CompBench's lists of spatial-only and action-only complex prompts, when present."""

    def read(name: str) -> set[str] | None:
        path = prompts_dir / name
        if not path.is_file():
            return None
        lines = path.read_text(encoding="utf-8").splitlines()
        return {line.strip().split(".")[0].lower() for line in lines if line.strip()}  # how the reference compares

    spatial, action = read("complex_val_spatial.txt"), read("complex_val_action.txt")
    return None if spatial is None or action is None else (spatial, action)


def score_complex(
    paths: Sequence[Path],
    prompts: Sequence[str],
    scorers: Scorers,
    *,
    split: tuple[set[str], set[str]] | None = None,
    progress: Progress = no_progress,
) -> tuple[list[float], dict[str, list[float]]]:
    """The "3-in-1" complex score per image and its parts (see the module docstring)."""
    assert scorers.blip is not None and scorers.clip is not None and scorers.detector is not None
    attribute = scorers.blip.score_files(paths, prompts, progress, "score:complex:blip-vqa")
    spatial = scorers.detector.score_files(paths, prompts, progress, "score:complex:detector")
    action = scorers.clip.score_files(paths, [without_attributes(p) for p in prompts], progress, "score:complex:clip")
    total = []
    for prompt, a, s, c in zip(prompts, attribute, spatial, action, strict=True):
        key = prompt.strip().split(".")[0].lower()
        if split is not None:
            parts = (a, s) if key in split[0] else (a, c) if key in split[1] else (a, s, c)
        else:
            parts = (a, s, c) if spatial_relation(prompt) else (a, c)
        total.append(sum(parts) / len(parts))
    return total, {"blip-vqa": attribute, "detector": spatial, "clip": action}


def score_category(
    category: str,
    paths: Sequence[Path],
    prompts: Sequence[str],
    scorers: Scorers,
    *,
    scorer: str = "auto",
    prompts_dir: Path | None = None,
    progress: Progress = no_progress,
) -> tuple[str, list[float], dict[str, list[float]]]:
    """(evaluator name, per-image scores, per-image parts) for one category."""
    stage = f"score:{category}"

    def need(name: str):
        found = getattr(scorers, name)
        if found is None:
            raise PixartError(f"category {category} needs the {name} evaluator (pass {FLAGS[name]})")
        return found

    if scorer == "vqascore":
        return "vqascore", need("vqascore").score_files(paths, prompts, progress, stage), {}
    if scorer == "clip":
        return "clip", need("clip").score_files(paths, prompts, progress, stage), {}
    evaluator = EVALUATORS[category]
    if evaluator == "blip-vqa":
        return evaluator, need("blip").score_files(paths, prompts, progress, stage), {}
    if evaluator == "clip":
        return evaluator, need("clip").score_files(paths, prompts, progress, stage), {}
    if evaluator == "detector":
        return evaluator, need("detector").score_files(paths, prompts, progress, stage), {}
    for name in ("blip", "clip", "detector"):
        need(name)
    split = complex_split(prompts_dir) if prompts_dir is not None else None
    total, parts = score_complex(paths, prompts, scorers, split=split, progress=progress)
    return "3-in-1" + (" (reference split)" if split else ""), total, parts


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def evaluate_compbench(
    prompts_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    make_images: ImageMaker | None,
    scorers: Scorers | Callable[[], Scorers],
    *,
    generation: dict,
    categories: Sequence[str] = CATEGORIES,
    images_per_prompt: int = 10,
    seed: int = 0,
    limit: int | None = None,
    scorer: str = "auto",
    shard: Shard | None = None,
    progress: Progress = no_progress,
) -> BenchReport | None:
    """Generate (with ``make_images``) and score T2I-CompBench categories; see the module docstring.

    Without ``make_images`` the images already in ``<out>/<category>/samples`` are scored, whoever made them.
    ``scorers`` may be a function that loads them: it is called on the main process once the images are made.
    ``limit``: the first N prompts of each category. Returns the report on the main process, None on the others;
    writes ``<out>/<category>/scores.json`` (per image) and ``<out>/compbench_report.json``.
    """
    started = time.monotonic()
    shard = shard or Shard()
    prompts_dir = Path(prompts_dir).expanduser()
    categories = check_categories(categories)
    need = required(categories, scorer)
    missing_scorers = sorted(n for n in need if isinstance(scorers, Scorers) and getattr(scorers, n) is None)
    if missing_scorers:
        needs = ", ".join(FLAGS[n] for n in missing_scorers)
        raise PixartError(f"scoring {', '.join(categories)} with --scorer {scorer} needs {needs}")
    if limit is not None and limit <= 0:
        raise PixartError(f"--limit must be positive, got {limit}")
    out = Path(output_dir)
    prompts = {c: read_prompts(prompts_dir, c)[:limit] for c in categories}  # read them all before any work
    if make_images is not None:
        items = [item for c in categories for item in layout(c, prompts[c], images_per_prompt, seed)]
        generate_images(items, out, make_images, settings=generation, shard=shard, progress=progress)
    else:
        shard.wait()
    if not shard.is_main:
        return None
    if not isinstance(scorers, Scorers):
        scorers = scorers()

    results: dict[str, CategoryResult] = {}
    for category in categories:
        if make_images is not None:
            files = [(out / i.path, i.prompt) for i in layout(category, prompts[category], images_per_prompt, seed)]
        else:
            files = discover_samples(out / category)
        paths, texts = [f for f, _ in files], [t for _, t in files]
        evaluator, scores, parts = score_category(
            category, paths, texts, scorers, scorer=scorer, prompts_dir=prompts_dir, progress=progress
        )
        per_image = [
            {"file": p.name, "prompt": t, "score": s, **{k: v[i] for k, v in parts.items()}}
            for i, (p, t, s) in enumerate(zip(paths, texts, scores, strict=True))
        ]
        write_json(out / category / SCORES_FILE, per_image)
        results[category] = CategoryResult(category, evaluator, float(np.mean(scores)), len(paths), len(set(texts)))
    sources = {n: getattr(scorers, n).source for n in ("blip", "clip", "detector", "vqascore") if getattr(scorers, n)}
    settings = {
        "benchmark": "t2i-compbench",
        "prompts": str(prompts_dir),
        "categories": categories,
        "images_per_prompt": images_per_prompt if make_images is not None else None,
        "seed": seed,
        "limit": limit,
        "scorer": scorer,
        "evaluators": sources,
        "detector_threshold": scorers.detector.threshold if scorers.detector else None,
        "noun_phrases": "rule-based chunker (pixart_cli.evaluation.compbench.noun_phrases), not spaCy",
        "generation": generation if make_images is not None else _recorded_generation(out),
        "processes": shard.count,
    }
    return finish_report("t2i-compbench", results, settings, out, started)


def _recorded_generation(out: Path) -> dict | None:
    try:
        return json.loads((out / SETTINGS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def finish_report(benchmark: str, results: dict[str, CategoryResult], settings: dict, out: Path, started: float):
    data = {
        "benchmark": benchmark,
        "categories": {
            c: {"evaluator": r.evaluator, "mean": r.mean, "images": r.images, "prompts": r.prompts, **r.extra}
            for c, r in results.items()
        },
        "seconds": round(time.monotonic() - started, 2),
        "settings": settings,
    }
    path = out / REPORT_FILE
    write_json(path, data)
    return BenchReport(benchmark, results, settings, path)
