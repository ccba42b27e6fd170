"""ShapesBench: held-out ShapesWorld prompts in T2I-CompBench's layout (category ``shapes``), scored exactly.

Prompts come from ``pixart_cli.shapesworld.prompts.heldout_prompts`` and are scored by
``pixart_cli.shapesworld.detect.score_images``; categories color, shape, spatial, complex.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pixart_cli.errors import PixartError
from pixart_cli.evaluation import Progress, no_progress
from pixart_cli.evaluation.generate import ImageMaker, Shard, generate_images
from pixart_cli.evaluation.t2i_compbench.bench import BenchReport, CategoryResult, finish_report, write_json
from pixart_cli.evaluation.t2i_compbench.layout import SCORES_FILE, SHAPES_CATEGORIES, layout
from pixart_cli.evaluation.t2i_compbench.scorers import open_rgb
from pixart_cli.shapesworld.detect import CHECKS, score_images
from pixart_cli.shapesworld.prompts import concept_prompts, heldout_prompts


def evaluate_shapes(
    output_dir: str | os.PathLike,
    make_images: ImageMaker | None,
    *,
    generation: dict,
    num_prompts: int = 100,
    images_per_prompt: int = 10,
    seed: int = 0,
    aspect: float = 1.0,
    prompt_style: str = "dense",
    shard: Shard | None = None,
    progress: Progress = no_progress,
    concept: str | None = None,
) -> BenchReport | None:
    """The ShapesWorld benchmark: held-out prompts, T2I-CompBench's layout (category ``shapes``), exact scoring.

    ``aspect`` (width / height) lays the prompts' scenes out for the images' shape (e.g. 80×48 for a multi-aspect
    model), so that every prompt's objects fit the canvas it is drawn on. ``prompt_style`` ``"short"`` words the
    same scenes without sizes and background, as a newcomer would (``heldout_prompts``); size is then not scored.

    Reports color, shape, spatial and complex (``shapes_detect``'s checks; spatial and complex over the prompts
    they apply to) plus the other checks (presence, count, binding, size) as extras of ``complex``, and the
    acceptance view: ``one_object`` colour and shape (one-object prompts), ``both_objects`` (binding on the
    two-object prompts) beside spatial.

    ``concept`` (a concept colour, e.g. "pink"): one-object prompts of that colour across the shapes instead
    (``concept_prompts``), for a model taught it; the detector then looks for that colour too.
    """

    started = time.monotonic()
    shard = shard or Shard()
    if num_prompts <= 0:
        raise PixartError(f"--limit must be positive, got {num_prompts}")
    if concept is not None:
        try:
            prompts = concept_prompts(concept, num_prompts, seed, aspect=aspect, style=prompt_style)
        except ValueError as exc:
            raise PixartError(f"--concept: {exc}") from None
    else:
        prompts = heldout_prompts(num_prompts, seed, aspect=aspect, style=prompt_style)
    out = Path(output_dir)
    items = layout("shapes", [p.text for p in prompts], images_per_prompt, seed)
    generate_images(items, out, make_images, settings=generation, shard=shard, progress=progress)
    if not shard.is_main:
        return None
    progress("score:shapes", 0, len(items))
    specs = [prompts[k // images_per_prompt].spec for k in range(len(items))]
    report = score_images([open_rgb(out / i.path) for i in items], specs)
    progress("score:shapes", len(items), len(items))
    per_image = [
        {"file": Path(i.path).name, "prompt": i.prompt, **c} for i, c in zip(items, report.per_prompt, strict=True)
    ]
    write_json(out / "shapes" / SCORES_FILE, per_image)
    results = {}
    for category in SHAPES_CATEGORIES:
        applies = [k for k, checks in enumerate(report.per_prompt) if checks[category] is not None]
        results[category] = CategoryResult(
            category,
            "shapes-detect",
            report.categories.get(category, float("nan")),
            len(applies),
            len({items[k].prompt for k in applies}),
        )
    # Checks that apply to no prompt (size, for short prompts) are left out.
    extras = (c for c in CHECKS if c not in SHAPES_CATEGORIES and c in report.categories)
    results["complex"].extra = {c: report.categories[c] for c in extras}
    # The acceptance view (docs/shapes.md): attributes on one-object prompts, both objects on two-object ones.
    counts = [len(spec.objects) for spec in specs]
    for category, check, n, name in (
        ("color", "color", 1, "one_object"),
        ("shape", "shape", 1, "one_object"),
        ("spatial", "binding", 2, "both_objects"),
    ):
        picked = [checks[check] for checks, k in zip(report.per_prompt, counts, strict=True) if k == n]
        if picked:
            results[category].extra[name] = sum(map(bool, picked)) / len(picked)
    settings = {
        "benchmark": "shapes",
        "num_prompts": num_prompts,
        "images_per_prompt": images_per_prompt,
        "seed": seed,
        "prompts": "pixart_cli.data.shapes.heldout_prompts(num_prompts, seed, aspect=aspect, style=prompt_style)"
        if concept is None
        else f"pixart_cli.shapesworld.prompts.concept_prompts({concept!r}, num_prompts, seed, aspect=aspect, "
        "style=prompt_style)",
        "aspect": aspect,
        "prompt_style": prompt_style,
        "scorer": "pixart_cli.data.shapes_detect.score_images",
        "generation": generation,
        "processes": shard.count,
    }
    return finish_report("shapes", results, settings, out, started)
