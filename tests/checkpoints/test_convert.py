"""`pixart convert`: parity with diffusers' PixArtTransformer2DModel, lossless official round trips, bad input."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, PixArtTransformer2DModel
from typer.testing import CliRunner

from pixart_cli.checkpoints.convert import (
    detect_format,
    diffusers_transformer_config,
    expected_pos_embed,
    ours_to_diffusers,
)
from pixart_cli.checkpoints.format import Checkpoint, CheckpointMeta, instantiate, load_checkpoint, save_checkpoint
from pixart_cli.cli import app
from pixart_cli.models import build_pixart
from tests.utils import TINY_PIXART, TINY_PIXART_MS, randomize

runner = CliRunner()


def make_checkpoint(tmp_path, config=TINY_PIXART, ema=False, name="ours"):
    model = randomize(build_pixart(config), seed=1)
    ema_sd = randomize(build_pixart(config), seed=2).state_dict() if ema else None
    return save_checkpoint(Checkpoint(config, model.state_dict(), ema_sd), tmp_path / name), model


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def inputs(config, h=8, w=8):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, config.in_channels, h, w, generator=g)
    caption = torch.randn(3, config.max_length, config.caption_channels, generator=g)
    mask = torch.zeros(3, config.max_length, dtype=torch.long)
    for i, n in enumerate((2, 10, 5)):  # captions of different lengths
        mask[i, :n] = 1
    return x, torch.tensor([1.0, 250.0, 999.0]), caption, mask


def size_conditions(config, h, w) -> dict:
    """The multi-scale model's image size and aspect-ratio inputs for h×w latents (none for a fixed-size model)."""
    if not config.multi_scale:
        return {}
    return {"resolution": torch.tensor([[h * 8.0, w * 8.0]]).repeat(3, 1), "aspect_ratio": torch.tensor([[h / w]] * 3)}


def diffusers_forward(model, x, t, caption, mask, resolution=None, aspect_ratio=None):
    added = {"resolution": resolution, "aspect_ratio": aspect_ratio}
    return model(
        x, encoder_hidden_states=caption, timestep=t, encoder_attention_mask=mask, added_cond_kwargs=added
    ).sample


@pytest.mark.parametrize("config,h,w", [(TINY_PIXART, 8, 8), (TINY_PIXART_MS, 12, 6), (TINY_PIXART_MS, 8, 16)])
def test_ours_to_diffusers_gives_the_same_output(tmp_path, config, h, w):
    src, model = make_checkpoint(tmp_path, config)
    result = cli("convert", src, "-o", tmp_path / "hf", "--to", "diffusers")
    assert result.exit_code == 0, result.output
    theirs = PixArtTransformer2DModel.from_pretrained(tmp_path / "hf").eval()
    x, t, caption, mask = inputs(config, h, w)
    kwargs = size_conditions(config, h, w)
    with torch.no_grad():
        ours = model.eval()(x, t, caption, mask, **kwargs)
        reference = diffusers_forward(theirs, x, t, caption, mask, **kwargs)
    assert (ours - reference).abs().max() <= 1e-5


def test_diffusers_to_ours_gives_the_same_output(tmp_path):
    config = TINY_PIXART_MS
    torch.manual_seed(0)
    theirs = randomize(PixArtTransformer2DModel(**diffusers_transformer_config(config)), seed=4).eval()
    theirs.save_pretrained(tmp_path / "hf")
    result = cli("convert", tmp_path / "hf", "-o", tmp_path / "ours", "--max-length", 10)
    assert result.exit_code == 0, result.output
    assert "created y_embedder.y_embedding" in result.output
    ckpt = load_checkpoint(tmp_path / "ours")
    assert ckpt.config == dataclasses.replace(config, variant=None)
    assert ckpt.meta.null_caption == "t5-empty"
    ours = instantiate(ckpt)
    x, t, caption, mask = inputs(config, 8, 12)
    res, ar = torch.tensor([[64.0, 96.0]] * 3), torch.tensor([[8 / 12]] * 3)
    with torch.no_grad():
        diff = ours(x, t, caption, mask, resolution=res, aspect_ratio=ar) - diffusers_forward(
            theirs, x, t, caption, mask, res, ar
        )
    assert diff.abs().max() <= 1e-5


def test_diffusers_pipeline_directory_reads_its_transformer(tmp_path):
    src, model = make_checkpoint(tmp_path)
    assert cli("convert", src, "-o", tmp_path / "pipe" / "transformer", "--to", "diffusers").exit_code == 0
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    assert detect_format(tmp_path / "pipe") == "diffusers-pipeline"
    assert cli("convert", tmp_path / "pipe", "-o", tmp_path / "back").exit_code == 0
    back = load_checkpoint(tmp_path / "back")
    for key, value in model.state_dict().items():
        if key != "y_embedder.y_embedding":  # diffusers keeps no null caption
            assert torch.equal(back.state_dict[key], value), key
    assert back.meta.text_encoder.endswith("text_encoder")


