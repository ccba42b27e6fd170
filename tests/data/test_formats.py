"""Real data formats: WebDataset tar shards (img2dataset's layout), datasets save_to_disk folders and parquet files
read, prepared, trained on and captioned like the equivalent image folder; corrupt members skipped and counted."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pixart_cli.cli import app
from pixart_cli.data.buckets import Buckets
from pixart_cli.data.cache import PrepareSettings, prepare
from pixart_cli.data.loader import OnTheFlyDataset, make_loader
from pixart_cli.data.sources import Record, detect_kind, read_manifest, read_source
from pixart_cli.data.transforms import BadImage, image_size, load_image
from pixart_cli.errors import PixartError

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()
SIZES = [(40, 30), (30, 40), (32, 32), (64, 16), (16, 64), (48, 32)]
CAPTIONS = ["a red square", "a blue circle on grass", "two green triangles", "a small yellow star", "sky", "cat"]


def _png(size: tuple[int, int], seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


SAMPLES = [(f"{i:06d}", _png(size, i), CAPTIONS[i], size) for i, size in enumerate(SIZES)]


def image_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    for key, data, caption, _ in SAMPLES:
        (root / f"{key}.png").write_bytes(data)
        (root / f"{key}.txt").write_text(caption)
    return root


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _meta(key: str, caption: str | None, size: tuple[int, int]) -> bytes:
    """img2dataset's .json sidecar."""
    meta = {"caption": caption, "width": size[0], "height": size[1], "key": key, "status": "success"}
    return json.dumps(meta).encode()


def tar_shards(root: Path, per_shard: int = 3) -> Path:
    """img2dataset's layout: key.png + key.txt + key.json; sample 1 has its caption in the .json only."""
    root.mkdir(parents=True)
    for s in range(0, len(SAMPLES), per_shard):
        with tarfile.open(root / f"{s // per_shard:05d}.tar", "w") as tar:
            for i, (key, data, caption, size) in enumerate(SAMPLES[s : s + per_shard], start=s):
                _add(tar, f"{key}.png", data)
                if i != 1:
                    _add(tar, f"{key}.txt", caption.encode())
                _add(tar, f"{key}.json", _meta(key, caption, size))
    (root / "00000.parquet").write_bytes(b"img2dataset writes its metadata beside each shard")
    return root


def _hf_dataset(rows=SAMPLES, image_column: str = "image", caption_column: str | None = "caption"):
    import datasets

    columns = {image_column: [{"bytes": data, "path": None} for _, data, _, _ in rows]}
    features = {image_column: datasets.Image()}
    if caption_column is not None:
        columns[caption_column] = [caption for _, _, caption, _ in rows]
        features[caption_column] = datasets.Value("string")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Parquet files are converted into the datasets cache: a test's own, not the user's."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    datasets.disable_progress_bars()


def make(kind: str, root: Path) -> Path:
    """The six samples in the layout ``kind`` names; returns what to point at."""
    if kind == "captions":
        return image_folder(root / "folder")
    if kind in ("webdataset", "one-tar", "brace-pattern"):
        shards = tar_shards(root / "shards")
        return {
            "webdataset": shards,
            "one-tar": shards / "00000.tar",
            "brace-pattern": shards / "{00000..00001}.tar",
        }[kind]
    dataset = _hf_dataset()
    if kind == "hf-dataset":
        dataset.save_to_disk(root / "hf")
        return root / "hf"
    if kind == "hf-dataset-dict":
        import datasets

        datasets.DatasetDict({"train": dataset, "test": dataset.select([0])}).save_to_disk(root / "hf-dict")
        return root / "hf-dict"
    (root / "parquet").mkdir()
    if kind == "parquet":
        dataset.to_parquet(root / "parquet" / "data.parquet")
        return root / "parquet" / "data.parquet"
    dataset.select(range(4)).to_parquet(root / "parquet" / "part-0.parquet")  # "parquet-folder"
    dataset.select(range(4, 6)).to_parquet(root / "parquet" / "part-1.parquet")
    return root / "parquet"


KINDS = {
    "webdataset": "webdataset",
    "one-tar": "webdataset",
    "brace-pattern": "webdataset",
    "hf-dataset": "hf-dataset",
    "hf-dataset-dict": "hf-dataset",
    "parquet": "parquet",
    "parquet-folder": "parquet",
}


def _pixels(record: Record) -> np.ndarray:
    image = load_image(record)
    assert not isinstance(image, BadImage), image
    return np.asarray(image)


