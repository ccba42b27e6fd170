"""The data side of training: sources, robust image loading, buckets and their sampler, the feature cache, loaders."""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pixart_cli.cli import app
from pixart_cli.components.autoencoders import VAE, PixelSpace, draw_latents
from pixart_cli.data.buckets import BucketBatchSampler, Buckets, make_bucket_table, official_bucket_table
from pixart_cli.data.cache import PrepareProgress, PrepareSettings, prepare
from pixart_cli.data.loader import (
    CachedDataset,
    LoaderBatches,
    OnTheFlyDataset,
    collate,
    make_loader,
    step_generator,
)
from pixart_cli.data.sources import Record, detect_kind, read_source
from pixart_cli.data.transforms import BadImage, image_size, load_image, load_pixels, resize_and_crop, to_tensor
from pixart_cli.errors import PixartError

CAPTIONS = ["a red square", "a blue circle on grass", "two green triangles", "a small yellow star", "sky", "cat"]


def save_image(path: Path, size: tuple[int, int] = (40, 30), seed: int = 0, mode: str = "RGB") -> Path:
    """A noise image of ``size`` = (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(array).convert(mode).save(path)
    return path


def bomb_png(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A tiny PNG whose header claims ``width``×``height`` pixels (IHDR patched, CRC recomputed)."""
    save_image(path, (1, 1))
    data = bytearray(path.read_bytes())
    start = 8 + 8  # signature, then IHDR length + type
    data[start : start + 8] = struct.pack(">II", width, height)
    data[start + 13 : start + 17] = struct.pack(">I", zlib.crc32(bytes(data[start - 4 : start + 13])))
    path.write_bytes(bytes(data))
    return path


def caption_folder(root: Path, sizes=((40, 30), (30, 40), (32, 32), (64, 16), (16, 64), (48, 32))) -> Path:
    for i, size in enumerate(sizes):
        save_image(root / f"{i % 2}" / f"img{i}.png", size, seed=i)
        (root / f"{i % 2}" / f"img{i}.txt").write_text(CAPTIONS[i % len(CAPTIONS)])
    return root


def class_tree(root: Path, per_class: int = 3) -> Path:
    for c, name in enumerate(["zebra", "apple", "mango"]):
        for i in range(per_class):
            save_image(root / name / f"{i}.png", (36, 32), seed=10 * c + i)
    return root


# ---------------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------------


def test_folder_source_recursive_with_missing_captions(tmp_path):
    root = caption_folder(tmp_path / "data")
    save_image(root / "deep" / "er" / "x.jpg")  # no caption
    save_image(root / "empty.png")
    (root / "empty.txt").write_text("  \n")
    save_image(root / ".hidden" / "h.png")
    (root / ".hidden" / "h.txt").write_text("hidden")
    assert detect_kind(root) == "captions"
    source = read_source(root)
    assert source.kind == "captions" and len(source.records) == 6
    assert source.missing_captions == 2 and source.skipped_captions == 2
    assert [r.caption for r in source.records][:1] == [CAPTIONS[0]]
    assert all(".hidden" not in str(r.path) for r in source.records)
    kept = read_source(root, keep_empty_captions=True)
    assert len(kept.records) == 8 and kept.skipped_captions == 0
    assert sorted(r.caption for r in kept.records)[:2] == ["", ""]


def test_manifest_source(tmp_path):
    save_image(tmp_path / "images" / "a.png")
    absolute = save_image(tmp_path / "elsewhere" / "b.png")
    lines = [
        {"path": "images/a.png", "caption": "first", "width": 40, "height": 30},
        {"path": str(absolute), "caption": "second"},
        {"path": "images/a.png", "caption": ""},
    ]
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert detect_kind(manifest) == "manifest"
    source = read_source(manifest)
    assert [r.path for r in source.records] == [tmp_path / "images" / "a.png", absolute]
    assert source.records[0] == Record(tmp_path / "images" / "a.png", "first", None, 40, 30)
    assert source.missing_captions == 1
    manifest.write_text('{"path": "a.png", "caption": "x"}\n{not json\n')
    with pytest.raises(PixartError, match=r"train\.jsonl:2: not valid JSON"):
        read_source(manifest)
    manifest.write_text('{"path": "a.png", "width": -3}\n')
    with pytest.raises(PixartError, match="width must be a positive integer"):
        read_source(manifest)


def test_class_tree_source(tmp_path):
    root = class_tree(tmp_path / "imagenet")
    (root / "empty_class").mkdir()
    assert detect_kind(root) == "classes"
    source = read_source(root)
    assert source.class_names == ["apple", "empty_class", "mango", "zebra"]
    assert [r.label for r in source.records] == [0] * 3 + [2] * 3 + [3] * 3
    assert all(r.caption is None for r in source.records) and source.conditioning == "label"
    with pytest.raises(PixartError, match="none of the 9 images has a caption"):
        read_source(root, "captions")  # explicit override
    assert read_source(root, "captions", keep_empty_captions=True).kind == "captions"


