"""PixArt-Σ: KV compression against the paper's definition, the Σ transformer against diffusers', the official Σ
key layout, and what is refused. (The whole model against the official Σ code on random weights:
experiments/2026-12-07-sigma-official-parity.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import PixArtTransformer2DModel
from typer.testing import CliRunner

from pixart_cli.checkpoints.convert import (
    detect_format,
    diffusers_transformer_config,
    official_config,
    ours_to_diffusers,
    read_official,
)
from pixart_cli.checkpoints.format import Checkpoint, save_checkpoint
from pixart_cli.cli import app
from pixart_cli.config import ConfigError, from_dict, to_dict
from pixart_cli.models import KVCompress, PixArtConfig, build_pixart
from pixart_cli.models.pixart_sigma import KVCompressAttention
from tests.utils import randomize

runner = CliRunner()

# Σ's shapes in miniature: 300-token captions, interpolation 2 (1024 px), no size conditioning, the second half of
# the layers compressed.
SIGMA = PixArtConfig(
    depth=4, hidden_size=48, num_heads=4, patch_size=2, input_size=16, caption_channels=32, max_length=300,
    interpolation_scale=2.0, variant="tiny-sigma",
)  # fmt: skip
SIGMA_KV = dataclasses.replace(SIGMA, kv_compress=KVCompress(layers=(2, 3), sampling="conv", scale_factor=2))


def reference_kv_attention(attn: KVCompressAttention, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Self-attention whose keys and values are pooled on the patch grid, written from the definition (PixArt-Σ
    §3.2): one key/value per f×f window — a learned depthwise weighting of the window then a LayerNorm (conv), or
    the window's first token (ave, uniform) — and softmax(q kᵀ/√d) v by hand."""
    b, n, c = x.shape
    heads, d, f = attn.num_heads, c // attn.num_heads, attn.scale_factor
    h, w = grid
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = qkv[..., :c], qkv[..., c : 2 * c], qkv[..., 2 * c :]

    def pool(t: torch.Tensor) -> torch.Tensor:
        windows = t.reshape(b, h // f, f, w // f, f, c).permute(0, 1, 3, 2, 4, 5)  # (b, h', w', f, f, c)
        if attn.sampling != "conv":
            return windows[:, :, :, 0, 0].reshape(b, -1, c)
        kernel = attn.sr.weight[:, 0].permute(1, 2, 0)  # (f, f, c): one f×f filter per channel
        pooled = (windows * kernel).sum(dim=(3, 4)) + attn.sr.bias
        pooled = pooled.reshape(b, -1, c)
        mean, var = pooled.mean(-1, keepdim=True), pooled.var(-1, unbiased=False, keepdim=True)
        return (pooled - mean) / torch.sqrt(var + attn.norm.eps) * attn.norm.weight + attn.norm.bias

    k, v = pool(k), pool(v)
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, n, c)
    return out @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("sampling", ["conv", "ave", "uniform"])