@pytest.mark.parametrize("layout", list(KINDS))
def test_each_format_reads_as_the_equivalent_image_folder(tmp_path, layout):
    data = make(layout, tmp_path)
    assert detect_kind(data) == KINDS[layout]
    source = read_source(data)
    folder = read_source(image_folder(tmp_path / "folder"))
    expected = folder.records[:3] if layout == "one-tar" else folder.records
    assert source.kind == KINDS[layout] and not source.bad and not source.notes
    assert [r.caption for r in source.records] == [r.caption for r in expected]
    for ours, theirs in zip(source.records, expected, strict=True):
        assert ours.member is not None and ours.path.exists()
        assert np.array_equal(_pixels(ours), _pixels(theirs))
        assert image_size(ours) == image_size(theirs)
        if KINDS[layout] == "webdataset":  # the .json states the size: no header to read when bucketing
            assert (ours.width, ours.height) == image_size(theirs)
    members = {
        "webdataset": "000000.png",
        "one-tar": "000000.png",
        "brace-pattern": "000000.png",
        "hf-dataset-dict": "train/0",
    }
    assert source.records[0].member == members.get(layout, "0")


@pytest.mark.parametrize("layout", ["webdataset", "hf-dataset", "parquet"])
def test_prepare_on_each_format_equals_the_image_folder(tmp_path, tiny_t5, layout):
    settings = PrepareSettings(resolution=32, multi_scale=True, batch_size=2, max_length=8, num_workers=2)
    reference = prepare(image_folder(tmp_path / "folder"), tmp_path / "reference", settings, t5=tiny_t5, vae="none")
    report = prepare(make(layout, tmp_path), tmp_path / "cache", settings, t5=tiny_t5, vae="none")
    assert report.items == reference.items == 6 and not report.bad_images
    assert report.bucket_counts == reference.bucket_counts and len(report.bucket_counts) > 1

    def arrays(cache: Path) -> dict[str, np.ndarray]:
        return {f"{d.name}/{f.name}": np.load(f) for d in sorted((cache / "shards").iterdir()) for f in d.glob("*.npy")}

    ours, theirs = arrays(tmp_path / "cache"), arrays(tmp_path / "reference")
    assert ours.keys() == theirs.keys() and any(k.endswith("caption.npy") for k in ours)
    for name in ours:
        assert np.array_equal(ours[name], theirs[name]), name


def test_loader_workers_open_members_themselves(tmp_path):
    """Forked workers read the members by offset with descriptors of their own: the same batches as in-process."""
    for layout in ("webdataset", "hf-dataset"):
        records = read_source(make(layout, tmp_path / layout)).records
        dataset = OnTheFlyDataset(records, Buckets.single(16))
        alone = list(make_loader(dataset, 2, seed=0, pin_memory=False))
        workers = list(make_loader(dataset, 2, seed=0, num_workers=2, pin_memory=False))
        for a, b in zip(alone, workers, strict=True):
            assert torch.equal(a["pixels"], b["pixels"]) and a["caption"] == b["caption"]


def test_a_rewritten_shard_is_indexed_again(tmp_path):
    shards = tar_shards(tmp_path / "shards")
    record = read_source(shards).records[0]
    before = _pixels(record)
    with tarfile.open(shards / "00000.tar", "w") as tar:  # the same names, other images and offsets
        _add(tar, "padding.bin", b"\0" * 3000)
        _add(tar, "000000.png", _png((40, 30), 99))
    os.utime(shards / "00000.tar", ns=(1, 1))
    assert not np.array_equal(_pixels(record), before)
    assert np.array_equal(_pixels(record), np.asarray(Image.open(io.BytesIO(_png((40, 30), 99)))))


def test_manifest_lines_name_members_of_containers(tmp_path):
    shards = tar_shards(tmp_path / "shards")
    make("hf-dataset", tmp_path)
    manifest = tmp_path / "manifest.jsonl"
    lines = [
        {"path": "shards/00001.tar", "member": "000004.png", "caption": "from a tar"},
        {"path": "hf", "member": "2", "caption": "from a dataset"},
        {"path": "shards/00000.tar", "member": "nothing.png", "caption": "missing"},
    ]
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    records = read_manifest(manifest).records
    assert [(r.path, r.member) for r in records] == [
        (shards / "00001.tar", "000004.png"),
        (tmp_path / "hf", "2"),
        (shards / "00000.tar", "nothing.png"),
    ]
    folder = read_source(image_folder(tmp_path / "folder")).records
    assert np.array_equal(_pixels(records[0]), _pixels(folder[4]))
    assert np.array_equal(_pixels(records[1]), _pixels(folder[2]))
    missing = load_image(records[2])
    assert isinstance(missing, BadImage) and str(missing.path) == f"{shards / '00000.tar'}:nothing.png"
    assert missing.reason == "no member 'nothing.png' in the tar"
    manifest.write_text('{"path": "shards/00000.tar", "member": 3, "caption": "x"}\n')
    with pytest.raises(PixartError, match=r'manifest.jsonl:1: "member" must be a non-empty string'):
        read_manifest(manifest)


