"""An exact classical detector for ShapesWorld pictures, and scoring of generated images against prompt specs.

The detector knows the world (``pixart_cli.data.shapes``): its palette, its shapes and its sizes.

1. Background: the median colour of the image border (robust to an object touching the edge).
2. Colour segmentation: each pixel is explained as a blend ``background + alpha · (colour − background)`` of the
   background with each palette colour, which is exactly what antialiasing produces. The colour whose blend fits
   best (smallest residual) claims the pixel if it covers at least half of it (``alpha ≥ 0.5``) and the residual
   is small enough (``max_residual`` tolerates slightly-off and noisy colours); otherwise the pixel is
   background. Plain nearest-colour labelling would mislabel edges: half yellow on black is closer to orange
   than to yellow.
3. Connected components (8-connected) of each colour; components smaller than ``min_area`` of a small
   object's box are noise and are dropped.
4. Shape by geometry: the component's soft coverage (its ``alpha``, which keeps the sub-pixel outline and
   averages noise away) is cropped to its bounding box and described by an 8×8 box-normalised occupancy grid
   (empty or full corners, thin or full arms, top/bottom asymmetry of the triangle), its fill ratio (1 square,
   ~0.79 circle, ~0.5 triangle and diamond) and its aspect ratio (2 for the semicircle). The nearest reference
   descriptor wins. References are renders of every shape at the world's two nominal sizes for this image (16
   sub-pixel offsets; sharp, binary and slightly blurred, since generated images are rarely crisp) and at a
   large size (the ideal outline): at 9 px a rasterised diamond is nearly an octagon, so it has to be compared
   with a 9 px diamond rather than with the ideal one.
5. Size from the box's longer side against the geometric mean of the two nominal extents; relations from box
   centres along the dominant axis.

Scoring (``score_image``) matches detections to a ``PromptSpec`` and returns per-prompt booleans:

* ``presence``: at least as many objects as requested; ``count``: exactly as many;
* ``color``: the requested colours are all there (one object each); ``shape``: likewise the shapes;
* ``binding``: every requested (colour, shape) object is there, one object each;
* ``size``: a binding assignment also gets the requested sizes (None when no size is requested);
* ``spatial``: a binding assignment also satisfies the requested relation (None without a relation);
* ``complex``: binding, count, and spatial and size where they apply.

``score_images`` averages them into categories named like T2I-CompBench's (``color``, ``shape``, ``spatial``,
``complex``) plus ``presence``, ``count``, ``binding`` and ``size``; each mean is over the prompts it applies
to. Note that ``color`` and ``shape`` here check the attributes alone; ``binding`` checks that they go together.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pixart_cli.shapesworld.prompts import ObjectSpec, PromptSpec
from pixart_cli.shapesworld.world import (
    COLOUR_NAMES,
    SHAPES,
    SIZE_EXTENT,
    SIZES,
    Scene,
    colour_rgb,
    shape_coverage,
    spatial_relation,
)

# A box whose longer side is above this fraction of the short side is "large".
SIZE_THRESHOLD = math.sqrt(SIZE_EXTENT["small"] * SIZE_EXTENT["large"])
_GRID = 8
_MAX_MATCHED = 8  # detections (largest first) considered when pairing them with requested or true objects
_ASPECT_WEIGHT = 2.0  # the log aspect ratio separates the semicircle; weigh it like several grid cells

CATEGORIES: tuple[str, ...] = ("color", "shape", "spatial", "complex")
CHECKS: tuple[str, ...] = ("presence", "count", "color", "shape", "binding", "size", "spatial", "complex")

# ----------------------------------------------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectedObject:
    """One detected object; ``centre`` and ``bbox`` are fractions of the image width and height like a Scene's."""

    shape: str
    colour: str
    size: str
    centre: tuple[float, float]
    bbox: tuple[float, float, float, float]
    area: int  # pixels
    shape_distance: float  # to the nearest reference descriptor: large values mean an unusual outline


@dataclass(frozen=True)
class Detections:
    """All objects found in one image, largest first."""

    objects: tuple[DetectedObject, ...]
    width: int
    height: int
    background: tuple[float, float, float]

    def relation(self, i: int, j: int) -> str:
        """Where object ``i`` is relative to object ``j``."""
        (xi, yi), (xj, yj) = self.objects[i].centre, self.objects[j].centre
        return spatial_relation((xi - xj) * self.width, (yi - yj) * self.height)


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image, dtype=np.float32)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (height, width, 3), got {array.shape}")
    return array


