"""`pixart prepare` under torchrun: the processes share the shards and write the cache one process writes.

The reference is one process with one thread, the test launches two with one thread each (``OMP_NUM_THREADS=1``,
gloo): the encoders compute the same numbers, so the cache must be the same bytes. The reference is launched by
torchrun too (``--nproc_per_node 1``: the same code path as a plain ``pixart prepare``, one process and no process
group), so that the launcher's own start-up is on both sides of the CPU-time comparison.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pixart_cli.io import FAULT_POINT_VARIABLE
from tests.utils import _descendants, launch_report, run_launcher

LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
# 32 images of 256 px through a VAE wide enough (64 channels) that encoding, ~0.3 s an image, outweighs starting
# the processes (~5 s of imports each, ~1.5 s for the launcher): the CPU-time comparison needs that.
IMAGES, SIZE = 32, 256
SETTINGS = ["--resolution", str(SIZE), "--shard-size", "4", "--batch-size", "2", "--workers", "0", "--device", "cpu"]
SETTINGS += ["--caption-field", "caption", "--caption-field", "caption_vlm"]  # two caption fields: both cached


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    """A captioned manifest with a second caption field, tiny encoders, and the cache one process makes of it."""
    from pixart_cli.shapesworld.dataset import write_dataset
    from pixart_cli.tiny import make_tiny_t5, make_tiny_vae

    root = tmp_path_factory.mktemp("prepare-distributed")
    manifest = write_dataset(root / "data", IMAGES, resolution=SIZE, fmt="jsonl", caption_style="sparse") / (
        "manifest.jsonl"
    )
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    manifest.write_text("".join(json.dumps({**x, "caption_vlm": f"a picture of {x['caption']}"}) + "\n" for x in lines))
    t5 = make_tiny_t5(root / "t5", [x["caption"] for x in lines] * 3, d_model=16, num_layers=1, num_heads=2, d_ff=32)
    vae = make_tiny_vae(root / "vae", block_out_channels=(64, 64, 64, 64))
    args = [str(manifest), "--t5", str(t5), "--vae", str(vae), *SETTINGS]
    reference = root / "one"
    done, seconds = _cpu_seconds(lambda: _launch(args, reference, processes=1))
    assert done.returncode == 0, launch_report(done)
    assert "cached 32 of 32 images in 8 shards" in done.stdout, done.stdout
    return {"args": args, "reference": reference, "cpu": seconds}


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _cpu_seconds(run):
    """(what ``run`` returned, user + system CPU seconds of the processes it started and waited for)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = run()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return result, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path: nothing is left out of the comparison."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _command(args: list[str], output: Path, processes: int = 2) -> list[str]:
    return [*LAUNCH, str(processes), "-m", "pixart_cli", "prepare", *args, "-o", str(output)]


def _launch(args: list[str], output: Path, processes: int = 2):
    return run_launcher(_command(args, output, processes), timeout=300, env=ENV)


def test_two_processes_write_the_cache_one_process_writes_encoding_each_item_once(job, tmp_path):
    done, seconds = _cpu_seconds(lambda: _launch(job["args"], tmp_path / "two"))
    assert done.returncode == 0, launch_report(done)
    ours, theirs = _files(tmp_path / "two"), _files(job["reference"])
    assert ours.keys() == theirs.keys()
    assert [name for name in ours if ours[name] != theirs[name]] == []
    index = json.loads(ours["index.json"])
    assert index["counts"]["items"] == IMAGES and index["caption_fields"] == ["caption", "caption_vlm"]
    # One report, from process 0, counting the whole job; the other process says nothing.
    assert done.stdout.count("cached 32 of 32 images in 8 shards") == 1, done.stdout
    # Each item encoded once: both processes together spend about the CPU of one, plus a second start-up (~6 s of
    # imports and encoder loading); encoding everything twice would be about 2×. (Two processes making one shard
    # would also fail outright: a finished shard is never written over.)
    print(f"CPU seconds: one process {job['cpu']:.1f}, two processes {seconds:.1f} ({seconds / job['cpu']:.2f}×)")
    assert seconds < 1.6 * job["cpu"]


