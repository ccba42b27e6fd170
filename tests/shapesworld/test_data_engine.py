"""The data engine in miniature (experiments/shapesworld/): the caption parser reads ground truth exactly, and the
tiny captioner trains on caption tokens only, saves a transformers directory, and `pixart caption` runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pixart_cli.cli import app
from pixart_cli.shapesworld.dataset import write_dataset
from pixart_cli.shapesworld.prompts import caption
from pixart_cli.shapesworld.world import sample_scene

SCRIPTS = Path(__file__).resolve().parents[2] / "experiments" / "shapesworld"


@pytest.fixture
def scripts(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import caption_accuracy
    import data_engine
    import train_captioner

    return caption_accuracy, data_engine, train_captioner


def test_dense_captions_read_back_as_their_scenes_and_alt_text_says_less(scripts):
    caption_accuracy, data_engine, _ = scripts
    scenes = [sample_scene(np.random.default_rng([7, i]), split="all") for i in range(300)]
    records = [data_engine.scene_record(f"{i}.png", s) for i, s in enumerate(scenes)]
    for style in ("dense", "varied"):
        texts = [caption(s, style, seed=i) for i, s in enumerate(scenes)]
        result = caption_accuracy.accuracy(list(zip(texts, records, strict=True)))
        assert result["colour"] == result["shape"] == result["relation"] == result["count"] == 1.0, style
        assert result["extra_objects"] == 0.0 and result["relations_stated"] > 0.6
        assert (result["size"] == 1.0) == (style == "dense")
    alt = caption_accuracy.accuracy(
        [(caption(s, "sparse", seed=i), r) for i, (s, r) in enumerate(zip(scenes, records, strict=True))]
    )
    assert alt["relations_stated"] == 0.0 and alt["colour"] < 0.6 and alt["extra_objects"] == 0.0
    # A wrong relation and a wrong colour are read as wrong.
    scene = data_engine.scene_record("x.png", scenes[next(i for i, s in enumerate(scenes) if len(s.objects) == 2)])
    a, b = scene["objects"]
    relation = next(r for i, r, j in scene["relations"] if (i, j) == (0, 1))
    wrong = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[relation]
    text = f"a {a['size']} {a['colour']} {a['shape']} {wrong} a {b['size']} {b['colour']} {b['shape']}"
    assert caption_accuracy.accuracy([(text, scene)])["relation"] == 0.0
    other = next(c for c in ("red", "green", "blue") if c not in (a["colour"], b["colour"]))
    text = f"a {a['size']} {other} {a['shape']} {relation} a {b['size']} {b['colour']} {b['shape']}"
    result = caption_accuracy.accuracy([(text, scene)])
    assert result["colour"] == 0.5 and result["extra_objects"] == 1.0 and result["exact"] == 0.0


@pytest.mark.slow  # 18 s beside two training jobs: a subprocess trains, then `pixart caption` loads the model
def test_captioner_supervises_caption_tokens_only_and_pixart_caption_runs_it(tmp_path, scripts):
    _, _, train_captioner = scripts
    data = write_dataset(tmp_path / "data", 6, fmt="jsonl", caption_style="dense", seed=3)
    manifest = data / "manifest.jsonl"
    model = tmp_path / "captioner"
    args = [str(manifest), "-o", str(model), "--hidden", "32", "--layers", "1", "--steps", "3", "--batch", "4"]
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "train_captioner.py"), *args, "--threads", "1", "--log-every", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    assert row["steps"] == 3 and row["pairs"] == 6 and 0 < row["size_mb"] < 5
    assert "step 3/3  loss" in result.stderr

    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model)
    rows = train_captioner.read_manifest(manifest)
    batch = train_captioner.encode(processor, rows, train_captioner.PROMPT)
    for ids, labels, (_, text) in zip(batch["input_ids"], batch["labels"], rows, strict=True):
        supervised = ids[labels != -100]
        assert processor.tokenizer.decode(supervised) == f" {text}</s>"  # the caption and its end, nothing else
        where = (labels != -100).nonzero().flatten().tolist()
        assert where == list(range(where[0], where[0] + len(where)))  # one run: after the conversation, before padding

    out = tmp_path / "captions.jsonl"
    cli = [str(manifest), "-m", str(model), "-o", str(out), "--max-new-tokens", "6", "--device", "cpu"]
    result = CliRunner().invoke(app, ["caption", *cli, "--prompt", train_captioner.PROMPT])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["caption"] for line in lines] == [text for _, text in rows]
    assert all(isinstance(line["caption_vlm"], str) for line in lines)