def test_missing_and_wrong_paths(tmp_path):
    with pytest.raises(PixartError, match=r"nope: no such dataset"):
        read_source(tmp_path / "nope")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(PixartError, match="not a dataset"):
        read_source(tmp_path / "x.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PixartError, match="no usable images"):
        read_source(tmp_path / "empty")


def test_a_manifest_that_is_not_utf8_is_an_error_naming_the_line(tmp_path):
    save_image(tmp_path / "a.png")
    manifest = tmp_path / "train.jsonl"
    manifest.write_bytes(b'{"path": "a.png", "caption": "one"}\n\n{"path": "a.png", "caption": "caf\xe9"}\n')
    with pytest.raises(PixartError, match=r"train\.jsonl:3: not UTF-8 text \(byte 0xe9 at column 34\)"):
        read_source(manifest)
    manifest.write_text('{"path": "a.png", "caption": "one"}\n'.encode("utf-16").decode("latin-1"), "latin-1")
    with pytest.raises(PixartError, match=r"train\.jsonl:1: not UTF-8 text \(byte 0xff at column 1\)"):
        read_source(manifest)
    manifest.write_bytes(b'\xef\xbb\xbf{"path": "a.png", "caption": "caf\xc3\xa9"}\n')  # a UTF-8 byte order mark
    assert [r.caption for r in read_source(manifest).records] == ["café"]
    root = class_tree(tmp_path / "classes", per_class=1)
    (root / "classes.txt").write_bytes(b"apple\nmang\xf3\nzebra\n")
    with pytest.raises(PixartError, match=r"classes\.txt:2: not UTF-8 text \(byte 0xf3 at column 5\)"):
        read_source(root, "classes")


def test_captions_that_are_not_utf8_text_are_counted_with_the_unreadable_images(tmp_path):
    root = caption_folder(tmp_path / "data", sizes=((32, 32),) * 6)
    (root / "0" / "img0.txt").write_bytes("crème brûlée".encode("latin-1"))
    (root / "1" / "img1.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (root / "0" / "img2.txt").write_bytes(b"a red\x01square")
    (root / "1" / "img3.txt").write_bytes("\ufeffa small yellow star\r\n".encode())  # BOM and CRLF: text
    source = read_source(root)
    assert sorted(r.path.name for r in source.records) == ["img3.png", "img4.png", "img5.png"]
    assert source.records[1].caption == "a small yellow star"
    reasons = {path.name: reason for path, reason in source.bad}
    assert reasons == {
        "img0.png": "caption not UTF-8 text (img0.txt: byte 0xe8 at offset 2)",
        "img1.png": "caption is binary (img1.txt: byte 0x00 at offset 8)",
        "img2.png": "caption is binary (img2.txt: byte 0x01 at offset 5)",
    }
    assert source.missing_captions == 0  # a broken caption file is not a missing caption
    for image in ("img3", "img4", "img5"):
        (root / str(int(image[-1]) % 2) / f"{image}.txt").write_bytes(b"\x00\x01")
    with pytest.raises(PixartError, match=r"none of the 6 images has a usable caption \(e\.g\. .*img0\.png"):
        read_source(root)


def test_symlink_loops_are_read_once_and_linked_in_folders_are_followed(tmp_path):
    plain = caption_folder(tmp_path / "plain")
    outside = caption_folder(tmp_path / "outside", sizes=((32, 32),))
    looped = caption_folder(tmp_path / "looped")
    (looped / "loop").symlink_to(".")  # up to 40 levels of looped/loop/loop/…: every image 41 times over
    (looped / "0" / "again").symlink_to(".")  # nested: a loop inside every copy
    expected = sorted((r.path.relative_to(plain), r.caption) for r in read_source(plain).records)
    source = read_source(looped)
    assert sorted((r.path.relative_to(looped), r.caption) for r in source.records) == expected
    assert source.notes and "not read again" in source.notes[0]
    (looped / "linked").symlink_to(outside / "0", target_is_directory=True)  # a dataset linked in: read
    (looped / "linked-twice").symlink_to(outside / "0", target_is_directory=True)  # once, by its first path
    (looped / "one.png").symlink_to(outside / "0" / "img0.png")
    (looped / "one.txt").symlink_to(outside / "0" / "img0.txt")
    names = sorted(str(r.path.relative_to(looped)) for r in read_source(looped).records)
    assert names == sorted([str(p) for p, _ in expected] + ["linked/img0.png", "one.png"])
    tree = class_tree(tmp_path / "classes", per_class=2)
    (tree / "apple" / "loop").symlink_to(".")
    (tree / "mango" / "deep").mkdir()
    (tree / "mango" / "deep" / "top").symlink_to("../..")  # the root: the other classes are not read as mango
    source = read_source(tree)
    assert [r.label for r in source.records] == [0, 0, 1, 1, 2, 2] and source.class_names == ["apple", "mango", "zebra"]


# ---------------------------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------------------------


def test_bad_images_are_reported_not_raised(tmp_path):
    good = save_image(tmp_path / "good.png", (64, 64))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    save_image(tmp_path / "good.jpg", (64, 64))
    truncated_jpg = tmp_path / "truncated.jpg"
    truncated_jpg.write_bytes((tmp_path / "good.jpg").read_bytes()[:400])
    zero = tmp_path / "zero.png"
    zero.write_bytes(b"")
    text = tmp_path / "text.png"
    text.write_text("not an image at all")
    bomb = bomb_png(tmp_path / "bomb.png")
    for path in (truncated, truncated_jpg, zero, text, bomb, tmp_path / "missing.png"):
        result = load_image(path)
        assert isinstance(result, BadImage) and result.path == path and result.reason, path
        assert isinstance(load_pixels(path, (16, 16)), BadImage)
    assert isinstance(image_size(bomb), BadImage) and isinstance(image_size(zero), BadImage)
    assert image_size(good) == (64, 64)
    limited = load_image(good, max_pixels=1000)
    assert isinstance(limited, BadImage) and "too many pixels" in limited.reason
    assert isinstance(load_image(good), Image.Image)


def test_modes_become_rgb(tmp_path):
    gray = save_image(tmp_path / "gray.png", mode="L")
    assert load_image(gray).mode == "RGB"
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[0, 0, 3] = 255  # one opaque red pixel, the rest fully transparent → white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    array = np.asarray(load_image(tmp_path / "rgba.png"))
    assert array[0, 0].tolist() == [255, 0, 0] and array[1, 1].tolist() == [255, 255, 255]
    deep = np.array([[0, 32768], [65535, 65535]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    array = np.asarray(load_image(tmp_path / "deep.png"))
    assert array[..., 0].tolist() == [[0, 128], [255, 255]]  # scaled, not clipped at 255
    palette = Image.fromarray(rgba, "RGBA").convert("P")
    palette.save(tmp_path / "palette.gif")
    assert load_image(tmp_path / "palette.gif").mode == "RGB"


def test_resize_and_centre_crop_geometry():
    stripes = np.zeros((100, 300, 3), dtype=np.uint8)  # three vertical thirds: red, green, blue
    stripes[:, :100, 0] = stripes[:, 100:200, 1] = stripes[:, 200:, 2] = 255
    image = Image.fromarray(stripes)
    crop = resize_and_crop(image, (50, 50))
    assert crop.size == (50, 50)
    centre = np.asarray(crop)[:, 5:45]
    assert (centre[..., 1] > 250).all() and (centre[..., [0, 2]] < 5).all()  # only the middle third survives
    tall = resize_and_crop(Image.fromarray(stripes.transpose(1, 0, 2).copy()), (32, 16))
    assert tall.size == (16, 32)  # PIL sizes are (width, height); targets are (height, width)
    for size in ((37, 53), (64, 16), (1, 1)):
        assert resize_and_crop(Image.new("RGB", (101, 67)), size).size == size[::-1]
    tensor = to_tensor(crop)
    assert tensor.shape == (3, 50, 50) and tensor.dtype == torch.float32
    assert tensor.min() >= -1 and tensor.max() <= 1 and tensor[1, 25, 25] == 1.0 and tensor[0, 25, 25] == -1.0


# ---------------------------------------------------------------------------------------------------------------
# Buckets and the sampler
# ---------------------------------------------------------------------------------------------------------------


def test_bucket_tables():
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha as alpha_tables
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_sigma as sigma_tables

    # Ours (the 1024 table, scaled for 256 and 512; PixArt-Σ's 2K table) are diffusers', key order included.
    for base in (256, 512, 1024, 2048):
        official = getattr(alpha_tables if base < 2048 else sigma_tables, f"ASPECT_RATIO_{base}_BIN")
        assert list(official_bucket_table(base).items()) == [(k, (int(h), int(w))) for k, (h, w) in official.items()]
        assert make_bucket_table(base, 16) == official_bucket_table(base)
    small = make_bucket_table(32, 16)
    assert (
        small["1.00"] == (32, 32)
        and small["1.50"] == (48, 32)
        and all(h % 16 == 0 and w % 16 == 0 for h, w in small.values())
    )
    assert len(set(small.values())) == len(small)
    pixels = make_bucket_table(64, 2)
    assert pixels["1.00"] == (64, 64) and len(pixels) > len(small)
    buckets = Buckets.from_table(official_bucket_table(256))
    assert buckets.sizes[buckets.assign(height=512, width=512)] == (256, 256)
    assert buckets.sizes[buckets.assign(height=1000, width=500)] == (352, 176)
    assert buckets.sizes[buckets.assign(height=100, width=10_000)] == (128, 512)
    assert Buckets.from_json(buckets.to_json()) == buckets
    assert Buckets.for_resolution(64, multi_scale=False) == Buckets.single(64)
    with pytest.raises(ValueError, match="not a multiple"):
        Buckets.for_resolution(40, multi_scale=False, multiple=16)


BUCKET_OF = [i % 3 for i in range(50)] + [3] * 5  # buckets of 17, 17, 16 and 5 items


def test_sampler_batches_stay_in_one_bucket_and_are_deterministic():
    sampler = BucketBatchSampler(BUCKET_OF, 4, seed=7)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 4 + 4 + 4 + 1
    for batch in batches:
        assert len(batch) == 4 and len({BUCKET_OF[i] for i in batch}) == 1
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat))  # no index twice in an epoch
    assert batches == list(BucketBatchSampler(BUCKET_OF, 4, seed=7))
    assert batches != list(BucketBatchSampler(BUCKET_OF, 4, seed=8))
    sampler.set_epoch(1)
    assert list(sampler) != batches
    sampler.set_epoch(0)
    assert list(sampler) == batches


def test_sampler_resume_equals_continuing():
    sampler = BucketBatchSampler(BUCKET_OF, 3, seed=1)
    sampler.set_epoch(2)
    iterator = iter(sampler)
    first = [next(iterator) for _ in range(5)]
    state = sampler.state_dict()
    rest = list(iterator)
    assert state == {"seed": 1, "epoch": 2, "batch": 5}
    fresh = BucketBatchSampler(BUCKET_OF, 3, seed=1)
    fresh.load_state_dict(state)
    assert list(fresh) == rest
    assert list(fresh.iterate(2, 5)) == rest and list(fresh.iterate(2)) == first + rest
    assert len(list(fresh)) == len(fresh)  # the start position applies to one pass only
    assert fresh.state_dict(consumed=3)["batch"] == 3
    with pytest.raises(ValueError, match="seed"):
        BucketBatchSampler(BUCKET_OF, 3, seed=2).load_state_dict(state)


def test_two_replicas_partition_each_global_batch():
    ranks = [BucketBatchSampler(BUCKET_OF, 2, seed=3, num_replicas=2, rank=r) for r in range(2)]
    for sampler in ranks:
        sampler.set_epoch(4)
    per_rank = [list(s) for s in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == len(ranks[0])
    for (a, b), whole in zip(zip(*per_rank, strict=True), ranks[0].global_batches(4), strict=True):
        assert len(a) == len(b) == 2 and not set(a) & set(b)
        assert a + b == whole.tolist()
        assert len({BUCKET_OF[i] for i in a + b}) == 1  # both ranks step in the same bucket


def test_sampler_without_drop_last_covers_everything():
    sampler = BucketBatchSampler(BUCKET_OF, 4, seed=0, num_replicas=2, rank=0, drop_last=False)
    other = BucketBatchSampler(BUCKET_OF, 4, seed=0, num_replicas=2, rank=1, drop_last=False)
    seen = {i for batch in list(sampler) + list(other) for i in batch}
    assert seen == set(range(len(BUCKET_OF)))
    assert all(len(b) == 4 for b in sampler)
    with pytest.raises(PixartError, match="no aspect-ratio bucket holds a full global batch"):
        BucketBatchSampler([0, 1, 2], 2, seed=0)


# ---------------------------------------------------------------------------------------------------------------
# Encoders and the feature cache
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from pixart_cli.tiny import make_tiny_t5, make_tiny_vae

    root = tmp_path_factory.mktemp("models")
    t5 = make_tiny_t5(root / "t5", CAPTIONS * 4, d_model=16, num_layers=1, num_heads=2, d_ff=32, vocab_size=64)
    vae = make_tiny_vae(root / "vae", block_out_channels=(8, 8, 8, 8))
    return str(t5), str(vae)


def test_vae_encoder_scales_the_posterior(tiny_models):
    from pixart_cli.components.autoencoders import load_vae

    vae = load_vae(tiny_models[1])
    encoder = VAE(vae, name="tiny")
    pixels = torch.rand(2, 3, 32, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, std = encoder.encode(pixels)
    posterior = vae.encode(pixels).latent_dist
    assert mean.shape == std.shape == (2, 4, 4, 2) == (2, *encoder.latent_shape(32, 16))
    torch.testing.assert_close(mean, posterior.mean * 0.18215)
    torch.testing.assert_close(std, posterior.std * 0.18215)
    assert encoder.decode(mean).shape == (2, 3, 32, 16)
    a = draw_latents(mean, std, torch.Generator().manual_seed(1))
    b = draw_latents(mean, std, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, mean)
    mean, std = PixelSpace().encode(pixels)
    assert torch.equal(mean, pixels) and not std.any()


def _shard_arrays(cache: Path) -> dict[str, np.ndarray]:
    return {f"{d.name}/{f.name}": np.load(f) for d in sorted((cache / "shards").iterdir()) for f in d.glob("*.npy")}


def test_cache_round_trip_with_t5_and_vae(tmp_path, tiny_models):
    from pixart_cli.components.autoencoders import load_vae
    from pixart_cli.components.text import TextEncoder

    t5, vae = tiny_models
    data = caption_folder(tmp_path / "data")
    settings = PrepareSettings(resolution=32, multi_scale=True, batch_size=2)
    report = prepare(data, tmp_path / "cache", settings, t5=t5, vae=vae)
    assert report.items == 6 and not report.bad_images and report.resumed_shards == 0
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert index["text_encoder"] == str(Path(t5).resolve()) and index["vae"] == str(Path(vae).resolve())
    assert index["counts"]["items"] == 6 and index["caption_channels"] == 16 and index["storage_dtype"] == "float16"

    dataset = CachedDataset(tmp_path / "cache")
    assert len(dataset) == 6 and len(set(dataset.bucket_of)) > 1
    encoder, text = VAE(load_vae(vae)), TextEncoder(t5, max_length=120)
    source = read_source(data)
    for i in range(len(dataset)):
        item = dataset[i]
        height, width = item["resolution"].int().tolist()
        assert (height, width) == dataset.buckets.sizes[item["bucket"]]
        record = source.records[_record_of(tmp_path / "cache", i)]
        with Image.open(record.path) as image:
            assert item["bucket"] == dataset.buckets.assign(height=image.height, width=image.width)
        mean, std = encoder.encode(load_pixels(record.path, (height, width))[None])
        torch.testing.assert_close(item["latent_mean"].float(), mean[0], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(item["latent_std"].float(), std[0], atol=1e-4, rtol=2e-3)
        captions = text.encode([record.caption])
        assert torch.equal(item["caption_mask"], captions.mask[0])
        real = captions.mask[0].bool()
        torch.testing.assert_close(item["caption"][real].float(), captions.embeddings[0][real], atol=2e-3, rtol=2e-3)
        assert item["caption"].shape == (120, 16) and not item["caption"][~real].any()
        assert item["aspect_ratio"].item() == pytest.approx(height / width)
    # A finished cache is left alone by a rerun with the same settings, and refused with different ones.
    again = prepare(data, tmp_path / "cache", PrepareSettings(resolution=32, multi_scale=True), t5=t5, vae=vae)
    assert again.resumed_shards == again.shards and again.items == 6
    with pytest.raises(PixartError, match=r"other settings \(resolution: 32 → 64"):
        prepare(data, tmp_path / "cache", PrepareSettings(resolution=64, multi_scale=True), t5=t5, vae=vae)


def _record_of(cache: Path, item: int) -> int:
    """The dataset record behind cache item ``item`` (shards in order, empty shards skipped)."""
    indices = np.concatenate([np.load(d / "index.npy") for d in sorted((cache / "shards").iterdir())])
    return int(indices[item])


def test_pixel_space_class_tree_cache_and_loader(tmp_path):
    root = class_tree(tmp_path / "classes", per_class=4)
    report = prepare(root, tmp_path / "cache", PrepareSettings(resolution=16, shard_size=5), t5=None, vae="none")
    assert report.items == 12 and report.shards == 3
    dataset = CachedDataset(tmp_path / "cache")
    assert dataset.class_names == ["apple", "mango", "zebra"] and dataset.conditioning == "label"
    assert not list((tmp_path / "cache" / "shards").glob("*/latent_std.npy"))  # std is 0: not stored
    item = dataset[7]
    record = read_source(root).records[_record_of(tmp_path / "cache", 7)]
    assert item["label"] == record.label and item["latent_mean"].shape == (3, 16, 16)
    torch.testing.assert_close(item["latent_mean"].float(), load_pixels(record.path, (16, 16)), atol=1e-3, rtol=0)
    assert not item["latent_std"].any() and "caption" not in item

    loader = make_loader(dataset, 4, seed=0)
    batches = list(loader)
    assert len(batches) == 3 and batches[0]["latent_mean"].shape == (4, 3, 16, 16)
    assert batches[0]["label"].dtype == torch.int64 and batches[0]["index"].shape == (4,)
    assert loader.batch_sampler.state_dict()["batch"] == 3
    in_workers = list(make_loader(dataset, 4, seed=0, num_workers=2))  # each worker maps the shards itself
    for ours, theirs in zip(batches, in_workers, strict=True):
        assert torch.equal(ours["latent_mean"], theirs["latent_mean"]) and torch.equal(ours["label"], theirs["label"])


def test_collate_samples_latents_per_step(tmp_path, tiny_models):
    data = caption_folder(tmp_path / "data", sizes=((32, 32),) * 4)
    settings = PrepareSettings(resolution=32, batch_size=4)
    prepare(data, tmp_path / "cache", settings, t5=tiny_models[0], vae=tiny_models[1])
    dataset = CachedDataset(tmp_path / "cache")
    items = [dataset[i] for i in range(4)]
    a = collate(items, step_generator(5, 10))
    b = collate(items, step_generator(5, 10))
    c = collate(items, step_generator(5, 11))
    longest = max(int(item["caption_mask"].sum()) for item in items)
    assert a["latents"].shape == (4, 4, 4, 4) and a["caption"].shape == (4, longest, 16) and longest < 120
    assert a["caption_mask"][:, -1].any()  # trimmed to the batch's longest caption, no further
    assert torch.equal(a["latents"], b["latents"]) and not torch.equal(a["latents"], c["latents"])
    assert a["caption_mask"].dtype == torch.int64
    assert "latents" not in collate(items)

    # The trainer's view: endless (epoch, next batch, batch) with x0 drawn from the position, resumable.
    stream = LoaderBatches(make_loader(dataset, 2, seed=3), seed=3)
    run = stream.iterate(0, 0, "cpu")
    got = [next(run) for _ in range(5)]
    assert [(e, k) for e, k, _ in got] == [(0, 1), (0, 2), (1, 1), (1, 2), (2, 1)]
    assert got[0][2]["x0"].shape == (2, 4, 4, 4) and got[0][2]["caption"].shape[::2] == (2, 16)
    epoch, position, batch = next(stream.iterate(1, 1, "cpu"))
    assert (epoch, position) == (1, 2) and torch.equal(batch["x0"], got[3][2]["x0"])
    assert torch.equal(batch["index"], got[3][2]["index"])
    assert not torch.equal(got[0][2]["x0"], got[0][2]["latent_mean"].float())


def test_prepare_resumes_after_interruption(tmp_path, tiny_models):
    t5, vae = tiny_models
    data = caption_folder(tmp_path / "data")
    settings, encoders = PrepareSettings(resolution=32, shard_size=2, batch_size=1), {"t5": t5, "vae": vae}
    reference = prepare(data, tmp_path / "reference", replace(settings, num_workers=2), **encoders)  # no change
    assert reference.shards == 3

    def interrupt(p: PrepareProgress) -> None:
        if p.shards_done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(data, tmp_path / "cache", settings, progress=interrupt, **encoders)
    shards = tmp_path / "cache" / "shards"
    assert sorted(p.name for p in shards.iterdir()) == ["00000", "00001"]
    assert not (tmp_path / "cache" / "index.json").exists()
    with pytest.raises(PixartError, match="unfinished feature cache"):
        CachedDataset(tmp_path / "cache")
    stamps = {p.name: p.stat().st_mtime_ns for p in shards.iterdir()}
    (shards / ".00002.tmp-999999999-0badc0de").mkdir()  # what a kill -9 mid-shard leaves behind
    seen: list[PrepareProgress] = []
    report = prepare(data, tmp_path / "cache", settings, progress=seen.append, **encoders)
    assert report.resumed_shards == 2 and report.items == 6
    assert seen[0].shards_done == 2 and seen[-1].shards_done == 3
    assert {p: shards.joinpath(p).stat().st_mtime_ns for p in stamps} == stamps  # finished shards not redone
    assert sorted(p.name for p in shards.iterdir()) == ["00000", "00001", "00002"]
    ours, theirs = _shard_arrays(tmp_path / "cache"), _shard_arrays(tmp_path / "reference")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert np.array_equal(ours[name], theirs[name]), name
    with pytest.raises(PixartError, match="unfinished cache made with other settings"):
        (tmp_path / "cache" / "index.json").unlink()
        prepare(data, tmp_path / "cache", replace(settings, shard_size=3), **encoders)


def test_prepare_skips_and_counts_bad_images(tmp_path):
    root = class_tree(tmp_path / "classes", per_class=10)
    (root / "apple" / "zero.png").write_bytes(b"")
    bomb_png(root / "mango" / "bomb.png")
    with pytest.raises(PixartError, match=r"2 of 32 images are unreadable, more than 1\.0%"):
        prepare(root, tmp_path / "strict", PrepareSettings(resolution=16), t5=None, vae="none")
    lenient = PrepareSettings(resolution=16, max_bad_fraction=0.1)
    report = prepare(root, tmp_path / "cache", lenient, t5=None, vae="none")
    assert report.items == 30 and sorted(b.path.name for b in report.bad_images) == ["bomb.png", "zero.png"]
    multi = prepare(root, tmp_path / "multi", replace(lenient, multi_scale=True), t5=None, vae="none")
    assert multi.items == 30 and len(multi.bad_images) == 2  # found by the header pass
    index = json.loads((tmp_path / "multi" / "index.json").read_text())
    assert index["counts"]["bad_images"] == 2


def test_on_the_fly_dataset_replaces_unreadable_images(tmp_path, tiny_models):
    from pixart_cli.components.text import TextEncoder

    root = caption_folder(tmp_path / "data", sizes=((32, 32),) * 4)
    (root / "0" / "img0.png").write_bytes(Path(root / "0" / "img0.png").read_bytes()[:60])  # header ok, data cut
    source = read_source(root)
    dataset = OnTheFlyDataset.from_source(source, Buckets.single(16))
    assert len(dataset) == 4
    item = dataset[0]
    assert item["pixels"].shape == (3, 16, 16) and item["index"] != 0 and isinstance(item["caption"], str)
    batch = next(iter(make_loader(dataset, 2, seed=0)))
    assert batch["pixels"].shape == (2, 3, 16, 16) and len(batch["caption"]) == 2
    text = TextEncoder(tiny_models[0], max_length=12)
    stream = LoaderBatches(make_loader(dataset, 2, seed=0), seed=0, autoencoder=PixelSpace(), text_encoder=text)
    _, _, batch = next(stream.iterate(0, 0, "cpu"))
    assert batch["x0"].shape == (2, 3, 16, 16) and batch["caption"].shape == (2, 12, 16)
    assert batch["caption_mask"].shape == (2, 12) and len(batch["caption_text"]) == 2


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

runner = CliRunner()


def test_prepare_cli(tmp_path):
    result = runner.invoke(app, ["prepare", "--help"])
    assert result.exit_code == 0 and "--multi-scale" in result.output
    root = class_tree(tmp_path / "classes")
    args = ["prepare", str(root), "-o", str(tmp_path / "cache"), "--vae", "none", "--resolution", "16"]
    result = runner.invoke(app, [*args, "--workers", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "cached 9 of 9 images" in result.output
    assert CachedDataset(tmp_path / "cache")[0]["latent_mean"].shape == (3, 16, 16)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["MISSING", "--vae", "none"], "no such dataset"),
        (["DATA", "--vae", "none"], "needs a T5 text encoder"),
        (["DATA", "--t5", "T5", "--vae", "VAE", "--resolution", "20"], "resolution 20 is not a multiple of 16"),
        (["DATA"], "--vae is required"),
        (["DATA", "--t5", "/no/such/t5", "--vae", "none"], "no such T5 directory"),
    ],
)
def test_prepare_cli_errors(tmp_path, tiny_models, args, message):
    data = caption_folder(tmp_path / "data", sizes=((32, 32),))
    paths = {"MISSING": str(tmp_path / "missing"), "DATA": str(data), "T5": tiny_models[0], "VAE": tiny_models[1]}
    result = runner.invoke(app, ["prepare", *(paths.get(a, a) for a in args), "--workers", "0", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_prepare_from_a_recipe_sizes_buckets_by_the_vaes_own_downsampling(tmp_path, tiny_t5):
    from pixart_cli.tiny import make_tiny_vae

    vae = make_tiny_vae(tmp_path / "vae", block_out_channels=(8, 8, 8))  # 4× downsampling, not the SD VAE's 8×
    data = caption_folder(tmp_path / "data", sizes=((32, 32),))
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "stage2.yaml"
    overrides = [
        f"data.path={data}", f"data.cache={tmp_path / 'cache'}", f"data.vae={vae}", f"data.text_encoder={tiny_t5}",
        "data.resolution=32", "data.kind=captions", "model.config={max_length: 32}",
    ]  # fmt: skip
    args = ["prepare", str(recipe), *(a for o in overrides for a in ("--set", o)), "--workers", "0", "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    settings = json.loads((tmp_path / "cache" / "index.json").read_text())["settings"]
    assert settings["bucket_multiple"] == 4 * 2  # XL/2: patch 2 of a 4× VAE's latent pixels
    assert CachedDataset(tmp_path / "cache")[0]["latent_mean"].shape == (4, 8, 8)


def test_a_manifest_that_is_not_utf8_is_one_error_line_in_prepare_and_train(tmp_path):
    save_image(tmp_path / "data" / "a.png", (32, 32))
    manifest = tmp_path / "data" / "manifest.jsonl"
    manifest.write_bytes(b'{"path": "a.png", "caption": "one"}\n{"path": "a.png", "caption": "caf\xe9"}\n')
    args = [str(manifest), "-o", str(tmp_path / "cache"), "--vae", "none", "--workers", "0", "--device", "cpu"]
    result = runner.invoke(app, ["prepare", *args])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        f"error: {manifest}:2: not UTF-8 text (byte 0xe9 at column 34); re-encode the manifest as UTF-8"
    ], result.output
    assert not (tmp_path / "cache").exists()
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "stage2.yaml"
    overrides = [
        f"data.path={manifest}", "data.cache=null", "data.vae=none", f"output.dir={tmp_path / 'run'}",
        "cluster.nodes=1", "cluster.gpus_per_node=1", "train.mixed_precision=fp32", "model.init=null",
        "data.num_workers=0",
    ]  # fmt: skip
    result = runner.invoke(app, ["train", str(recipe), *(a for o in overrides for a in ("--set", o))])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    last = result.output.strip().splitlines()[-1]
    assert last == f"error: {manifest}:2: not UTF-8 text (byte 0xe9 at column 34); re-encode the manifest as UTF-8"
    assert not (tmp_path / "run").exists()  # refused before training: no empty output.dir left behind


def _binary_captions(root: Path) -> Path:
    """Six captioned images, two of them with a caption file that is not text (Latin-1, binary)."""
    caption_folder(root, sizes=((32, 32),) * 6)
    (root / "0" / "img0.txt").write_bytes("crème brûlée".encode("latin-1"))
    (root / "1" / "img1.txt").write_bytes(b"\x00\x01\x02\x03")
    return root


def test_prepare_counts_captions_that_are_not_text_as_unreadable_images(tmp_path, tiny_models):
    data = _binary_captions(tmp_path / "data")
    args = ["prepare", str(data), "--t5", tiny_models[0], "--vae", "none", "--resolution", "16", "--max-length", "8"]
    args += ["--workers", "0", "--device", "cpu"]
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "strict")])  # at most 1% by default
    assert result.exit_code == 2, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: 2 of 6 images are unreadable, more than 1.0% (e.g. ") and "img0.png" in last, last
    assert result.output.count("error:") == 1 and "Traceback" not in result.output
    assert not (tmp_path / "strict").exists()  # found before anything is written
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "cache"), "--max-bad-fraction", "0.5"])
    assert result.exit_code == 0, result.output
    assert "cached 4 of 6 images" in result.output and "2 unreadable image(s) skipped" in result.output
    assert "caption not UTF-8 text (img0.txt: byte 0xe8 at offset 2)" in result.output
    assert "caption is binary (img1.txt: byte 0x00 at offset 0)" in result.output
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert index["counts"]["bad_images"] == 2 and index["counts"]["items"] == 4
    again = runner.invoke(app, [*args, "-o", str(tmp_path / "cache"), "--max-bad-fraction", "0.5"])
    assert again.exit_code == 0 and "cached 4 of 6 images" in again.output, again.output  # complete: as it was


def test_training_on_the_fly_counts_captions_that_are_not_text_as_unreadable_images(tmp_path, tiny_models):
    from types import SimpleNamespace

    from pixart_cli.training.batches import batch_source
    from pixart_cli.training.recipe import load_recipe

    data = _binary_captions(tmp_path / "data")
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "stage2.yaml"
    model = "{depth: 1, hidden_size: 32, num_heads: 2, patch_size: 2, input_size: 16, in_channels: 3, max_length: 8}"
    overrides = [
        f"data.path={data}", "data.kind=captions", "data.cache=null", "data.vae=none",
        f"data.text_encoder={tiny_models[0]}",
        "data.resolution=16", "data.num_workers=0", f"model.config={model}", "model.init=null", "train.batch_size=2",
    ]  # fmt: skip
    accelerator = SimpleNamespace(
        is_main_process=True, wait_for_everyone=lambda: None, device="cpu", num_processes=1, process_index=0
    )
    with pytest.raises(PixartError, match=r"2 images are unreadable, more than the 0 allowed .*img0\.png"):
        batch_source(load_recipe(recipe, overrides)[0], accelerator)  # before the first step
    batches = batch_source(load_recipe(recipe, [*overrides, "data.max_bad_fraction=0.5"])[0], accelerator)
    assert len(batches.loader.dataset) == 4 and batches.max_unreadable == 3
    assert {Path(p).name: reason.split(" (")[0] for p, reason in batches.faults.unreadable.items()} == {
        "img0.png": "caption not UTF-8 text",
        "img1.png": "caption is binary",
    }
    assert batches.faults.summary().startswith("data: 2 unreadable image(s) skipped (e.g. ")
