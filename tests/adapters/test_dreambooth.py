"""DreamBooth: instance prompt, prior preservation with class images drawn by the base, exact resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from pixart_cli.cli import app
from pixart_cli.training.dreambooth import combine
from tests.adapters.test_train_adapter import RECIPE, adapter_args, base  # noqa: F401  (fixtures)
from tests.training.test_train import losses, world  # noqa: F401  (a fixture)

runner = CliRunner()


def dreambooth_args(world, base, out, steps, prior=True, adapter="{rank: 4, alpha: 8}"):  # noqa: F811
    section = "{instance_prompt: 'a sks shape'"
    if prior:
        section += ", class_prompts: ['a red circle'], class_images: 8, class_steps: 3"
        section += f", class_dir: {out.parent / 'class'}"
    return [
        *adapter_args(world, base, out, steps=steps, adapter=adapter), "--set", "data.cache=null",
        "--set", f"dreambooth={section}}}", "--set", "train.batch_size=4", "--set", "output.save_every=3",
    ]  # fmt: skip


def test_prior_preservation_draws_class_images_once_and_resumes_exactly(world, base, tmp_path):  # noqa: F811
    full, split = tmp_path / "full", tmp_path / "split"
    result = runner.invoke(app, ["train", RECIPE, *dreambooth_args(world, base, full, steps=6)])
    assert result.exit_code == 0, result.output
    assert "8 class images of 'a red circle'" in result.output
    records = [json.loads(line) for line in (tmp_path / "class" / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 8 and {r["prompt"] for r in records} == {"a red circle"}
    drawn = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "class").glob("*.png")}

    assert runner.invoke(app, ["train", RECIPE, *dreambooth_args(world, base, split, steps=4)]).exit_code == 0
    result = runner.invoke(app, ["train", RECIPE, *dreambooth_args(world, base, split, steps=6), "--resume", "auto"])
    assert result.exit_code == 0, result.output
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "class").glob("*.png")} == drawn  # reused, not redrawn
    for name in ("adapter", "adapter_ema"):
        a = load_file(full / "checkpoints" / "step-0000006" / f"{name}.safetensors")
        b = load_file(split / "checkpoints" / "step-0000006" / f"{name}.safetensors")
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert losses(full)[-1] == pytest.approx(losses(split)[-1], abs=1e-6)


def test_dreambooth_trains_full_weights_without_prior(world, base, tmp_path):  # noqa: F811
    args = dreambooth_args(world, base, tmp_path / "run", steps=3, prior=False)
    args += ["--set", "adapter=null"]
    result = runner.invoke(app, ["train", RECIPE, *args])
    assert result.exit_code == 0, result.output
    assert "instance images, captioned 'a sks shape'" in result.output
    assert (tmp_path / "run" / "checkpoints" / "step-0000003" / "model.safetensors").is_file()
    # Without an instance prompt the images keep their own captions (a new word named in them).
    args += ["--set", "dreambooth.instance_prompt=null", "--set", f"output.dir={tmp_path / 'own'}"]
    result = runner.invoke(app, ["train", RECIPE, *args])
    assert result.exit_code == 0 and "instance images, captioned with their own captions" in result.output


def test_combined_batch_weights_give_instance_mean_plus_weighted_prior_mean():
    def part(n, length):
        return {
            "x0": torch.zeros(n, 3, 8, 8),
            "caption": torch.ones(n, length, 5),
            "caption_mask": torch.ones(n, length),
        }

    batch = combine(part(2, 3), part(4, 5), prior_loss_weight=0.5)
    losses_ = torch.tensor([1.0, 3.0, 2.0, 2.0, 6.0, 6.0])
    assert (losses_ * batch["loss_weight"]).sum().item() == pytest.approx(2.0 + 0.5 * 4.0)
    assert batch["caption"].shape == (6, 5, 5) and batch["caption_mask"][:2, 3:].sum() == 0


def test_dreambooth_recipe_errors_name_the_key(world, base, tmp_path):  # noqa: F811
    args = dreambooth_args(world, base, tmp_path / "a", steps=2)
    result = runner.invoke(app, ["train", RECIPE, *args, "--set", "dreambooth.instance_prompt=' '"])
    assert result.exit_code == 2 and "dreambooth.instance_prompt:" in result.output
    result = runner.invoke(app, ["train", RECIPE, *args, "--set", "dreambooth.class_prompts=['']"])
    assert result.exit_code == 2 and "dreambooth.class_prompts: an empty prompt" in result.output
    result = runner.invoke(app, ["train", RECIPE, *args, "--set", f"data.cache={tmp_path}"])
    assert result.exit_code == 2 and "data.cache: DreamBooth encodes" in result.output
