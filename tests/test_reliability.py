"""Reliability: killed runs resume exactly, interrupted generation resumes, bad data is skipped and counted, and
non-finite steps stop the run or are skipped. docs/reliability.md states each guarantee and names its test.

Training runs here are real ``python -m pixart_cli train`` subprocesses on a tiny pixel-space PixArt (a few
seconds each), killed with real signals.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from pixart_cli.checkpoints.format import checkpoint_dirs, load_checkpoint
from pixart_cli.cli import app
from pixart_cli.data.loader import CachedDataset
from pixart_cli.io import FAULT_POINT_VARIABLE, png_is_complete
from tests.training.test_train import stage2_args

ROOT = Path(__file__).resolve().parents[1]
STAGE2 = str(ROOT / "recipes" / "stage2.yaml")
STEPS = 12  # 96 scenes in batches of 16: two epochs, so resumes cross an epoch boundary
runner = CliRunner()


@pytest.fixture(autouse=True)
def one_thread():
    """In-process work on one intra-op thread too: on a busy shared CPU, oversubscribed threads slow it tenfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """ShapesWorld captions, a tiny T5 trained on them and a prepared pixel-space feature cache."""
    from pixart_cli.data.cache import PrepareSettings, prepare
    from pixart_cli.shapesworld.dataset import write_dataset
    from pixart_cli.shapesworld.prompts import caption
    from pixart_cli.shapesworld.world import sample_scene
    from pixart_cli.tiny import make_tiny_t5

    root = tmp_path_factory.mktemp("world")
    make_tiny_t5(root / "t5", [caption(sample_scene(i), "dense", seed=i) for i in range(300)], d_model=32)
    write_dataset(root / "captions", 96, resolution=32, seed=0, fmt="jsonl")
    manifest = root / "captions" / "manifest.jsonl"
    prepare(manifest, root / "cache", PrepareSettings(resolution=32, max_length=32), t5=str(root / "t5"), vae="none")
    return root


# -- training subprocesses ------------------------------------------------------------------------------------------


def train_command(world: Path, out: Path, *extra: str, workers: int = 0) -> list[str]:
    """A 12-step run that saves every 2 steps and logs every step."""
    return [
        sys.executable, "-m", "pixart_cli", "train", STAGE2, *stage2_args(world, out, steps=STEPS),
        "--set", "output.save_every=2", "--set", "log.every=1", "--set", f"data.num_workers={workers}", *extra,
    ]  # fmt: skip


# One intra-op thread in every run (uninterrupted and resumed alike), so the machine's load cannot change the
# order of floating-point reductions between the runs compared, and polling here keeps a core of its own.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def start(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    # A process group of its own: signals sent to it reach the loader workers too, as a scheduler's do.
    return subprocess.Popen(
        command,
        cwd=cwd,
        env={**ENV, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(command: list[str], cwd: Path) -> str:
    done = subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def wait_for(proc: subprocess.Popen, condition, timeout: float = 300.0) -> bool:
    """Poll ``condition`` every 10 ms while ``proc`` runs; False if it ended (or timed out) first. Conditions are
    states the run stays in (a logged step, a fault point it waits at), so the interval does not decide a test."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def logged_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if line.endswith("}")]
    return max(steps, default=0)


def temporaries(run: Path) -> list[Path]:
    """Hidden checkpoint directories being written (``.step-NNNNNNN.tmp-PID-…``)."""
    try:
        return [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".step-") and ".tmp-" in p.name]
    except FileNotFoundError:
        return []


def history(run: Path) -> list[tuple]:
    """(step, loss, lr, images, grad norm) per logged step: equal histories mean equal data order and draws."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"], r["images"], r["grad_norm"]) for r in records]


