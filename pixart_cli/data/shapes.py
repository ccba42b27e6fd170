"""ShapesWorld: a tiny synthetic text-to-image world of coloured shapes with exact ground truth.

A scene holds 1–3 objects on a plain background. Each object is one of 6 shapes in one of 8 colours and 2 sizes;
every pair of objects stands in a clear spatial relation (left of / right of / above / below). Scenes are sampled
from a seed, rendered at any resolution (32×32, 64×64, 64×48, ...), captioned densely or sparsely, and written to
disk in the layouts real data comes in. ``pixart_cli.data.shapes_detect`` reads the pictures back exactly, so
generated images can be scored against their prompts.

Geometry. Positions are fractions of the image width and height; sizes are fractions of the *short* side, so a
circle stays round on a 64×48 canvas. A scene is sampled for one aspect ratio (width / height) and renders at any
resolution of that aspect. Every object's bounding box keeps ``BORDER_MARGIN`` from the edges and ``OBJECT_GAP``
from the other boxes, and for every pair of centres the horizontal and vertical offsets differ by at least
``RELATION_MARGIN``, so "left of" versus "above" is never a judgement call. Layouts that cannot meet these rules
(three large objects rarely fit) are resampled.

Shapes were chosen to stay distinguishable when a small object is only 9 px wide (32×32 images): a star or a
hexagon collapses into a blob at that size, whereas these differ in fill ratio, corner occupancy, top/bottom
asymmetry or aspect ratio (the semicircle is twice as wide as it is tall). Sizes are 0.28 and 0.42 of the short
side (9 and 13 px at 32×32, 18 and 27 px at 64×64).

Class labels (stage 1, class-conditional DiT): ``label = SHAPES.index(shape) * len(COLOURS) + colour index`` of
the scene's *primary object*, the first large object or, if none is large, the first object: 6 × 8 = 48 classes
named ``"<colour>_<shape>"`` (``CLASS_NAMES``). Class folders on disk are ``"<label:02d>_<colour>_<shape>"`` so
that sorting the folder names gives label order.

Held-out split (compositional generalisation). Training scenes (``split="train"``) never contain

* any (shape, colour) pair in ``HELDOUT_SHAPE_COLOURS``: shape ``k`` in colour ``(3k + 1) mod 8``, one colour per
  shape (orange circle, cyan square, white triangle, yellow diamond, blue cross, red semicircle); and
* any two objects whose colours stand in an arrangement of ``HELDOUT_ARRANGEMENTS``: colour ``i`` left of colour
  ``(i + 3) mod 8`` for even ``i`` and colour ``i`` above colour ``(i + 5) mod 8`` for odd ``i`` (8 ordered
  arrangements; "A right of B" is the same arrangement as "B left of A"). The mirrored arrangement (B left of A)
  and the same colours on the other axis do appear in training.

Every shape, colour and colour pair is still seen in training; only these combinations are new.
``heldout_prompts`` builds evaluation prompts from exactly these combinations.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import json
import math
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

from pixart_cli.errors import PixartError

# ----------------------------------------------------------------------------------------------------------------
# The world
# ----------------------------------------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "semicircle")

# Saturated colours at least ~100 apart in RGB, and far from both backgrounds.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 135, 0),
    "yellow": (240, 230, 40),
    "green": (30, 170, 40),
    "cyan": (0, 210, 230),
    "blue": (40, 60, 230),
    "purple": (170, 50, 220),
    "white": (250, 250, 250),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

BACKGROUNDS: dict[str, tuple[int, int, int]] = {"grey": (128, 128, 128), "black": (0, 0, 0)}

SIZES: tuple[str, ...] = ("small", "large")
# Extent (the longer side of the bounding box) as a fraction of the image's short side.
SIZE_EXTENT: dict[str, float] = {"small": 0.28, "large": 0.42}

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
INVERSE_RELATION: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

# Layout rules, in units of the short side (see the module docstring).
BORDER_MARGIN = 0.03
OBJECT_GAP = 0.06
RELATION_MARGIN = 0.10

MAX_OBJECTS = 3

Split = Literal["train", "all"]
CaptionStyle = Literal["dense", "sparse", "mixed", "varied"]
CAPTION_STYLES: tuple[str, ...] = ("dense", "sparse", "mixed", "varied")
DatasetFormat = Literal["folder", "jsonl", "imagefolder"]
PromptStyle = Literal["dense", "short"]
PROMPT_STYLES: tuple[str, ...] = ("dense", "short")

# ----------------------------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeObject:
    """One object. ``centre`` and ``bbox`` (x0, y0, x1, y1) are fractions of the image width and height."""

    shape: str
    colour: str
    size: str
    centre: tuple[float, float]
    bbox: tuple[float, float, float, float]


@dataclass(frozen=True)
class Relation:
    """``objects[first]`` is ``relation`` ``objects[second]`` (e.g. 0 "left of" 1)."""

    first: int
    relation: str
    second: int


@dataclass(frozen=True)
class Scene:
    """A full description of one picture; ``render`` draws it and ``caption`` describes it."""

    objects: tuple[ShapeObject, ...]
    relations: tuple[Relation, ...]
    background: str
    aspect: float = 1.0  # width / height

    def relation(self, i: int, j: int) -> str:
        """Where object ``i`` is relative to object ``j``."""
        (xi, yi), (xj, yj) = self.objects[i].centre, self.objects[j].centre
        width, height = _canvas(self.aspect)
        return spatial_relation((xi - xj) * width, (yi - yj) * height)


def spatial_relation(dx: float, dy: float) -> str:
    """The relation of a point offset by (dx, dy) from another, along the dominant axis (y grows downwards).

    The offsets must be in the same unit on both axes (pixels, or fractions of the short side).
    """
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _canvas(aspect: float) -> tuple[float, float]:
    """Canvas width and height in units of the short side."""
    return (aspect, 1.0) if aspect >= 1.0 else (1.0, 1.0 / aspect)


def _half_extent(shape: str, size: str) -> tuple[float, float]:
    half = SIZE_EXTENT[size] / 2
    return (half, half / 2) if shape == "semicircle" else (half, half)


def _as_rng(seed: int | np.random.Generator) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _check_aspect(aspect: float) -> None:
    if not 1 / 3 <= aspect <= 3:
        raise ValueError(f"aspect (width / height) must be between 1/3 and 3, got {aspect}")


# ----------------------------------------------------------------------------------------------------------------
# Class labels and the held-out split
# ----------------------------------------------------------------------------------------------------------------

CLASS_NAMES: tuple[str, ...] = tuple(f"{colour}_{shape}" for shape in SHAPES for colour in COLOUR_NAMES)
NUM_CLASSES = len(CLASS_NAMES)


def class_label(shape: str, colour: str) -> int:
    """The stage-1 class index of a (shape, colour) pair; see the module docstring."""
    return SHAPES.index(shape) * len(COLOUR_NAMES) + COLOUR_NAMES.index(colour)


def class_folder(label: int) -> str:
    """The class-folder name of ``label``: ``"<label:02d>_<colour>_<shape>"`` (sorts in label order)."""
    return f"{label:02d}_{CLASS_NAMES[label]}"


def primary_object(scene: Scene) -> ShapeObject:
    """The object a scene's class label names: the first large object, else the first object."""
    return next((obj for obj in scene.objects if obj.size == "large"), scene.objects[0])


