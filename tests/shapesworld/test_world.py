"""ShapesWorld: determinism, coverage of the world, captions, the held-out split, dataset formats, and the detector
measured against the generator's ground truth."""

from __future__ import annotations

import dataclasses
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixart_cli.components.autoencoders import VAE, load_vae
from pixart_cli.data.sources import read_class_tree
from pixart_cli.errors import PixartError
from pixart_cli.shapesworld import world as shapes
from pixart_cli.shapesworld.dataset import write_dataset
from pixart_cli.shapesworld.detect import compare_with_scene, detect, score_image, score_images
from pixart_cli.shapesworld.prompts import ObjectSpec, PromptSpec, caption, complete_prompt, heldout_prompts
from pixart_cli.shapesworld.world import (
    BACKGROUNDS,
    CLASS_NAMES,
    COLOUR_NAMES,
    COLOURS,
    HELDOUT_ARRANGEMENTS,
    HELDOUT_SHAPE_COLOURS,
    SHAPES,
    SIZE_EXTENT,
    arrangement,
    class_folder,
    class_label,
    primary_object,
    render,
    sample_scene,
    scene_label,
    uses_heldout,
)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def pair_arrangements(scene: shapes.Scene) -> set[tuple[str, str, str]]:
    """Every (colour, left of | above, colour) arrangement in a scene, recomputed from the object centres."""
    width, height = shapes._canvas(scene.aspect)
    found = set()
    for i, a in enumerate(scene.objects):
        for b in scene.objects[i + 1 :]:
            dx, dy = (a.centre[0] - b.centre[0]) * width, (a.centre[1] - b.centre[1]) * height
            if abs(dx) >= abs(dy):
                found.add((a.colour, "left of", b.colour) if dx < 0 else (b.colour, "left of", a.colour))
            else:
                found.add((a.colour, "above", b.colour) if dy < 0 else (b.colour, "above", a.colour))
    return found


# ----------------------------------------------------------------------------------------------------------------
# Scenes and rendering
# ----------------------------------------------------------------------------------------------------------------


def test_same_seed_same_scene_and_pixels_different_seeds_differ():
    assert sample_scene(7) == sample_scene(7)
    assert png_bytes(render(sample_scene(7), 64)) == png_bytes(render(sample_scene(7), 64))
    assert sample_scene(7) != sample_scene(8)
    images = {png_bytes(render(sample_scene(seed), 32)) for seed in range(20)}
    assert len(images) == 20


def test_the_whole_world_appears_and_layouts_follow_the_rules():
    scenes = [sample_scene(seed, split="all") for seed in range(600)]
    objects = [obj for scene in scenes for obj in scene.objects]
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.colour for o in objects} == set(COLOURS)
    assert {o.size for o in objects} == {"small", "large"}
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    assert {r.relation for s in scenes for r in s.relations} == {"left of", "right of", "above", "below"}
    assert not set(BACKGROUNDS.values()) & set(COLOURS.values())
    for scene in scenes:
        kinds = [(o.shape, o.colour) for o in scene.objects]
        assert len(set(kinds)) == len(kinds), "(shape, colour) pairs are distinct within a scene"
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.bbox
            assert min(x0, y0) >= shapes.BORDER_MARGIN - 1e-9 and max(x1, y1) <= 1 - shapes.BORDER_MARGIN + 1e-9
            assert x1 - x0 == pytest.approx(SIZE_EXTENT[obj.size])
        for r in scene.relations:
            a, b = scene.objects[r.first], scene.objects[r.second]
            dx, dy = a.centre[0] - b.centre[0], a.centre[1] - b.centre[1]
            assert abs(abs(dx) - abs(dy)) >= shapes.RELATION_MARGIN - 1e-9
            gap_x = abs(dx) - (a.bbox[2] - a.bbox[0] + b.bbox[2] - b.bbox[0]) / 2
            gap_y = abs(dy) - (a.bbox[3] - a.bbox[1] + b.bbox[3] - b.bbox[1]) / 2
            assert max(gap_x, gap_y) >= shapes.OBJECT_GAP - 1e-9
            expected = ("left of" if dx < 0 else "right of") if abs(dx) > abs(dy) else ("above" if dy < 0 else "below")
            assert r.relation == expected