def assert_same_training(run: Path, reference: Path) -> None:
    """Final model and EMA weights within 1e-6, and the same per-step metrics, as the uninterrupted run."""
    final = f"checkpoints/step-{STEPS:07d}"
    for name in ("model", "ema"):
        a, b = load_file(reference / final / f"{name}.safetensors"), load_file(run / final / f"{name}.safetensors")
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6, name
    ours, theirs = history(run), history(reference)
    assert [h[0] for h in ours] == list(range(1, STEPS + 1)) == [h[0] for h in theirs]
    for mine, ref in zip(ours, theirs, strict=True):
        assert mine[3] == ref[3] and mine[1:] == pytest.approx(ref[1:], rel=1e-6, abs=1e-7), (mine, ref)


def assert_only_complete_checkpoints(run: Path) -> list[int]:
    """``checkpoint_dirs`` lists complete checkpoints only, each of which loads; returns their steps."""
    found = checkpoint_dirs(run)
    for step, path in found:
        assert not path.name.startswith(".") and path.name == f"step-{step:07d}"
        load_checkpoint(path)
        assert json.loads((path / "position.json").read_text())["step"] == step
    return [step for step, _ in found]


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory) -> Path:
    """The uninterrupted run that every interrupted one must reproduce."""
    cwd = tmp_path_factory.mktemp("reference")
    finish(train_command(world, cwd / "run"), cwd)
    return cwd / "run"


def test_sigkill_while_a_checkpoint_is_written_leaves_no_partial_checkpoint_and_resumes_exactly(
    world, reference, tmp_path
):
    """kill -9 while a checkpoint is written (at a fault point in the atomic writer: every file of step 6 written,
    its hidden directory not yet renamed): it is never listed nor resumed from, the next run deletes it, and
    ``--resume auto`` ends with the uninterrupted run's weights and metrics."""
    run = tmp_path / "run"
    marker = tmp_path / "at-the-fault-point"
    env = {FAULT_POINT_VARIABLE: f"before-rename:step-0000006:{marker}"}  # all its files written, not yet renamed
    proc = start(train_command(world, run), tmp_path, env)
    caught = wait_for(proc, marker.exists)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert caught, "the run ended before reaching the fault point"
    leftover = temporaries(run)
    assert leftover, "the half-written checkpoint should still be there"
    partial = int(leftover[0].name[6:13])
    steps = assert_only_complete_checkpoints(run)
    assert steps and max(steps) < partial  # the half-written one is not listed

    log = finish([*train_command(world, run), "--resume", "auto"], tmp_path)
    assert f"resumed from {run / 'checkpoints' / f'step-{max(steps):07d}'}" in log
    assert "removed a half-written checkpoint" in log and not temporaries(run)
    assert_same_training(run, reference)


def test_sigterm_and_sigint_save_a_checkpoint_and_resume_exactly(world, reference, tmp_path):
    """SIGTERM to the whole process group (loader workers included, as a scheduler sends it), then SIGINT: each
    saves a checkpoint at the step reached (odd steps: not a regular save), says how to continue and exits 143 /
    130 (not an error); resuming twice ends where the uninterrupted run did."""
    run = tmp_path / "run"
    stopped_at = []
    for sig, after in ((signal.SIGTERM, 3), (signal.SIGINT, 6)):
        resume = ["--resume", "auto"] if stopped_at else []
        proc = start(train_command(world, run, *resume, workers=1), tmp_path)
        assert wait_for(proc, lambda after=after: logged_step(run) >= after), proc.communicate()[0][-3000:]
        os.killpg(proc.pid, sig)
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 128 + sig, output[-3000:]  # the shell's convention: 143 SIGTERM, 130 SIGINT
        found = re.search(rf"stopped at step (\d+) \({sig.name}\); checkpoint: (\S+)", output)
        assert found and "Traceback" not in output and "error:" not in output, output[-3000:]
        assert "continue with: pixart train " in output and output.rstrip().endswith("--resume auto"), output[-500:]
        step = int(found[1])
        assert after <= step < STEPS and Path(found[2]) == run / "checkpoints" / f"step-{step:07d}"
        assert max(assert_only_complete_checkpoints(run)) == step
        stopped_at.append(step)
    assert stopped_at[0] < stopped_at[1]
    finish([*train_command(world, run), "--resume", "auto"], tmp_path)
    assert_same_training(run, reference)


