"""The PixArt-α and DiT modules: shapes, parameter counts, positional/timestep embeddings, masks, dtypes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers.models.embeddings import get_2d_sincos_pos_embed, get_timestep_embedding

from pixart_cli.models import DIT_VARIANTS, PIXART_VARIANTS, DiT, PixArt, PixArtMS, build_pixart, pixart_config
from pixart_cli.models.layers import attention, explicit_attention, sincos_pos_embed_2d, timestep_embedding
from tests.utils import TINY_DIT, TINY_PIXART, TINY_PIXART_MS, diffusers_dit, randomize


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_xl2_parameter_counts_match_the_paper_models():
    with torch.device("meta"):
        assert n_params(build_pixart(pixart_config("PixArt-XL/2"))) == 610_856_096
        assert n_params(build_pixart(pixart_config("PixArt-XL/2", input_size=64))) == 610_856_096
        ms = pixart_config("PixArt-XL/2", input_size=128, multi_scale=True, interpolation_scale=2.0)
        assert n_params(build_pixart(ms)) == 611_349_152


def test_variants_cover_the_dit_family():
    for size in ("XL", "L", "B", "S"):
        assert f"PixArt-{size}/2" in PIXART_VARIANTS
        assert f"DiT-{size}/2" in DIT_VARIANTS
    assert PIXART_VARIANTS["PixArt-XL/2"].hidden_size == 1152
    with pytest.raises(ValueError, match="unknown PixArt variant"):
        pixart_config("PixArt-XXL/2")


@pytest.mark.parametrize(
    "field,value,message",
    [("num_heads", 5, "divisible by num_heads"), ("input_size", 9, "multiple of patch_size"), ("depth", 0, "positive")],
)
def test_config_rejects_inconsistent_shapes(field, value, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY_PIXART, **{field: value})


@pytest.mark.parametrize("grid,base,scale", [((4, 4), 4, 1.0), ((6, 3), 4, 1.0), ((5, 8), 8, 2.0), ((64, 64), 64, 2.0)])
def test_pos_embed_matches_diffusers_for_any_grid(grid, base, scale):
    ours = sincos_pos_embed_2d(64, grid[0], grid[1], base, scale)
    theirs = get_2d_sincos_pos_embed(64, grid, base_size=base, interpolation_scale=scale, output_type="pt")
    assert torch.equal(ours, theirs.float())


def test_timestep_embedding_is_cos_sin_without_frequency_shift():
    t = torch.tensor([0.0, 1.0, 499.5, 999.0])
    theirs = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_embedding(t, 256), theirs, rtol=0, atol=1e-6)


def test_per_block_adaln_is_the_papers_baseline():
    """adaln="block": DiT's adaLN MLP in every block (the paper's 833M-parameter baseline), starting at zero."""
    with torch.device("meta"):
        per_block = n_params(build_pixart(pixart_config("PixArt-XL/2", adaln="block")))
    hidden, depth = 1152, 28
    # every block gains a (hidden → 6·hidden) MLP; the shared t_block and the per-block tables go
    assert per_block - 610_856_096 == (depth - 1) * (6 * hidden * hidden + 6 * hidden) - depth * 6 * hidden

    config = dataclasses.replace(TINY_PIXART, adaln="block")
    model = build_pixart(config)
    keys = set(model.state_dict())
    assert "blocks.0.adaLN_modulation.1.weight" in keys
    assert not any("t_block" in k or k.startswith("blocks.0.scale_shift_table") for k in keys)
    hidden_states, text = torch.randn(2, 16, config.hidden_size), torch.randn(2, 5, config.hidden_size)
    t0 = torch.randn(2, config.hidden_size)
    assert torch.equal(model.blocks[0](hidden_states, text, t0, None), hidden_states)  # adaLN-Zero: identity
    model = randomize(model)
    x, t, caption = _inputs(config)
    model(x, t, caption).square().mean().backward()
    assert model.blocks[0].adaLN_modulation[1].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="adaln must be one of"):
        dataclasses.replace(TINY_PIXART, adaln="zero")


def test_build_pixart_picks_the_class():
    assert type(build_pixart(TINY_PIXART)) is PixArt
    assert type(build_pixart(TINY_PIXART_MS)) is PixArtMS


def _inputs(config, batch=2, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, h, w, generator=g)
    caption = torch.randn(batch, config.max_length, config.caption_channels, generator=g)
    return x, torch.tensor([10.0, 700.0][:batch]), caption


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
def test_explicit_attention_matches_sdpa_with_masks_and_gradients(dtype, atol):
    """The CPU path for short sequences computes what scaled_dot_product_attention does, backward included."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, n, 16, generator=g).to(dtype).requires_grad_() for n in (20, 7, 7))
    mask = (torch.arange(7)[None] < torch.tensor([[7], [3], [1]]))[:, None, None, :]
    reference = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = torch.nn.functional.scaled_dot_product_attention(*reference, attn_mask=mask)
    expected.square().sum().backward()
    got = explicit_attention(q, k, v, mask)
    assert got.dtype == dtype
    if dtype == torch.bfloat16:
        assert torch.equal(got, attention(q, k, v, mask))  # attention() takes this path for short bf16 sequences
    got.float().square().sum().backward()
    torch.testing.assert_close(got.double(), expected, atol=atol, rtol=0)
    for ours, theirs in zip((q, k, v), reference, strict=True):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, atol=4 * atol, rtol=0.02)


