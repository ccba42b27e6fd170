"""A disk that fills up mid-run: one `error:` line (exit 2), no traceback, nothing half-written kept.

Each test mounts a small tmpfs (root only; CI runs as root) and writes a command's output there. Marked slow: each
runs a real command in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pixart_cli.checkpoints.format import checkpoint_dirs
from pixart_cli.io import png_is_complete

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB file system."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def pixart(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pixart_cli", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def assert_one_error_line(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the disk is full" in errors[0] and "Traceback" not in done.stderr, done.stderr


@pytest.mark.slow
def test_training_onto_a_full_disk_ends_in_one_line_and_leaves_no_partial_checkpoint(small_disk, tmp_path):
    out = small_disk / "run"
    sets = [
        "model.config={depth: 1, hidden_size: 64, num_heads: 2, patch_size: 4, in_channels: 3, input_size: 32, "
        "caption_channels: 64, max_length: 64}",
        "data.shapes.n=16", "data.cache=null", f"data.path={tmp_path / 'data' / 'manifest.jsonl'}",
        "train.batch_size=4", "train.steps=2", "train.mixed_precision=fp32", "optim.warmup_steps=0", "log.every=1",
        "log.sample_every=0", "output.save_every=1", f"output.dir={out}",
    ]  # fmt: skip
    args = ["train", str(ROOT / "recipes" / "shapes" / "quick.yaml")]
    for item in sets:
        args += ["--set", item]
    done = pixart(*args, cwd=tmp_path)
    assert_one_error_line(done)
    assert checkpoint_dirs(out) == []  # the checkpoint that did not fit is not there, not even half
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_sampling_onto_a_full_disk_keeps_only_complete_images(small_disk, tmp_path):
    out = small_disk / "samples"
    done = pixart("sample", "a red circle", "-n", "24", "--steps", "2", "-o", str(out), cwd=tmp_path)
    assert_one_error_line(done)
    pngs = sorted(out.glob("*.png"))
    assert pngs and all(png_is_complete(p) for p in pngs)  # some fitted; none is half-written
    recorded = [json.loads(line)["file"] for line in (out / "manifest.jsonl").read_text().splitlines() if line]
    assert set(recorded) <= {p.name for p in pngs}