@pytest.mark.slow
def test_sigkill_at_random_points_resumes_exactly(world, reference, tmp_path):
    """Four kill -9 at seeded random moments (during start-up, mid-step, mid-checkpoint-write), each followed by
    ``--resume auto``: the final weights and metrics equal the uninterrupted run's."""
    rng = random.Random(1234)
    run = tmp_path / "run"
    for attempt in range(4):
        kind = rng.choice(["startup", "step", "write"])
        resume = ["--resume", "auto"] if attempt else []
        done = max(assert_only_complete_checkpoints(run), default=0)
        proc = start(train_command(world, run, *resume), tmp_path)
        if kind == "startup":
            time.sleep(rng.uniform(0.5, 4.0))
        elif kind == "step":
            target = done + rng.randint(1, 3)
            wait_for(proc, lambda target=target: logged_step(run) >= target)
        else:
            wait_for(proc, lambda done=done: any(int(p.name[6:13]) > done for p in temporaries(run)))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert_only_complete_checkpoints(run)
    finish([*train_command(world, run), "--resume", "auto"], tmp_path)
    assert not temporaries(run)
    assert_same_training(run, reference)


# -- interrupted generation --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(world, tmp_path_factory) -> Path:
    """A random pixel-space PixArt (32 px images) with the world's T5: generation takes a fraction of a second."""
    from pixart_cli.models import PixArtConfig
    from pixart_cli.tiny import make_tiny_pixart

    config = PixArtConfig(
        depth=1, hidden_size=32, num_heads=2, patch_size=4, input_size=32, in_channels=3, caption_channels=32,
        max_length=16,
    )  # fmt: skip
    directory = tmp_path_factory.mktemp("tiny-model") / "model"
    return make_tiny_pixart(directory, config, text_encoder=str(world / "t5"), vae="none", seed=0)


def stamps(paths) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in paths}


def damage(finished: list[Path]) -> tuple[Path, Path, Path]:
    """What an interrupted run (or an interrupted copy) leaves: a PNG cut short under its final name, an image
    never written, and the hidden temporary file of the image that was being written when the run was killed."""
    truncated, absent = finished[0], finished[1]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    absent.unlink()
    temporary = absent.parent / f".{absent.name}.tmp-{os.getpid()}-0badc0de"
    temporary.write_bytes(b"\x89PNG\r\n\x1a\n half an image")
    return truncated, absent, temporary


def assert_resumed(finished: list[Path], before: dict[Path, int], damaged: tuple[Path, Path, Path]) -> None:
    """The damaged images are made again (complete), the temporary is gone, every other file is untouched."""
    truncated, absent, temporary = damaged
    assert not temporary.exists()
    for path in finished:
        assert png_is_complete(path), path
        with Image.open(path) as image:
            image.load()
    untouched = {p: t for p, t in before.items() if p not in (truncated, absent)}
    assert untouched and stamps(untouched) == untouched
    assert truncated.stat().st_mtime_ns != before[truncated]