def _segment(
    rgb: np.ndarray, background: np.ndarray, max_residual: float, colours: Sequence[str] = COLOUR_NAMES
) -> tuple[np.ndarray, np.ndarray]:
    """Unmix each pixel from the background: index into ``colours`` per pixel (-1: background or unexplained) and
    the coverage (alpha, shape (H, W, K)) each colour would need to explain it."""
    palette = np.asarray([colour_rgb(name) for name in colours], dtype=np.float32) - background  # (K, 3)
    offset = rgb - background  # (H, W, 3)
    alpha = offset @ palette.T / (palette**2).sum(axis=1)  # (H, W, K)
    residual = np.linalg.norm(offset[..., None, :] - np.maximum(alpha, 0)[..., None] * palette, axis=-1)
    # Pick the colour that explains the pixel best, then ask whether it covers at least half the pixel: an orange
    # edge pixel at 45% coverage on black must become background, not red (which also fits it, worse, at 55%).
    residual[alpha < 0.25] = np.inf
    best = residual.argmin(axis=-1)[..., None]
    ok = (np.take_along_axis(residual, best, -1) <= max_residual) & (np.take_along_axis(alpha, best, -1) >= 0.5)
    return np.where(ok[..., 0], best[..., 0], -1), alpha


def _components(labels: np.ndarray) -> list[tuple[int, int, int, np.ndarray]]:
    """8-connected components of equal non-negative labels, as (label, top, left, mask cropped to the box).

    Union-find over horizontal runs, so the Python loop runs once per run rather than once per pixel.
    """
    height, width = labels.shape
    runs: list[tuple[int, int, int, int]] = []  # (row, start, end exclusive, label)
    parent: list[int] = []

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    previous: list[int] = []
    for row in range(height):
        values = labels[row]
        cuts = np.flatnonzero(np.diff(values)) + 1
        current = []
        for start, end in zip([0, *cuts.tolist()], [*cuts.tolist(), width], strict=True):
            label = int(values[start])
            if label < 0:
                continue
            index = len(runs)
            runs.append((row, start, end, label))
            parent.append(index)
            current.append(index)
            for p in previous:
                _, p_start, p_end, p_label = runs[p]
                if p_label == label and p_start <= end and p_end >= start:  # overlapping or diagonal neighbours
                    parent[find(p)] = find(index)
        previous = current

    groups: dict[int, list[tuple[int, int, int, int]]] = {}
    for index, run in enumerate(runs):
        groups.setdefault(find(index), []).append(run)
    components = []
    for group in groups.values():
        top, bottom = group[0][0], group[-1][0] + 1  # runs are appended row by row
        left, right = min(r[1] for r in group), max(r[2] for r in group)
        mask = np.zeros((bottom - top, right - left), dtype=bool)
        for row, start, end, _ in group:
            mask[row - top, start - left : end - left] = True
        components.append((group[0][3], top, left, mask))
    return components


