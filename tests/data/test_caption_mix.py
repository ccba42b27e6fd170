"""Caption mixing (``data.captions``): each item reads one caption field, chosen with the recipe's proportions as a
pure function of (seed, epoch, item), the same for cached and on-the-fly data and on a resumed run."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pixart_cli.cli import app
from pixart_cli.components.autoencoders import PixelSpace
from pixart_cli.components.text import TextEncoder
from pixart_cli.data.buckets import Buckets
from pixart_cli.data.cache import PrepareSettings, prepare
from pixart_cli.data.loader import CachedDataset, LoaderBatches, OnTheFlyDataset, caption_choices, make_loader
from pixart_cli.data.sources import UnknownCaptionField, read_source
from pixart_cli.errors import PixartError
from pixart_cli.training.recipe import load_recipe, resume_changes, to_dict

ROOT = Path(__file__).resolve().parents[2]
STAGE2 = ROOT / "recipes" / "stage2.yaml"
MIX = {"caption_vlm": 0.75, "caption": 0.25}
runner = CliRunner()


def _manifest(root: Path, n: int = 12) -> Path:
    """``n`` 16-px images with two caption fields that differ in every line (``caption_vlm`` names the index)."""
    lines = []
    for i in range(n):
        pixels = (np.random.default_rng(i).random((16, 16, 3)) * 255).astype("uint8")
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        short = ["a red square", "a blue circle", "two green triangles"][i % 3]
        lines.append({"path": f"images/{i}.png", "caption": short, "caption_vlm": f"photo {i} of {short} on grey"})
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


@pytest.fixture(scope="module")
def t5(tmp_path_factory) -> str:
    from pixart_cli.tiny import make_tiny_t5

    sentences = ["a red square", "a blue circle on grey", "photo of two green triangles"] * 8
    root = tmp_path_factory.mktemp("t5")
    return str(make_tiny_t5(root, sentences, d_model=16, num_layers=1, num_heads=2, d_ff=32, vocab_size=64))


def test_caption_choices_follow_the_proportions_and_depend_on_seed_epoch_and_index_only():
    mix = tuple(MIX.items())
    chosen = [f for epoch in range(40) for f in caption_choices(43, epoch, range(500), mix)]
    shares = Counter(chosen)
    assert shares["caption_vlm"] / len(chosen) == pytest.approx(0.75, abs=0.01)  # 20 000 draws: σ ≈ 0.003
    assert shares["caption"] / len(chosen) == pytest.approx(0.25, abs=0.01)
    # A pure function of (seed, epoch, index): however the indices are batched or ordered, and however the mix is
    # written; another seed or epoch draws afresh.
    batch = [7, 3, 99, 0, 12]
    assert caption_choices(43, 5, batch, mix) == [caption_choices(43, 5, [i], mix)[0] for i in batch]
    assert caption_choices(43, 5, batch, mix) == caption_choices(43, 5, batch, mix[::-1])
    assert caption_choices(43, 5, range(64), mix) != caption_choices(44, 5, range(64), mix)
    assert caption_choices(43, 5, range(64), mix) != caption_choices(43, 6, range(64), mix)
    assert set(caption_choices(0, 0, range(200), (("only", 1.0),))) == {"only"}
    # Fixed values: a change of the function would silently change the data of every resumed run.
    assert caption_choices(43, 0, range(8), mix) == [
        "caption_vlm", "caption_vlm", "caption", "caption_vlm", "caption_vlm", "caption_vlm", "caption_vlm",
        "caption_vlm",
    ]  # fmt: skip


def test_a_manifest_reads_the_caption_fields_asked_for(tmp_path):
    manifest = _manifest(tmp_path)
    lines = manifest.read_text().splitlines()
    lines[1] = json.dumps({"path": "images/1.png", "caption": "only a caption"})  # no caption_vlm: missing
    manifest.write_text("\n".join(lines) + "\n")
    source = read_source(manifest, caption_fields=("caption", "caption_vlm"))
    assert len(source.records) == 11 and source.missing_captions == 1
    assert source.records[0].caption == "a red square"
    assert source.records[0].captions == {"caption_vlm": "photo 0 of a red square on grey"}
    only_vlm = read_source(manifest, caption_fields=("caption_vlm",))  # `caption` not needed: not counted missing
    assert len(only_vlm.records) == 11 and only_vlm.records[0].caption == "a red square"
    assert len(read_source(manifest).records) == 12 and read_source(manifest).records[0].captions == {}
    with pytest.raises(UnknownCaptionField, match=r"'caption_llava' \(fields found: caption, caption_vlm\)"):
        read_source(manifest, caption_fields=("caption", "caption_llava"))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.png").write_bytes((tmp_path / "images" / "0.png").read_bytes())
    (folder / "a.txt").write_text("a caption")
    with pytest.raises(UnknownCaptionField, match=r"fields found: caption\)"):
        read_source(folder, caption_fields=("caption_vlm",))
    with pytest.raises(PixartError, match="cannot be a caption field"):
        read_source(manifest, caption_fields=("path",))


def test_cached_and_on_the_fly_items_read_the_field_chosen_for_seed_epoch_and_index(tmp_path, t5):
    manifest = _manifest(tmp_path)
    fields = ("caption_vlm", "caption")  # sorted by the settings
    report = prepare(
        manifest, tmp_path / "cache", PrepareSettings(resolution=16, caption_fields=fields), t5=t5, vae="none"
    )
    assert report.items == 12
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert index["caption_fields"] == ["caption", "caption_vlm"] and index["settings"]["caption_fields"] == [
        "caption",
        "caption_vlm",
    ]
    shard = tmp_path / "cache" / "shards" / "00000"
    assert {p.name for p in shard.glob("caption*.npy")} == {
        "caption.npy", "caption_mask.npy", "caption__caption_vlm.npy", "caption_mask__caption_vlm.npy"
    }  # fmt: skip
    cached = CachedDataset(tmp_path / "cache")
    source = read_source(manifest, caption_fields=fields)
    on_the_fly = OnTheFlyDataset(source.records, Buckets.single(16))
    text = TextEncoder(t5, max_length=120)
    mix, seed = tuple(MIX.items()), 5

    def stream(dataset, epoch=0, start=0):
        batches = LoaderBatches(
            make_loader(dataset, 4, seed=seed, captions=mix), seed=seed, autoencoder=PixelSpace(), text_encoder=text
        )
        return batches.iterate(epoch, start, "cpu")

    ours, theirs = stream(cached), stream(on_the_fly)
    seen = Counter()
    for _ in range(9):  # three epochs of three batches
        (epoch, _, a), (_, _, b) = next(ours), next(theirs)
        indices = a["index"].tolist()
        assert indices == b["index"].tolist()  # one bucket, records in order: the same items in both
        chosen = caption_choices(seed, epoch, indices, mix)
        assert a["caption_field"] == b["caption_field"] == chosen
        assert b["caption_text"] == [
            source.records[i].caption if f == "caption" else source.records[i].captions[f]
            for i, f in zip(indices, chosen, strict=True)
        ]
        # The cached features of the chosen field are the on-the-fly encoding of its text (fp16 storage).
        length = b["caption"].shape[1]
        assert torch.equal(a["caption_mask"][:, :length], b["caption_mask"]) and not a["caption_mask"][:, length:].any()
        real = b["caption_mask"].bool()  # padding: zeros in the cache, masked out of attention either way
        torch.testing.assert_close(a["caption"][:, :length][real].float(), b["caption"][real], atol=3e-3, rtol=3e-3)
        seen.update(chosen)
    assert set(seen) == {"caption", "caption_vlm"}
    # A resumed run (the trainer restarts at its saved epoch and batch) sees the same choices.
    _, _, again = next(stream(cached, epoch=1, start=2))
    _, _, first = [next(s) for s in [stream(cached)] for _ in range(6)][-1]
    assert again["caption_field"] == first["caption_field"] and torch.equal(again["caption"], first["caption"])
    # Without a mix, items read the `caption` field as before.
    plain = next(iter(make_loader(cached, 4, seed=seed)))
    assert "caption_field" not in plain
    with pytest.raises(PixartError, match=r"no caption field 'caption_llava' in this cache \(it holds caption, cap"):
        cached[(0, "caption_llava")]


def _train_args(tmp_path: Path, manifest: Path, t5: str, *extra: str) -> list[str]:
    model = "{depth: 1, hidden_size: 32, num_heads: 2, patch_size: 2, input_size: 8, in_channels: 3, max_length: 16,"
    model += " caption_channels: 16}"
    overrides = [
        f"data.path={manifest}", f"data.cache={tmp_path / 'cache'}", "data.vae=none", f"data.text_encoder={t5}",
        "data.resolution=16", "data.num_workers=0", f"model.config={model}", "model.init=null",
        "model.variant=PixArt-S/2", "model.gradient_checkpointing=false",
        "train.batch_size=4", "train.steps=2", "train.mixed_precision=fp32", "optim.warmup_steps=0",
        f"output.dir={tmp_path / 'run'}", "log.every=1", "log.sample_every=0",
        "cluster.nodes=1", "cluster.gpus_per_node=1", *extra,
    ]  # fmt: skip
    return [a for o in overrides for a in ("--set", o)]


def _error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len([line for line in lines if line.startswith("error:")]) == 1 and "Traceback" not in result.output
    return lines[-1]


@pytest.mark.parametrize(
    ("captions", "message"),
    [
        ("{caption_vlm: 0.9, caption: 0.2}", "data.captions: the proportions must sum to 1, got 1.1"),
        ("{caption_vlm: 1.2, caption: -0.2}", "data.captions: the proportion of caption must be positive, got -0.2"),
        ("{}", "data.captions: name at least one caption field"),
        ("{path: 1.0}", "data.captions: 'path' cannot be a caption field"),
        ("{caption: high}", "data.captions.caption: expected a number"),
    ],
)
def test_a_bad_caption_mix_is_one_error_line(tmp_path, captions, message):
    result = runner.invoke(app, ["train", str(STAGE2), "--dry-run", "--set", f"data.captions={captions}"])
    assert _error(result).startswith(f"error: {STAGE2}: {message}"), result.output
    with pytest.raises(PixartError, match=r"data\.captions: stage 1 trains on class labels"):
        load_recipe(ROOT / "recipes" / "stage1.yaml", ["data.captions={caption: 1.0}"])


def test_training_mixes_captions_and_refuses_fields_the_data_or_the_cache_lacks(tmp_path, t5):
    manifest = _manifest(tmp_path)
    mix = "data.captions={caption_vlm: 0.75, caption: 0.25}"
    # A field the data lacks: on the fly and in `pixart prepare RECIPE`, one line naming the recipe key.
    unknown = "data.captions={caption_llava: 0.5, caption: 0.5}"
    result = runner.invoke(
        app, ["train", str(STAGE2), *_train_args(tmp_path, manifest, t5, unknown, "data.cache=null")]
    )
    expected = f"error: data.captions.caption_llava: {manifest} has no caption field 'caption_llava' (fields found: "
    assert _error(result) == expected + "caption, caption_vlm)"
    prepare_args = ["prepare", str(STAGE2), *_train_args(tmp_path, manifest, t5, unknown), "--workers", "0"]
    assert _error(runner.invoke(app, prepare_args)) == expected + "caption, caption_vlm)"
    assert not (tmp_path / "cache").exists()
    # A cache made without the mix holds `caption` alone: training with the mix is refused, naming the command.
    prepare_args = ["prepare", str(STAGE2), *_train_args(tmp_path, manifest, t5), "--workers", "0", "--device", "cpu"]
    assert runner.invoke(app, prepare_args).exit_code == 0
    result = runner.invoke(app, ["train", str(STAGE2), *_train_args(tmp_path, manifest, t5, mix)])
    line = _error(result)
    assert line.startswith(f"error: data.captions.caption_vlm: the cache {tmp_path / 'cache'} has no caption field")
    assert "(it holds caption); `pixart prepare " in line and f"'--set={mix}' --overwrite` makes one" in line
    # `pixart prepare RECIPE --overwrite` with the mix makes a cache with both fields, and training runs on it.
    prepare_args = ["prepare", str(STAGE2), *_train_args(tmp_path, manifest, t5, mix), "--workers", "0"]
    assert runner.invoke(app, [*prepare_args, "--device", "cpu", "--overwrite"]).exit_code == 0
    assert CachedDataset(tmp_path / "cache").caption_fields == ("caption", "caption_vlm")
    result = runner.invoke(app, ["train", str(STAGE2), *_train_args(tmp_path, manifest, t5, mix)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "checkpoints" / "step-0000002").is_dir()


def test_a_changed_caption_mix_is_refused_on_resume():
    _, saved = load_recipe(STAGE2, ["data.captions={caption_vlm: 0.9, caption: 0.1}"])
    for change, key in [
        ("data.captions={caption_vlm: 0.8, caption: 0.2}", "data.captions.caption"),
        ("data.captions=null", "data.captions"),
        ("data.captions={caption_vlm: 1.0}", "data.captions.caption"),
    ]:
        refused, _ = resume_changes(saved, load_recipe(STAGE2, [change])[1])
        assert any(line.startswith(key) for line in refused), refused
    same, _ = resume_changes(saved, load_recipe(STAGE2, ["data.captions={caption: 0.1, caption_vlm: 0.9}"])[1])
    assert same == []  # the order it is written in is no change
    assert to_dict(load_recipe(STAGE2)[0])["data"]["captions"] is None