def test_interrupted_sample_resumes_without_redoing_or_keeping_damaged_images(tiny_model, tmp_path):
    out = tmp_path / "samples"
    args = ["sample", "a red circle", "a blue square", "-n", "3", "--model", str(tiny_model), "--steps", "2"]
    args += ["-o", str(out), "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    finished = sorted(out.glob("*.png"))
    assert len(finished) == 6
    before = stamps(finished)
    damaged = damage(finished)
    with open(out / "manifest.jsonl", "a") as manifest:
        manifest.write('{"file": "p00001-s2.png", "prom')  # a record cut short by the kill
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "wrote 2 images" in result.output and "skipped 4 already there" in result.output
    assert_resumed(finished, before, damaged)
    records = []
    for line in (out / "manifest.jsonl").read_text().splitlines():
        with contextlib.suppress(ValueError):  # the cut-short line stays unreadable; the next starts a new line
            records.append(json.loads(line)["file"])
    assert sorted(set(records)) == sorted(p.name for p in finished)


def test_sample_killed_mid_run_resumes_without_redoing_finished_images(tiny_model, tmp_path):
    """A real kill -9 of ``pixart sample`` once a few images are written; the rerun makes only the rest."""
    out = tmp_path / "samples"
    args = ["sample", "a red circle", "-n", "30", "--model", str(tiny_model), "--steps", "5", "-b", "1"]
    command = [sys.executable, "-m", "pixart_cli", *args, "-o", str(out), "--device", "cpu"]
    proc = start(command, tmp_path)
    assert wait_for(proc, lambda: len(list(out.glob("*.png"))) >= 3), proc.communicate()[0][-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = sorted(out.glob("*.png"))
    assert 3 <= len(finished) < 30 and all(png_is_complete(p) for p in finished)
    before = stamps(finished)
    result = runner.invoke(app, [*args, "-o", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert f"wrote {30 - len(finished)} images" in result.output
    assert f"skipped {len(finished)} already there" in result.output
    assert stamps(finished) == before and len(list(out.glob("*.png"))) == 30
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_interrupted_eval_compbench_shapes_resumes(tiny_model, tmp_path):
    out = tmp_path / "bench"
    args = ["eval-compbench", "--bench", "shapes", "--model", str(tiny_model), "--limit", "3"]
    args += ["--images-per-prompt", "2", "--steps", "2", "-o", str(out), "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    finished = sorted((out / "shapes" / "samples").glob("*.png"))
    assert len(finished) == 6
    before = stamps(finished)
    damaged = damage(finished)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert_resumed(finished, before, damaged)
    assert json.loads((out / "compbench_report.json").read_text())["categories"]


def _write_coco(root: Path, n: int = 10) -> Path:
    """A COCO-format caption set: ``annotations/captions_val2014.json`` and JPEGs under ``val2014/``."""
    from pixart_cli.shapesworld.world import render, sample_scene

    (root / "val2014").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, notes = [], []
    for k in range(n):
        name = f"COCO_val2014_{k:012d}.jpg"
        render(sample_scene(seed=k), 40).save(root / "val2014" / name)
        images.append({"id": k, "file_name": name, "width": 40, "height": 40})
        notes.append({"image_id": k, "id": 100 + k, "caption": f"a picture number {k}"})
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps({"images": images, "annotations": notes}))
    return root


class _MeanColour(torch.nn.Module):
    """A stand-in for Inception: three features per image (its mean colour)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def test_interrupted_eval_fid_resumes(tiny_model, tmp_path):
    import warnings

    coco = _write_coco(tmp_path / "coco")
    inception = tmp_path / "inception.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(_MeanColour()), str(inception))
    out = tmp_path / "fid"
    args = ["eval-fid", "--coco", "val2014", "--coco-root", str(coco), "--model", str(tiny_model), "--num", "8"]
    args += ["--inception", str(inception), "--no-cache", "--size", "32", "--steps", "2", "-o", str(out)]
    args += ["--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    finished = sorted((out / "images").glob("*.png"))
    assert len(finished) == 8 and "FID" in result.output
    before = stamps(finished)
    damaged = damage(finished)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert_resumed(finished, before, damaged)


# -- data faults ----------------------------------------------------------------------------------------------------


def faulty_dataset(root: Path) -> Path:
    """A caption folder of 32 px scenes plus one of each kind of fault.

    Unreadable (skipped and counted): truncated, zero bytes, not an image, a decompression bomb. Converted to RGB:
    grayscale, RGBA (transparent: composited on white), 16-bit (mid-grey: scaled, not clipped to white). Without a
    caption (skipped and counted): no .txt, and a blank .txt.
    """
    from pixart_cli.shapesworld.prompts import caption
    from pixart_cli.shapesworld.world import render, sample_scene

    root.mkdir(parents=True)
    for k in range(12):
        scene = sample_scene(seed=k)
        render(scene, 32).save(root / f"good{k:02d}.png")
        (root / f"good{k:02d}.txt").write_text(caption(scene, "dense", seed=k))
    good = (root / "good00.png").read_bytes()
    faults = {
        "truncated.png": good[: len(good) // 2],
        "zero.png": b"",
        "text.png": b"this is not an image\n",
    }
    for name, data in faults.items():
        (root / name).write_bytes(data)
    Image.new("L", (32, 32), 128).save(root / "gray.png")
    Image.new("RGBA", (32, 32), (255, 0, 0, 0)).save(root / "rgba.png")
    Image.fromarray(np.full((32, 32), 32896, dtype=np.uint16)).save(root / "deep.png")  # 16-bit: 32896 / 257 = 128
    bomb = root / "bomb.png"
    Image.new("RGB", (1, 1)).save(bomb)
    data = bytearray(bomb.read_bytes())  # IHDR claims 100000 × 100000 pixels (CRC recomputed)
    data[16:24] = struct.pack(">II", 100_000, 100_000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    bomb.write_bytes(bytes(data))
    for name in ("truncated", "zero", "text", "gray", "rgba", "deep", "bomb"):
        (root / f"{name}.txt").write_text("a red circle")
    Image.new("RGB", (32, 32)).save(root / "uncaptioned.png")
    Image.new("RGB", (32, 32)).save(root / "blank.png")
    (root / "blank.txt").write_text("   \n")
    return root


def test_prepare_skips_counts_and_reports_data_faults(world, tmp_path):
    data = faulty_dataset(tmp_path / "data")
    args = ["prepare", str(data), "--t5", str(world / "t5"), "--vae", "none", "--resolution", "32"]
    args += ["--max-length", "32", "--workers", "0", "--device", "cpu"]
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "strict")])
    last = result.output.strip().splitlines()[-1]  # after the warning about the captions
    assert result.exit_code == 2 and last.startswith("error: 4 of 19 images are unreadable, more than 1.0%"), last
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "cache"), "--max-bad-fraction", "0.3"])
    assert result.exit_code == 0, result.output
    assert "cached 15 of 19 images" in result.output
    assert "2 image(s) without a caption (skipped)" in result.output
    assert "4 unreadable image(s) skipped" in result.output
    for name in ("truncated", "zero", "text", "bomb"):
        assert f"{name}.png" in result.output
    cache = CachedDataset(tmp_path / "cache")
    shards = sorted((tmp_path / "cache" / "shards").iterdir())
    paths = [p for shard in shards for p in json.loads((shard / "meta.json").read_text())["paths"]]
    pixels = {Path(p).stem: cache[i]["latent_mean"].float() for i, p in enumerate(paths)}
    assert pixels["gray"].shape == (3, 32, 32)
    assert pixels["rgba"].min() == 1.0  # fully transparent → white
    assert pixels["deep"].abs().max() < 0.01  # 16-bit mid-grey stays mid-grey (0 in [-1, 1])


def test_training_on_the_fly_skips_counts_and_reports_data_faults(world, tmp_path):
    """Images decoded during training: the unreadable ones are replaced and counted, the rest converted; the end
    of the run reports both counts."""
    data = faulty_dataset(tmp_path / "data")
    args = stage2_args(world, tmp_path / "run", steps=2, batch=19)  # one batch holds every captioned image
    data_args = ["--set", "data.cache=null", "--set", f"data.path={data}", "--set", "data.kind=captions"]
    result = runner.invoke(app, ["train", STAGE2, *args, *data_args])  # at most 1% unreadable by default
    last = result.output.strip().split("\n")[-1]
    assert result.exit_code == 2 and re.match(r"error: \d images are unreadable, more than the 0 allowed", last), last
    assert not checkpoint_dirs(tmp_path / "run")
    result = runner.invoke(app, ["train", STAGE2, *args, *data_args, "--set", "data.max_bad_fraction=0.3"])
    assert result.exit_code == 0, result.output
    assert "data: 4 unreadable image(s) skipped" in result.output
    assert "2 image(s) without a caption skipped" in result.output
    assert assert_only_complete_checkpoints(tmp_path / "run") == [2]


# -- numerical faults -----------------------------------------------------------------------------------------------


def _recipe(world: Path, run: Path, steps: int, *extra: str):
    from pixart_cli.training.recipe import load_recipe

    args = [*stage2_args(world, run, steps=steps), "--set", "output.save_every=4", *extra]
    return load_recipe(STAGE2, [v for flag, v in zip(args[::2], args[1::2], strict=True) if flag == "--set"])


class _InfGradient(torch.autograd.Function):
    """Identity forward; +inf gradient backward: a finite loss whose gradients overflow."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


def poison(monkeypatch, faults: dict[int, str]) -> None:
    """Make training step s (1-based) produce a NaN loss (``"nan"``) or infinite gradients (``"inf"``)."""
    from pixart_cli.diffusion import GaussianDiffusion

    original = GaussianDiffusion.training_losses
    calls = []

    def training_losses(self, model_output, x_start, t, noise, *args, **kwargs):
        calls.append(1)
        fault = faults.get(len(calls))
        if fault == "inf":
            model_output = _InfGradient.apply(model_output)
        out = original(self, model_output, x_start, t, noise, *args, **kwargs)
        if fault == "nan":
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(GaussianDiffusion, "training_losses", training_losses)


def _train(recipe, resolved):
    from accelerate import Accelerator

    from pixart_cli.training.batches import batch_source
    from pixart_cli.training.loop import train

    accelerator = Accelerator(cpu=True)
    return train(recipe, resolved, batch_source(recipe, accelerator), accelerator=accelerator)


def test_infinite_gradients_with_a_finite_loss_stop_the_run_with_the_last_checkpoint_intact(
    world, tmp_path, monkeypatch
):
    from pixart_cli.training.loop import TrainingDiverged

    recipe, resolved = _recipe(world, tmp_path / "run", 10)
    poison(monkeypatch, {6: "inf"})
    with pytest.raises(TrainingDiverged, match=r"step 6.*step-0000004"):
        _train(recipe, resolved)
    assert assert_only_complete_checkpoints(tmp_path / "run") == [4]
    weights = load_checkpoint(tmp_path / "run" / "checkpoints" / "step-0000004")
    assert all(torch.isfinite(v).all() for v in [*weights.state_dict.values(), *weights.ema_state_dict.values()])


def test_nan_policy_skip_skips_nan_and_inf_steps_and_finishes(world, tmp_path, monkeypatch):
    """NaN loss at step 6, infinite gradients at the last step: both updates are skipped, the run finishes and its
    final checkpoint (written although the last step was skipped) holds finite weights."""
    run = tmp_path / "run"
    skip = ["--set", "train.nan_policy=skip", "--set", "log.every=1"]
    recipe, resolved = _recipe(world, run, 8, *skip, "--set", "output.save_every=1", "--set", "output.keep_last=10")
    poison(monkeypatch, {6: "nan", 8: "inf"})
    result = _train(recipe, resolved)
    assert result.steps == 8 and result.checkpoint == run / "checkpoints" / "step-0000008"
    assert assert_only_complete_checkpoints(run) == list(range(1, 9))
    final = load_checkpoint(result.checkpoint)
    assert all(torch.isfinite(v).all() for v in [*final.state_dict.values(), *final.ema_state_dict.values()])
    assert [h[0] for h in history(run)] == [1, 2, 3, 4, 5, 7]  # skipped steps are not logged
    for skipped in (6, 8):  # a skipped step changes neither the weights nor the EMA
        for name in ("model", "ema"):
            before = load_file(run / "checkpoints" / f"step-{skipped - 1:07d}" / f"{name}.safetensors")
            after = load_file(run / "checkpoints" / f"step-{skipped:07d}" / f"{name}.safetensors")
            assert all(torch.equal(before[k], after[k]) for k in before), (skipped, name)
    # A skipped step still consumes its batch: the data order after it is that of a run without the fault.
    assert json.loads((result.checkpoint / "position.json").read_text())["images"] == 8 * 16


def test_sample_manifest_keeps_one_record_per_image_after_a_kill_and_a_redone_image(tiny_model, tmp_path):
    """A real kill -9 of ``pixart sample -n 16``, then a finished PNG cut short: the rerun makes that image again
    and replaces its record instead of adding a second one (issue #24: 17 records for 16 images)."""
    out = tmp_path / "samples"
    args = ["sample", "a red circle", "-n", "16", "--model", str(tiny_model), "--steps", "40", "-b", "1"]
    args += ["-o", str(out), "--device", "cpu"]
    proc = start([sys.executable, "-m", "pixart_cli", *args], tmp_path)
    assert wait_for(proc, lambda: len(list(out.glob("*.png"))) >= 4), proc.communicate()[0][-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 4 <= len(list(out.glob("*.png"))) < 16
    manifest = out / "manifest.jsonl"
    redone = out / "p00000-s0.png"  # the first image written: recorded before the second was begun
    assert any(line.startswith('{"file": "p00000-s0.png"') for line in manifest.read_text().splitlines())
    redone.write_bytes(redone.read_bytes()[: redone.stat().st_size // 2])
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    names = sorted(f"p00000-s{seed}.png" for seed in range(16))
    assert sorted(p.name for p in out.glob("*.png")) == names
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert sorted(r["file"] for r in records) == names  # 16 lines, one per image
    for record in records:
        assert png_is_complete(out / record["file"])
        with Image.open(out / record["file"]) as image:
            assert json.loads(image.info["pixart"]) == record


@pytest.mark.parametrize("command", ["eval-compbench", "eval-fid"])
def test_eval_killed_mid_generation_resumes_without_redoing_finished_images(tiny_model, tmp_path, command):
    """A real `pixart eval-*` process killed with SIGKILL while it generates: the rerun keeps every image finished
    before the kill (same file, same mtime), makes the rest, and ends with every image complete and a report."""
    out = tmp_path / "out"
    if command == "eval-compbench":
        args = ["eval-compbench", "--bench", "shapes", "--model", str(tiny_model), "--limit", "12"]
        args += ["--images-per-prompt", "2", "--steps", "60", "-o", str(out), "--device", "cpu"]
        images, total = out / "shapes" / "samples", 24
    else:
        import warnings

        coco = _write_coco(tmp_path / "coco", n=24)
        inception = tmp_path / "inception.pt"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(torch.jit.script(_MeanColour()), str(inception))
        args = ["eval-fid", "--coco", "val2014", "--coco-root", str(coco), "--model", str(tiny_model), "--num", "24"]
        args += ["--inception", str(inception), "--no-cache", "--size", "32", "--steps", "60", "-o", str(out)]
        args += ["--device", "cpu", "--batch-size", "1"]
        images, total = out / "images", 24
    proc = start([sys.executable, "-m", "pixart_cli", *args], tmp_path)
    caught = wait_for(proc, lambda: len(list(images.glob("*.png"))) >= 3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert caught, "the run ended before it could be killed"
    finished = sorted(p for p in images.glob("*.png") if png_is_complete(p))
    before = stamps(finished)
    assert 3 <= len(finished) < total
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    made = sorted(images.glob("*.png"))
    assert len(made) == total and all(png_is_complete(p) for p in made)
    assert stamps(before) == before  # nothing finished before the kill was made again
    assert not [p for p in images.iterdir() if p.name.startswith(".")]  # no temporaries left