@pytest.mark.parametrize("resolution", [32, 64, (64, 48)])
def test_render_sizes_and_unantialiased_palette(resolution):
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    scene = sample_scene(3, aspect=width / height)
    image = render(scene, resolution)
    assert image.size == (width, height) and image.mode == "RGB"
    crisp = np.asarray(render(scene, resolution, antialias=False)).reshape(-1, 3)
    allowed = {BACKGROUNDS[scene.background], *(COLOURS[o.colour] for o in scene.objects)}
    assert {tuple(int(v) for v in pixel) for pixel in np.unique(crisp, axis=0)} == allowed
    with pytest.raises(ValueError, match="aspect"):
        render(scene, (width * 2, height))


# ----------------------------------------------------------------------------------------------------------------
# Captions and labels
# ----------------------------------------------------------------------------------------------------------------

_ATTRIBUTE_WORDS = set(SHAPES) | set(COLOUR_NAMES)


def test_dense_captions_describe_everything():
    seen_templates = set()
    for seed in range(300):
        scene = sample_scene(seed)
        text = caption(scene, "dense", seed)
        assert caption(scene, "dense", seed) == text
        for obj in scene.objects:
            size_words = {"small": ("small", "little"), "large": ("large", "big")}[obj.size]
            assert any(f"{w} {obj.colour} {obj.shape}" in text for w in size_words), text
        assert {"grey": "gr", "black": "black"}[scene.background] in text
        if len(scene.objects) > 1:
            assert re.search(r"left|right|above|below|over|under|beneath", text), text
        seen_templates.add(re.sub(r"\b(?:" + "|".join(_ATTRIBUTE_WORDS) + r")\b", "", text)[:12])
    assert len(seen_templates) > 10, "captions should vary in wording and order"


def test_sparse_captions_are_short_and_true():
    texts = set()
    for seed in range(300):
        scene = sample_scene(seed)
        text = caption(scene, "sparse", seed)
        texts.add(text)
        assert len(text.split()) <= 8
        words = set(re.findall(r"[a-z]+", text))
        assert words & _ATTRIBUTE_WORDS <= {o.shape for o in scene.objects} | {o.colour for o in scene.objects}
    assert {"shapes", "geometric shapes"} <= texts
    with pytest.raises(ValueError, match="caption style"):
        caption(sample_scene(0), "long")  # type: ignore[arg-type]


def test_varied_captions_leave_out_sizes_or_background_but_name_every_object_and_relation():
    kinds = set()
    for seed in range(400):
        scene = sample_scene(seed)
        text = caption(scene, "varied", seed)
        assert caption(scene, "varied", seed) == text
        names_sizes = any(w in text.split() for w in ("small", "little", "large", "big"))
        names_background = any(w in text.split() for w in ("grey", "gray", "black", "background"))
        kinds.add((names_sizes, names_background))
        for obj in scene.objects:
            assert f"{obj.colour} {obj.shape}" in text, text
        if len(scene.objects) > 1:
            assert re.search(r"left|right|above|below|over|under|beneath", text), text
        if names_sizes:  # then every object's, and truly
            for obj in scene.objects:
                size_words = {"small": ("small", "little"), "large": ("large", "big")}[obj.size]
                assert any(f"{w} {obj.colour} {obj.shape}" in text for w in size_words), text
        if names_background:
            assert {"grey": "gr", "black": "black"}[scene.background] in text
    assert kinds == {(True, True), (True, False), (False, True), (False, False)}
    # Prompts worded like the README's ("a red circle to the left of a blue square") are among them.
    relation = r"(?:to the |on the )?(?:left of|right of|above|over|below|under|beneath)"
    readme_like = re.compile(rf"an? [a-z]+ [a-z]+ {relation} an? [a-z]+ [a-z]+")
    assert any(readme_like.fullmatch(caption(sample_scene(s), "varied", s)) for s in range(400))


