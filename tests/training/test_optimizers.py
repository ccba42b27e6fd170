"""`optim.name`: AdamW, 8-bit AdamW (bitsandbytes) and CAME (came-pytorch) train, resume exactly and are validated."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from pixart_cli.cli import app
from pixart_cli.training.recipe import load_recipe
from tests.training.test_train import ROOT, losses, one_line_error, resume_args, world  # noqa: F401  (world: fixture)

runner = CliRunner()
STAGE2 = str(ROOT / "recipes" / "stage2.yaml")
CAME = ["--set", "optim.name=came", "--set", "optim.betas=[0.9, 0.999, 0.9999]", "--set", "optim.eps=[1e-30, 1e-16]"]
SETTINGS = {"adamw8bit": ["--set", "optim.name=adamw8bit"], "came": CAME}


@pytest.mark.parametrize("name", ["adamw8bit", "came"])
def test_lean_optimisers_train_and_resume_exactly(world, tmp_path, name):  # noqa: F811
    """A 6-step run equals 3 steps + `--resume auto` for 3 more: weights, EMA and logged losses; the saved state is
    the optimiser's own (8-bit moments, factored second moments)."""
    full, split = tmp_path / "full", tmp_path / "split"
    every = [*SETTINGS[name], "--set", "output.save_every=3", "--set", "log.every=1"]
    args = [*resume_args(world, full, steps=6), *every]
    assert (result := runner.invoke(app, ["train", STAGE2, *args])).exit_code == 0, result.output
    args = [*resume_args(world, split, steps=6), *every]
    assert runner.invoke(app, ["train", STAGE2, *args, "--set", "train.steps=3"]).exit_code == 0
    assert (result := runner.invoke(app, ["train", STAGE2, *args, "--resume", "auto"])).exit_code == 0, result.output
    for file in ("model", "ema"):
        a, b = (load_file(run / "checkpoints" / "step-0000006" / f"{file}.safetensors") for run in (full, split))
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert losses(full) == pytest.approx(losses(split), abs=1e-6)
    assert losses(full)[-1] < losses(full)[0]
    state = torch.load(full / "checkpoints" / "step-0000006" / "training_state.pt", weights_only=True)["optimizer"]
    saved = [per_param.get("__bnb_optimizer_quant_state__", per_param) for per_param in state["state"].values()]
    if name == "adamw8bit":
        assert any(s["state1"].dtype == torch.uint8 and "absmax1" in s for s in saved if "state1" in s)
    else:
        assert any("exp_avg_sq_row" in s for s in saved)


def test_optimiser_settings_are_validated_naming_the_key():
    one_line_error(runner.invoke(app, ["train", STAGE2, "--dry-run", "--set", "optim.name=came"]),
                   "optim.betas", "came takes 3 betas", "0.9999")  # fmt: skip
    bad_eps = ["--set", "optim.name=came", "--set", "optim.betas=[0.9, 0.999, 0.9999]"]
    one_line_error(runner.invoke(app, ["train", STAGE2, "--dry-run", *bad_eps]), "optim.eps", "two values")
    one_line_error(runner.invoke(app, ["train", STAGE2, "--dry-run", "--set", "optim.eps=[1e-8, 1e-8]"]), "optim.eps")
    one_line_error(runner.invoke(app, ["train", STAGE2, "--dry-run", "--set", "optim.name=lion"]), "optim.name")
    recipe, resolved = load_recipe(STAGE2, [o for o in CAME if o != "--set"])
    assert recipe.optim.eps == (1e-30, 1e-16) and resolved["optim"]["betas"] == [0.9, 0.999, 0.9999]


def test_dry_run_counts_each_optimisers_state(monkeypatch):
    from pixart_cli.training.plan import memory_estimate

    memory = {}
    for name, overrides in {"adamw": [], **SETTINGS}.items():
        recipe, _ = load_recipe(STAGE2, [o for o in overrides if o != "--set"])
        memory[name] = memory_estimate(recipe, 610_856_096)
        result = runner.invoke(app, ["train", STAGE2, "--dry-run", *overrides])
        assert result.exit_code == 0 and f"{name}: " in result.output, result.output
    # 610.9 M trained parameters: ~8, ~4 and ~2 bytes of optimiser state each.
    assert memory["adamw"] - memory["came"] == pytest.approx((8 - 4.013) * 610_856_096 / 1024**3)
    assert memory["came"] - memory["adamw8bit"] == pytest.approx((4.013 - 2.035) * 610_856_096 / 1024**3)


def test_a_missing_optimiser_package_is_one_error_before_any_work(world, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "came_pytorch", None)  # import fails
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", STAGE2, *resume_args(world, run, steps=2), *CAME])
    one_line_error(result, "optim.name: came needs the came-pytorch package", "pip install")
    assert not run.exists() or not any(run.iterdir())
    shutil.rmtree(run, ignore_errors=True)
