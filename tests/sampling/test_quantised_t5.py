"""`--t5-quant int8|nf4`: T5 with 8-/4-bit weights (bitsandbytes through transformers) on the CPU: close features,
less memory, recorded where its output goes, and a clear error without the package."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from pixart_cli.cli import app
from pixart_cli.components.resolve import resolve_builtin
from pixart_cli.components.text import TextEncoder
from pixart_cli.shapesworld.prompts import caption
from pixart_cli.shapesworld.world import sample_scene

runner = CliRunner()
PROMPTS = [caption(sample_scene(i), "dense", seed=i) for i in range(8)]


@pytest.mark.parametrize(("quantize", "distance"), [("int8", 1e-3), ("nf4", 5e-2)])
def test_quantised_shapes_t5_reads_captions_as_the_full_precision_one(quantize, distance):
    source = resolve_builtin("builtin:shapes-t5")
    full = TextEncoder(source, max_length=64).load()
    small = TextEncoder(source, max_length=64, quantize=quantize).load()
    a, b = full.encode(PROMPTS), small.encode(PROMPTS)
    mask = a.mask.bool()
    cos = torch.nn.functional.cosine_similarity(a.embeddings[mask], b.embeddings.float()[mask], dim=-1)
    assert 1 - cos.mean().item() < distance and 1 - cos.min().item() < 10 * distance
    assert small.encoder.get_memory_footprint() < full.encoder.get_memory_footprint()


def test_sample_with_a_quantised_t5_records_it(tmp_path):
    args = ["sample", "a red circle to the left of a blue square", "-n", "1", "--steps", "4", "--seed", "3"]
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "int8"), "--t5-quant", "int8"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "int8" / "manifest.jsonl").read_text().splitlines()[0])
    assert record["model"].endswith("(T5 int8)")
    bad = runner.invoke(app, [*args, "-o", str(tmp_path / "x"), "--t5-quant", "int3"])
    assert bad.exit_code == 2 and "--t5-quant" in bad.output


def test_without_bitsandbytes_the_quantised_t5_is_one_error(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a)
    )
    out = tmp_path / "out"
    result = runner.invoke(app, ["sample", "a red circle", "-n", "1", "-o", str(out), "--t5-quant", "nf4"])
    assert result.exit_code == 2 and result.output.startswith("error:"), result.output
    assert "--t5-quant nf4 needs the bitsandbytes package" in result.output and "Traceback" not in result.output
    assert "pip install -e '.[lean]'" in result.output  # printed as written, not read as markup
    assert not any(out.glob("*.png"))


def test_a_cache_records_the_quantised_t5(tmp_path):
    from pixart_cli.data.cache import INDEX, PrepareSettings, prepare
    from pixart_cli.shapesworld.dataset import write_dataset

    write_dataset(tmp_path / "data", 4, resolution=32, seed=0, fmt="jsonl")
    settings = PrepareSettings(resolution=32, max_length=64)
    t5 = resolve_builtin("builtin:shapes-t5")
    manifest = tmp_path / "data" / "manifest.jsonl"
    prepare(manifest, tmp_path / "cache", settings, t5=t5, vae="none", t5_quant="int8")
    prepare(manifest, tmp_path / "plain", settings, t5=t5, vae="none")
    assert json.loads((tmp_path / "cache" / INDEX).read_text())["settings"]["t5_quantization"] == "int8"
    assert "t5_quantization" not in json.loads((tmp_path / "plain" / INDEX).read_text())["settings"]
