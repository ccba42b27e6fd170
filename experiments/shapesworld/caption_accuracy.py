"""How right are a dataset's captions? Each caption is parsed into objects and relations and read against the
ground-truth scene it describes (ShapesWorld knows every scene exactly).

Per attribute, over the scenes of a captions manifest that a scenes file (``data_engine.py data`` writes one) knows:

* ``colour``, ``shape``, ``size``: the fraction of true objects whose colour (shape, size) the caption states for
  that object. Caption objects ("a big red circle", "the red circle", a bare "circle") are paired with true objects
  to agree on the most attributes; an attribute the caption leaves out is not right.
* ``relation``: of the relations the caption states between two named objects, the fraction that hold (null
  when it states none); an object named with the wrong shape makes its relations wrong.
* ``relation_by_colour``: the same for the stated relations whose two objects have colours found once each in the
  scene, the objects found by colour alone: placement read apart from shape errors.
  ``relations_stated``: relations stated per two-object pair in the scene (dense captions of three objects state
  two of the three pairs).
* ``count``: the caption names exactly as many distinct objects as the scene has.
* ``extra_objects``: caption objects per scene that pair with no true object or contradict its colour or shape.
* ``exact``: every object with its colour, shape and size, no extra object, and for two or more objects at least
  one relation stated and every stated relation right.

Dense ground-truth captions score 1.000 on all of these but ``relations_stated`` (the parser's check).
Prints one JSON line; ``--label`` and ``--field`` name what was read::

    python experiments/shapesworld/caption_accuracy.py data/shapes/data-engine-32/captions.jsonl \
        --scenes data/shapes/data-engine-32/scenes.jsonl --field caption_vlm --skip 2000 --label captioner
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from pixart_cli.shapesworld.world import COLOUR_NAMES, SHAPES

_SIZES = {"small": "small", "little": "small", "large": "large", "big": "large"}
_SHAPES = sorted(SHAPES, key=len, reverse=True)  # "semicircle" before "circle"
_OBJECT = re.compile(
    rf"\b(?:({'|'.join(_SIZES)})\s+)?(?:({'|'.join(COLOUR_NAMES)})\s+)?({'|'.join(_SHAPES)})s?\b", re.IGNORECASE
)
# "to its left is X" / "X to its left": X stands in the relation to the object named first ("there is B; ...").
_ITS = {"to its left": "left of", "to its right": "right of", "above it": "above", "below it": "below"}
_ITS_PATTERN = re.compile(r"\b(" + "|".join(_ITS) + r")\b(\s+is\b)?", re.IGNORECASE)
_BINARY = {
    "to the left of": "left of", "on the left of": "left of", "left of": "left of",
    "to the right of": "right of", "on the right of": "right of", "right of": "right of",
    "above": "above", "over": "above", "below": "below", "under": "below", "beneath": "below",
}  # fmt: skip
_BINARY_PATTERN = re.compile(r"\b(" + "|".join(sorted(_BINARY, key=len, reverse=True)) + r")\b", re.IGNORECASE)
_COUNT_WORDS = {"one": 1, "single": 1, "two": 2, "three": 3}
_COUNT_PATTERN = re.compile(r"\b(one|two|three)\s+shapes\b", re.IGNORECASE)

Key = tuple[str | None, str]  # (colour or None, shape)


@dataclass
class Parsed:
    """What a caption says: its objects (colour or None, shape) with a size where one is named, the relations it
    states as (subject, relation, object), and a count if it names one ("two shapes")."""

    objects: dict[Key, str | None]
    relations: list[tuple[Key, str, Key]]
    count: int | None


def parse_caption(text: str) -> Parsed:
    """Objects, relations and a stated count of a ShapesWorld caption (dense, sparse or generated)."""
    mentions = []  # (start, end, key)
    objects: dict[Key, str | None] = {}
    for m in _OBJECT.finditer(text):
        size, colour, shape = (g.lower() if g else None for g in m.groups())
        key = (colour, shape)
        if colour is None and any(k[1] == shape and k[0] is not None for k in objects):
            key = next(k for k in objects if k[1] == shape and k[0] is not None)  # "the circle": one named before
        mentions.append((m.start(), m.end(), key))
        if objects.get(key) is None:
            objects[key] = _SIZES[size] if size else None
    relations = []
    taken: list[tuple[int, int]] = []
    for m in _ITS_PATTERN.finditer(text):
        taken.append(m.span())
        if not mentions:
            continue
        anchor = mentions[0][2]
        if m.group(2):  # "to its left is X"
            after = [k for s, _, k in mentions if s >= m.end()]
            subject = after[0] if after else None
        else:  # "X to its left"
            before = [k for _, e, k in mentions if e <= m.start()]
            subject = before[-1] if before else None
        if subject is not None and subject != anchor:
            relations.append((subject, _ITS[m.group(1).lower()], anchor))
    for m in _BINARY_PATTERN.finditer(text):
        if any(s <= m.start() < e for s, e in taken):
            continue
        before = [k for _, e, k in mentions if e <= m.start()]
        after = [k for s, _, k in mentions if s >= m.end()]
        if before and after and before[-1] != after[0]:
            relations.append((before[-1], _BINARY[m.group(1).lower()], after[0]))
    counted = _COUNT_PATTERN.search(text)
    return Parsed(objects, relations, _COUNT_WORDS[counted.group(1).lower()] if counted else None)


def compare(parsed: Parsed, scene: dict) -> dict[str, float | int | bool]:
    """Counts of right facts for one caption against its scene (``scenes.jsonl`` form: objects with shape, colour,
    size; relations as [i, relation, j] for every pair)."""
    truth = scene["objects"]
    said = list(parsed.objects.items())

    def agreement(pairs: dict[int, int]) -> int:
        return sum(
            (said[c][0][0] == truth[t]["colour"])
            + (said[c][0][1] == truth[t]["shape"])
            + (said[c][1] == truth[t]["size"])
            for t, c in pairs.items()
        )

    if len(said) >= len(truth):
        options = [dict(enumerate(p)) for p in itertools.permutations(range(len(said)), len(truth))]
    else:
        options = [{t: c for c, t in enumerate(p)} for p in itertools.permutations(range(len(truth)), len(said))]
    pairs = max(options, key=agreement) if said else {}
    by_key = {said[c][0]: t for t, c in pairs.items()}
    colour = sum(said[c][0][0] == truth[t]["colour"] for t, c in pairs.items())
    shape = sum(said[c][0][1] == truth[t]["shape"] for t, c in pairs.items())
    size = sum(said[c][1] == truth[t]["size"] for t, c in pairs.items())
    # An object that stands for none of the scene's, or contradicts the one it stands for (a bare "circle" does not).
    extra = len(said) - sum(
        said[c][0][0] in (None, truth[t]["colour"]) and said[c][0][1] == truth[t]["shape"] for t, c in pairs.items()
    )
    true_relation = {(i, j): r for i, r, j in scene["relations"]}
    colours = [o["colour"] for o in truth]
    stated = right = by_colour = right_by_colour = 0
    for subject, relation, obj in parsed.relations:
        stated += 1
        i, j = by_key.get(subject), by_key.get(obj)
        if i is not None and j is not None and i != j:
            right += true_relation.get((i, j)) == relation
        # Where the relation's objects are found by their colours alone (each colour once in the scene): placement
        # read apart from shape errors.
        if subject[0] != obj[0] and colours.count(subject[0]) == 1 and colours.count(obj[0]) == 1:
            by_colour += 1
            right_by_colour += true_relation[(colours.index(subject[0]), colours.index(obj[0]))] == relation
    named = len(said) if parsed.count is None else parsed.count
    n = len(truth)
    exact = (
        colour == shape == size == n and extra == 0 and len(said) == n and (n == 1 or (stated > 0 and right == stated))
    )
    return {
        "objects": n, "colour": colour, "shape": shape, "size": size, "extra": extra,
        "pairs": n * (n - 1) // 2, "stated": stated, "right": right, "by_colour": by_colour,
        "right_by_colour": right_by_colour, "count": named == n, "exact": exact,
    }  # fmt: skip


def accuracy(rows: list[tuple[str, dict]]) -> dict[str, float | int]:
    """Per-attribute accuracy over (caption, scene) pairs (see the module docstring)."""
    totals: dict[str, float] = {}
    for text, scene in rows:
        for k, v in compare(parse_caption(text), scene).items():
            totals[k] = totals.get(k, 0) + v
    n = len(rows)
    objects = totals.get("objects", 0) or 1
    return {
        "scenes": n,
        "colour": round(totals.get("colour", 0) / objects, 4),
        "shape": round(totals.get("shape", 0) / objects, 4),
        "size": round(totals.get("size", 0) / objects, 4),
        "relation": round(totals["right"] / totals["stated"], 4) if totals.get("stated") else None,
        "relations_stated": round(totals.get("stated", 0) / (totals.get("pairs", 0) or 1), 4),
        "relation_by_colour": (
            round(totals["right_by_colour"] / totals["by_colour"], 4) if totals.get("by_colour") else None
        ),
        "count": round(totals.get("count", 0) / max(n, 1), 4),
        "extra_objects": round(totals.get("extra", 0) / max(n, 1), 4),
        "exact": round(totals.get("exact", 0) / max(n, 1), 4),
    }


def read_pairs(captions: Path, scenes: Path, field: str, skip: int = 0, limit: int | None = None) -> list[tuple]:
    """(caption, scene) for each line of ``captions`` whose image ``scenes`` knows, by the image's file name,
    leaving out the first ``skip`` scenes of the scenes file (the captioner's training subset)."""
    known = {}
    for k, line in enumerate(scenes.read_text().splitlines()):
        if k >= skip:
            scene = json.loads(line)
            known[Path(scene["path"]).name] = scene
    pairs = []
    for line in captions.read_text().splitlines():
        row = json.loads(line)
        scene = known.get(Path(row["path"]).name)
        if scene is not None:
            pairs.append((row.get(field) or "", scene))
    return pairs[:limit] if limit else pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("captions", type=Path, help="a captions manifest (e.g. `pixart caption`'s output)")
    parser.add_argument("--scenes", type=Path, required=True, help="the scenes file of the images")
    parser.add_argument("--field", default="caption", help="the caption field to read [caption]")
    parser.add_argument("--skip", type=int, default=0, help="leave out the first N scenes (the labelled subset)")
    parser.add_argument("--limit", type=int, default=None, help="read at most N captions")
    parser.add_argument("--label", default=None, help="a name for this reading, copied into the output")
    args = parser.parse_args()
    pairs = read_pairs(args.captions, args.scenes, args.field, args.skip, args.limit)
    if not pairs:
        sys.exit(f"error: no caption of {args.captions} has a scene in {args.scenes}")
    row = {"label": args.label, "captions": str(args.captions), "field": args.field, **accuracy(pairs)}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
