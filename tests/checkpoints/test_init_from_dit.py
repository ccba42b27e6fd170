"""`pixart init-from-dit`: the paper's re-parameterisation, checked against diffusers' DiT (independent)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch
from typer.testing import CliRunner

from pixart_cli.checkpoints.format import Checkpoint, instantiate, load_checkpoint, save_checkpoint
from pixart_cli.checkpoints.init_from_dit import init_from_dit
from pixart_cli.cli import app
from pixart_cli.models import DiT, dit_config
from tests.utils import TINY_DIT, diffusers_dit, randomize

runner = CliRunner()


def random_dit(config=TINY_DIT, seed=0, std=0.1):
    return randomize(DiT(config), seed=seed, std=std).eval()


def compare_at(pixart, reference, config, t, caption_channels, batch=2, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, config.input_size, config.input_size, generator=g)
    caption = torch.randn(batch, pixart.config.max_length, caption_channels, generator=g)
    timestep = torch.full((batch,), float(t))
    null = torch.full((batch,), config.num_classes)
    with torch.no_grad():
        ours = pixart(x, timestep, caption, torch.ones(batch, pixart.config.max_length))
        theirs = reference(x, timestep=timestep, class_labels=null).sample
    return (ours - theirs).abs().max().item()


def test_cli_reparameterisation_reproduces_dit_at_t500(tmp_path):
    dit = random_dit()
    torch.save(dit.state_dict(), tmp_path / "dit.pt")  # DiT's released files are raw state dicts
    result = runner.invoke(
        app,
        [
            "init-from-dit",
            str(tmp_path / "dit.pt"),
            "-o",
            str(tmp_path / "px"),
            "--caption-channels",
            "16",
            "--max-length",
            "6",
            "--num-heads",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(tmp_path / "px")
    assert ckpt.config.caption_channels == 16 and ckpt.config.max_length == 6 and ckpt.config.depth == 3
    pixart = instantiate(ckpt)
    reference = diffusers_dit(TINY_DIT, dit.state_dict())
    assert compare_at(pixart, reference, TINY_DIT, 500, 16) <= 1e-5
    assert compare_at(pixart, reference, TINY_DIT, 500, 16, seed=9) <= 1e-5  # any caption
    assert compare_at(pixart, reference, TINY_DIT, 100, 16) > 1e-3  # only at the chosen t
    for i in range(3):
        assert not ckpt.state_dict[f"blocks.{i}.cross_attn.proj.weight"].any()
        assert not ckpt.state_dict[f"blocks.{i}.cross_attn.proj.bias"].any()


def test_other_t_and_dit_train_checkpoints_take_ema(tmp_path):
    model, ema = random_dit(seed=1), random_dit(seed=2)
    # What DiT's train.py saves: the command line as an argparse.Namespace beside the weights (and optimiser state).
    args = argparse.Namespace(model="DiT-XL/2", image_size=256, num_classes=1000, epochs=1400, global_seed=0)
    checkpoint = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": {}, "args": args}
    torch.save(checkpoint, tmp_path / "0100.pt")
    ckpt = init_from_dit(tmp_path / "0100.pt", t=250.0, caption_channels=16, max_length=6, num_heads=4)
    pixart = instantiate(ckpt)
    reference = diffusers_dit(TINY_DIT, ema.state_dict())
    assert compare_at(pixart, reference, TINY_DIT, 250, 16) <= 1e-5
    command = ["init-from-dit", str(tmp_path / "0100.pt"), "-o", str(tmp_path / "px"), "--num-heads", "4"]
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output


def test_shapes_are_inferred_and_non_family_widths_need_heads(tmp_path):
    config = dataclasses.replace(TINY_DIT, hidden_size=40, num_heads=5, patch_size=4, input_size=16, learn_sigma=False)
    dit = random_dit(config)
    torch.save(dit.state_dict(), tmp_path / "odd.pt")
    result = runner.invoke(app, ["init-from-dit", str(tmp_path / "odd.pt"), "-o", str(tmp_path / "px")])
    assert result.exit_code == 2 and "--num-heads" in result.output
    ckpt = init_from_dit(tmp_path / "odd.pt", caption_channels=8, max_length=4, num_heads=5)
    c = ckpt.config
    assert (c.hidden_size, c.patch_size, c.input_size, c.learn_sigma) == (40, 4, 16, False)
    assert compare_at(instantiate(ckpt), diffusers_dit(config, dit.state_dict()), config, 500, 8) <= 1e-5


def test_bad_dit_files_fail_cleanly(tmp_path):
    sd = random_dit().state_dict()
    del sd["blocks.1.mlp.fc2.weight"]
    torch.save(sd, tmp_path / "missing.pt")
    torch.save({"y_embedder.y_proj.fc1.weight": torch.zeros(2, 2)}, tmp_path / "pixart.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    shifted = random_dit().state_dict()
    shifted["pos_embed"] = shifted["pos_embed"].roll(1, dims=1)  # another grid's positions: PixArt's would differ
    torch.save(shifted, tmp_path / "shifted.pt")
    for name, expected in [
        ("missing.pt", "missing keys: blocks.1.mlp.fc2.weight"),
        ("shifted.pt", "stored pos_embed is not the sin-cos embedding"),
        ("pixart.pt", "already a PixArt"),
        ("junk.pt", "not a PyTorch checkpoint"),
        ("absent.pt", "no such file"),
    ]:
        result = runner.invoke(
            app, ["init-from-dit", str(tmp_path / name), "-o", str(tmp_path / "out"), "--num-heads", "4"]
        )
        assert result.exit_code == 2, result.output
        assert expected in result.output and "Traceback" not in result.output
        assert not (tmp_path / "out").exists()
    result = runner.invoke(app, ["init-from-dit", str(tmp_path / "missing.pt"), "--t", "1000", "--num-heads", "4"])
    assert result.exit_code == 2


@pytest.mark.slow
def test_real_shaped_xl2_reparameterisation(tmp_path):
    """DiT-XL/2 at 256 px with random weights (2.7 GB of float32): the identity holds at full size."""
    config = dit_config("DiT-XL/2")
    dit = random_dit(config, std=0.02)  # ~1/sqrt(width): activations stay O(1) through 28 blocks
    torch.save(dit.state_dict(), tmp_path / "DiT-XL-2-256x256.pt")
    ckpt = init_from_dit(tmp_path / "DiT-XL-2-256x256.pt")
    del dit
    pixart = instantiate(ckpt)
    assert sum(p.numel() for p in pixart.parameters()) == 610_856_096
    reference = diffusers_dit(config, torch.load(tmp_path / "DiT-XL-2-256x256.pt", weights_only=True))
    assert compare_at(pixart, reference, config, 500, 4096, batch=1) <= 1e-5


def test_licence_note_only_for_files_in_dits_formats(tmp_path):
    """DiT's released weights (raw state dicts, train.py checkpoints) are CC-BY-NC; our own DiT directories are not."""
    torch.save(random_dit().state_dict(), tmp_path / "dit.pt")
    common = ["--caption-channels", "16", "--max-length", "6", "--num-heads", "4"]
    cases = [(str(tmp_path / "dit.pt"), True), ("builtin:shapes-dit", False), (str(tmp_path / "ours"), False)]
    save_checkpoint(Checkpoint(TINY_DIT, random_dit().state_dict()), tmp_path / "ours")
    for i, (src, noted) in enumerate(cases):
        result = runner.invoke(app, ["init-from-dit", src, "-o", str(tmp_path / f"out{i}"), *common])
        assert result.exit_code == 0, result.output
        assert ("CC-BY-NC" in result.output) == noted, (src, result.output)


def test_num_heads_that_contradicts_the_checkpoint_is_refused(tmp_path):
    """Our DiT checkpoints record their heads: a different --num-heads is a contradiction, not silently ignored."""
    result = runner.invoke(app, ["init-from-dit", "builtin:shapes-dit", "-o", str(tmp_path / "px"), "--num-heads", "7"])
    assert result.exit_code == 2 and "--num-heads 7" in result.output and "records 4 heads" in result.output
    assert not (tmp_path / "px").exists()
