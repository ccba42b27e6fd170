"""One writer per output folder: a second `pixart train`/`sample` is refused, and a killed holder frees the folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pixart_cli.errors import PixartError
from pixart_cli.io import LOCK_FILE, exclusive_output

HOLD = """
import sys, time
from pixart_cli.io import exclusive_output
with exclusive_output(sys.argv[1], "train"):
    print("held", flush=True)
    time.sleep(600)
"""


def hold(directory: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_frees_the_folder(tmp_path):
    folder = tmp_path / "run"
    holder = hold(folder)
    try:
        refused = rf"in use by another pixart train \(pid {holder.pid} on .*since"
        with pytest.raises(PixartError, match=refused), exclusive_output(folder, "sample"):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)  # the worst exit: no cleanup runs
        holder.wait()
    with exclusive_output(folder, "sample"):  # the kernel released the lock with the process
        assert (folder / LOCK_FILE).is_file()
    with exclusive_output(folder, "sample"):  # and a finished holder releases it too
        pass


def test_the_lock_is_per_folder(tmp_path):
    with exclusive_output(tmp_path / "a", "train"), exclusive_output(tmp_path / "b", "train"):
        assert os.path.exists(tmp_path / "a" / LOCK_FILE) and os.path.exists(tmp_path / "b" / LOCK_FILE)
    start = time.monotonic()
    with exclusive_output(tmp_path / "a", "train"):
        pass
    assert time.monotonic() - start < 5  # never waits: refused or taken at once


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_two_samplers_on_one_folder_the_second_is_refused_and_the_first_finishes(tmp_path):
    """The demo model writing 12 images; a second `pixart sample` into the same folder exits 2 naming the first, and
    the first ends with exactly one record per image."""
    out = tmp_path / "samples"
    command = [
        sys.executable,
        "-m",
        "pixart_cli",
        "sample",
        "a red circle",
        "-n",
        "12",
        "--steps",
        "40",
        "-o",
        str(out),
    ]
    first = subprocess.Popen(
        command, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 300
    while not list(out.glob("*.png")) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    second = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    output, _ = first.communicate(timeout=600)
    assert first.returncode == 0, output[-2000:]
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"in use by another pixart sample (pid {first.pid} on" in second.stderr and "Traceback" not in second.stderr
    records = (out / "manifest.jsonl").read_text().splitlines()
    assert len(records) == 12 == len(list(out.glob("*.png")))


def test_two_trainings_on_one_output_dir_the_second_is_refused(tmp_path):
    """`pixart train` holds output.dir from start to end: a second run into it (even with --resume auto) exits 2 naming
    the first, and writes nothing there."""
    out = tmp_path / "run"
    sets = [
        "model.config={depth: 1, hidden_size: 32, num_heads: 2, patch_size: 4, in_channels: 3, input_size: 32, "
        "caption_channels: 64, max_length: 64}",
        "data.shapes.n=16", "data.cache=null", f"data.path={tmp_path / 'data' / 'manifest.jsonl'}",
        "train.batch_size=2", "train.steps=100000", "train.mixed_precision=fp32", "log.sample_every=0",
        "validation.every=0", "data.shapes.workers=1", f"output.dir={out}",
    ]  # fmt: skip
    command = [
        sys.executable,
        "-m",
        "pixart_cli",
        "train",
        str(Path(__file__).parents[1] / "recipes/shapes/quick.yaml"),
    ]
    for item in sets:
        command += ["--set", item]
    first = subprocess.Popen(
        command, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 300
        while str(first.pid) not in _read(out / LOCK_FILE) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        second = subprocess.run([*command, "--resume", "auto"], cwd=tmp_path, env=ENV, capture_output=True, text=True)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"in use by another pixart train (pid {first.pid} on" in second.stderr, second.stderr[-2000:]
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=300)
    # stopped by the signal: at a step boundary (143), or before training began (the default action)
    assert first.returncode in (143, -signal.SIGTERM), first.returncode


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""