def test_caption_padding_is_ignored():
    model = randomize(build_pixart(TINY_PIXART)).eval()
    x, t, caption = _inputs(TINY_PIXART)
    mask = torch.zeros(2, 10, dtype=torch.long)
    mask[0, :3] = 1
    mask[1, :7] = 1
    with torch.no_grad():
        out = model(x, t, caption, mask)
        garbage = caption.clone()
        garbage[0, 3:] = 1e3  # padded positions must not matter
        assert torch.allclose(out, model(x, t, garbage, mask), atol=1e-6)
        alone = model(x[:1], t[:1], caption[:1, :3], None)  # the same caption, trimmed instead of masked
        assert torch.allclose(out[:1], alone, atol=1e-5)


def test_trimming_caption_padding_changes_nothing_even_with_dropout():
    """``trim_padding`` (sampling and training batches): same output with dropped and kept captions; a row with no
    real token (the model then attends to all tokens) keeps the batch untrimmed."""
    from pixart_cli.components.text import trim_padding

    model = randomize(build_pixart(TINY_PIXART)).eval()
    x, t, caption = _inputs(TINY_PIXART)
    mask = torch.zeros(2, 10, dtype=torch.long)
    mask[0, :3], mask[1, :6] = 1, 1
    short, short_mask = trim_padding(caption, mask)
    assert short.shape[1] == short_mask.shape[1] == 6
    drop = torch.tensor([True, False])
    with torch.no_grad():
        torch.testing.assert_close(
            model(x, t, short, short_mask, drop_caption=drop), model(x, t, caption, mask, drop_caption=drop)
        )
    mask[1] = 0
    assert trim_padding(caption, mask)[0].shape[1] == 10


def test_null_caption_dropout_replaces_the_caption():
    model = randomize(build_pixart(TINY_PIXART)).eval()
    x, t, caption = _inputs(TINY_PIXART)
    null = model.y_embedder.y_embedding[None].expand(2, -1, -1)
    with torch.no_grad():
        dropped = model(x, t, caption, drop_caption=torch.tensor([True, False]))
        assert torch.allclose(dropped[0], model(x, t, null)[0], atol=1e-6)
        assert torch.allclose(dropped[1], model(x, t, caption)[1], atol=1e-6)


def test_output_shape_non_square_and_multi_scale_needs_sizes():
    model = randomize(build_pixart(TINY_PIXART_MS)).eval()
    x, t, caption = _inputs(TINY_PIXART_MS, h=12, w=6)
    res, ar = torch.tensor([[96.0, 48.0]]).repeat(2, 1), torch.tensor([[2.0]]).repeat(2, 1)
    assert model(x, t, caption, resolution=res, aspect_ratio=ar).shape == (2, 8, 12, 6)
    with pytest.raises(ValueError, match="resolution"):
        model(x, t, caption)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = randomize(build_pixart(TINY_PIXART))
    x, t, caption = _inputs(TINY_PIXART)
    grads = []
    for enabled in (False, True):
        model.zero_grad()
        model.enable_gradient_checkpointing(enabled)
        model(x, t, caption).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_runs_in_half_precision(dtype):
    model = randomize(build_pixart(TINY_PIXART)).eval()
    x, t, caption = _inputs(TINY_PIXART)
    mask = torch.ones(2, 10)
    with torch.no_grad():
        ref = model(x, t, caption, mask)
        out = model.to(dtype)(x.to(dtype), t, caption.to(dtype), mask)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_dit_matches_diffusers_dit():
    dit = randomize(DiT(TINY_DIT)).eval()
    reference = diffusers_dit(TINY_DIT, dit.state_dict())
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([0.0, 500.0, 999.0]), torch.tensor([0, 7, 10])
    with torch.no_grad():
        torch.testing.assert_close(dit(x, t, y), reference(x, timestep=t, class_labels=y).sample, rtol=0, atol=1e-5)
