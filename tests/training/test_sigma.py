"""PixArt-Σ's weak-to-strong steps at tiny size (the ShapesWorld recipes from the shipped demo), and the transitions
that are refused: another caption length without rebuilding the null caption, a KV-compressed checkpoint for a model
without compression."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pixart_cli.checkpoints.format import load_checkpoint
from pixart_cli.cli import app
from pixart_cli.components.text import TextEncoder
from pixart_cli.models import KVCompress
from pixart_cli.tiny import make_tiny_vae

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def tiny(recipe: str, out: Path, *extra: str) -> list[str]:
    """`pixart train` on a recipes/shapes recipe at tiny size: 16 generated scenes, 2 steps of 4."""
    return [
        "train", str(ROOT / "recipes" / "shapes" / recipe),
        "--set", f"data.path={out / 'data' / 'manifest.jsonl'}", "--set", f"data.cache={out / 'cache'}",
        "--set", "data.shapes.n=16", "--set", "validation.every=0", "--set", "train.steps=2",
        "--set", "train.batch_size=4", "--set", f"output.dir={out / 'run'}", "--set", "log.sample_every=0",
        "--set", "train.mixed_precision=fp32",  # as every in-process run of the suite: accelerate's state is global
        *extra,
    ]  # fmt: skip


def one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert all(n in lines[0] for n in needles), lines[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sigma")
    # The autoencoder swap's VAE at tiny size: 3 latent channels, 2x downsampling, as the recipe's.
    vae = make_tiny_vae(root / "vae", block_out_channels=(32, 32), latent_channels=3, scaling_factor=0.7)
    out = {}
    for name, extra in (("sigma-tokens", ()), ("sigma-kvcompress", ()), ("sigma-vae", ("--set", f"data.vae={vae}"))):
        result = runner.invoke(app, tiny(f"{name}.yaml", root / name, *extra))
        assert result.exit_code == 0, result.output
        out[name] = root / name / "run"
    return out


def test_longer_captions_start_from_the_demo_with_a_rebuilt_null_caption(runs):
    demo = load_checkpoint(ROOT / "pixart_cli" / "shapesworld" / "assets" / "shapes-demo")
    adapted = load_checkpoint(runs["sigma-tokens"] / "checkpoints" / "step-0000002")
    assert adapted.config.max_length == 128 and demo.config.max_length == 64
    expected = TextEncoder(demo.meta.text_encoder, max_length=128).encode([""]).embeddings[0]
    null = adapted.state_dict["y_embedder.y_embedding"]  # a buffer: training leaves it as the init made it
    torch.testing.assert_close(null, expected.to(null.dtype), rtol=0, atol=0)


def test_kv_compression_starts_from_the_demo_with_average_pooling_layers(runs):
    adapted = load_checkpoint(runs["sigma-kvcompress"] / "checkpoints" / "step-0000002")
    assert adapted.config.kv_compress == KVCompress((3, 4, 5), "conv", 2)
    assert adapted.config.input_size == 128 and adapted.config.interpolation_scale == 4.0
    assert "blocks.5.attn.sr.weight" in adapted.state_dict and "blocks.2.attn.sr.weight" not in adapted.state_dict
    # The sampler runs it at its trained size.
    result = runner.invoke(app, ["sample", "a red circle", "-m", str(runs["sigma-kvcompress"]), "--steps", "2",
                                 "-n", "1", "-o", str(runs["sigma-kvcompress"].parent / "samples")])  # fmt: skip
    assert result.exit_code == 0, result.output


def test_a_new_autoencoder_starts_from_the_pixel_space_demo_with_every_weight(runs):
    demo = load_checkpoint(ROOT / "pixart_cli" / "shapesworld" / "assets" / "shapes-demo")
    adapted = load_checkpoint(runs["sigma-vae"] / "checkpoints" / "step-0000002")
    assert adapted.meta.vae.endswith("vae") and demo.meta.vae == "none"
    assert adapted.config.input_size == 32 and adapted.config.in_channels == 3  # 64-px scenes as 32 x 32 latents
    assert adapted.state_dict.keys() == demo.state_dict.keys()
    # Sampled through the new decoder at the trained size: 64 px.
    out = runs["sigma-vae"].parent / "samples"
    result = runner.invoke(app, ["sample", "a red circle", "-m", str(runs["sigma-vae"]), "--steps", "2", "-n", "1",
                                 "-o", str(out), "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert '"width": 64' in result.stdout


def test_a_run_from_diffusers_weights_builds_the_null_caption_diffusers_guides_with(tmp_path):
    from pixart_cli.checkpoints.convert import write_diffusers

    demo = load_checkpoint(ROOT / "pixart_cli" / "shapesworld" / "assets" / "shapes-demo")
    write_diffusers(demo, tmp_path / "diffusers")  # diffusers keeps no null caption: reading it back fills one in
    out = tmp_path / "from-diffusers"
    init = ["--set", f"model.init={tmp_path / 'diffusers'}", "--set", "model.init_weights=model"]
    result = runner.invoke(app, tiny("stage3.yaml", out, *init))
    assert result.exit_code == 0, result.output
    assert 'null caption built as T5("")' in result.output
    trained = load_checkpoint(out / "run" / "checkpoints" / "step-0000002")
    expected = TextEncoder(demo.meta.text_encoder, max_length=64).encode([""]).embeddings[0]
    null = trained.state_dict["y_embedder.y_embedding"]
    torch.testing.assert_close(null, expected.to(null.dtype), rtol=0, atol=0)


def test_another_caption_length_without_the_rebuild_is_one_error_and_writes_nothing(runs, tmp_path):
    out = tmp_path / "no-rebuild"
    result = runner.invoke(app, tiny("sigma-tokens.yaml", out, "--set", "model.rebuild_null_caption=false"))
    one_line_error(result, "64-token captions", "128", "model.rebuild_null_caption")
    assert not (out / "run").exists()
    # The reverse: the 128-token model into a recipe for 64 tokens (a Σ-style checkpoint where α is expected).
    result = runner.invoke(app, tiny("stage3.yaml", tmp_path / "back", "--set", f"model.init={runs['sigma-tokens']}"))
    one_line_error(result, "128-token captions", "64")
    assert not (tmp_path / "back" / "run").exists()


def test_a_compressed_checkpoint_needs_the_compression_in_the_recipe(runs, tmp_path):
    out = tmp_path / "uncompressed"
    args = tiny("sigma-kvcompress.yaml", out, "--set", f"model.init={runs['sigma-kvcompress']}")
    args += ["--set", "model.config={depth: 6, hidden_size: 240, num_heads: 4, patch_size: 4, input_size: 128, "
             "in_channels: 3, caption_channels: 64, max_length: 64, interpolation_scale: 4.0}"]  # fmt: skip
    one_line_error(runner.invoke(app, args), "unexpected: blocks.3.attn.norm", "model.config.kv_compress")
    assert not (out / "run").exists()


def test_an_adapter_cannot_change_the_caption_length():
    result = runner.invoke(app, ["train", str(ROOT / "recipes" / "lora-xl512.yaml"), "--dry-run",
                                 "--set", "model.rebuild_null_caption=true"])  # fmt: skip
    one_line_error(result, "model.rebuild_null_caption", "adapter")


def test_dry_run_counts_the_compression_layers():
    from pixart_cli.checkpoints.format import build_model
    from pixart_cli.training.plan import count_parameters
    from pixart_cli.training.recipe import load_recipe

    recipe, _ = load_recipe(ROOT / "recipes" / "sigma" / "1024ms-kvcompress.yaml")
    with torch.device("meta"):
        model = build_model(recipe.model_config())
    every = sum(p.numel() for p in model.parameters())
    assert count_parameters(recipe) == (every, every)