def _box_resample(values: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Area-average a 2-D array onto a rows × cols grid (cells may cut through pixels)."""

    def weights(n: int, m: int) -> np.ndarray:
        cells = np.linspace(0, n, m + 1)
        lo = np.maximum(np.arange(n)[None, :], cells[:-1, None])
        hi = np.minimum(np.arange(1, n + 1)[None, :], cells[1:, None])
        return np.clip(hi - lo, 0, None) * (m / n)

    return weights(values.shape[0], rows) @ values @ weights(values.shape[1], cols).T


def shape_features(coverage: np.ndarray) -> np.ndarray:
    """The geometric descriptor of an object's coverage (0–1, binary or soft) cropped to its box.

    An 8×8 box-normalised occupancy grid, the fill ratio and the (weighted) log aspect ratio.
    """
    height, width = coverage.shape
    grid = _box_resample(coverage.astype(np.float64), _GRID, _GRID)
    return np.concatenate([grid.ravel(), [coverage.mean(), _ASPECT_WEIGHT * math.log(width / height)]])


_OFFSETS = (0.0, 0.25, 0.5, 0.75)  # sub-pixel positions of the reference renders
_BLURS = (0.5, 0.8)  # Gaussian blurs (pixels) of the references: generated images are rarely crisp


def _blur(values: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with zero padding."""
    radius = math.ceil(3 * sigma)
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    rows = np.apply_along_axis(np.convolve, 0, values, kernel, mode="same")
    return np.apply_along_axis(np.convolve, 1, rows, kernel, mode="same")


@functools.cache
def _references(extent: float) -> tuple[np.ndarray, np.ndarray]:
    """Descriptors of every shape rendered at ``extent`` pixels, and their shape indices (see the module docstring).

    Each of the 16 sub-pixel positions contributes its antialiased, binary and blurred coverage.
    """
    side = math.ceil(extent) + 4
    features, shapes = [], []
    for index, shape in enumerate(SHAPES):
        for dx, dy in itertools.product(_OFFSETS, _OFFSETS):
            sharp = shape_coverage(shape, (side / 2 + dx, side / 2 + dy), extent, side, side)
            for coverage in (sharp, sharp >= 0.5, *(_blur(sharp, sigma) for sigma in _BLURS)):
                mask = coverage >= 0.5
                rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
                features.append(shape_features(coverage[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]))
                shapes.append(index)
    return np.stack(features), np.asarray(shapes)


def classify_shape(coverage: np.ndarray, extents: Sequence[float] = (64.0,)) -> tuple[str, float]:
    """The shape of the reference render nearest to the descriptor of ``coverage`` (cropped to the object's box),
    and the distance to it.

    ``extents``: sizes (pixels) of the reference renders to compare with; large ones stand for ideal outlines.
    """
    feature = shape_features(coverage)
    best_shape, best_distance = 0, math.inf
    for extent in extents:
        references, shapes = _references(round(extent, 1))
        distances = np.linalg.norm(references - feature, axis=1)
        k = int(distances.argmin())
        if distances[k] < best_distance:
            best_shape, best_distance = int(shapes[k]), float(distances[k])
    return SHAPES[best_shape], best_distance


def detect(
    image: Image.Image | np.ndarray,
    *,
    min_area: float = 0.15,
    max_residual: float = 60.0,
    colours: Sequence[str] = COLOUR_NAMES,
) -> Detections:
    """Find the objects in a ShapesWorld picture (rendered or generated): a PIL image or an (H, W, 3) array of
    0–255 values.

    ``min_area``: components smaller than this fraction of a small object's box (extent²) are ignored as noise.
    ``max_residual``: how far (RGB units, 0–255) a pixel may be from any background/palette blend and still count.
    ``colours``: the colours to look for (the palette; add concept colours such as "pink" to find them too).
    """
    rgb = _as_array(image)
    height, width = rgb.shape[:2]
    border = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])
    background = np.median(border, axis=0)
    labels, alpha = _segment(rgb, background, max_residual, colours)
    short = min(width, height)
    min_pixels = min_area * (SIZE_EXTENT["small"] * short) ** 2
    extents = (*(SIZE_EXTENT[size] * short for size in SIZES), 64.0)
    objects = []
    for label, top, left, mask in _components(labels):
        area = int(mask.sum())
        if area < min_pixels:
            continue
        h, w = mask.shape
        box = (slice(top, top + h), slice(left, left + w))
        # Soft coverage keeps the sub-pixel outline and averages noise away; pixels of other colours count as empty.
        soft = np.clip(alpha[box][..., label], 0, 1) * ((labels[box] == label) | (labels[box] < 0))
        shape, distance = classify_shape(soft, extents)
        size = "large" if max(h, w) / short > SIZE_THRESHOLD else "small"
        bbox = (left / width, top / height, (left + w) / width, (top + h) / height)
        centre = ((bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2)
        objects.append(DetectedObject(shape, colours[label], size, centre, bbox, area, distance))
    objects.sort(key=lambda o: -o.area)
    return Detections(tuple(objects), width, height, tuple(float(c) for c in background))


# ----------------------------------------------------------------------------------------------------------------
# Checking the detector against ground truth
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneComparison:
    """Detections against a ground-truth scene; objects are paired by nearest centres."""

    count_ok: bool
    objects: int  # ground-truth objects
    shape_ok: int  # paired objects whose shape is right
    colour_ok: int
    size_ok: int
    relations: int  # ground-truth relations
    relation_ok: int  # relations whose two objects were both paired and stand in the same relation


def compare_with_scene(detections: Detections, scene: Scene) -> SceneComparison:
    """Compare what the detector found with the scene that was rendered."""
    truth, found = scene.objects, detections.objects[:_MAX_MATCHED]
    if len(truth) <= len(found):
        options = [dict(enumerate(p)) for p in itertools.permutations(range(len(found)), len(truth))]
    else:
        options = [{t: j for j, t in enumerate(p)} for p in itertools.permutations(range(len(truth)), len(found))]
    pairs = min(options, key=lambda m: sum(math.dist(truth[i].centre, found[j].centre) for i, j in m.items()))
    matched = [(truth[i], found[j]) for i, j in pairs.items()]
    relation_ok = sum(
        r.first in pairs and r.second in pairs and detections.relation(pairs[r.first], pairs[r.second]) == r.relation
        for r in scene.relations
    )
    return SceneComparison(
        count_ok=len(detections.objects) == len(truth),
        objects=len(truth),
        shape_ok=sum(t.shape == f.shape for t, f in matched),
        colour_ok=sum(t.colour == f.colour for t, f in matched),
        size_ok=sum(t.size == f.size for t, f in matched),
        relations=len(scene.relations),
        relation_ok=relation_ok,
    )


# ----------------------------------------------------------------------------------------------------------------
# Scoring generated images against prompts
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreReport:
    """Per-prompt checks (True / False, None where a check does not apply) and their means per category."""

    per_prompt: tuple[dict[str, bool | None], ...]
    categories: dict[str, float]


def score_detections(detections: Detections, spec: PromptSpec) -> dict[str, bool | None]:
    """The checks of the module docstring for one image's detections against what its prompt asked for."""
    wanted, found = spec.objects, detections.objects
    # Only the largest detections can stand for requested objects: it keeps the search small on a speckled image.
    assignments = list(itertools.permutations(range(min(len(found), _MAX_MATCHED)), len(wanted)))

    def exists(match: Callable[[ObjectSpec, DetectedObject], bool]) -> bool:
        return any(all(match(w, found[j]) for w, j in zip(wanted, a, strict=True)) for a in assignments)

    def bound(a: tuple[int, ...]) -> bool:
        return all(w.shape == found[j].shape and w.colour == found[j].colour for w, j in zip(wanted, a, strict=True))

    binding = [a for a in assignments if bound(a)]
    has_size = any(w.size is not None for w in wanted)
    size = (
        any(all(w.size in (None, found[j].size) for w, j in zip(wanted, a, strict=True)) for a in binding)
        if has_size
        else None
    )
    spatial = None if spec.relation is None else any(detections.relation(a[0], a[1]) == spec.relation for a in binding)
    count = len(found) == len(wanted)
    return {
        "presence": len(found) >= len(wanted),
        "count": count,
        "color": exists(lambda w, f: w.colour == f.colour),
        "shape": exists(lambda w, f: w.shape == f.shape),
        "binding": bool(binding),
        "size": size,
        "spatial": spatial,
        "complex": bool(binding) and count and spatial is not False and size is not False,
    }


def score_image(image: Image.Image | np.ndarray, spec: PromptSpec) -> dict[str, bool | None]:
    """Detect the objects in ``image`` and check them against ``spec`` (see the module docstring). The detector
    looks for the palette plus any concept colour the prompt asks for (pink, for a model taught pink)."""
    asked = tuple(dict.fromkeys(o.colour for o in spec.objects if o.colour not in COLOUR_NAMES))
    return score_detections(detect(image, colours=(*COLOUR_NAMES, *asked)), spec)


def score_images(images: Sequence[Image.Image | np.ndarray], specs: Sequence[PromptSpec]) -> ScoreReport:
    """Score each image against its prompt's spec and average the checks over the prompts they apply to."""
    if len(images) != len(specs):
        raise ValueError(f"got {len(images)} images for {len(specs)} prompt specs")
    per_prompt = tuple(score_image(image, spec) for image, spec in zip(images, specs, strict=True))
    categories = {}
    for check in (*CATEGORIES, *(c for c in CHECKS if c not in CATEGORIES)):
        values = [p[check] for p in per_prompt if p[check] is not None]
        if values:
            categories[check] = sum(values) / len(values)
    return ScoreReport(per_prompt, categories)