def scene_label(scene: Scene) -> int:
    """The stage-1 class label of a scene (that of its primary object)."""
    obj = primary_object(scene)
    return class_label(obj.shape, obj.colour)


HELDOUT_SHAPE_COLOURS: frozenset[tuple[str, str]] = frozenset(
    (shape, COLOUR_NAMES[(3 * k + 1) % len(COLOUR_NAMES)]) for k, shape in enumerate(SHAPES)
)
# (colour A, "left of" | "above", colour B): "an A object is left of / above a B object".
HELDOUT_ARRANGEMENTS: frozenset[tuple[str, str, str]] = frozenset(
    [(COLOUR_NAMES[i], "left of", COLOUR_NAMES[(i + 3) % 8]) for i in (0, 2, 4, 6)]
    + [(COLOUR_NAMES[i], "above", COLOUR_NAMES[(i + 5) % 8]) for i in (1, 3, 5, 7)]
)


def arrangement(colour_a: str, relation: str, colour_b: str) -> tuple[str, str, str]:
    """Canonical form of "an ``colour_a`` object is ``relation`` a ``colour_b`` object" (left of / above only)."""
    if relation in ("right of", "below"):
        return (colour_b, INVERSE_RELATION[relation], colour_a)
    return (colour_a, relation, colour_b)


def _heldout_arrangement_in(objects: Sequence[ShapeObject], relations: Sequence[Relation]) -> bool:
    return any(
        arrangement(objects[r.first].colour, r.relation, objects[r.second].colour) in HELDOUT_ARRANGEMENTS
        for r in relations
    )


def uses_heldout(scene: Scene) -> bool:
    """Whether a scene contains a held-out (shape, colour) pair or colour arrangement."""
    if any((obj.shape, obj.colour) in HELDOUT_SHAPE_COLOURS for obj in scene.objects):
        return True
    return _heldout_arrangement_in(scene.objects, scene.relations)