def _corrupt_shards(root: Path) -> Path:
    """Two shards of 4 samples: truncated image bytes, a non-image .jpg, a Latin-1 .txt, and a second shard cut
    short inside its last image."""
    root.mkdir(parents=True)
    good = [_png((32, 32), i) for i in range(8)]
    with tarfile.open(root / "00000.tar", "w") as tar:
        for i in range(4):
            data = {1: good[1][: len(good[1]) // 2], 2: b"<html>not an image</html>"}.get(i, good[i])
            _add(tar, f"{i:06d}.{'jpg' if i == 2 else 'png'}", data)
            _add(tar, f"{i:06d}.txt", "crème brûlée".encode("latin-1") if i == 3 else f"caption {i}".encode())
        _add(tar, "notes.md", b"a member that is no sample")
    with tarfile.open(root / "00001.tar", "w") as tar:
        for i in range(4, 8):
            _add(tar, f"{i:06d}.txt", f"caption {i}".encode())
            _add(tar, f"{i:06d}.png", good[i])
    with tarfile.open(root / "00001.tar") as tar:
        last = tar.getmember("000007.png")
    with open(root / "00001.tar", "r+b") as handle:
        handle.truncate(last.offset_data + last.size // 2)
    return root


def test_corrupt_members_are_counted_and_skipped(tmp_path, tiny_t5):
    shards = _corrupt_shards(tmp_path / "shards")
    source = read_source(shards)
    assert {str(path): reason.split(" (")[0] for path, reason in source.bad} == {
        f"{shards / '00000.tar'}:000003.png": "caption not UTF-8 text",
        f"{shards / '00001.tar'}:000007.png": "the tar ends inside this member",
    }
    members = ["000000.png", "000001.png", "000002.jpg", "000004.png", "000005.png", "000006.png"]
    assert [r.member for r in source.records] == members
    assert source.notes == [f"{shards / '00001.tar'}: the tar is cut short; the members before the cut were read"]
    truncated, not_image = load_image(source.records[1]), load_image(source.records[2])
    assert str(truncated.path).endswith("00000.tar:000001.png") and "truncated" in truncated.reason
    assert not_image.reason == "UnidentifiedImageError: cannot identify image file"

    args = ["prepare", str(shards), "--t5", str(tiny_t5), "--vae", "none", "--resolution", "16", "--max-length", "8"]
    args += ["--workers", "0", "--device", "cpu"]
    strict = runner.invoke(app, [*args, "-o", str(tmp_path / "strict")])
    assert strict.exit_code == 2 and strict.output.count("error:") == 1 and "Traceback" not in strict.output
    assert not (tmp_path / "strict").exists()
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "cache"), "--max-bad-fraction", "0.5"])
    assert result.exit_code == 0, result.output
    assert "cached 4 of 8 images" in result.output and "4 unreadable image(s) skipped" in result.output


def test_a_shard_cut_or_damaged_anywhere_reads_or_fails_with_one_error(tmp_path):
    """Every cut on a block boundary (and inside the blocks) and damaged header bytes: records with bad members
    counted, or one ``PixartError``; never another exception, when reading the source or decoding its images."""
    whole = (tar_shards(tmp_path / "shards") / "00000.tar").read_bytes()
    rng = np.random.default_rng(0)
    cuts = [bytearray(whole[:n]) for n in [*range(0, len(whole), 512), *rng.integers(1, len(whole), 20)]]
    flipped = []
    for _ in range(20):
        data = bytearray(whole)
        data[int(rng.integers(0, 3)) * 512 + int(rng.integers(0, 512))] ^= 0xFF  # inside the first headers
        flipped.append(data)
    counts = set()
    for n, data in enumerate(cuts + flipped):
        shard = tmp_path / f"damaged-{n}.tar"
        shard.write_bytes(bytes(data))
        try:
            source = read_source(shard, expect_captions=False)
        except PixartError as exc:
            assert str(exc).startswith(str(shard)), exc
            continue
        for record in source.records:
            image = load_image(record)
            assert isinstance(image, Image.Image | BadImage)
        counts.add(len(source.records) + len(source.bad))
    assert {1, 2, 3} <= counts  # the cuts keep the samples before them


