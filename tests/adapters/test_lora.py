"""Adapters: parity with diffusers + peft (an independent reference), merging, scales, strict directories, errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import PixArtTransformer2DModel
from peft import PeftModel
from typer.testing import CliRunner

from pixart_cli.adapters.format import (
    Adapter,
    BaseReference,
    apply_adapters,
    load_adapter,
    save_adapter,
)
from pixart_cli.adapters.lora import adapter_state_dict, add_adapter, merged_model, weights_hash
from pixart_cli.adapters.settings import AdapterSection
from pixart_cli.checkpoints.convert import diffusers_transformer_config, ours_to_diffusers
from pixart_cli.checkpoints.format import Checkpoint, instantiate, load_checkpoint, save_checkpoint
from pixart_cli.cli import app
from pixart_cli.errors import PixartError
from pixart_cli.models import build_pixart
from tests.checkpoints.test_convert import diffusers_forward, inputs, size_conditions
from tests.utils import TINY_PIXART, TINY_PIXART_MS, randomize

runner = CliRunner()


def trained_adapter(base: torch.nn.Module, settings: AdapterSection, seed: int = 5) -> dict:
    """An adapter with random (non-zero) weights, as if trained: a fresh one (B = 0) would hide every bug."""
    model = build_pixart(base.config)
    model.load_state_dict(base.state_dict())
    add_adapter(model, settings)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=generator) * 0.1
                p.copy_(p + noise if "magnitude" in name else noise)  # a magnitude near the base's row norms
    return adapter_state_dict(model)


def make_adapter(tmp_path, config=TINY_PIXART, settings=None, name="adapter", seed=5):
    """An adapter directory, the base checkpoint directory it was trained on, and the base model (made once per
    test directory and config: every adapter of a test shares it)."""
    settings = settings or AdapterSection(rank=4, alpha=8)
    base_dir = tmp_path / "base-1"
    if base_dir.exists():
        base = instantiate(load_checkpoint(base_dir))
    else:
        base = randomize(build_pixart(config), seed=1).eval()
        save_checkpoint(Checkpoint(config, base.state_dict()), base_dir)
    weights = trained_adapter(base, settings, seed)
    reference = BaseReference(str(base_dir), weights_hash(base.state_dict()), "model")
    adapter = Adapter(settings, reference, config, weights, None, "test")
    return save_adapter(adapter, tmp_path / name, overwrite=True), base_dir, base


def adapted(base, directory, scale=1.0):
    """Our model with the adapter applied, unmerged (peft's layers in the forward)."""
    from pixart_cli.adapters.lora import load_adapter_weights, scale_adapter

    model = build_pixart(base.config)
    model.load_state_dict(base.state_dict())
    adapter = load_adapter(directory)
    add_adapter(model, adapter.settings)
    load_adapter_weights(model, adapter.state_dict)
    scale_adapter(model, "default", scale)
    return model.eval()


def forward_inputs(config, h=8, w=8):
    return inputs(config, h, w), size_conditions(config, h, w)


@pytest.mark.parametrize("kind", ["lora", "dora"])
@pytest.mark.parametrize("config,targets", [(TINY_PIXART, ("blocks",)), (TINY_PIXART_MS, ("official",))])
def test_exported_adapter_in_diffusers_with_peft_equals_ours(tmp_path, kind, config, targets):
    settings = AdapterSection(type=kind, rank=4, alpha=8, targets=targets)
    directory, _, base = make_adapter(tmp_path, config, settings)
    result = runner.invoke(app, ["convert", str(directory), "--to", "diffusers", "-o", str(tmp_path / "peft")])
    assert result.exit_code == 0, result.output
    theirs = PixArtTransformer2DModel(**diffusers_transformer_config(config))
    theirs.load_state_dict(ours_to_diffusers(base.state_dict(), config), strict=True)
    theirs = PeftModel.from_pretrained(theirs.eval(), str(tmp_path / "peft")).eval()
    ours = adapted(base, directory)
    args, kwargs = forward_inputs(config, 8, 12 if config.multi_scale else 8)
    with torch.no_grad():
        mine = ours(*args, **kwargs)
        reference = diffusers_forward(theirs, *args, **kwargs)
        plain = base(*args, **kwargs)
    assert (mine - plain).abs().max() > 1e-2  # the adapter does something
    assert (mine - reference).abs().max() <= 1e-5
    # Merged into the base (peft's merge_and_unload on their side): the same output again.
    merged = theirs.merge_and_unload()
    with torch.no_grad():
        assert (diffusers_forward(merged, *args, **kwargs) - mine).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_merged_weights_equal_the_unmerged_forward_and_scale_zero_is_the_base(tmp_path, kind):
    directory, base_dir, base = make_adapter(tmp_path, settings=AdapterSection(type=kind, rank=4, alpha=8))
    args, _ = forward_inputs(TINY_PIXART)
    checkpoint = load_checkpoint(base_dir)
    with torch.no_grad():
        for scale in (1.0, 0.5):
            merged = instantiate(apply_adapters(checkpoint, [(str(directory), scale)], "base"))
            assert (merged(*args) - adapted(base, directory, scale)(*args)).abs().max() <= 1e-5
        if kind == "lora":  # DoRA's magnitude stays at scale 0: only LoRA's scale 0 is the base itself
            zero = apply_adapters(checkpoint, [(str(directory), 0.0)], "base")
            assert all(torch.equal(zero.state_dict[k], checkpoint.state_dict[k]) for k in checkpoint.state_dict)
        # merged_model (sample grids during training) agrees with the unmerged model
        assert (merged_model(adapted(base, directory))(*args) - adapted(base, directory)(*args)).abs().max() <= 1e-5


def test_two_adapters_combine_and_each_scale_applies(tmp_path):
    a, base_dir, _ = make_adapter(tmp_path, name="a", seed=5)
    b, _, _ = make_adapter(tmp_path, name="b", seed=6)
    checkpoint = load_checkpoint(base_dir)
    # Two LoRAs add their updates: (W + s_a ΔA + s_b ΔB) = merging each on its own and summing the deltas.
    both = apply_adapters(checkpoint, [(str(a), 1.0), (str(b), 0.5)], "base").state_dict
    only_a = apply_adapters(checkpoint, [(str(a), 1.0)], "base").state_dict
    only_b = apply_adapters(checkpoint, [(str(b), 0.5)], "base").state_dict
    for key, value in checkpoint.state_dict.items():
        assert torch.allclose(both[key], only_a[key] + only_b[key] - value, atol=1e-6)


def test_an_adapter_on_another_base_is_an_error_naming_both(tmp_path):
    directory, _, _ = make_adapter(tmp_path)
    other = randomize(build_pixart(TINY_PIXART), seed=9)
    other_dir = save_checkpoint(Checkpoint(TINY_PIXART, other.state_dict()), tmp_path / "other")
    with pytest.raises(PixartError, match=r"trained on .*base-1 .*sha256 [0-9a-f]{12}.*not on .*other"):
        apply_adapters(load_checkpoint(other_dir), [(str(directory), 1.0)], str(other_dir))
    # A bf16 copy of the right base is the same base, and so is its diffusers copy (which makes a new null caption).
    base = load_checkpoint(tmp_path / "base-1").to_dtype(torch.bfloat16)
    assert next(iter(apply_adapters(base, [(str(directory), 1.0)], "bf16 copy").state_dict.values())).dtype == (
        torch.bfloat16
    )  # merged in the base's own precision
    result = runner.invoke(app, ["convert", str(tmp_path / "base-1"), "--to", "diffusers", "-o", str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    from pixart_cli.checkpoints.convert import read_any

    apply_adapters(read_any(tmp_path / "hf", max_length=TINY_PIXART.max_length), [(str(directory), 1.0)], "hf")


def test_adapter_directories_are_strict(tmp_path):
    directory, _, _ = make_adapter(tmp_path)
    from safetensors.torch import load_file, save_file

    weights = load_file(directory / "adapter.safetensors")
    first = sorted(weights)[0]
    save_file({k: v for k, v in weights.items() if k != first}, directory / "adapter.safetensors")
    with pytest.raises(PixartError, match=f"missing: {first}"):
        load_adapter(directory)
    (directory / "adapter.yaml").write_bytes(b"\xff\xfe not yaml")
    with pytest.raises(PixartError, match="cannot read the adapter description"):
        load_adapter(directory)
    with pytest.raises(PixartError, match="not an adapter directory"):
        load_adapter(tmp_path / "base-1")


def test_targets_are_checked_against_the_model():
    model = build_pixart(TINY_PIXART)
    with pytest.raises(PixartError, match=r"adapter.targets: 'attn.qkvv' names no layer"):
        add_adapter(model, AdapterSection(targets=("attn.qkvv",)))
    with pytest.raises(PixartError, match=r"adapter.targets: 'attn' names blocks.0.attn, a SelfAttention"):
        add_adapter(build_pixart(TINY_PIXART), AdapterSection(targets=("attn",)))
    layers = add_adapter(build_pixart(TINY_PIXART), AdapterSection(targets=("official",)))
    assert "x_embedder.proj" in layers and not any("csize" in layer for layer in layers)  # not multi-scale
    with pytest.raises(ValueError, match="rank"):
        AdapterSection(rank=0)


def test_cli_refuses_an_adapter_as_a_model_and_merges_into_any_format(tmp_path):
    directory, base_dir, base = make_adapter(tmp_path)
    result = runner.invoke(app, ["convert", str(directory), "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "an adapter; it converts to diffusers" in result.output
    assert not (tmp_path / "x").exists()
    result = runner.invoke(
        app,
        [
            "convert",
            str(base_dir),
            "--merge-lora",
            f"{directory}:0.5",
            "--to",
            "official",
            "-o",
            str(tmp_path / "m.pth"),
        ],
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["convert", str(tmp_path / "m.pth"), "-o", str(tmp_path / "m"), "--num-heads", "4"])
    assert result.exit_code == 0, result.output
    args, _ = forward_inputs(TINY_PIXART)
    with torch.no_grad():
        merged = instantiate(load_checkpoint(tmp_path / "m"))(*args)
        assert (merged - adapted(base, directory, 0.5)(*args)).abs().max() <= 1e-5
    other = save_checkpoint(
        Checkpoint(TINY_PIXART, randomize(build_pixart(TINY_PIXART), seed=3).state_dict()), tmp_path / "o"
    )
    result = runner.invoke(app, ["convert", str(other), "--merge-lora", str(directory), "-o", str(tmp_path / "bad")])
    assert result.exit_code == 2 and result.output.count("error:") == 1 and "trained on" in result.output
    assert not (tmp_path / "bad").exists()


def test_an_adapter_for_another_model_shape_is_refused(tmp_path):
    directory, _, _ = make_adapter(tmp_path)
    wide = dataclasses.replace(TINY_PIXART, hidden_size=64)
    other = save_checkpoint(Checkpoint(wide, build_pixart(wide).state_dict()), tmp_path / "wide")
    with pytest.raises(PixartError, match="another model shape"):
        apply_adapters(load_checkpoint(other), [(str(directory), 1.0)], "wide")
