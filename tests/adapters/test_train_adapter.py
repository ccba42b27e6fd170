"""Training an adapter with the ordinary loop: frozen base, adapter checkpoints, exact resume, sampling with it."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from pixart_cli.adapters.format import load_adapter
from pixart_cli.checkpoints.format import checkpoint_dirs, load_checkpoint
from pixart_cli.cli import app
from tests.training.test_train import ROOT, losses, stage2_args, world  # noqa: F401  (a fixture)

runner = CliRunner()
RECIPE = str(ROOT / "recipes" / "stage2.yaml")
LORA = "{type: lora, rank: 4, alpha: 8}"


def adapter_args(world, base, out, steps=12, adapter=LORA):  # noqa: F811
    return [
        *stage2_args(world, out, steps=steps), "--set", f"model.init={base}", "--set", "model.init_weights=ema",
        "--set", f"adapter={adapter}", "--set", "output.save_every=5", "--set", "log.every=2",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def base(world, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("base") / "run"
    result = runner.invoke(app, ["train", RECIPE, *stage2_args(world, out, steps=10)])
    assert result.exit_code == 0, result.output
    return out


def test_an_adapter_trains_on_a_frozen_base_and_resumes_exactly(world, base, tmp_path):  # noqa: F811
    full, split = tmp_path / "full", tmp_path / "split"
    result = runner.invoke(app, ["train", RECIPE, *adapter_args(world, base, full)])
    assert result.exit_code == 0, result.output
    assert "frozen, with a LORA adapter of rank 4 on 14 layers" in result.output
    last = full / "checkpoints" / "step-0000012"
    assert sorted(p.name for p in last.iterdir()) == [
        "adapter.safetensors", "adapter.yaml", "adapter_ema.safetensors", "position.json", "recipe.yaml",
        "training_state.pt",
    ]  # fmt: skip
    adapter = load_adapter(full)
    assert adapter.base.path == str(checkpoint_dirs(base)[-1][1].resolve()) and adapter.base.weights == "ema"
    assert any(v.abs().max() > 0 for k, v in adapter.state_dict.items() if "lora_B" in k)  # it learned
    # The adapter checkpoint is small: the base is referenced, not copied.
    size = sum(p.stat().st_size for p in last.glob("adapter*.safetensors"))
    assert size < 0.2 * (checkpoint_dirs(base)[-1][1] / "model.safetensors").stat().st_size

    assert runner.invoke(app, ["train", RECIPE, *adapter_args(world, base, split, steps=6)]).exit_code == 0
    result = runner.invoke(app, ["train", RECIPE, *adapter_args(world, base, split), "--resume", "auto"])
    assert result.exit_code == 0, result.output
    for name in ("adapter", "adapter_ema"):
        a = load_file(full / "checkpoints" / "step-0000012" / f"{name}.safetensors")
        b = load_file(split / "checkpoints" / "step-0000012" / f"{name}.safetensors")
        assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert losses(full) == pytest.approx(losses(split), abs=1e-6)

    # Sampling: the run directory stands for its latest adapter; without --model, the base it names.
    out = tmp_path / "samples"
    result = runner.invoke(
        app, ["sample", "a red circle", "-n", "1", "--steps", "4", "--lora", str(full), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    record = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    assert record["model"].endswith(f" + {full}:1")
    # The benchmarks take adapters the same way, and record them with the generation settings.
    bench = tmp_path / "bench"
    result = runner.invoke(
        app, ["eval-compbench", "--bench", "shapes", "--lora", f"{full}:0.5", "--limit", "2", "--images-per-prompt",
              "1", "--steps", "3", "-o", str(bench)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((bench / "generation.json").read_text())["lora"] == [f"{full}:0.5"]


def test_resume_refuses_a_changed_base_and_a_switch_between_adapter_and_full(world, base, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    grids = [
        "--set",
        "log.sample_every=5",
        "--set",
        "log.sample_prompts=['a red circle']",
        "--set",
        "log.sample_steps=2",
    ]
    assert runner.invoke(app, ["train", RECIPE, *adapter_args(world, base, run, steps=5), *grids]).exit_code == 0
    assert (run / "samples" / "step-0000005.png").is_file()  # the EMA adapter merged into its base
    result = runner.invoke(
        app,
        [
            "train",
            RECIPE,
            *adapter_args(world, base, run, steps=6, adapter="{type: dora, rank: 4}"),
            "--resume",
            "auto",
        ],
    )
    assert result.exit_code == 2 and "adapter.type: lora → dora" in result.output
    # The base's weights changed under the same path: the adapter no longer belongs to it.
    checkpoint = checkpoint_dirs(base)[-1][1]
    ema = load_file(checkpoint / "ema.safetensors")
    from safetensors.torch import save_file

    original = dict(ema)
    ema["t_block.1.bias"] = ema["t_block.1.bias"] + 1
    save_file(ema, checkpoint / "ema.safetensors")
    try:
        result = runner.invoke(app, ["train", RECIPE, *adapter_args(world, base, run, steps=6), "--resume", "auto"])
        assert result.exit_code == 2 and result.output.count("error:") == 1, result.output
        assert "now holds other weights" in result.output
    finally:
        save_file(original, checkpoint / "ema.safetensors")


def test_half_precision_base_needs_the_same_autocast(world, base, tmp_path):  # noqa: F811
    args = adapter_args(world, base, tmp_path / "run", steps=2, adapter="{base_dtype: bf16, rank: 2}")
    result = runner.invoke(app, ["train", RECIPE, *args])
    assert result.exit_code == 2 and "adapter.base_dtype: bf16 needs train.mixed_precision bf16" in result.output
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # a new precision in this process
    try:
        result = runner.invoke(app, ["train", RECIPE, *args, "--set", "train.mixed_precision=bf16"])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert result.exit_code == 0, result.output
    adapter = load_adapter(tmp_path / "run")
    assert all(v.dtype == torch.float32 for v in adapter.state_dict.values())


def test_recipe_errors_name_the_adapter_key(world, base, tmp_path):  # noqa: F811
    result = runner.invoke(app, ["train", RECIPE, *adapter_args(world, base, tmp_path / "a", adapter="{rank: 0}")])
    assert result.exit_code == 2 and "adapter.rank: must be positive" in result.output
    result = runner.invoke(
        app, ["train", RECIPE, *adapter_args(world, base, tmp_path / "b", adapter="{targets: [nope]}")]
    )
    assert result.exit_code == 2 and "adapter.targets: 'nope' names no layer" in result.output
    result = runner.invoke(app, ["train", RECIPE, *stage2_args(world, tmp_path / "c"), "--set", f"adapter={LORA}"])
    assert result.exit_code == 2 and "set model.init to the base model" in result.output
    saved = yaml.safe_load((ROOT / "recipes" / "stage2.yaml").read_text())
    assert "adapter" not in saved
    assert load_checkpoint(checkpoint_dirs(base)[-1][1]).ema_state_dict is not None
