"""`pixart caption`: captions equal transformers' own generate for each image alone; resumable after SIGKILL with
every image captioned exactly once; several processes write what one writes; bad input is one error line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pixart_cli.cli import app
from pixart_cli.io import FAULT_POINT_VARIABLE
from tests.utils import launch_report, run_launcher

runner = CliRunner()

WORDS = (
    "a red blue green grey black circle square triangle on background left of right above below small large "
    "describe this image and its style in very detailed manner"
)
PROMPT = "Describe this image and its style in a very detailed manner"


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory) -> Path:
    from pixart_cli.tiny import make_tiny_llava

    return make_tiny_llava(tmp_path_factory.mktemp("tiny-llava"), [WORDS] * 20, seed=0)


def _images(root: Path, n: int, *, captions: bool = True, start: int = 0) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        pixels = (np.random.default_rng(i).random((24 + i % 3 * 8, 32, 3)) * 255).astype("uint8")
        path = root / f"img{i:03d}.png"
        Image.fromarray(pixels).save(path)
        if captions:
            path.with_suffix(".txt").write_text(f"alt text {i}", encoding="utf-8")
        paths.append(path)
    return paths


def _reference(model_dir: Path, images: list[Path], max_new_tokens: int) -> list[str]:
    """transformers' own generate + batch_decode, each image alone (an independent reference)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    out = []
    for path in images:
        inputs = processor(images=[Image.open(path).convert("RGB")], text=[text], return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        out += processor.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [t.strip() for t in out]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _caption(*args) -> object:
    return runner.invoke(app, ["caption", *map(str, args)])


def test_captions_equal_transformers_generate_per_image_and_keep_the_source_captions(tmp_path, tiny_llava):
    images = _images(tmp_path / "data", 7)
    out = tmp_path / "captions.jsonl"
    result = _caption(tmp_path / "data", "-m", tiny_llava, "-o", out, "-b", "3", "--max-new-tokens", "12")
    assert result.exit_code == 0, result.output
    lines = _lines(out)
    assert [line["key"] for line in lines] == [p.name for p in images]  # the source's order
    assert [line["caption_vlm"] for line in lines] == _reference(tiny_llava, images, 12)
    assert len({line["caption_vlm"] for line in lines}) > 1  # the images are told apart
    assert [line["caption"] for line in lines] == [f"alt text {i}" for i in range(7)]
    # The output is a manifest the data readers take as it is.
    from pixart_cli.data.sources import read_manifest

    assert [r.path.resolve() for r in read_manifest(out).records] == [p.resolve() for p in images]
    recorded = json.loads(out.with_name("captions.jsonl.settings.json").read_text())
    assert recorded["prompt"] == PROMPT and recorded["decoding"] == "greedy" and recorded["max_new_tokens"] == 12
    assert not out.with_name("captions.jsonl.parts").exists()
    # A rerun has nothing to do and loads no model; more images later are added in the source's order.
    again = _caption(tmp_path / "data", "-m", tiny_llava, "-o", out, "--max-new-tokens", "12", "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["captioned"] == 0
    _images(tmp_path / "data", 2, start=7)
    more = _caption(tmp_path / "data", "-m", tiny_llava, "-o", out, "--max-new-tokens", "12", "--json")
    assert json.loads(more.stdout)["captioned"] == 2
    assert [line["key"] for line in _lines(out)] == [f"img{i:03d}.png" for i in range(9)]


def test_bad_images_are_counted_and_skipped(tmp_path, tiny_llava):
    _images(tmp_path / "data", 3, captions=False)
    (tmp_path / "data" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "c.jsonl"
    result = _caption(tmp_path / "data", "-m", tiny_llava, "-o", out, "--max-new-tokens", "4", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["images"] == 3 and [Path(b["path"]).name for b in report["bad_images"]] == ["broken.png"]
    assert all("caption" not in line for line in _lines(out))  # no source caption: none written


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--field", "caption"], "is a key of the manifest itself"),
        (["--batch-size", "0"], "--batch-size must be positive"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be in"),
        (["--prompt", " "], "--prompt must not be empty"),
    ],
)
def test_bad_settings_are_one_error_line_before_anything_loads(tmp_path, tiny_llava, args, message):
    _images(tmp_path / "data", 1)
    result = _caption(tmp_path / "data", "-m", tiny_llava, "-o", tmp_path / "c.jsonl", *args)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == [tmp_path / "data"]


def test_bad_input_is_one_error_line_and_writes_nothing(tmp_path, tiny_t5):
    _images(tmp_path / "data", 2)
    (tmp_path / "empty").mkdir()
    cases = [
        ([tmp_path / "data", "-m", tiny_t5, "-o", tmp_path / "c.jsonl"], "not an image-text-to-text model"),
        ([tmp_path / "empty", "-m", tiny_t5, "-o", tmp_path / "c.jsonl"], "no usable images"),
        ([tmp_path / "data", "-m", tmp_path / "nothing", "-o", tmp_path / "c.jsonl"], "no such"),
        ([tmp_path / "data", "-m", tiny_t5, "-o", tmp_path / "c.txt"], "give a name ending in .jsonl"),
    ]
    for args, message in cases:
        result = _caption(*args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "empty"]
    # An output that exists in another format is refused, and kept as it was.
    (tmp_path / "mine.jsonl").write_text('{"path": "x.png", "caption": "mine"}\n')
    result = _caption(tmp_path / "data", "-m", tiny_t5, "-o", tmp_path / "mine.jsonl")
    assert result.exit_code == 2 and "was not written by `pixart caption`" in result.output
    assert (tmp_path / "mine.jsonl").read_text() == '{"path": "x.png", "caption": "mine"}\n'


def test_a_settings_file_gives_the_defaults_and_options_win(tmp_path, tiny_llava):
    """``--config`` (e.g. recipes/caption/sam-llava.yaml) holds the settings; command-line options override them."""
    from pixart_cli.captioning.settings import PAPER_PROMPT, load_caption_settings

    sam = load_caption_settings(Path(__file__).parents[2] / "recipes" / "caption" / "sam-llava.yaml", {})
    assert (sam.model, sam.prompt, sam.dtype, sam.batch_size) == ("llava-hf/llava-1.5-7b-hf", PAPER_PROMPT, "bf16", 32)
    _images(tmp_path / "data", 2)
    config = tmp_path / "caption.yaml"
    config.write_text(f"model: {tiny_llava}\nmax_new_tokens: 4\nfield: dense\nbatch_size: 2\n")
    out = tmp_path / "c.jsonl"
    result = _caption(tmp_path / "data", "-o", out, "--config", config, "--max-new-tokens", "3", "--json")
    assert result.exit_code == 0, result.output
    recorded = json.loads(out.with_name("c.jsonl.settings.json").read_text())
    assert (recorded["max_new_tokens"], recorded["field"]) == (3, "dense")
    assert all("dense" in line for line in _lines(out))
    for text, message in [
        ("model: m\nbatch_sise: 2\n", "batch_sise: unknown key"),
        ("model: m\ndtype: fp8\n", "dtype"),
        ("- a list\n", "must be a mapping"),
        ("prompt: hi\n", "give --model"),
    ]:
        config.write_text(text)
        result = _caption(tmp_path / "data", "-o", tmp_path / "d.jsonl", "--config", config)
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, text
    assert not (tmp_path / "d.jsonl").exists()


def test_other_settings_on_the_same_output_are_refused(tmp_path, tiny_llava):
    _images(tmp_path / "data", 2)
    out = tmp_path / "c.jsonl"
    assert _caption(tmp_path / "data", "-m", tiny_llava, "-o", out, "--max-new-tokens", "4").exit_code == 0
    result = _caption(tmp_path / "data", "-m", tiny_llava, "-o", out, "--max-new-tokens", "5")
    assert result.exit_code == 2 and "other settings (max_new_tokens)" in result.output


def _command(data: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pixart_cli", "caption", str(data), "-m", str(model), "-o", str(out), *extra]


def test_sigkill_mid_run_then_rerun_captions_every_image_exactly_once(tmp_path, tiny_llava):
    images = _images(tmp_path / "data", 9)
    out = tmp_path / "c.jsonl"
    settings = ["--shard-size", "4", "-b", "2", "--max-new-tokens", "6"]
    marker = tmp_path / "at-fault-point"
    # Stop in the middle of the second shard: the first is complete, the second has one batch written.
    env = {**os.environ, FAULT_POINT_VARIABLE: f"after-batch:000001.jsonl.partial:{marker}"}
    proc = subprocess.Popen(_command(tmp_path / "data", tiny_llava, out, *settings), env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    parts = out.with_name("c.jsonl.parts")
    assert (parts / "000000.jsonl").exists() and not out.exists()
    partial = parts / "000001.jsonl.partial"
    assert len(partial.read_text().splitlines()) == 2
    with open(partial, "a", encoding="utf-8") as f:  # a line a kill cut short, as it would be mid-write
        f.write('{"key": "img006.png", "path": "da')
    done = subprocess.run(_command(tmp_path / "data", tiny_llava, out, *settings), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = _lines(out)
    assert [line["key"] for line in lines] == [p.name for p in images]
    assert [line["caption_vlm"] for line in lines] == _reference(tiny_llava, images, 6)
    assert not parts.exists()


def test_two_processes_write_what_one_writes(tmp_path, tiny_llava):
    _images(tmp_path / "data", 10)
    settings = ["--shard-size", "3", "-b", "2", "--max-new-tokens", "6"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        _command(tmp_path / "data", tiny_llava, tmp_path / "one.jsonl", *settings), env=env, capture_output=True
    )
    assert one.returncode == 0, one.stderr[-2000:]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = run_launcher(
        [*launch, *_command(tmp_path / "data", tiny_llava, tmp_path / "two.jsonl", *settings)[1:]],
        timeout=300,
        env=env,
    )
    assert two.returncode == 0, launch_report(two)
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