def test_class_labels():
    assert len(CLASS_NAMES) == len(set(CLASS_NAMES)) == 48
    for label, name in enumerate(CLASS_NAMES):
        colour, shape = name.split("_")
        assert class_label(shape, colour) == label
    assert sorted(class_folder(k) for k in range(48)) == [class_folder(k) for k in range(48)]
    for seed in range(50):
        scene = sample_scene(seed)
        primary = primary_object(scene)
        assert primary.size == "large" or all(o.size == "small" for o in scene.objects)
        assert CLASS_NAMES[scene_label(scene)] == f"{primary.colour}_{primary.shape}"


# ----------------------------------------------------------------------------------------------------------------
# Held-out split
# ----------------------------------------------------------------------------------------------------------------


def test_heldout_rule_is_as_documented():
    assert set(HELDOUT_SHAPE_COLOURS) == {
        ("circle", "orange"),
        ("square", "cyan"),
        ("triangle", "white"),
        ("diamond", "yellow"),
        ("cross", "blue"),
        ("semicircle", "red"),
    }
    assert len(HELDOUT_ARRANGEMENTS) == 8
    assert arrangement("green", "right of", "red") == ("red", "left of", "green") in HELDOUT_ARRANGEMENTS


def test_heldout_combinations_never_appear_in_training_scenes():
    train = [sample_scene(seed) for seed in range(3000)]
    for scene in train:
        assert not {(o.shape, o.colour) for o in scene.objects} & HELDOUT_SHAPE_COLOURS
        assert not pair_arrangements(scene) & HELDOUT_ARRANGEMENTS
        assert not uses_heldout(scene)
    # Everything else is still seen: all 42 other (shape, colour) pairs and both orders of every held-out pair.
    seen_pairs = {(o.shape, o.colour) for scene in train for o in scene.objects}
    assert len(seen_pairs) == 48 - len(HELDOUT_SHAPE_COLOURS)
    seen_arrangements = set().union(*(pair_arrangements(s) for s in train))
    assert {(b, rel, a) for a, rel, b in HELDOUT_ARRANGEMENTS} <= seen_arrangements
    # The check is not vacuous: without the split the held-out combinations do occur.
    assert any(uses_heldout(sample_scene(seed, split="all")) for seed in range(100))


def test_short_heldout_prompts_word_the_same_scenes_without_sizes_or_background():
    dense, short = heldout_prompts(24, seed=2), heldout_prompts(24, seed=2, style="short")
    for d, s in zip(dense, short, strict=True):
        assert s.scene == d.scene and s.spec.relation == d.spec.relation
        assert all(o.size is None for o in s.spec.objects) and all(o.size for o in d.spec.objects)
        assert not {"small", "little", "large", "big", "grey", "gray", "black", "background"} & set(s.text.split())
        assert all(f"{o.colour} {o.shape}" in s.text for o in s.spec.objects), s.text
    with pytest.raises(ValueError, match="prompt style"):
        heldout_prompts(2, style="long")  # type: ignore[arg-type]


def test_prompt_completion_leaves_dense_captions_alone():
    """Every dense caption already names each object's size and the background: nothing to add."""
    for i in range(300):
        text = caption(sample_scene(i, split="all"), "dense", seed=i)
        assert complete_prompt(text, seed=i) == text
    for text in ("a corgi astronaut", "shapes", "a circle above a square", ""):  # no object of this world named
        assert complete_prompt(text, seed=3) == text


def test_prompt_completion_adds_only_the_missing_sizes_and_background():
    sizes, backgrounds = {"small", "large"}, {"grey", "black"}
    seen = set()
    for prompt in heldout_prompts(24, seed=5, style="short"):
        for seed in range(8):
            done = complete_prompt(prompt.text, seed)
            assert done == complete_prompt(prompt.text, seed)  # a function of (prompt, seed)
            # Take the additions out again: the prompt's own words are left, in order.
            kept = done
            for obj in prompt.spec.objects:
                size = re.search(rf"\b(small|large) {obj.colour} {obj.shape}\b", done)
                assert size, (obj, done)  # the first mention of each object is sized
                seen.add(size[1])
                kept = kept.replace(f"{size[1]} {obj.colour} {obj.shape}", f"{obj.colour} {obj.shape}", 1)
            background = re.search(r" on a (grey|black) background", kept)
            assert background, done
            seen.add(background[1])
            # Before the first sentence break, where the captions name it ("there is ... background; to its left").
            assert background.end() == len(kept) or kept[background.end()] == ";", done
            kept = kept[: background.start()] + kept[background.end() :]
            an_to_a = re.compile(r"\ban\b")  # "an orange circle" → "a large orange circle"
            assert an_to_a.sub("a", kept) == an_to_a.sub("a", prompt.text)
            assert len(done.split()) == len(prompt.text.split()) + len(prompt.spec.objects) + 4
    assert seen == sizes | backgrounds  # drawn, not fixed


