"""`cluster.strategy: fsdp` on two CPU processes (gloo): the DDP run's weights, kill -9 + `--resume auto` equal to the
uninterrupted run, checkpoints any strategy resumes, bad combinations refused."""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from pixart_cli.cli import app
from tests.test_reliability import finish, history, logged_step, start, wait_for, world  # noqa: F401  (fixture)
from tests.training.test_train import ROOT, one_line_error, stage2_args

runner = CliRunner()
STAGE2 = str(ROOT / "recipes" / "stage2.yaml")
STEPS = 8
FSDP = ["--set", "cluster.strategy=fsdp"]


def launch(world: Path, out: Path, *extra: str) -> list[str]:  # noqa: F811
    """Two gloo processes, batch 8 each: the global batch of 16 that the one-process runs of test_train use."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pixart_cli",
        "train", STAGE2, *stage2_args(world, out, steps=STEPS, batch=8), "--set", "output.save_every=3",
        "--set", "log.every=1", *extra,
    ]  # fmt: skip


def weights(run: Path, name: str, step: int = STEPS) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step-{step:07d}" / f"{name}.safetensors")


def assert_close(a: Path, b: Path, tolerance: float) -> None:
    for name in ("model", "ema"):
        x, y = weights(a, name), weights(b, name)
        assert x.keys() == y.keys() and max((x[k] - y[k]).abs().max().item() for k in x) <= tolerance, name


def test_fsdp_equals_ddp_and_resumes_exactly_after_kill_9(world, tmp_path):  # noqa: F811
    ddp, fsdp, killed = tmp_path / "ddp", tmp_path / "fsdp", tmp_path / "killed"
    finish(launch(world, ddp), tmp_path)
    log = finish(launch(world, fsdp, *FSDP), tmp_path)
    assert "FSDP: this process holds" in log  # sharded, not silently DDP
    assert_close(ddp, fsdp, 1e-5)
    for mine, ref in zip(history(fsdp), history(ddp), strict=True):  # step, loss, lr, images, gradient norm
        assert mine == pytest.approx(ref, rel=1e-5)

    proc = start(launch(world, killed, *FSDP), tmp_path)
    assert wait_for(proc, lambda: logged_step(killed) >= 5), proc.communicate()[0][-3000:]  # past step 3's save
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finish([*launch(world, killed, *FSDP), "--resume", "auto"], tmp_path)
    assert_close(fsdp, killed, 1e-6)
    assert [h[0] for h in history(killed)] == list(range(1, STEPS + 1))
    for mine, ref in zip(history(killed), history(fsdp), strict=True):
        assert mine == pytest.approx(ref, rel=1e-6, abs=1e-7)

    # The checkpoint is the ordinary directory: DDP continues the sharded run's step 6 (and `pixart sample` reads it).
    switched = tmp_path / "switched"
    shutil.copytree(fsdp / "checkpoints" / "step-0000006", switched / "checkpoints" / "step-0000006")
    finish([*launch(world, switched), "--resume", "auto"], tmp_path)
    assert_close(fsdp, switched, 1e-5)


def test_fsdp_refuses_what_it_does_not_shard():
    lean = ["--set", "optim.name=adamw8bit"]
    one_line_error(runner.invoke(app, ["train", STAGE2, "--dry-run", *FSDP, *lean]), "cluster.strategy", "adamw")
    adapter = ["--set", "model.init=builtin:shapes-demo", "--set", "adapter={rank: 4}"]
    one_line_error(runner.invoke(app, ["train", STAGE2, "--dry-run", *FSDP, *adapter]), "cluster.strategy", "ddp")


def test_dry_run_estimates_memory_per_gpu_for_each_strategy():
    from pixart_cli.training.plan import memory_estimate
    from pixart_cli.training.recipe import load_recipe

    ddp, _ = load_recipe(STAGE2)
    fsdp, _ = load_recipe(STAGE2, ["cluster.strategy=fsdp"])
    parameters = 610_856_096
    saved = memory_estimate(ddp, parameters) - memory_estimate(fsdp, parameters)
    processes = ddp.cluster.world_size  # 64: the state (20 bytes per parameter with AdamW) is split 64 ways
    assert saved == pytest.approx(20 * parameters * (1 - 1 / processes) / 1024**3, rel=0.05)
    result = runner.invoke(app, ["train", STAGE2, "--dry-run"])
    assert "ddp" in result.output and "fsdp" in result.output
