"""The words of ShapesWorld: captions of a scene (dense, sparse, varied), the benchmark's held-out prompts,
and prompt completion (a user's short prompt in the words the dense training captions use).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np

from pixart_cli.shapesworld.world import (
    BACKGROUNDS,
    CAPTION_STYLES,
    COLOUR_NAMES,
    CONCEPT_COLOURS,
    HELDOUT_ARRANGEMENTS,
    HELDOUT_SHAPE_COLOURS,
    INVERSE_RELATION,
    PROMPT_STYLES,
    RELATIONS,
    SHAPES,
    SIZES,
    CaptionStyle,
    PromptStyle,
    Scene,
    as_rng,
    class_label,
    pick,
    primary_object,
    scene_for,
)

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


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption(scene: Scene, style: CaptionStyle = "dense", seed: int | np.random.Generator = 0) -> str:
    """A caption for ``scene``: ``"dense"`` describes everything, ``"sparse"`` is a few alt-text-like words.

    ``"varied"`` is a dense caption that leaves out the sizes (probability ½) and, independently, the background
    (½), the way people write prompts ("a red circle to the left of a blue square"); objects and relations are
    always named. ``"mixed"`` picks dense or sparse at random. The template and synonyms come from ``seed``.
    """
    rng = as_rng(seed)
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
    bg = pick(rng, _BACKGROUND_WORDS[scene.background])
    size_words = [pick(rng, _SIZE_WORDS[o.size]) for o in objs]
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
        return pick(rng, templates)

    if len(objs) == 2:
        a, b = (0, 1) if rng.random() < 0.5 else (1, 0)
        rel = scene.relation(a, b)
        words, inverse = pick(rng, _RELATION_WORDS[rel]), pick(rng, _RELATION_WORDS[INVERSE_RELATION[rel]])
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
        return pick(rng, templates)

    a, b, c = (int(k) for k in rng.permutation(3))
    rab, rcb = scene.relation(a, b), scene.relation(c, b)
    wab, wcb = pick(rng, _RELATION_WORDS[rab]), pick(rng, _RELATION_WORDS[rcb])
    on_bg = f" on a {bg} background" if background else ""
    where_ab, where_cb = _RELATION_ITS[rab], _RELATION_ITS[rcb]
    templates = (
        f"{full[a]}, {full[b]} and {full[c]}{on_bg}; "
        f"the {short[a]} is {wab} the {short[b]} and the {short[c]} is {wcb} the {short[b]}",
        f"{full[a]} {wab} {full[b]}, and {full[c]} {wcb} the {short[b]}" + (f",{on_bg}" if background else ""),
        f"three shapes{on_bg}: {full[b]}, with {full[a]} {where_ab} and {full[c]} {where_cb}",
        f"there is {full[b]}{on_bg}. {where_ab} is {full[a]}, and {where_cb} is {full[c]}",
    )
    return pick(rng, templates)


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
    return pick(rng, options)


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
        background = pick(rng, tuple(BACKGROUNDS))
        scene = None
        while scene is None:  # two large objects stacked vertically rarely fit: draw sizes again until they do
            if i % 2 == 0:
                shape, colour = pairs[(i // 2) % len(pairs)]
                scene = scene_for(rng, [(shape, colour, pick(rng, SIZES))], background, aspect, lambda s: True)
            else:
                colour_a, relation, colour_b = arrangements[(i // 2) % len(arrangements)]
                shape_a, shape_b = _seen_shape(rng, colour_a), _seen_shape(rng, colour_b)
                kinds = [(shape_a, colour_a, pick(rng, SIZES)), (shape_b, colour_b, pick(rng, SIZES))]
                scene = scene_for(rng, kinds, background, aspect, lambda s, r=relation: s.relation(0, 1) == r)
        text = _dense_caption(scene, rng, sizes=dense, background=dense)
        prompts.append(EvalPrompt(text, spec_of(scene, sizes=dense), scene))
    return prompts


def concept_prompts(
    colour: str, n: int, seed: int = 0, *, aspect: float = 1.0, style: PromptStyle = "dense"
) -> list[EvalPrompt]:
    """``n`` one-object prompts in ``colour`` (a concept colour taught to a trained model, e.g. "pink"), cycling
    through the shapes; sizes, backgrounds and wording drawn from ``seed`` as ``heldout_prompts`` draws them."""
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if colour not in (*COLOUR_NAMES, *CONCEPT_COLOURS):
        raise ValueError(f"unknown colour {colour!r}; concept colours: {', '.join(CONCEPT_COLOURS)}")
    dense = style == "dense"
    rng = np.random.default_rng(seed)
    prompts = []
    for i in range(n):
        background = pick(rng, tuple(BACKGROUNDS))
        kinds = [(SHAPES[i % len(SHAPES)], colour, pick(rng, SIZES))]
        scene = scene_for(rng, kinds, background, aspect, lambda s: True)
        assert scene is not None  # one object always fits
        text = _dense_caption(scene, rng, sizes=dense, background=dense)
        prompts.append(EvalPrompt(text, spec_of(scene, sizes=dense), scene))
    return prompts


def _seen_shape(rng: np.random.Generator, colour: str) -> str:
    return pick(rng, [s for s in SHAPES if (s, colour) not in HELDOUT_SHAPE_COLOURS])


_SIZE_NAMES = frozenset(w for words in _SIZE_WORDS.values() for w in words)
_BACKGROUND_NAMES = frozenset(("background", *(w for words in _BACKGROUND_WORDS.values() for w in words)))
# "an orange circle", "a big red circle", "the blue square": an optional article and size word, a colour, a shape.
_OBJECT_PHRASE = re.compile(
    rf"\b(?:(an?)\s+)?(?:({'|'.join(sorted(_SIZE_NAMES))})\s+)?({'|'.join((*COLOUR_NAMES, *CONCEPT_COLOURS))})\s+"
    rf"({'|'.join(SHAPES)})\b",
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
            sizes[key] = pick(rng, SIZES)

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
    return f"{text[:end]} on a {pick(rng, tuple(BACKGROUNDS))} background{text[end:]}"


def _object_named(match: re.Match) -> tuple[str, str]:
    return match[3].lower(), match[4].lower()