def test_prompt_completion_keeps_what_the_prompt_says():
    assert re.fullmatch(
        "A (small|large) orange circle on a (grey|black) background", complete_prompt("An orange circle")
    )
    done = complete_prompt("A big Red circle above a blue square.", seed=0)
    assert re.fullmatch("A big Red circle above a (small|large) blue square on a (grey|black) background", done)
    # A size given at any mention counts; later mentions ("the blue square") stay as the captions word them.
    text = "a red circle and a blue square: the red circle is left of the small blue square, on grey"
    done = complete_prompt(text, seed=1)
    assert re.fullmatch("a (small|large) " + re.escape(text[2:]), done), done
    done = complete_prompt("there is a blue square; to its left is a red circle.", seed=2)
    pattern = (
        "there is a (small|large) blue square on a (grey|black) background; to its left is a (small|large) red circle"
    )
    assert re.fullmatch(pattern, done), done


def test_heldout_prompts_use_exactly_the_heldout_combinations():
    prompts = heldout_prompts(32, seed=1)
    assert [p.text for p in prompts] == [p.text for p in heldout_prompts(32, seed=1)]
    singles, pairs = prompts[::2], prompts[1::2]
    assert {(p.spec.objects[0].shape, p.spec.objects[0].colour) for p in singles} == HELDOUT_SHAPE_COLOURS
    for p in singles:
        assert len(p.spec.objects) == 1 and p.spec.relation is None
    for p in pairs:
        a, b = p.spec.objects
        assert arrangement(a.colour, p.spec.relation, b.colour) in HELDOUT_ARRANGEMENTS
        assert not {(a.shape, a.colour), (b.shape, b.colour)} & HELDOUT_SHAPE_COLOURS
    assert {arrangement(p.spec.objects[0].colour, p.spec.relation, p.spec.objects[1].colour) for p in pairs} == (
        HELDOUT_ARRANGEMENTS
    )
    for p in prompts:
        assert all(o.colour in p.text and o.shape in p.text for o in p.spec.objects)
        assert uses_heldout(p.scene)


# ----------------------------------------------------------------------------------------------------------------
# On-disk datasets
# ----------------------------------------------------------------------------------------------------------------


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fmt", ["folder", "jsonl", "imagefolder"])
def test_write_dataset_is_deterministic(tmp_path, fmt):
    calls = []
    first = write_dataset(tmp_path / "a", 6, resolution=(64, 48), seed=3, fmt=fmt, progress=lambda *a: calls.append(a))
    assert calls == [(i, 6) for i in range(1, 7)]
    assert tree(first) == tree(write_dataset(tmp_path / "b", 6, resolution=(64, 48), seed=3, fmt=fmt))
    assert tree(first) != tree(write_dataset(tmp_path / "c", 6, resolution=(64, 48), seed=4, fmt=fmt))
    smaller = tree(write_dataset(tmp_path / "d", 4, resolution=(64, 48), seed=3, fmt=fmt))
    if fmt != "jsonl":  # the manifest grows; every other file of a smaller dataset is the same
        assert smaller.items() <= tree(first).items()
    with pytest.raises(PixartError, match="not an empty directory"):
        write_dataset(first, 1, fmt=fmt)


def test_multi_aspect_dataset_draws_a_size_per_scene(tmp_path):
    sizes = [[64, 64], [80, 48], [48, 80]]  # as YAML gives them
    out = write_dataset(tmp_path / "ds", 24, resolution=sizes, seed=0, fmt="jsonl")
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    seen = {(r["width"], r["height"]) for r in records}
    assert seen == {(64, 64), (80, 48), (48, 80)}
    for record in records:
        assert Image.open(out / record["path"]).size == (record["width"], record["height"])
    with pytest.raises(ValueError, match="empty list"):
        write_dataset(tmp_path / "none", 1, resolution=[])


