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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

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
# Colours outside the palette: concepts a model trained on this world has never seen, to teach it (docs/adapters.md).
# Generated data holds them only where asked for (write_dataset's ``colours``); they have no class label, and the
# detector looks for them only when told to (``detect(colours=...)``). Pink is ≥ 100 from every palette colour.
CONCEPT_COLOURS: dict[str, tuple[int, int, int]] = {"pink": (255, 105, 180)}

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


def as_rng(seed: int | np.random.Generator) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _check_aspect(aspect: float) -> None:
    if not 1 / 3 <= aspect <= 3:
        raise ValueError(f"aspect (width / height) must be between 1/3 and 3, got {aspect}")


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


def scene_for(
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


def colour_rgb(name: str) -> tuple[int, int, int]:
    """The RGB of a palette or concept colour."""
    return COLOURS[name] if name in COLOURS else CONCEPT_COLOURS[name]


def check_colours(colours: Sequence[str]) -> None:
    known = (*COLOUR_NAMES, *CONCEPT_COLOURS)
    unknown = [c for c in colours if c not in known]
    if unknown or not colours:
        raise ValueError(f"colours must name some of {', '.join(known)}, got {list(colours)}")


def sample_scene(
    seed: int | np.random.Generator,
    *,
    aspect: float = 1.0,
    split: Split = "train",
    num_objects: int | None = None,
    colours: Sequence[str] | None = None,
) -> Scene:
    """Sample a scene: 1–3 objects (uniform, or ``num_objects``) with distinct (shape, colour) pairs.

    Shapes, colours, sizes and the background are uniform; positions are uniform subject to the layout rules.
    ``split="train"`` leaves out the held-out combinations, ``"all"`` samples the whole world. ``colours``
    restricts the objects' colours (it may name concept colours, which the world otherwise never draws).
    """
    if split not in ("train", "all"):
        raise ValueError(f"split must be 'train' or 'all', got {split!r}")
    if num_objects is not None and not 1 <= num_objects <= MAX_OBJECTS:
        raise ValueError(f"num_objects must be between 1 and {MAX_OBJECTS}, got {num_objects}")
    _check_aspect(aspect)
    rng = as_rng(seed)
    if colours is None:  # in label order: the stream every generated dataset was drawn with
        kinds_pool = [_label_kind(label) for label in range(NUM_CLASSES) if split == "all" or not _label_heldout(label)]
    else:
        check_colours(colours)
        kinds_pool = [
            (shape, colour)
            for shape in SHAPES
            for colour in colours
            if split == "all" or (shape, colour) not in HELDOUT_SHAPE_COLOURS
        ]
    if num_objects is not None and num_objects > len(kinds_pool):
        raise ValueError(f"{num_objects} objects need as many (shape, colour) pairs; there are {len(kinds_pool)}")

    def accept(scene: Scene) -> bool:
        return split == "all" or not _heldout_arrangement_in(scene.objects, scene.relations)

    while True:
        count = num_objects if num_objects is not None else int(rng.integers(1, min(MAX_OBJECTS, len(kinds_pool)) + 1))
        picked = rng.choice(len(kinds_pool), size=count, replace=False)
        kinds = [(*kinds_pool[k], pick(rng, SIZES)) for k in picked]
        background = pick(rng, tuple(BACKGROUNDS))
        scene = scene_for(rng, kinds, background, aspect, accept)
        if scene is not None:
            return scene


def _label_kind(label: int) -> tuple[str, str]:
    return SHAPES[label // len(COLOUR_NAMES)], COLOUR_NAMES[label % len(COLOUR_NAMES)]


def _label_heldout(label: int) -> bool:
    return _label_kind(label) in HELDOUT_SHAPE_COLOURS


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


def sizes_of(resolution: int | tuple[int, int] | Sequence) -> list[tuple[int, int]]:
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
        canvas += alpha * (np.asarray(colour_rgb(obj.colour), dtype=np.float32) - canvas)
    return Image.fromarray(np.rint(canvas).astype(np.uint8), "RGB")