def _rank_of(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        for entry in environ:
            if entry.startswith(b"RANK="):
                return int(entry[5:])
    return None


def test_sigkill_of_one_process_then_rerun_finishes_the_same_cache(job, tmp_path):
    output, marker = tmp_path / "two", tmp_path / "at-fault-point"
    # Process 1 makes shards 1, 3, 5, 7: stop it with shard 3 written but not yet renamed into place, its shard 1
    # finished, then kill it; the launcher then stops process 0 wherever it is.
    env = {**ENV, FAULT_POINT_VARIABLE: f"before-rename:00003:{marker}"}
    command = _command(job["args"], output)
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert launcher.poll() is None, launcher.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the fault point was never reached"
        time.sleep(0.05)
    ranks = {pid: _rank_of(pid) for pid in _descendants(launcher.pid)}
    (victim,) = [pid for pid, rank in ranks.items() if rank == 1]
    os.kill(victim, signal.SIGKILL)
    launcher.communicate(timeout=60)  # the launcher stops process 0 and fails
    assert launcher.returncode != 0
    assert not (output / "index.json").exists()
    shards = output / "shards"
    left = {p.name: p.stat().st_mtime_ns for p in shards.iterdir() if not p.name.startswith(".")}
    assert "00001" in left and "00003" not in left and list(shards.glob(".00003.tmp-*"))  # half-made: hidden

    done = _launch(job["args"], output)
    assert done.returncode == 0, launch_report(done)
    assert f"({len(left)} shards were already done)" in done.stdout, done.stdout
    assert {name: (shards / name).stat().st_mtime_ns for name in left} == left  # finished shards not redone
    ours, theirs = _files(output), _files(job["reference"])
    assert ours.keys() == theirs.keys()  # the half-made shard's temporary is gone
    assert [name for name in ours if ours[name] != theirs[name]] == []


def test_two_processes_prepare_a_recipes_cache_generating_its_dataset_once(tmp_path):
    """``pixart prepare RECIPE`` under torchrun: process 0 generates the recipe's ShapesWorld data while the other
    waits (two writers would collide: ``write_dataset`` refuses a folder that is not empty), then both share the
    shards; one process on the data they generated makes the same bytes."""
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "shapes" / "quick.yaml"
    shapes = "data.shapes={n: 48, resolution: 32, seed: 0, caption_style: dense, fmt: jsonl, split: train, workers: 1}"
    args = [str(recipe), "--set", shapes, "--set", f"data.path={tmp_path / 'shapes' / 'manifest.jsonl'}"]
    args += ["--shard-size", "16", "--workers", "0", "--device", "cpu"]
    for name, processes in (("two", 2), ("one", 1)):  # the first launch generates the data
        done = _launch(args, tmp_path / name, processes=processes)
        assert done.returncode == 0, launch_report(done)
        assert done.stdout.count("cached 48 of 48 images in 3 shards") == 1, done.stdout
    assert len(list((tmp_path / "shapes" / "images").iterdir())) == 48
    ours, theirs = _files(tmp_path / "two"), _files(tmp_path / "one")
    assert ours.keys() == theirs.keys()
    assert [name for name in ours if ours[name] != theirs[name]] == []


def test_each_process_of_a_launch_computes_on_its_own_gpu():
    from pixart_cli.distributed import Dist

    second = Dist(rank=3, world=4, local_rank=1)  # the second process of the second machine
    assert second.device("cuda") == torch.device("cuda", 1)
    assert second.device("cuda:0") == torch.device("cuda", 0)  # named explicitly: kept
    assert second.device("cpu") == torch.device("cpu")
    assert Dist().device("cuda") == torch.device("cuda")  # one process: the current device, as before
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        assert Dist.from_environment() == second