def test_fixed_number_of_objects(tmp_path):
    """``objects=1``: every scene holds one object (the detector finds exactly one); a bad count is refused."""
    out = write_dataset(tmp_path / "one", 12, resolution=32, seed=0, fmt="jsonl", objects=1)
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert all(len(detect(np.asarray(Image.open(out / r["path"]).convert("RGB"))).objects) == 1 for r in records)
    for bad in (0, 4, True):
        with pytest.raises(ValueError, match="objects must be between 1 and 3"):
            write_dataset(tmp_path / f"bad-{bad}", 1, objects=bad)


def test_folder_format(tmp_path):
    out = write_dataset(tmp_path / "ds", 5, resolution=32, seed=0, caption_style="sparse")
    images = sorted(out.glob("*.png"))
    assert [p.name for p in images] == [f"{i:06d}.png" for i in range(5)]
    for path in images:
        assert Image.open(path).size == (32, 32)
        assert path.with_suffix(".txt").read_text().strip()


def test_jsonl_format(tmp_path):
    out = write_dataset(tmp_path / "ds", 5, resolution=(64, 48), seed=0, fmt="jsonl", caption_style="mixed")
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 5
    for record in records:
        assert set(record) == {"path", "caption", "width", "height"}
        assert Image.open(out / record["path"]).size == (record["width"], record["height"]) == (64, 48)


def test_imagefolder_format(tmp_path):
    out = write_dataset(tmp_path / "ds", 40, resolution=32, seed=0, fmt="imagefolder")
    assert (out / "classes.txt").read_text().split() == [class_folder(k) for k in range(48)]
    folders = [p for p in out.iterdir() if p.is_dir()]
    assert len(folders) == 48
    heldout_folders = {class_folder(class_label(*pair)) for pair in HELDOUT_SHAPE_COLOURS}
    for folder in folders:
        assert folder.name not in heldout_folders or not any(folder.iterdir())  # held-out classes: empty folders
        label = int(folder.name.split("_")[0])
        for path in folder.glob("*.png"):
            scene = sample_scene(np.random.default_rng([0, int(path.stem)]), aspect=1.0)
            assert scene_label(scene) == label
    # What training reads (ImageNet convention: rank among the sorted folders) is the class label itself.
    source = read_class_tree(out)
    assert len(source.records) == 40 and len(source.notes) == 1
    for record in source.records:
        assert record.label == int(record.path.parent.name.split("_")[0])


def test_a_class_tree_missing_a_listed_folder_is_refused(tmp_path):
    """Data written before every class had a folder: labels after a missing folder would shift by one."""
    out = write_dataset(tmp_path / "ds", 8, resolution=32, seed=0, fmt="imagefolder")
    (out / class_folder(1)).rmdir()  # the held-out orange circle
    with pytest.raises(PixartError, match="no folder for 01_orange_circle"):
        read_class_tree(out)


# ----------------------------------------------------------------------------------------------------------------
# Detector
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resolution", "noise", "antialias", "n"),
    [(32, 0, True, 500), (64, 0, True, 500), (32, 8, True, 500), (64, 8, True, 500), ((64, 48), 0, False, 200)],
)
def test_detector_recovers_ground_truth(resolution, noise, antialias, n):
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    totals: dict[str, int] = {}
    for seed in range(n):
        scene = sample_scene(100_000 + seed, aspect=width / height, split="all")
        image = np.asarray(render(scene, resolution, antialias=antialias), dtype=np.float32)
        if noise:
            image = np.clip(image + np.random.default_rng(seed).normal(0, noise, image.shape), 0, 255)
        for key, value in dataclasses.asdict(compare_with_scene(detect(image), scene)).items():
            totals[key] = totals.get(key, 0) + int(value)
    accuracy = {
        "count": totals["count_ok"] / n,
        "shape": totals["shape_ok"] / totals["objects"],
        "colour": totals["colour_ok"] / totals["objects"],
        "size": totals["size_ok"] / totals["objects"],
        "relation": totals["relation_ok"] / totals["relations"],
    }
    print(f"\ndetector at {width}×{height}, noise σ={noise}, {n} scenes:", accuracy)
    assert min(accuracy.values()) >= 0.99, accuracy