def test_bad_inputs_are_one_error_line_and_write_nothing(tmp_path, tiny_t5):
    import datasets

    (tmp_path / "foreign.tar").write_bytes(b"this is not a tar file" * 50)
    (tmp_path / "packed.tar").write_bytes(gzip.compress((tar_shards(tmp_path / "shards") / "00000.tar").read_bytes()))
    _hf_dataset(rows=[]).save_to_disk(tmp_path / "empty")
    _hf_dataset(rows=[]).to_parquet(tmp_path / "empty.parquet")
    _hf_dataset(image_column="picture").to_parquet(tmp_path / "picture.parquet")  # Image-typed: found by its type
    no_image = datasets.Dataset.from_dict({"url": ["http://x"], "caption": ["a cat"]})
    no_image.to_parquet(tmp_path / "urls.parquet")
    _hf_dataset(caption_column=None).save_to_disk(tmp_path / "no-captions")
    datasets.DatasetDict({"a": _hf_dataset(), "b": _hf_dataset()}).save_to_disk(tmp_path / "splits")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    cases = {
        "foreign.tar": "foreign.tar: not a tar file",
        "packed.tar": "packed.tar: a compressed tar; shards must be uncompressed",
        "empty": "empty: an empty dataset (no rows)",
        "empty.parquet": "empty.parquet: an empty parquet file (no rows)",
        "urls.parquet": "urls.parquet: no image column (columns: url, caption)",
        "no-captions": "no-captions: no caption column (columns: image;",
        "splits": "splits: a DatasetDict without a 'train' split (splits: a, b); give one split's directory",
        "junk.parquet": "junk.parquet: not a readable parquet file",
    }
    for name, message in cases.items():
        args = ["prepare", str(tmp_path / name), "-o", str(tmp_path / "cache"), "--t5", str(tiny_t5)]
        result = runner.invoke(app, [*args, "--vae", "none", "--workers", "0", "--device", "cpu"])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, result.output)
        assert message in lines[0], (name, lines[0])
        assert not (tmp_path / "cache").exists()
    assert len(read_source(tmp_path / "picture.parquet").records) == 6
    with pytest.raises(PixartError, match=r"\{00000\.\.00003\}\.tar: 2 of the 4 shards it names do not exist"):
        read_source(tmp_path / "shards" / "{00000..00003}.tar")


def test_train_a_few_steps_from_tar_shards_and_a_datasets_directory(tmp_path, tiny_t5):
    model = (
        "{depth: 1, hidden_size: 32, num_heads: 2, patch_size: 2, input_size: 16, in_channels: 3, "
        "caption_channels: 32, max_length: 8}"
    )
    for layout in ("webdataset", "hf-dataset"):
        data, run = make(layout, tmp_path / layout), tmp_path / layout / "run"
        overrides = [
            f"data.path={data}", "data.kind=auto", "data.cache=null", "data.vae=none", f"data.text_encoder={tiny_t5}",
            "data.resolution=16", "data.num_workers=0", "model.variant=PixArt-S/2", f"model.config={model}",
            "model.init=null", "model.gradient_checkpointing=false", "train.batch_size=2", "train.steps=2",
            "train.mixed_precision=fp32", f"output.dir={run}", "output.save_every=2", "log.every=1",
            "log.sample_every=0", "cluster.nodes=1", "cluster.gpus_per_node=1",
        ]  # fmt: skip
        args = ["train", str(ROOT / "recipes" / "stage2.yaml"), *(a for o in overrides for a in ("--set", o))]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
        assert (run / "checkpoints" / "step-0000002").is_dir()


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory) -> Path:
    from pixart_cli.tiny import make_tiny_llava

    return make_tiny_llava(tmp_path_factory.mktemp("tiny-llava"), [" ".join(CAPTIONS)] * 20, seed=0)


def test_caption_over_tar_shards_writes_a_manifest_that_reads_back(tmp_path, tiny_llava):
    shards = tar_shards(tmp_path / "shards")
    with tarfile.open(shards / "00002.tar", "w") as tar:
        _add(tar, "broken.png", b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "captions" / "c.jsonl"
    args = ["caption", str(shards), "-m", str(tiny_llava), "-o", str(out), "-b", "4", "--max-new-tokens", "3"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["images"] == 6 and [b["path"] for b in report["bad_images"]] == [f"{shards / '00002.tar'}:broken.png"]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["key"] for line in lines] == [f"0000{i // 3}.tar/{key}.png" for i, (key, *_) in enumerate(SAMPLES)]
    assert lines[0]["path"] == "../shards/00000.tar" and lines[0]["member"] == "000000.png"
    assert [line["caption"] for line in lines] == CAPTIONS and all(line["caption_vlm"] for line in lines)
    # The captions manifest is a dataset: its records find the images inside the shards again.
    source = read_source(out, caption_fields=("caption", "caption_vlm"))
    assert source.kind == "manifest" and [r.caption for r in source.records] == CAPTIONS
    assert [r.captions["caption_vlm"] for r in source.records] == [line["caption_vlm"] for line in lines]
    for record, original in zip(source.records, read_source(shards).records, strict=True):
        assert (record.path.resolve(), record.member) == (original.path, original.member)
        assert np.array_equal(_pixels(record), _pixels(original))


def test_the_command_line_does_not_import_datasets():
    code = "import sys, pixart_cli.cli, pixart_cli.data.sources; print('datasets' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