def test_official_round_trips_are_lossless(tmp_path):
    src, _ = make_checkpoint(tmp_path, TINY_PIXART_MS, ema=True)
    original = load_checkpoint(src)
    assert cli("convert", src, "-o", tmp_path / "official.pth", "--to", "official").exit_code == 0
    official = torch.load(tmp_path / "official.pth", weights_only=True)
    assert set(official) == {"state_dict", "state_dict_ema"}
    assert official["state_dict"]["pos_embed"].shape == (1, 16, 48)
    result = cli("convert", tmp_path / "official.pth", "-o", tmp_path / "back", "--num-heads", 4)
    assert result.exit_code == 0, result.output
    back = load_checkpoint(tmp_path / "back")
    assert back.config == dataclasses.replace(TINY_PIXART_MS, variant=None)  # scale 2.0 read back from pos_embed
    for name in ("state_dict", "ema_state_dict"):
        a, b = getattr(original, name), getattr(back, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # official → ours → official reproduces the file exactly, pos_embed included
    assert cli("convert", tmp_path / "back", "-o", tmp_path / "again.pth", "--to", "official").exit_code == 0
    again = torch.load(tmp_path / "again.pth", weights_only=True)
    for part in ("state_dict", "state_dict_ema"):
        assert all(torch.equal(official[part][k], again[part][k]) for k in official[part])


def test_ema_selection_and_dtype(tmp_path):
    src, _ = make_checkpoint(tmp_path, ema=True)
    ckpt = load_checkpoint(src)
    assert cli("convert", src, "-o", tmp_path / "ema", "--ema", "--dtype", "bf16").exit_code == 0
    ema = load_checkpoint(tmp_path / "ema")
    assert ema.ema_state_dict is None
    key = "t_block.1.weight"
    assert ema.state_dict[key].dtype == torch.bfloat16
    assert torch.equal(ema.state_dict[key], ckpt.ema_state_dict[key].bfloat16())
    assert cli("convert", src, "-o", tmp_path / "raw", "--no-ema").exit_code == 0
    assert torch.equal(load_checkpoint(tmp_path / "raw").state_dict[key], ckpt.state_dict[key])
    # diffusers holds one set: EMA by default
    assert cli("convert", src, "-o", tmp_path / "hf", "--to", "diffusers").exit_code == 0
    hf = PixArtTransformer2DModel.from_pretrained(tmp_path / "hf")
    expected = ours_to_diffusers(ckpt.ema_state_dict, TINY_PIXART)["adaln_single.linear.weight"]
    assert torch.equal(hf.state_dict()["adaln_single.linear.weight"], expected)


# -- bad input: one line, exit code 2, nothing written ---------------------------------------------------------


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def _bad_inputs(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    torch.save({"a": 1, "b": [2, 3]}, tmp_path / "unknown.pth")
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump(_Evil(), f)
    ckpt, _ = make_checkpoint(tmp_path, name="good")
    wrong = {k: v for k, v in load_checkpoint(ckpt).state_dict.items()}
    wrong["t_block.1.weight"] = torch.zeros(3, 3)
    official = {"state_dict": {**wrong, "pos_embed": expected_pos_embed(TINY_PIXART)}}
    torch.save(official, tmp_path / "wrong_shape.pth")
    (tmp_path / "emptydir").mkdir()
    return {
        "missing file": tmp_path / "nope.pth",
        "not a checkpoint": tmp_path / "notes.txt",
        "unknown format": tmp_path / "unknown.pth",
        "code-executing pickle": tmp_path / "evil.pth",
        "wrong shapes": tmp_path / "wrong_shape.pth",
        "unknown directory": tmp_path / "emptydir",
    }


def test_bad_input_fails_cleanly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for case, path in _bad_inputs(tmp_path).items():
        out = tmp_path / f"out-{case.replace(' ', '-')}"
        result = cli("convert", path, "-o", out, "--num-heads", 4)
        assert result.exit_code == 2, (case, result.output)
        assert "Traceback" not in result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert result.output.strip().startswith("error:"), (case, result.output)
        assert len(result.output.strip().splitlines()) <= 3, (case, result.output)  # one line (wrapped at most)
        assert not out.exists(), case
    assert not (tmp_path / "pwned").exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_existing_output_needs_overwrite(tmp_path):
    src, _ = make_checkpoint(tmp_path)
    (tmp_path / "out").mkdir()
    result = cli("convert", src, "-o", tmp_path / "out")
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert cli("convert", src, "-o", tmp_path / "out", "--overwrite").exit_code == 0
    assert load_checkpoint(tmp_path / "out").config == TINY_PIXART


def test_v_prediction_is_refused_where_the_target_cannot_record_it(tmp_path):
    """An official .pth has no field for v-prediction: a clear error, no file."""
    src, _ = make_checkpoint(tmp_path, dataclasses.replace(TINY_PIXART, prediction_type="v_prediction"))
    result = cli("convert", src, "-o", tmp_path / "v.pth", "--to", "official")
    assert result.exit_code == 2 and "v_prediction" in result.output, result.output
    assert not (tmp_path / "v.pth").exists()
    assert cli("convert", src, "-o", tmp_path / "copy").exit_code == 0
    assert load_checkpoint(tmp_path / "copy").config.prediction_type == "v_prediction"


def test_v_prediction_pixel_model_converts_to_diffusers_with_its_scheduler(tmp_path):
    """A ShapesWorld-like model (v-prediction, pixel space, multi-scale): diffusers' transformer computes the same
    output, and the scheduler config written beside it makes diffusers' schedulers read it as v."""
    config = dataclasses.replace(TINY_PIXART_MS, prediction_type="v_prediction", in_channels=3, learn_sigma=True)
    model = randomize(build_pixart(config), seed=1).eval()
    src = save_checkpoint(Checkpoint(config, model.state_dict(), None, CheckpointMeta(vae="none")), tmp_path / "v")
    result = cli("convert", src, "-o", tmp_path / "hf", "--to", "diffusers")
    assert result.exit_code == 0, result.output
    theirs = PixArtTransformer2DModel.from_pretrained(tmp_path / "hf").eval()
    x, t, caption, mask = inputs(config, 8, 12)
    res, ar = torch.tensor([[64.0, 96.0]] * 3), torch.tensor([[8 / 12]] * 3)
    with torch.no_grad():
        ours = model(x, t, caption, mask, resolution=res, aspect_ratio=ar)
        reference = diffusers_forward(theirs, x, t, caption, mask, res, ar)
    assert (ours - reference).abs().max() <= 1e-5
    for scheduler_class in (DPMSolverMultistepScheduler, DDPMScheduler):
        scheduler = scheduler_class.from_pretrained(tmp_path / "hf")
        assert scheduler.config.prediction_type == "v_prediction"
        betas = scheduler.config.beta_schedule, scheduler.config.beta_start, scheduler.config.beta_end
        assert betas == ("linear", 1e-4, 0.02)  # the training noise schedule
    back = cli("convert", tmp_path / "hf", "-o", tmp_path / "back", "--max-length", config.max_length)
    assert back.exit_code == 0, back.output
    assert load_checkpoint(tmp_path / "back").config.prediction_type == "v_prediction"


def test_pixel_space_pipeline_export_is_refused_before_loading_anything(tmp_path, monkeypatch):
    """PixArtAlphaPipeline always decodes with a VAE: `--vae none` (or a pixel-space model) is one error line, with
    nothing written and no VAE or T5 looked up (the hub would be asked for a model named "none")."""
    import pixart_cli.components.autoencoders
    import pixart_cli.components.t5

    def no_hub(*args, **kwargs):
        raise AssertionError("a component was loaded")

    monkeypatch.setattr(pixart_cli.components.autoencoders, "load_vae", no_hub)
    monkeypatch.setattr(pixart_cli.components.t5, "load_t5", no_hub)
    latent, _ = make_checkpoint(tmp_path, name="latent")
    config = dataclasses.replace(TINY_PIXART, in_channels=3)
    pixel = save_checkpoint(
        Checkpoint(config, build_pixart(config).state_dict(), None, CheckpointMeta(vae="none")), tmp_path / "pixel"
    )
    for src, args in (
        (latent, ["--vae", "none"]),
        (latent, ["--vae", "None", "--t5", "t5-dir"]),
        (pixel, ["--vae", "some-vae", "--t5", "t5-dir"]),
    ):
        out = tmp_path / "pipeline"
        result = cli("convert", src, "-o", out, "--to", "diffusers", *args)
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error:") and "pixel-space" in result.output, result.output
        assert "Traceback" not in result.output
        assert not out.exists()


def test_per_block_adaln_round_trips_ours_and_is_refused_elsewhere(tmp_path):
    """The ablation's per-block adaLN model saves and loads strictly; official and diffusers have no such model."""
    config = dataclasses.replace(TINY_PIXART, adaln="block")
    src, model = make_checkpoint(tmp_path, config)
    loaded = load_checkpoint(src)
    assert loaded.config.adaln == "block"
    x, t, caption, mask = inputs(config)
    torch.testing.assert_close(instantiate(loaded)(x, t, caption, mask), model(x, t, caption, mask))
    for target, out in (("official", tmp_path / "b.pth"), ("diffusers", tmp_path / "b-diffusers")):
        result = cli("convert", src, "-o", out, "--to", target)
        assert result.exit_code == 2 and "adaLN" in result.output, result.output
        assert not out.exists()


def test_converting_a_checkpoint_onto_itself_is_refused_and_keeps_it(tmp_path):
    """`convert CK -o CK --overwrite` would replace a training checkpoint with what the target keeps (no optimiser
    state, no recipe): refused, and the checkpoint is untouched."""
    src, _ = make_checkpoint(tmp_path, ema=True)
    (src / "training_state.pt").write_bytes(b"state")  # what only a training checkpoint has
    before = sorted(p.name for p in src.iterdir())
    for target in ("pixart", "diffusers"):
        result = runner.invoke(app, ["convert", str(src), "-o", str(src), "--to", target, "--overwrite"])
        assert result.exit_code == 2 and "that is the checkpoint being converted" in result.output, result.output
    assert sorted(p.name for p in src.iterdir()) == before
