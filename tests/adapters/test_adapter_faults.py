"""Adapters under faults: kill -9 mid-run resumes exactly; bad adapters and bases are one error line each."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from pixart_cli.cli import app
from tests.adapters.test_lora import make_adapter
from tests.test_reliability import ENV, STAGE2, finish, history, logged_step, start, wait_for, world  # noqa: F401
from tests.training.test_train import stage2_args

runner = CliRunner()
STEPS = 10


def adapter_command(world: Path, base: Path, out: Path, *extra: str) -> list[str]:  # noqa: F811
    return [
        sys.executable, "-m", "pixart_cli", "train", STAGE2, *stage2_args(world, out, steps=STEPS),
        "--set", f"model.init={base}", "--set", "adapter={type: dora, rank: 4, alpha: 8}", "--set",
        "output.save_every=3", "--set", "log.every=1", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def base(world, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("base") / "run"
    result = runner.invoke(app, ["train", STAGE2, *stage2_args(world, out, steps=4)])
    assert result.exit_code == 0, result.output
    return out


def test_sigkill_mid_run_resumes_to_the_same_adapter(world, base, tmp_path):  # noqa: F811
    reference, run = tmp_path / "reference", tmp_path / "run"
    finish(adapter_command(world, base, reference), tmp_path)
    proc = start(adapter_command(world, base, run), tmp_path)
    assert wait_for(proc, lambda: logged_step(run) >= 5), proc.communicate()[0][-3000:]  # past step 3's checkpoint
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finish([*adapter_command(world, base, run), "--resume", "auto"], tmp_path)
    final = f"checkpoints/step-{STEPS:07d}"
    for name in ("adapter", "adapter_ema"):
        a, b = load_file(reference / final / f"{name}.safetensors"), load_file(run / final / f"{name}.safetensors")
        assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6, name
    assert [h[0] for h in history(run)] == list(range(1, STEPS + 1))
    for mine, ref in zip(history(run), history(reference), strict=True):  # the same logged losses, steps, images
        assert mine == pytest.approx(ref, rel=1e-6, abs=1e-7)


def one_error(args: list[str], fragment: str, out: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pixart_cli", *args], env=ENV, capture_output=True, text=True, timeout=300
    )
    text = done.stdout + done.stderr
    assert done.returncode == 2 and text.count("error:") == 1 and "Traceback" not in text, text[-2000:]
    assert fragment in text, text[-2000:]
    assert not out.exists()


def test_bad_adapters_and_bases_are_one_error_line_and_write_nothing(tmp_path):
    directory, base_dir, _ = make_adapter(tmp_path)
    out = tmp_path / "samples"
    sample = ["sample", "a red circle", "-n", "1", "--steps", "2", "-o", str(out), "--t5", "none", "--vae", "none"]
    # Another architecture: the shipped demo is not the tiny model the adapter was trained on.
    one_error([*sample, "-m", "builtin:shapes-demo", "--lora", str(directory)], "another model shape", out)
    # Not a PixArt model at all.
    one_error([*sample, "-m", "builtin:shapes-dit", "--lora", str(directory)], "not a PixArt one", out)
    # A model directory where an adapter belongs.
    one_error([*sample, "-m", str(base_dir), "--lora", str(base_dir)], "not an adapter directory", out)
    # A rank that does not match the weights.
    config = yaml.safe_load((directory / "adapter.yaml").read_text())
    config["adapter"]["rank"] = 8
    (directory / "adapter.yaml").write_text(yaml.safe_dump(config))
    one_error([*sample, "-m", str(base_dir), "--lora", str(directory)], "not the adapter its settings describe", out)
    one_error(["convert", str(directory), "--to", "diffusers", "-o", str(out)], "wrong shape", out)