# ----------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------

_OBJECT_TRIES = 64  # candidate positions drawn per object (at once) before the layout restarts
_LAYOUT_TRIES = 50  # layouts tried before giving up on these shapes and sizes


def _fits(x: np.ndarray, y: np.ndarray, hx: float, hy: float, other: tuple[float, float, float, float]) -> np.ndarray:
    """Which candidate centres (x, y) keep the gap to a placed object and stand in a clear relation to it."""
    dx, dy = np.abs(x - other[0]), np.abs(y - other[1])
    gap = np.maximum(dx - hx - other[2], dy - hy - other[3])
    return (gap >= OBJECT_GAP) & (np.abs(dx - dy) >= RELATION_MARGIN)


def _layout(
    rng: np.random.Generator,
    halves: Sequence[tuple[float, float]],
    aspect: float,
    accept: Callable[[list[tuple[float, float]]], bool],
) -> list[tuple[float, float]] | None:
    """Centres (short-side units) for objects of the given half-extents, or None if none was found."""
    width, height = _canvas(aspect)
    for _ in range(_LAYOUT_TRIES):
        placed: list[tuple[float, float, float, float]] = []
        for hx, hy in halves:
            x = rng.uniform(BORDER_MARGIN + hx, width - BORDER_MARGIN - hx, _OBJECT_TRIES)
            y = rng.uniform(BORDER_MARGIN + hy, height - BORDER_MARGIN - hy, _OBJECT_TRIES)
            ok = np.ones(_OBJECT_TRIES, dtype=bool)
            for other in placed:
                ok &= _fits(x, y, hx, hy, other)
            if not ok.any():
                break
            k = int(ok.argmax())  # the first candidate that fits
            placed.append((float(x[k]), float(y[k]), hx, hy))
        else:
            centres = [(x, y) for x, y, _, _ in placed]
            if accept(centres):
                return centres
    return None


def _build_scene(
    kinds: Sequence[tuple[str, str, str]], centres: Sequence[tuple[float, float]], background: str, aspect: float
) -> Scene:
    width, height = _canvas(aspect)
    objects = []
    for (shape, colour, size), (x, y) in zip(kinds, centres, strict=True):
        hx, hy = _half_extent(shape, size)
        bbox = ((x - hx) / width, (y - hy) / height, (x + hx) / width, (y + hy) / height)
        objects.append(ShapeObject(shape, colour, size, (x / width, y / height), bbox))
    relations = tuple(
        Relation(i, spatial_relation(centres[i][0] - centres[j][0], centres[i][1] - centres[j][1]), j)
        for i in range(len(centres))
        for j in range(i + 1, len(centres))
    )
    return Scene(tuple(objects), relations, background, aspect)


def _scene_for(
    rng: np.random.Generator,
    kinds: Sequence[tuple[str, str, str]],
    background: str,
    aspect: float,
    accept: Callable[[Scene], bool],
) -> Scene | None:
    halves = [_half_extent(shape, size) for shape, _, size in kinds]

    def accept_centres(centres: list[tuple[float, float]]) -> bool:
        return accept(_build_scene(kinds, centres, background, aspect))

    centres = _layout(rng, halves, aspect, accept_centres)
    return None if centres is None else _build_scene(kinds, centres, background, aspect)


def sample_scene(
    seed: int | np.random.Generator,
    *,
    aspect: float = 1.0,
    split: Split = "train",
    num_objects: int | None = None,
) -> Scene:
    """Sample a scene: 1–3 objects (uniform, or ``num_objects``) with distinct (shape, colour) pairs.

    Shapes, colours, sizes and the background are uniform; positions are uniform subject to the layout rules.
    ``split="train"`` leaves out the held-out combinations, ``"all"`` samples the whole world.
    """
    if split not in ("train", "all"):
        raise ValueError(f"split must be 'train' or 'all', got {split!r}")
    if num_objects is not None and not 1 <= num_objects <= MAX_OBJECTS:
        raise ValueError(f"num_objects must be between 1 and {MAX_OBJECTS}, got {num_objects}")
    _check_aspect(aspect)
    rng = _as_rng(seed)
    labels = [label for label in range(NUM_CLASSES) if split == "all" or not _label_heldout(label)]

    def accept(scene: Scene) -> bool:
        return split == "all" or not _heldout_arrangement_in(scene.objects, scene.relations)

    while True:
        count = num_objects if num_objects is not None else int(rng.integers(1, MAX_OBJECTS + 1))
        picked = rng.choice(len(labels), size=count, replace=False)
        kinds = [(*_label_kind(labels[k]), _pick(rng, SIZES)) for k in picked]
        background = _pick(rng, tuple(BACKGROUNDS))
        scene = _scene_for(rng, kinds, background, aspect, accept)
        if scene is not None:
            return scene


