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


@pytest.mark.slow  # a minute of launches; CI runs the slow tests too
def test_sharded_checkpoints_resume_exactly_convert_and_sample(world, tmp_path):  # noqa: F811
    """`output.checkpoint: sharded`: each process writes its rows; kill -9 + `--resume auto` reads each its own shard
    back to the uninterrupted full-checkpoint run; DDP resumes the same shards put together; `pixart convert` writes
    the ordinary directory; `pixart sample` reads the run as it is."""
    full, killed, switched = tmp_path / "full", tmp_path / "killed", tmp_path / "switched"
    sharded = [*FSDP, "--set", "output.checkpoint=sharded"]
    finish(launch(world, full, *FSDP), tmp_path)
    proc = start(launch(world, killed, *sharded), tmp_path)
    assert wait_for(proc, lambda: logged_step(killed) >= 5), proc.communicate()[0][-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    step3 = killed / "checkpoints" / "step-0000003"
    assert sorted(p.name for p in step3.glob("shard-*")) == [
        "shard-00000-of-00002.safetensors", "shard-00001-of-00002.safetensors",
    ] and not (step3 / "model.safetensors").exists()  # fmt: skip
    shutil.copytree(step3, switched / "checkpoints" / step3.name)
    finish([*launch(world, killed, *sharded), "--resume", "auto"], tmp_path)
    converted = tmp_path / "converted"
    result = runner.invoke(app, ["convert", str(killed), "--to", "pixart", "-o", str(converted)])
    assert result.exit_code == 0, result.output
    for name in ("model", "ema"):
        a, b = weights(full, name), load_file(converted / f"{name}.safetensors")
        assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6, name
    for mine, ref in zip(history(killed), history(full), strict=True):
        assert mine == pytest.approx(ref, rel=1e-6, abs=1e-7)
    finish([*launch(world, switched), "--resume", "auto"], tmp_path)  # DDP from step 3's shards
    assert_close(full, switched, 1e-5)
    out = tmp_path / "samples"
    result = runner.invoke(
        app, ["sample", "a red circle", "-n", "1", "--steps", "2", "--model", str(killed), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output


@pytest.mark.slow  # a minute of launches; CI runs the slow tests too
def test_damaged_shards_are_set_aside_by_every_process_alike(world, tmp_path):  # noqa: F811
    """Process 1's shard of the newest checkpoint lacks a tensor (a valid file: only process 1 can tell): every process
    falls back to the checkpoint before, and the run ends where the uninterrupted one does. A layout of the wrong
    kind is one error line wherever the checkpoint is read."""
    from safetensors.torch import save_file

    full, run = tmp_path / "full", tmp_path / "run"
    sharded = [*FSDP, "--set", "output.checkpoint=sharded"]
    finish(launch(world, full, *sharded), tmp_path)
    shutil.copytree(full, run)
    shutil.rmtree(run / "checkpoints" / "step-0000008")
    shard = run / "checkpoints" / "step-0000006" / "shard-00001-of-00002.safetensors"
    tensors = load_file(shard)
    tensors.pop(next(k for k in tensors if k.startswith("ema.")))
    save_file(tensors, str(shard))
    log = finish([*launch(world, run, *sharded), "--resume", "auto"], tmp_path)
    assert "resuming from" in log and "step-0000003" in log, log[-2000:]
    assert (run / "checkpoints" / "damaged-step-0000006").is_dir()
    converted = {name: load_checkpoint_weights(run, name) for name in ("model", "ema")}
    for name, tensors in converted.items():
        reference = load_checkpoint_weights(full, name)
        assert max((reference[k] - tensors[k]).abs().max().item() for k in reference) <= 1e-6, name

    (run / "checkpoints" / "step-0000008" / "shards.json").write_text("[]")
    out = tmp_path / "samples"
    result = runner.invoke(app, ["sample", "a red circle", "-n", "1", "--model", str(run), "-o", str(out)])
    one_line_error(result, "shards.json: not a sharded checkpoint layout")


def load_checkpoint_weights(run: Path, name: str) -> dict[str, torch.Tensor]:
    from pixart_cli.checkpoints.format import load_checkpoint

    checkpoint = load_checkpoint(run / "checkpoints" / f"step-{STEPS:07d}")
    return checkpoint.state_dict if name == "model" else checkpoint.ema_state_dict


@pytest.mark.slow  # a minute of launches; CI runs the slow tests too
def test_four_processes_shard_unevenly_and_resume_from_their_own_shards(world, tmp_path):  # noqa: F811
    """At 4 processes some weights have fewer rows than processes (the 2-row scale-shift table): empty shards are
    written and read back; a resumed sharded run equals an uninterrupted DDP run of the same layout."""

    def four(out: Path, *extra: str) -> list[str]:
        cmd = launch(world, out)
        cmd[cmd.index("--nproc_per_node=2")] = "--nproc_per_node=4"
        return [*cmd, "--set", "train.batch_size=4", "--set", "train.steps=4", "--set", "output.save_every=2", *extra]

    ddp, run = tmp_path / "ddp", tmp_path / "run"
    finish(four(ddp), tmp_path)
    finish(four(run, *FSDP, "--set", "output.checkpoint=sharded", "--set", "train.steps=2"), tmp_path)
    finish([*four(run, *FSDP, "--set", "output.checkpoint=sharded"), "--resume", "auto"], tmp_path)
    from pixart_cli.checkpoints.format import load_checkpoint

    sharded = load_checkpoint(run / "checkpoints" / "step-0000004")
    for name, tensors in (("model", sharded.state_dict), ("ema", sharded.ema_state_dict)):
        reference = load_file(ddp / "checkpoints" / "step-0000004" / f"{name}.safetensors")
        assert max((reference[k] - tensors[k]).abs().max().item() for k in reference) <= 1e-5, name


def test_fsdp_refuses_what_it_does_not_shard():
    lean = ["--set", "optim.name=adamw8bit"]
    one_line_error(runner.invoke(app, ["train", STAGE2, "--dry-run", *FSDP, *lean]), "cluster.strategy", "adamw")
    adapter = ["--set", "model.init=builtin:shapes-demo", "--set", "adapter={rank: 4}"]
    one_line_error(runner.invoke(app, ["train", STAGE2, "--dry-run", *FSDP, *adapter]), "cluster.strategy", "ddp")
    sharded = ["--set", "output.checkpoint=sharded"]
    one_line_error(runner.invoke(app, ["train", STAGE2, "--dry-run", *sharded]), "output.checkpoint", "fsdp")


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