@pytest.mark.parametrize(("resolution", "noise"), [(32, 0), (64, 8)])
def test_detector_finds_the_concept_colour_by_the_same_rule(resolution, noise):
    """Pink, a concept colour no generated data has unless asked, is found as exactly as the palette colours when the
    detector is told to look for it, in scenes that mix it with every palette colour."""
    colours = (*shapes.COLOUR_NAMES, "pink")
    totals: dict[str, int] = {}
    pinks = 0
    for seed in range(300):
        scene = sample_scene(200_000 + seed, split="all", colours=colours)
        pinks += sum(obj.colour == "pink" for obj in scene.objects)
        image = np.asarray(render(scene, resolution), dtype=np.float32)
        if noise:
            image = np.clip(image + np.random.default_rng(seed).normal(0, noise, image.shape), 0, 255)
        for key, value in dataclasses.asdict(compare_with_scene(detect(image, colours=colours), scene)).items():
            totals[key] = totals.get(key, 0) + int(value)
    assert pinks > 50
    for key in ("shape_ok", "colour_ok", "size_ok"):
        assert totals[key] / totals["objects"] >= 0.99, totals


def test_concept_colours_appear_only_where_asked(tmp_path):
    write_dataset(tmp_path / "pink", 12, resolution=32, fmt="jsonl", objects=1, colours=["pink"], split="all")
    records = [json.loads(line) for line in (tmp_path / "pink" / "manifest.jsonl").read_text().splitlines()]
    assert all("pink" in r["caption"] for r in records)
    assert not any(o.colour == "pink" for i in range(2000) for o in sample_scene(i, split="all").objects)
    assert complete_prompt("a pink circle", 0).startswith(("a large pink circle on", "a small pink circle on"))
    with pytest.raises(ValueError, match="colours must name some of"):
        write_dataset(tmp_path / "bad", 2, colours=["mauve"])
    with pytest.raises(ValueError, match="no class label"):
        write_dataset(tmp_path / "bad2", 2, fmt="imagefolder", colours=["pink"])


def test_the_scene_stream_is_unchanged():
    """Regression test (a hash of our own output): the scenes and captions every shipped dataset and asset was drawn
    from, for seeds 0–299 of both splits and every object count, so that a change to the sampler cannot silently
    change what the recipes train on."""
    import hashlib

    digest = hashlib.sha256()
    for i in range(300):
        for split in ("train", "all"):
            for count in (None, 1, 3):
                scene = sample_scene(i, split=split, num_objects=count)
                digest.update(repr(scene).encode())
                digest.update(caption(scene, "dense", i).encode())
    assert digest.hexdigest() == "68f206a374138a175c2dfdab176622c8da1dbeec7b5b8649a86a810b15b47a6c"


def test_detector_ignores_specks_and_tolerates_off_colours():
    scene = sample_scene(5, num_objects=2)
    image = np.asarray(render(scene, 64), dtype=np.float32).copy()
    image[1:3, 30:32] = COLOURS["red"]  # a 2×2 speck
    image += np.asarray([12.0, -10.0, 8.0])  # a colour cast
    found = detect(np.clip(image, 0, 255)).objects
    assert sorted((o.shape, o.colour) for o in found) == sorted((o.shape, o.colour) for o in scene.objects)


# ----------------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------------


def test_reference_scenes_of_heldout_prompts_score_perfectly():
    prompts = heldout_prompts(24, seed=0)
    for resolution in (32, 64):
        report = score_images([render(p.scene, resolution) for p in prompts], [p.spec for p in prompts])
        assert report.categories == dict.fromkeys(report.categories, 1.0)
        assert set(report.categories) >= {"color", "shape", "spatial", "complex"}