def _label_kind(label: int) -> tuple[str, str]:
    return SHAPES[label // len(COLOUR_NAMES)], COLOUR_NAMES[label % len(COLOUR_NAMES)]


def _label_heldout(label: int) -> bool:
    return _label_kind(label) in HELDOUT_SHAPE_COLOURS


# ----------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------

_SUPERSAMPLE = 4  # antialiasing: draw at 4× and average each 4×4 block into coverage


def _unit_polygon(shape: str) -> list[tuple[float, float]]:
    """The outline of a shape centred on the origin, inside [-0.5, 0.5]² (y down); the extent is 1."""
    if shape == "circle":
        return [(0.5 * math.cos(t), 0.5 * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 96, endpoint=False)]
    if shape == "square":
        return [(-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)]
    if shape == "triangle":
        return [(0.0, -0.5), (0.5, 0.5), (-0.5, 0.5)]
    if shape == "diamond":
        return [(0.0, -0.5), (0.5, 0.0), (0.0, 0.5), (-0.5, 0.0)]
    if shape == "cross":
        w = 0.18  # half the arm width: arms a bit over a third of the extent stay visible at 9 px
        return [(-w, -0.5), (w, -0.5), (w, -w), (0.5, -w), (0.5, w), (w, w), (w, 0.5), (-w, 0.5), (-w, w),
                (-0.5, w), (-0.5, -w), (-w, -w)]  # fmt: skip
    if shape == "semicircle":  # flat side down; the full disc's centre sits on the flat side, 0.25 below the middle
        return [(0.5 * math.cos(t), 0.25 + 0.5 * math.sin(t)) for t in np.linspace(math.pi, 2 * math.pi, 49)]
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _resolution(resolution: int | tuple[int, int]) -> tuple[int, int]:
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    if width < 16 or height < 16:
        raise ValueError(f"resolution must be at least 16×16, got {width}×{height}")
    return int(width), int(height)


def _sizes(resolution: int | tuple[int, int] | Sequence) -> list[tuple[int, int]]:
    """One size, or a list of sizes ([[64, 64], [80, 48]] from YAML): [(width, height), ...]."""
    if isinstance(resolution, int) or (len(resolution) == 2 and all(isinstance(v, int) for v in resolution)):
        return [_resolution(resolution)]
    if not resolution:
        raise ValueError("resolution: an empty list of sizes")
    return [_resolution(tuple(size)) for size in resolution]


def shape_coverage(
    shape: str, centre: tuple[float, float], extent: float, width: int, height: int, *, antialias: bool = True
) -> np.ndarray:
    """The fraction of each pixel covered by ``shape`` of ``extent`` pixels centred at ``centre`` (pixels).

    Shape (height, width), float32 in [0, 1]; without antialiasing, coverage is rounded to 0 or 1.
    """
    ss = _SUPERSAMPLE
    # -0.5: PIL fills the supersampled pixels whose centres fall inside the polygon.
    points = [
        (ss * (centre[0] + u * extent) - 0.5, ss * (centre[1] + v * extent) - 0.5) for u, v in _unit_polygon(shape)
    ]
    mask = Image.new("L", (width * ss, height * ss), 0)
    ImageDraw.Draw(mask).polygon(points, fill=255)
    coverage = np.asarray(mask, dtype=np.float32).reshape(height, ss, width, ss).mean(axis=(1, 3)) / 255.0
    return coverage if antialias else (coverage >= 0.5).astype(np.float32)


def object_coverage(obj: ShapeObject, width: int, height: int, *, antialias: bool = True) -> np.ndarray:
    """The fraction of each pixel the object covers in a width × height rendering, float32 in [0, 1]."""
    centre = (obj.centre[0] * width, obj.centre[1] * height)
    extent = SIZE_EXTENT[obj.size] * min(width, height)
    return shape_coverage(obj.shape, centre, extent, width, height, antialias=antialias)


def render(scene: Scene, resolution: int | tuple[int, int] = 32, *, antialias: bool = True) -> Image.Image:
    """Draw a scene as an RGB image; ``resolution`` is a side or (width, height) of the scene's aspect."""
    width, height = _resolution(resolution)
    if abs(width / height - scene.aspect) > 0.02 * scene.aspect:
        raise ValueError(f"resolution {width}×{height} does not match the scene's aspect ratio {scene.aspect:.3f}")
    canvas = np.empty((height, width, 3), dtype=np.float32)
    canvas[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        alpha = object_coverage(obj, width, height, antialias=antialias)[..., None]
        canvas += alpha * (np.asarray(COLOURS[obj.colour], dtype=np.float32) - canvas)
    return Image.fromarray(np.rint(canvas).astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------------------------

_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_BACKGROUND_WORDS = {"grey": ("grey", "gray"), "black": ("black",)}
_RELATION_WORDS = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
_RELATION_ITS = {"left of": "to its left", "right of": "to its right", "above": "above it", "below": "below it"}
_WHERE = (
    ("in the top left", "at the top", "in the top right"),
    ("on the left", "in the middle", "on the right"),
    ("in the bottom left", "at the bottom", "in the bottom right"),
)
_NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption(scene: Scene, style: CaptionStyle = "dense", seed: int | np.random.Generator = 0) -> str:
    """A caption for ``scene``: ``"dense"`` describes everything, ``"sparse"`` is a few alt-text-like words.

    ``"varied"`` is a dense caption that leaves out the sizes (probability ½) and, independently, the background
    (½), the way people write prompts ("a red circle to the left of a blue square"); objects and relations are
    always named. ``"mixed"`` picks dense or sparse at random. The template and synonyms come from ``seed``.
    """
    rng = _as_rng(seed)
    if style == "mixed":
        style = "dense" if rng.random() < 0.5 else "sparse"
    if style == "varied":
        sizes, background = bool(rng.random() >= 0.5), bool(rng.random() >= 0.5)
        return _dense_caption(scene, rng, sizes=sizes, background=background)
    if style == "dense":
        return _dense_caption(scene, rng)
    if style == "sparse":
        return _sparse_caption(scene, rng)
    raise ValueError(f"caption style must be one of {CAPTION_STYLES}, got {style!r}")


def _dense_caption(scene: Scene, rng: np.random.Generator, *, sizes: bool = True, background: bool = True) -> str:
    """Every object and relation; the sizes and the background too unless switched off. The random draws are the
    same either way, so switching them off words the same template without those words."""
    objs = scene.objects
    bg = _pick(rng, _BACKGROUND_WORDS[scene.background])
    size_words = [_pick(rng, _SIZE_WORDS[o.size]) for o in objs]
    short = [f"{o.colour} {o.shape}" for o in objs]  # unique within a scene: (shape, colour) pairs are distinct
    bare = [f"{w} {s}" for w, s in zip(size_words, short, strict=True)] if sizes else short  # "big red circle"
    full = [_a(phrase) for phrase in bare]  # "a big red circle"

    if len(objs) == 1:
        (x, y), obj = objs[0].centre, full[0]
        where = _WHERE[min(int(y * 3), 2)][min(int(x * 3), 2)]
        if background:
            templates = (
                f"{obj} on a {bg} background",
                f"a {bg} background with {obj} {where}",
                f"there is {obj} {where} on a plain {bg} background",
                f"{obj} {where}, {bg} background",
                f"a single {bare[0]} on {bg}",
            )
        else:
            templates = (obj, f"{obj} {where}", f"there is {obj} {where}", f"{obj}, {where}", f"a single {bare[0]}")
        return _pick(rng, templates)

    if len(objs) == 2:
        a, b = (0, 1) if rng.random() < 0.5 else (1, 0)
        rel = scene.relation(a, b)
        words, inverse = _pick(rng, _RELATION_WORDS[rel]), _pick(rng, _RELATION_WORDS[INVERSE_RELATION[rel]])
        if background:
            templates = (
                f"{full[a]} {words} {full[b]} on a {bg} background",
                f"there is {full[b]} on a {bg} background; {_RELATION_ITS[rel]} is {full[a]}",
                f"on a {bg} background, {full[a]} is {words} {full[b]}",
                f"a {bg} background with {full[a]} and {full[b]}: the {short[a]} is {words} the {short[b]}",
                f"{full[b]} {inverse} {full[a]}, on a plain {bg} background",
            )
        else:
            templates = (
                f"{full[a]} {words} {full[b]}",
                f"there is {full[b]}; {_RELATION_ITS[rel]} is {full[a]}",
                f"{full[a]} is {words} {full[b]}",
                f"{full[a]} and {full[b]}: the {short[a]} is {words} the {short[b]}",
                f"{full[b]} {inverse} {full[a]}",
            )
        return _pick(rng, templates)

    a, b, c = (int(k) for k in rng.permutation(3))
    rab, rcb = scene.relation(a, b), scene.relation(c, b)
    wab, wcb = _pick(rng, _RELATION_WORDS[rab]), _pick(rng, _RELATION_WORDS[rcb])
    on_bg = f" on a {bg} background" if background else ""
    where_ab, where_cb = _RELATION_ITS[rab], _RELATION_ITS[rcb]
    templates = (
        f"{full[a]}, {full[b]} and {full[c]}{on_bg}; "
        f"the {short[a]} is {wab} the {short[b]} and the {short[c]} is {wcb} the {short[b]}",
        f"{full[a]} {wab} {full[b]}, and {full[c]} {wcb} the {short[b]}" + (f",{on_bg}" if background else ""),
        f"three shapes{on_bg}: {full[b]}, with {full[a]} {where_ab} and {full[c]} {where_cb}",
        f"there is {full[b]}{on_bg}. {where_ab} is {full[a]}, and {where_cb} is {full[c]}",
    )
    return _pick(rng, templates)


def _sparse_caption(scene: Scene, rng: np.random.Generator) -> str:
    objs, primary = scene.objects, primary_object(scene)
    some = objs[int(rng.integers(len(objs)))]
    options = [
        f"{primary.colour} {primary.shape}",
        f"{primary.size} {primary.colour} {primary.shape}",
        f"{primary.colour} {primary.shape} on {scene.background}",
        some.shape,
        "shapes",
        "geometric shapes",
    ]
    if len(objs) > 1:
        shapes = list(dict.fromkeys(o.shape for o in objs))  # distinct, in scene order
        colours = list(dict.fromkeys(o.colour for o in objs))
        options += [
            " and ".join(shapes) if len(shapes) == 2 else ", ".join(shapes),
            f"{_NUMBER_WORDS[len(objs)]} shapes",
            " and ".join(colours) if len(colours) == 2 else ", ".join(colours),
            ", ".join(f"{o.colour} {o.shape}" for o in objs),
        ]
    return _pick(rng, options)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation prompts on the held-out combinations
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectSpec:
    """A requested object; ``size`` None means any size."""

    shape: str
    colour: str
    size: str | None = None


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt asks for: its objects and, for two objects, where ``objects[0]`` is relative to ``objects[1]``."""

    objects: tuple[ObjectSpec, ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        if not self.objects:
            raise ValueError("a prompt spec needs at least one object")
        if self.relation is not None and (len(self.objects) != 2 or self.relation not in RELATIONS):
            raise ValueError(f"a relation needs exactly two objects and one of {RELATIONS}, got {self.relation!r}")


@dataclass(frozen=True)
class EvalPrompt:
    """An evaluation prompt, what it asks for, and a reference scene that satisfies it."""

    text: str
    spec: PromptSpec
    scene: Scene


def spec_of(scene: Scene, *, sizes: bool = True) -> PromptSpec:
    """The spec a scene satisfies: its objects (with their sizes unless ``sizes`` is False: any size will do) and,
    for two objects, their relation."""
    relation = scene.relation(0, 1) if len(scene.objects) == 2 else None
    objects = tuple(ObjectSpec(o.shape, o.colour, o.size if sizes else None) for o in scene.objects)
    return PromptSpec(objects, relation)


def heldout_prompts(n: int, seed: int = 0, *, aspect: float = 1.0, style: PromptStyle = "dense") -> list[EvalPrompt]:
    """``n`` prompts that use exactly the held-out combinations, alternating two kinds.

    Even indices: one object of a held-out (shape, colour) pair, cycling through the pairs. Odd indices: two
    objects whose colours stand in a held-out arrangement (cycling through them), with shapes drawn from the
    pairs seen in training. Sizes, backgrounds, positions and wording are random from ``seed``.

    ``style="dense"`` words them like the dense training captions (sizes and background named); ``"short"`` words
    the same scenes, template for template, without sizes and background ("a red circle to the left of a blue
    square"), the way a newcomer writes a prompt, and then any size will do.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style must be one of {PROMPT_STYLES}, got {style!r}")
    dense = style == "dense"
    rng = np.random.default_rng(seed)
    pairs = sorted(HELDOUT_SHAPE_COLOURS, key=lambda p: class_label(*p))
    arrangements = sorted(HELDOUT_ARRANGEMENTS)
    prompts = []
    for i in range(n):
        background = _pick(rng, tuple(BACKGROUNDS))
        scene = None
        while scene is None:  # two large objects stacked vertically rarely fit: draw sizes again until they do
            if i % 2 == 0:
                shape, colour = pairs[(i // 2) % len(pairs)]
                scene = _scene_for(rng, [(shape, colour, _pick(rng, SIZES))], background, aspect, lambda s: True)
            else:
                colour_a, relation, colour_b = arrangements[(i // 2) % len(arrangements)]
                shape_a, shape_b = _seen_shape(rng, colour_a), _seen_shape(rng, colour_b)
                kinds = [(shape_a, colour_a, _pick(rng, SIZES)), (shape_b, colour_b, _pick(rng, SIZES))]
                scene = _scene_for(rng, kinds, background, aspect, lambda s, r=relation: s.relation(0, 1) == r)
        text = _dense_caption(scene, rng, sizes=dense, background=dense)
        prompts.append(EvalPrompt(text, spec_of(scene, sizes=dense), scene))
    return prompts


def _seen_shape(rng: np.random.Generator, colour: str) -> str:
    return _pick(rng, [s for s in SHAPES if (s, colour) not in HELDOUT_SHAPE_COLOURS])


# ----------------------------------------------------------------------------------------------------------------
# Prompt completion: a user's short prompt in the words the dense training captions use
# ----------------------------------------------------------------------------------------------------------------

_SIZE_NAMES = frozenset(w for words in _SIZE_WORDS.values() for w in words)
_BACKGROUND_NAMES = frozenset(("background", *(w for words in _BACKGROUND_WORDS.values() for w in words)))
# "an orange circle", "a big red circle", "the blue square": an optional article and size word, a colour, a shape.
_OBJECT_PHRASE = re.compile(
    rf"\b(?:(an?)\s+)?(?:({'|'.join(sorted(_SIZE_NAMES))})\s+)?({'|'.join(COLOUR_NAMES)})\s+({'|'.join(SHAPES)})\b",
    re.IGNORECASE,
)


def complete_prompt(prompt: str, seed: int | np.random.Generator = 0) -> str:
    """Fill in what a dense training caption always says and ``prompt`` leaves out: a size for every named object
    ("<colour> <shape>") that has none, and a background when none is named.

    The missing words are drawn as the world draws them (sizes and background uniform) from ``seed`` and the
    prompt, so the images of one prompt vary as its training scenes did and prompts that share a seed draw apart.
    Everything the prompt says is kept, word for word, except "an" before an inserted size ("a large orange
    circle"). A prompt that names them already (every dense caption), or names no object of the world, comes back
    unchanged. Why: a model trained only on dense captions finds "a red circle to the left of a blue square" out of
    its distribution (docs/shapes.md).
    """
    phrases = list(_OBJECT_PHRASE.finditer(prompt))
    if not phrases:  # names no object of this world: nothing to complete
        return prompt
    rng = seed
    if not isinstance(rng, np.random.Generator):  # from (seed, prompt); image seeds may be negative, numpy's may not
        rng = np.random.default_rng([seed % 2**64, zlib.crc32(prompt.encode())])
    sized = {_object_named(m) for m in phrases if m[2]}
    sizes: dict[tuple[str, str], str] = {}  # the missing sizes, drawn in order of first mention
    for key in map(_object_named, phrases):
        if key not in sized and key not in sizes:
            sizes[key] = _pick(rng, SIZES)

    def fill(m: re.Match) -> str:
        size = sizes.pop(_object_named(m), None)  # popped: only the first mention gets the size
        if size is None:
            return m[0]
        article = f"{m[1][0]} " if m[1] else ""  # "an" → "a": every size word starts with a consonant
        return f"{article}{size} {m[3]} {m[4]}"

    text = _OBJECT_PHRASE.sub(fill, prompt)
    if _BACKGROUND_NAMES & set(re.findall(r"[a-z]+", text.lower())):
        return text
    # Where the captions name it: before the first sentence break ("there is a blue square on a grey background;
    # to its left is ..."), else last. Placed last in that template, the demo drew its relations mirrored (0/33).
    text = text.rstrip().rstrip(".,;:")
    end = min((i for i in map(text.find, ";.") if i >= 0), default=len(text))
    return f"{text[:end]} on a {_pick(rng, tuple(BACKGROUNDS))} background{text[end:]}"


def _object_named(match: re.Match) -> tuple[str, str]:
    return match[3].lower(), match[4].lower()


# ----------------------------------------------------------------------------------------------------------------
# Writing datasets
# ----------------------------------------------------------------------------------------------------------------


def _write_items(
    items: range,
    *,
    directory: Path,
    image_dir: Path,
    seed: int,
    sizes: list[tuple[int, int]],
    split: Split,
    objects: int | None,
    antialias: bool,
    caption_style: CaptionStyle,
    fmt: DatasetFormat,
    digits: int,
) -> list[str]:
    """Write scenes ``items`` (each seeded by (seed, i)); return their manifest lines (jsonl format)."""
    manifest = []
    for i in items:
        rng = np.random.default_rng([seed, i])
        width, height = sizes[int(rng.integers(len(sizes)))] if len(sizes) > 1 else sizes[0]
        scene = sample_scene(rng, aspect=width / height, split=split, num_objects=objects)
        image = render(scene, (width, height), antialias=antialias)
        name = f"{i:0{digits}d}.png"
        if fmt == "imagefolder":
            image.save(directory / class_folder(scene_label(scene)) / name, format="PNG")
            continue
        text = caption(scene, caption_style, rng)
        image.save(image_dir / name, format="PNG")
        if fmt == "folder":
            (directory / name).with_suffix(".txt").write_text(text + "\n")
        else:
            record = {"path": f"images/{name}", "caption": text, "width": width, "height": height}
            manifest.append(json.dumps(record, ensure_ascii=False))
    return manifest


def check_dataset_args(
    n: int, resolution: int | tuple[int, int] | Sequence, caption_style: str, fmt: str, objects: int | None = None
) -> list[tuple[int, int]]:
    """Validate ``write_dataset``'s arguments (ValueError naming the bad one); return the (width, height) sizes."""
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if objects is not None and (isinstance(objects, bool) or objects not in range(1, MAX_OBJECTS + 1)):
        raise ValueError(f"objects must be between 1 and {MAX_OBJECTS} (or null for a mix), got {objects!r}")
    if fmt not in ("folder", "jsonl", "imagefolder"):
        raise ValueError(f"fmt must be 'folder', 'jsonl' or 'imagefolder', got {fmt!r}")
    if caption_style not in CAPTION_STYLES:
        raise ValueError(f"caption_style must be one of {CAPTION_STYLES}, got {caption_style!r}")
    return _sizes(resolution)


def write_dataset(
    directory: str | Path,
    n: int,
    *,
    resolution: int | tuple[int, int] | Sequence[tuple[int, int]] = 32,
    seed: int = 0,
    caption_style: CaptionStyle = "dense",
    fmt: DatasetFormat = "folder",
    split: Split = "train",
    objects: int | None = None,
    antialias: bool = True,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write ``n`` scenes to ``directory`` (created; must be absent or empty) and return it.

    Formats:

    * ``"folder"``: ``000000.png`` with its caption in ``000000.txt``.
    * ``"jsonl"``: ``images/000000.png`` plus ``manifest.jsonl``, one ``{"path", "caption", "width", "height"}``
      per line with ``path`` relative to the manifest.
    * ``"imagefolder"``: ``<class folder>/000000.png`` (ImageNet layout, class of the primary object) plus
      ``classes.txt`` listing all 48 class folders in label order. Every class has a folder, empty where no scene
      has it (with ``split="train"``, the 6 held-out classes), so a folder's rank among the sorted folders, which
      is how ImageNet-style readers assign labels, is its label.

    ``objects`` fixes the number of objects in every scene (None: 1–3, uniform), e.g. 1 for a quick first model.
    ``resolution`` is a side, a (width, height), or a list of (width, height) sizes: then each scene draws its
    size (hence its aspect ratio) uniformly from the list, for multi-aspect training.

    Item ``i`` is drawn from ``numpy.random.default_rng([seed, i])``: the same seed writes byte-identical files and
    a smaller ``n`` writes a prefix of a larger one, whatever the number of ``workers`` (processes).
    ``progress(done, n)`` is called as items are done.
    """
    sizes = check_dataset_args(n, resolution, caption_style, fmt, objects)
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise PixartError(f"{directory}: already exists and is not an empty directory")
    image_dir = directory / "images" if fmt == "jsonl" else directory
    image_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "imagefolder":
        (directory / "classes.txt").write_text("".join(f"{class_folder(k)}\n" for k in range(NUM_CLASSES)))
        for k in range(NUM_CLASSES):
            (directory / class_folder(k)).mkdir()

    digits = max(6, len(str(max(n - 1, 0))))
    job = functools.partial(
        _write_items, directory=directory, image_dir=image_dir, seed=seed, sizes=sizes, split=split,
        objects=objects, antialias=antialias, caption_style=caption_style, fmt=fmt, digits=digits,
    )  # fmt: skip
    chunk = 1 if workers <= 1 else max(1, min(1000, -(-n // workers)))  # serial: progress after every item
    ranges = [range(start, min(n, start + chunk)) for start in range(0, n, chunk)]
    manifest: list[str] = []
    done = 0
    with contextlib.ExitStack() as stack:
        if workers > 1 and len(ranges) > 1:
            pool = stack.enter_context(concurrent.futures.ProcessPoolExecutor(workers))
            results = pool.map(job, ranges)
        else:
            results = map(job, ranges)
        for lines, items in zip(results, ranges, strict=True):  # in order: the manifest matches a serial run
            manifest += lines
            done += len(items)
            if progress is not None:
                progress(done, n)
    if fmt == "jsonl":
        (directory / "manifest.jsonl").write_text("".join(line + "\n" for line in manifest))
    return directory