@pytest.mark.parametrize("grid", [(8, 8), (6, 10)])
def test_kv_compression_matches_its_definition(sampling, grid):
    attn = randomize(KVCompressAttention(48, 4, sampling, 2), seed=5).eval()
    x = torch.randn(3, grid[0] * grid[1], 48, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        diff = attn(x, grid) - reference_kv_attention(attn, x, grid)
    assert diff.abs().max() <= 1e-5


def test_conv_compression_starts_as_the_window_average():
    """The official initialisation: each window averaged (then normalised), so a new layer starts from pooling."""
    attn = KVCompressAttention(48, 4, "conv", 2)
    tokens = torch.randn(2, 36, 48)
    image = tokens.transpose(1, 2).reshape(2, 48, 6, 6)
    average = torch.nn.functional.avg_pool2d(image, 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(attn.compress(tokens, (6, 6)), torch.nn.functional.layer_norm(average, (48,)))


def test_compressed_layers_have_the_official_keys_and_others_do_not():
    keys = build_pixart(SIGMA_KV).state_dict()
    assert {k for k in keys if ".sr." in k or ".attn.norm." in k} == {
        f"blocks.{i}.attn.{m}.{p}" for i in (2, 3) for m in ("sr", "norm") for p in ("weight", "bias")
    }
    assert keys["blocks.2.attn.sr.weight"].shape == (48, 1, 2, 2)  # depthwise, kernel = stride = factor
    assert build_pixart(dataclasses.replace(SIGMA_KV, kv_compress=KVCompress((3,), "ave"))).state_dict().keys() == (
        build_pixart(SIGMA).state_dict().keys()
    )  # the weightless samplings add no keys


def test_kv_compress_config_validates_with_dotted_keys():
    config = from_dict(PixArtConfig, to_dict(SIGMA_KV), "model.config")
    assert config == SIGMA_KV
    for bad, message in (
        ({"layers": [2, 9]}, "layer 9 does not exist"),
        ({"layers": [2], "scale_factor": 1}, "model.config.kv_compress.scale_factor"),
        ({"layers": [2], "sampling": "mean"}, "model.config.kv_compress.sampling"),
        ({"layers": []}, "model.config.kv_compress.layers"),
    ):
        with pytest.raises(ConfigError, match=message):
            from_dict(PixArtConfig, {**to_dict(SIGMA), "kv_compress": bad}, "model.config")


@pytest.mark.parametrize("h,w", [(16, 16), (12, 20)])
def test_sigma_transformer_matches_diffusers(h, w):
    """Σ shapes (300-token captions, interpolation 2, no size conditioning, any aspect): ours = diffusers' ≤ 1e-5."""
    ours = randomize(build_pixart(SIGMA), seed=1).eval()
    theirs = PixArtTransformer2DModel(**diffusers_transformer_config(SIGMA)).eval()
    theirs.load_state_dict(ours_to_diffusers(ours.state_dict(), SIGMA), strict=True)
    g = torch.Generator().manual_seed(2)
    x, caption = torch.randn(2, 4, h, w, generator=g), torch.randn(2, 300, 32, generator=g)
    mask = torch.zeros(2, 300, dtype=torch.long)
    mask[0, :7], mask[1, :300] = 1, 1  # a short caption and one that fills all 300 tokens
    t = torch.tensor([10.0, 900.0])
    with torch.no_grad():
        reference = theirs(
            x, encoder_hidden_states=caption, timestep=t, encoder_attention_mask=mask,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample  # fmt: skip
        diff = ours(x, t, caption, mask) - reference
    assert diff.abs().max() <= 1e-5


def test_official_sigma_layout_round_trips_bit_identically(tmp_path):
    model = randomize(build_pixart(SIGMA_KV), seed=3)
    src = save_checkpoint(Checkpoint(SIGMA_KV, model.state_dict(), None), tmp_path / "ours")
    result = runner.invoke(app, ["convert", str(src), "-o", str(tmp_path / "sigma.pth"), "--to", "official"])
    assert result.exit_code == 0, result.output
    official = torch.load(tmp_path / "sigma.pth", weights_only=True)["state_dict"]
    assert official["y_embedder.y_embedding"].shape == (300, 32) and "blocks.3.attn.sr.weight" in official
    assert detect_format(tmp_path / "sigma.pth") == "official"
    back = read_official(tmp_path / "sigma.pth", num_heads=4)
    assert back.config.kv_compress == SIGMA_KV.kv_compress and back.config.max_length == 300
    assert back.config.interpolation_scale == 2.0 and not back.config.multi_scale
    assert back.state_dict.keys() == model.state_dict().keys()
    assert all(torch.equal(back.state_dict[k], v) for k, v in model.state_dict().items())
    result = runner.invoke(app, ["convert", str(tmp_path / "sigma.pth"), "-o", str(tmp_path / "again.pth"),
                                 "--to", "official", "--num-heads", "4"])  # fmt: skip
    assert result.exit_code == 0, result.output
    again = torch.load(tmp_path / "again.pth", weights_only=True)["state_dict"]
    assert again.keys() == official.keys() and all(torch.equal(again[k], official[k]) for k in official)


def test_official_config_reads_the_compression_from_the_weights():
    sd = build_pixart(SIGMA_KV).state_dict()
    sd["pos_embed"] = torch.zeros(1, 64, 48)
    with pytest.raises(Exception, match="pos_embed"):  # without it the base resolution is unknown
        official_config({k: v for k, v in sd.items() if k != "pos_embed"}, num_heads=4)
    from pixart_cli.checkpoints.convert import expected_pos_embed

    sd["pos_embed"] = expected_pos_embed(SIGMA_KV)
    assert official_config(sd, num_heads=4).kv_compress == KVCompress((2, 3), "conv", 2)


def test_kv_compressed_model_to_diffusers_is_one_error_and_writes_nothing(tmp_path):
    src = save_checkpoint(Checkpoint(SIGMA_KV, build_pixart(SIGMA_KV).state_dict(), None), tmp_path / "ours")
    out = tmp_path / "hf"
    result = runner.invoke(app, ["convert", str(src), "-o", str(out), "--to", "diffusers"])
    assert result.exit_code == 2, result.output
    assert (
        result.output.startswith("error:") and "no KV compression" in result.output and "layers 2, 3" in result.output
    )
    assert "Traceback" not in result.output and not out.exists()


def test_edges_of_compression_are_clean_errors():
    from pixart_cli.adapters.lora import target_layers
    from pixart_cli.errors import PixartError
    from pixart_cli.sampling.size import resolve_size

    assert KVCompress((3, 1)) == KVCompress((1, 3))  # one config for one model, in any order
    with pytest.raises(PixartError, match="at least 32"):  # a 1-patch-high grid has no 2×2 window to pool
        resolve_size(SIGMA_KV, 8, 16, 64)
    assert resolve_size(SIGMA_KV, 8, 32, 64) == (32, 64)
    with pytest.raises(PixartError, match="grouped convolution"):  # the depthwise attn.sr takes no LoRA
        target_layers(build_pixart(SIGMA_KV), ["attn.sr"])


def test_weightless_compression_to_official_is_said_out_loud(tmp_path):
    config = dataclasses.replace(SIGMA, kv_compress=KVCompress((3,), "ave"))
    src = save_checkpoint(Checkpoint(config, build_pixart(config).state_dict(), None), tmp_path / "ours")
    result = runner.invoke(app, ["convert", str(src), "-o", str(tmp_path / "ave.pth"), "--to", "official"])
    assert result.exit_code == 0 and "does not record it" in result.output, result.output
    assert read_official(tmp_path / "ave.pth", num_heads=4).config.kv_compress is None