def test_concept_prompts_score_their_reference_scenes_perfectly_and_other_colours_not():
    from pixart_cli.shapesworld.prompts import concept_prompts

    prompts = concept_prompts("pink", 12, seed=0)
    assert {p.spec.objects[0].shape for p in prompts} == set(shapes.SHAPES) and all("pink" in p.text for p in prompts)
    for resolution in (32, 64):
        report = score_images([render(p.scene, resolution) for p in prompts], [p.spec for p in prompts])
        assert report.categories["color"] == 1.0 and report.categories["shape"] == 1.0
    red = [
        dataclasses.replace(p.scene, objects=(dataclasses.replace(p.scene.objects[0], colour="red"),)) for p in prompts
    ]
    report = score_images([render(scene, 64) for scene in red], [p.spec for p in prompts])
    assert report.categories["color"] == 0.0  # a red shape is not pink
    with pytest.raises(ValueError, match="unknown colour"):
        concept_prompts("mauve", 2)


def _two_object_image(left: tuple[str, str], right: tuple[str, str], extra: tuple[str, str] | None = None):
    objects = [("large", 0.3, 0.5, *left), ("large", 0.75, 0.5, *right)]
    if extra:
        objects.append(("small", 0.5, 0.15, *extra))
    built = []
    for size, x, y, shape, colour in objects:
        half = SIZE_EXTENT[size] / 2
        built.append(shapes.ShapeObject(shape, colour, size, (x, y), (x - half, y - half, x + half, y + half)))
    return render(shapes.Scene(tuple(built), (), "grey"), 64)


def test_scores_separate_the_failure_modes():
    spec = PromptSpec((ObjectSpec("circle", "red", "large"), ObjectSpec("square", "blue")), relation="left of")
    right = score_image(_two_object_image(("circle", "red"), ("square", "blue")), spec)
    assert all(right[k] for k in ("presence", "count", "color", "shape", "binding", "size", "spatial", "complex"))

    swapped_colours = score_image(_two_object_image(("circle", "blue"), ("square", "red")), spec)
    assert swapped_colours["color"] and swapped_colours["shape"]
    assert not swapped_colours["binding"] and not swapped_colours["complex"]

    mirrored = score_image(_two_object_image(("square", "blue"), ("circle", "red")), spec)
    assert mirrored["binding"] and not mirrored["spatial"] and not mirrored["complex"]

    extra = score_image(_two_object_image(("circle", "red"), ("square", "blue"), ("cross", "green")), spec)
    assert extra["spatial"] and not extra["count"] and not extra["complex"]

    wrong_shape = score_image(_two_object_image(("circle", "red"), ("triangle", "blue")), spec)
    assert wrong_shape["color"] and not wrong_shape["shape"]

    empty = score_image(Image.new("RGB", (64, 64), (128, 128, 128)), spec)
    assert not any(empty[k] for k in ("presence", "count", "color", "shape", "binding", "spatial", "complex"))

    single = score_image(
        _two_object_image(("circle", "red"), ("square", "blue")), PromptSpec((ObjectSpec("circle", "red"),))
    )
    assert single["spatial"] is None and single["size"] is None and single["binding"] and not single["count"]


def test_autoencoder_script_writes_a_vae_the_pipeline_reads(tmp_path):
    """experiments/shapesworld/shapes_autoencoder.py: two steps of a tiny AutoencoderKL, scored by the detector,
    saved so that `data.vae` can name it (scaling factor set from its latents)."""
    script = Path(__file__).resolve().parents[2] / "experiments" / "shapesworld" / "shapes_autoencoder.py"
    args = ["-o", str(tmp_path / "vae"), "--steps", "2", "--eval-every", "2", "--eval-scenes", "6", "--width", "8"]
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "detector on the original pixels" in result.stdout
    (row,) = [json.loads(line) for line in (tmp_path / "vae" / "results.jsonl").read_text().splitlines()]
    assert row["step"] == 2 and row["downsample"] == 4 and 0 <= row["scenes_all_right"] <= 1
    vae = VAE(load_vae(str(tmp_path / "vae")))
    assert vae.downsample == 4 and vae.scaling_factor == pytest.approx(1 / row["latent_std"], rel=1e-5)
    mean, _ = vae.encode(torch.zeros(1, 3, 32, 32))
    assert mean.shape == (1, 4, 8, 8) and vae.decode(mean).shape == (1, 3, 32, 32)
