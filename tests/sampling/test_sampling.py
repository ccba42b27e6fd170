"""Sampling: parity with diffusers' PixArtAlphaPipeline, solvers, seeds, the CLI and its failure modes.

Everything runs on tiny random components (a d_model-32 T5 with a freshly trained sentencepiece vocabulary, a
4-level 32/64-channel VAE, a depth-2 width-32 PixArt with all weights random) on the CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pixart_cli.checkpoints.convert import read_any, write_diffusers, write_official
from pixart_cli.checkpoints.format import load_checkpoint
from pixart_cli.cli import app
from pixart_cli.components.autoencoders import VAE, PixelSpace
from pixart_cli.components.text import Captions, TextEncoder
from pixart_cli.diffusion import GaussianDiffusion
from pixart_cli.errors import PixartError
from pixart_cli.models import PixArtConfig
from pixart_cli.sampling.guidance import classifier_free_guidance, sample_latents, seeded_noise
from pixart_cli.sampling.pipeline import Pipeline
from pixart_cli.sampling.settings import SampleSettings
from pixart_cli.sampling.size import resolve_size
from pixart_cli.sampling.solvers import SAMPLERS, make_scheduler, sample
from pixart_cli.tiny import make_tiny_pixart, make_tiny_t5, make_tiny_vae

TINY = PixArtConfig(depth=2, hidden_size=32, num_heads=2, patch_size=2, input_size=8, caption_channels=32)
PROMPTS = ["a photo of a cat", "two dogs playing in the snow"]
runner = CliRunner()


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_t5, tiny_vae) -> dict[str, Path]:
    """The same random weights saved twice: with the stored null caption and with T5("") as the baseline."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for kind in ("embedding", "t5-empty"):
        out[kind] = make_tiny_pixart(
            root / kind, TINY, text_encoder=str(tiny_t5), vae=str(tiny_vae), null_caption=kind, seed=1
        )
    out["diffusers"] = write_diffusers(
        read_any(out["t5-empty"]), root / "diffusers", t5=str(tiny_t5), vae=str(tiny_vae)
    )
    return out


# The reference schedulers, written out by hand rather than taken from our make_scheduler. The published PixArt-α
# pipelines were converted by diffusers' scripts/convert_pixart_alpha_to_diffusers.py with
# `DPMSolverMultistepScheduler()`, i.e. diffusers' defaults, which are these values. DDIM has no published PixArt
# config: the reference is the usual one for a 1000-step linear schedule (Stable Diffusion's offset, no final alpha 1).
PUBLISHED_SCHEDULERS = {
    "dpm-solver": ("DPMSolverMultistepScheduler", {
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "prediction_type": "epsilon", "solver_order": 2, "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
        "lower_order_final": True, "timestep_spacing": "linspace", "steps_offset": 0, "thresholding": False,
    }),
    "ddim": ("DDIMScheduler", {
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "prediction_type": "epsilon", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
    }),
}  # fmt: skip


def _diffusers_pipeline(path: Path, sampler: str):
    import diffusers
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline.from_pretrained(str(path))
    name, config = PUBLISHED_SCHEDULERS[sampler]
    pipe.scheduler = getattr(diffusers, name)(**config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _array(images) -> np.ndarray:
    return np.stack([np.asarray(image) for image in images]).astype(np.int16)


#################################################################################
#                              Parity with diffusers                            #
#################################################################################


@pytest.mark.parametrize("sampler", ["dpm-solver", "ddim"])
def test_matches_diffusers_pipeline(models, sampler):
    """Same weights, same initial noise, T5("") as the negative: our images equal PixArtAlphaPipeline's (±1/255)."""
    ours = Pipeline.from_pretrained(models["t5-empty"], device="cpu", clean_captions=False)
    images = _array(ours(PROMPTS, num_images_per_prompt=2, sampler=sampler, steps=20, cfg=4.5, seed=7))

    noise, _ = seeded_noise([7, 8, 7, 8], (4, 8, 8))  # image j of each prompt uses seed 7 + j
    reference = _diffusers_pipeline(models["diffusers"], sampler)(
        PROMPTS,
        num_images_per_prompt=2,
        num_inference_steps=20,
        guidance_scale=4.5,
        latents=noise,
        clean_caption=False,
        use_resolution_binning=False,
        max_sequence_length=120,
        output_type="np",
    ).images
    reference = np.round(reference * 255).astype(np.int16)
    assert np.abs(images - reference).max() <= 1
    assert images.std() > 20 and (images[0] != images[2]).any(), "degenerate test: prompts must change the image"


def test_v_prediction_model_matches_diffusers_pipeline(tmp_path, tiny_t5, tiny_vae):
    """A v-prediction model: the converted pipeline's own scheduler says so, and its images equal ours (±1/255)."""

    def tiny(name: str, config: PixArtConfig) -> Path:
        components = {"text_encoder": str(tiny_t5), "vae": str(tiny_vae), "null_caption": "t5-empty"}
        return make_tiny_pixart(tmp_path / name, config, **components, seed=1)

    def ours(directory: Path) -> np.ndarray:
        pipe = Pipeline.from_pretrained(directory, device="cpu", clean_captions=False)
        return _array(pipe(PROMPTS, seed=7, steps=20))

    v_model = tiny("v", dataclasses.replace(TINY, prediction_type="v_prediction"))
    pipeline_dir = write_diffusers(read_any(v_model), tmp_path / "pipe", t5=str(tiny_t5), vae=str(tiny_vae))
    assert read_any(pipeline_dir).config.prediction_type == "v_prediction"
    from diffusers import PixArtAlphaPipeline

    reference = PixArtAlphaPipeline.from_pretrained(str(pipeline_dir))  # with the scheduler it was saved with
    assert reference.scheduler.config.prediction_type == "v_prediction"
    reference.set_progress_bar_config(disable=True)
    noise, _ = seeded_noise([7, 7], (4, 8, 8))
    expected = reference(
        PROMPTS, num_inference_steps=20, guidance_scale=4.5, latents=noise, clean_caption=False,
        use_resolution_binning=False, max_sequence_length=120, output_type="np",
    ).images  # fmt: skip
    images = ours(v_model)
    assert np.abs(images - np.round(expected * 255).astype(np.int16)).max() <= 1
    assert np.abs(images - ours(tiny("eps", TINY))).max() > 10, "degenerate: the same weights read as ε must differ"


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_reads_v_prediction(sampler):
    """A denoiser predicting v = (ε − √(1 − ᾱ) x_t) / √ᾱ samples exactly as the ε denoiser it was made from."""
    alphas_cumprod = GaussianDiffusion().alphas_cumprod.float()
    noise, _ = seeded_noise([0], (3, 8, 8))

    def eps_denoiser(x, t):
        return torch.cat([torch.sin(x + t / 100), torch.full_like(x, 0.3)], dim=1)  # ε and a learned variance

    def v_denoiser(x, t):
        eps, variance = eps_denoiser(x, t).chunk(2, dim=1)
        a = alphas_cumprod[int(t)]
        return torch.cat([(eps - (1 - a).sqrt() * x) / a.sqrt(), variance], dim=1)

    results = []
    for denoiser, kind in ((eps_denoiser, "epsilon"), (v_denoiser, "v_prediction")):
        _, generators = seeded_noise([0], (3, 8, 8))
        results.append(
            sample(
                denoiser,
                noise,
                sampler=sampler,
                steps=8,
                generators=generators,
                learned_variance=True,
                prediction_type=kind,
            )
        )
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-4)


def test_null_caption_embedding_matches_diffusers_negative_embeds(models):
    """The stored null caption (with each prompt's mask, as officially) equals diffusers given those embeddings."""
    ours = Pipeline.from_pretrained(models["embedding"], device="cpu", clean_captions=False)
    assert ours.null_caption == "embedding"
    images = _array(ours(PROMPTS, num_images_per_prompt=2, steps=20, seed=3))

    captions = ours.text_encoder.encode(PROMPTS)
    null = ours.model.y_embedder.y_embedding[None].expand(len(PROMPTS), -1, -1)
    noise, _ = seeded_noise([3, 4, 3, 4], (4, 8, 8))
    reference = _diffusers_pipeline(models["diffusers"], "dpm-solver")(
        prompt_embeds=captions.embeddings,
        prompt_attention_mask=captions.mask,
        negative_prompt=None,
        negative_prompt_embeds=null,
        negative_prompt_attention_mask=captions.mask,
        num_images_per_prompt=2,
        num_inference_steps=20,
        guidance_scale=4.5,
        latents=noise,
        use_resolution_binning=False,
        output_type="np",
    ).images
    assert np.abs(images - np.round(reference * 255)).max() <= 1

    t5_empty = _array(
        Pipeline.from_pretrained(models["t5-empty"], device="cpu", clean_captions=False)(
            PROMPTS, num_images_per_prompt=2, steps=20, seed=3
        )
    )
    assert np.abs(images - t5_empty).max() > 10, "the null caption should matter"


def test_size_messages_read_width_by_height(caplog):
    """People read 80×48 as 80 wide and 48 high, as --width 80 --height 48 ask."""
    with pytest.raises(PixartError, match="image size 80×50: each side must be a multiple of 16"):
        resolve_size(TINY, 8, 50, 80)
    with pytest.raises(PixartError, match=r"got 80×-16 \(width×height\)"):
        resolve_size(TINY, 8, -16, 80)
    config = dataclasses.replace(TINY, hidden_size=48, input_size=128, multi_scale=True)  # 1024 px: official buckets
    with caplog.at_level(logging.WARNING, logger="pixart_cli"):
        height, width = resolve_size(config, 8, 1000, 1500)
    assert f"size 1500×1000 snapped to {width}×{height} (width×height)" in caplog.text


def test_multi_scale_snaps_to_buckets_and_matches_diffusers(tmp_path, tiny_t5, caplog):
    """PixArtMS (1024 px base): size snapped like diffusers' binning; resolution/aspect conditioning identical."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline

    config = dataclasses.replace(TINY, hidden_size=48, input_size=128, patch_size=8, multi_scale=True)
    make_tiny_pixart(tmp_path / "ms", config, seed=2)
    checkpoint = load_checkpoint(tmp_path / "ms")
    with caplog.at_level(logging.WARNING, logger="pixart_cli"):
        height, width = resolve_size(config, 8, 1000, 1500)
    assert (height, width) != (1000, 1500) and "snapped" in caplog.text
    assert resolve_size(config, 8, None, None) == (1024, 1024)

    from pixart_cli.checkpoints.format import instantiate

    model = instantiate(checkpoint)
    text = TextEncoder(str(tiny_t5), max_length=120, clean=False)
    captions = text.encode(PROMPTS)
    null = text.encode(["", ""])
    noise, _ = seeded_noise([5, 6], (4, height // 8, width // 8))
    ours = sample_latents(model, noise, captions, null, steps=10, cfg=4.5, image_size=(height, width))

    write_diffusers(checkpoint, tmp_path / "ms-diffusers")
    from diffusers import PixArtTransformer2DModel

    transformer = PixArtTransformer2DModel.from_pretrained(str(tmp_path / "ms-diffusers"))
    pipe = PixArtAlphaPipeline(
        tokenizer=text.tokenizer,
        text_encoder=text.encoder,
        vae=None,
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(**PUBLISHED_SCHEDULERS["dpm-solver"][1]),
    )
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(
        prompt_embeds=captions.embeddings,
        prompt_attention_mask=captions.mask,
        negative_prompt=None,
        negative_prompt_embeds=null.embeddings,
        negative_prompt_attention_mask=null.mask,
        height=1000,
        width=1500,
        num_inference_steps=10,
        latents=noise,
        output_type="latent",
    ).images
    assert reference.shape == ours.shape
    # We drop the caption padding diffusers keeps (the same attention, summed in another order): over ten solver
    # steps on a 125×188 latent that rounding grows to ~2.5e-4 at a few of 126k elements.
    torch.testing.assert_close(ours, reference, rtol=5e-4, atol=5e-4)


#################################################################################
#                                    Guidance                                   #
#################################################################################


def _recording_model(calls: list):
    """A stand-in model: (x, t, conditioning) → (B, 2C, H, W), ε then variance, depending on all three."""

    def model_fn(x, t, conditioning):
        calls.append(conditioning)
        if isinstance(conditioning, Captions):
            code = (conditioning.embeddings * conditioning.mask[..., None]).sum(dim=(1, 2))
        else:
            code = conditioning.float() * 0.7 - 1.0  # class labels
        code = code[:, None, None, None]
        return torch.cat([torch.sin(x * code + t / 100), torch.cos(x - code)], dim=1)

    return model_fn


def test_guidance_with_label_tensors_is_the_explicit_mix():
    """Class-conditional models (label tensors, the null class as baseline) share the captions' guidance: one
    batched forward, uncond + scale·(cond − uncond) on the first ``channels``, the rest from the conditional."""
    channels, scale = 3, 4.5
    x, t = torch.randn(4, channels, 5, 5, generator=torch.Generator().manual_seed(0)), torch.tensor(500)
    labels, null = torch.tensor([0, 3, 5, 3]), torch.full((4,), 48)
    calls = []
    model_fn = _recording_model(calls)
    out = classifier_free_guidance(model_fn, labels, null, scale, channels)(x, t)
    assert len(calls) == 1 and torch.equal(calls[0], torch.cat([null, labels]))  # one forward, uncond first
    out_c, out_u = model_fn(x, t, labels), model_fn(x, t, null)
    expected = out_u[:, :channels] + scale * (out_c[:, :channels] - out_u[:, :channels])
    torch.testing.assert_close(out[:, :channels], expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(out[:, channels:], out_c[:, channels:])  # learned variance: the conditional branch's
    for plain in (
        classifier_free_guidance(model_fn, labels, null, 1.0, channels),
        classifier_free_guidance(model_fn, labels, None, scale, channels),
    ):
        calls.clear()
        assert torch.equal(plain(x, t), out_c) and len(calls) == 1 and torch.equal(calls[0], labels)


def test_guidance_with_captions_trims_padding_once_and_mixes():
    channels, scale = 2, 3.0
    generator = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, channels, 4, 4, generator=generator), torch.tensor(250)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    cond = Captions(torch.randn(2, 5, 6, generator=generator), mask)
    uncond = Captions(torch.randn(2, 5, 6, generator=generator), torch.tensor([[1, 0, 0, 0, 0]] * 2))
    calls = []
    model_fn = _recording_model(calls)
    out = classifier_free_guidance(model_fn, cond, uncond, scale, channels)(x, t)
    assert len(calls) == 1 and calls[0].embeddings.shape == (4, 3, 6)  # one forward; the unused padding dropped
    out_c, out_u = model_fn(x, t, cond), model_fn(x, t, uncond)
    expected = out_u[:, :channels] + scale * (out_c[:, :channels] - out_u[:, :channels])
    torch.testing.assert_close(out[:, :channels], expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(out[:, channels:], out_c[:, channels:])


#################################################################################
#                                    Solvers                                    #
#################################################################################


def test_iddpm_uses_the_learned_variance(models):
    pipe = Pipeline.from_pretrained(models["embedding"], device="cpu")
    bias = pipe.model.final_layer.linear.bias
    original = bias.detach().clone()

    def run(sampler: str, variance_shift: float) -> np.ndarray:
        with torch.no_grad():
            bias.copy_(original)
            bias.view(TINY.patch_size**2, TINY.out_channels)[:, TINY.in_channels :] += variance_shift
        return _array(pipe(["a photo of a cat"], num_images_per_prompt=1, sampler=sampler, steps=10, seed=0))

    assert np.abs(run("iddpm", -0.5) - run("iddpm", 0.5)).max() > 10
    assert np.array_equal(run("dpm-solver", -0.5), run("dpm-solver", 0.5)), "dpm-solver must ignore the variance"


def test_learned_range_variance_reaches_the_scheduler():
    """A denoiser whose variance channels are -1 (posterior variance) vs +1 (beta_t) gives different samples."""
    noise, _ = seeded_noise([0], (2, 4, 4))

    def denoiser(value: float):
        return lambda x, t: torch.cat([torch.zeros_like(x), torch.full_like(x, value)], dim=1)

    results = []
    for value in (-1.0, 1.0):
        _, generators = seeded_noise([0], (2, 4, 4))
        results.append(
            sample(denoiser(value), noise, sampler="iddpm", steps=5, generators=generators, learned_variance=True)
        )
    assert not torch.allclose(results[0], results[1])


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_pixel_space_solvers_clip_the_predicted_image(sampler):
    """``clip_x0`` (pixel-space models): a denoiser whose clean-image predictions overshoot [-1, 1] still ends in
    range; without it the overshoot reaches the image. Latent models never clip (diffusers' pipeline does not)."""
    noise, _ = seeded_noise([0], (3, 8, 8))

    def run(clip_x0: bool) -> torch.Tensor:
        _, generators = seeded_noise([0], (3, 8, 8))
        # epsilon = 0: the predicted clean image is x_t / sqrt(alpha_bar), far outside [-1, 1] at high noise
        denoiser = lambda x, t: torch.zeros(x.shape[0], 6, *x.shape[2:])  # noqa: E731
        return sample(denoiser, noise, sampler=sampler, steps=5, generators=generators, clip_x0=clip_x0)

    assert run(True).abs().max() <= 1.05 and run(False).abs().max() > 2  # SA-Solver's last step adds a little noise
    assert PixelSpace.bounded and not VAE.bounded


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_clipping_solvers_follow_the_clipped_image(sampler):
    """A far too large ε (what strong guidance can give) is tamed by clipping in every solver: each step moves
    towards the clipped image, so the sample stays in range (DDIM needs its ε re-derived from it for this)."""
    noise, generators = seeded_noise([0], (3, 8, 8))
    denoiser = lambda x, t: torch.cat([5 * x, torch.zeros_like(x)], dim=1)  # noqa: E731
    result = sample(denoiser, noise, sampler=sampler, steps=10, generators=generators, clip_x0=True)
    assert result.abs().max() <= 1.05


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_is_seeded_per_image(models, sampler):
    """An image depends on its seed only: not on the batch it ran in (stochastic solvers included)."""
    pipe = Pipeline.from_pretrained(models["embedding"], device="cpu")
    together = _array(pipe(PROMPTS, num_images_per_prompt=2, sampler=sampler, steps=6, seed=4, batch_size=3))
    alone = _array(pipe(PROMPTS, num_images_per_prompt=2, sampler=sampler, steps=6, seed=4, batch_size=1))
    assert np.abs(together - alone).max() <= 1
    assert np.abs(together[0] - together[1]).max() > 10  # seeds 4 and 5 differ


def test_default_steps_are_the_official_ones():
    assert {name: spec.default_steps for name, spec in SAMPLERS.items()} == {
        "dpm-solver": 20,
        "sa-solver": 25,
        "ddim": 50,
        "iddpm": 100,
    }
    assert len(make_scheduler("iddpm").timesteps) == 1000
    scheduler = make_scheduler("iddpm")
    scheduler.set_timesteps(100)
    assert scheduler.timesteps[0] == 999 and scheduler.timesteps[-1] == 0  # IDDPM's respacing of "100"


def test_offload_frees_the_text_encoder_and_changes_nothing(models):
    plain = Pipeline.from_pretrained(models["embedding"], device="cpu")
    offloaded = Pipeline.from_pretrained(models["embedding"], device="cpu", offload=True)
    a = _array(plain(PROMPTS, steps=5, seed=1))
    b = _array(offloaded(PROMPTS, steps=5, seed=1))
    assert not offloaded.text_encoder.loaded and plain.text_encoder.loaded
    assert np.array_equal(a, b)
    assert np.array_equal(b, _array(offloaded(PROMPTS, steps=5, seed=1)))  # reloads when needed again


def test_prompt_completion_feeds_the_completed_caption_per_image(models, tmp_path):
    """A completing pipeline makes exactly the image of its completed caption, seeded per image, and records it."""
    from pixart_cli.sampling.pipeline import check_prompt_completion
    from pixart_cli.sampling.writer import write_samples

    assert Pipeline.from_pretrained(models["embedding"], device="cpu").prompt_completion is None  # records none
    with pytest.raises(PixartError, match="prompt completion knows only the ShapesWorld"):
        Pipeline.from_pretrained(models["embedding"], device="cpu", complete_prompts=True)
    for model in (models["diffusers"], models["embedding"]):  # a diffusers pipeline never completes
        with pytest.raises(PixartError, match="prompt completion knows only the ShapesWorld"):
            check_prompt_completion(model)
    plain = Pipeline.from_pretrained(models["embedding"], device="cpu")
    completing = Pipeline.from_pretrained(models["embedding"], device="cpu")
    completing.prompt_completion = lambda prompt, seed: f"{prompt} number {seed}"
    got = _array(completing(PROMPTS, num_images_per_prompt=2, steps=4, seed=7))
    expected = [plain(f"{p} number {seed}", steps=4, seed=seed)[0] for p in PROMPTS for seed in (7, 8)]
    assert np.abs(got - _array(expected)).max() <= 1  # batches differ: rounding, as in the per-image seed test
    assert np.abs(got - _array(plain(PROMPTS, num_images_per_prompt=2, steps=4, seed=7))).max() > 10
    write_samples(completing, PROMPTS[:1], tmp_path, SampleSettings(num_images_per_prompt=2, seed=7, steps=2))
    records = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["caption"]) for r in records] == [(PROMPTS[0], f"{PROMPTS[0]} number {s}") for s in (7, 8)]


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"sampler": "euler"}, "unknown sampler 'euler'; choose one of: dpm-solver, sa-solver, ddim, iddpm"),
        ({"steps": 0}, "--steps must be positive, got 0"),
        ({"steps": 1001}, "--steps can be at most 1000 (the training schedule's timesteps), got 1001"),
        ({"cfg": -1.0}, "--cfg must be a non-negative number, got -1.0"),
        ({"cfg": float("nan")}, "--cfg must be a non-negative number, got nan"),
        ({"batch_size": 0}, "--batch-size must be positive, got 0"),
        ({"num_images_per_prompt": 0}, "number of images per prompt must be positive, got 0"),
        ({"seed": 2**64}, f"--seed must be in [-2^63, 2^64 - 1], got {2**64}"),
        ({"seed": 2**64 - 2, "num_images_per_prompt": 3}, f"--seed must be in [-2^63, 2^64 - 3], got {2**64 - 2}"),
        ({"seed": -(2**63) - 1}, f"--seed must be in [-2^63, 2^64 - 1], got {-(2**63) - 1}"),
    ],
)
def test_sample_settings_refuse_bad_values(given, message):
    with pytest.raises(PixartError) as caught:
        SampleSettings(**given)
    assert str(caught.value) == message


def test_sample_settings_resolve_steps_and_make_the_jobs():
    assert SampleSettings().steps == 20 and SampleSettings(sampler="iddpm").steps == 100  # recorded concretely
    assert SampleSettings(sampler="ddim", steps=7).steps == 7
    settings = SampleSettings(seed=5, num_images_per_prompt=2)
    assert [(j.prompt_index, j.prompt, j.seed) for j in settings.jobs(["a", "b"])] == [
        (0, "a", 5), (0, "a", 6), (1, "b", 5), (1, "b", 6),
    ]  # fmt: skip
    with pytest.raises(PixartError, match=r"^no prompts given$"):
        settings.jobs([])
    with pytest.raises(PixartError) as caught:
        settings.check_image_count(500_001)
    assert str(caught.value) == "a run makes at most 1,000,000 images; 500,001 prompt(s) × 2 images is 1,000,002"
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.steps = 3  # type: ignore[misc]


def test_write_samples_records_the_settings_as_given(models, tmp_path):
    """The manifest and each PNG hold the settings object's values under the keys earlier versions wrote (so
    their folders resume), and the images are those ``Pipeline.__call__`` makes with the same settings."""
    from PIL import Image

    from pixart_cli.sampling.writer import write_samples

    settings = SampleSettings(
        sampler="ddim", steps=2, cfg=3.0, seed=4, num_images_per_prompt=2, batch_size=3, negative_prompt="blurry"
    )
    pipeline = Pipeline.from_pretrained(models["embedding"], device="cpu")
    report = write_samples(pipeline, PROMPTS[:1], tmp_path, settings)
    records = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert records == [
        {
            "file": f"p00000-s{seed}.png",
            "prompt_index": 0,
            "prompt": PROMPTS[0],
            "seed": seed,
            "sampler": "ddim",
            "steps": 2,
            "cfg": 3.0,
            "negative_prompt": "blurry",
            "height": 64,
            "width": 64,
            "model": str(models["embedding"]),
        }
        for seed in (4, 5)
    ]
    assert list(records[0]) == ["file", "prompt_index", "prompt", "seed", *settings.record((64, 64), "m")]
    for path, record in zip(report.written, records, strict=True):
        with Image.open(path) as image:
            assert json.loads(image.info["pixart"]) == record
    made = pipeline(PROMPTS[:1], **dataclasses.asdict(settings))
    assert np.array_equal(_array(Image.open(p) for p in report.written), _array(made))
    again = write_samples(pipeline, PROMPTS[:1], tmp_path, settings)  # resumes: the records match
    assert not again.written and len(again.skipped) == 2


def test_pixel_space_model(tmp_path, tiny_t5):
    config = dataclasses.replace(TINY, in_channels=3, input_size=16)
    make_tiny_pixart(tmp_path / "px", config, text_encoder=str(tiny_t5), vae="none")
    pipe = Pipeline.from_pretrained(tmp_path / "px", device="cpu")
    images = pipe(["a red cube"], num_images_per_prompt=2, steps=4)
    assert images[0].size == (16, 16)
    assert pipe(["a red cube"], height=18, width=22, steps=2)[0].size == (22, 18)
    with pytest.raises(PixartError, match="multiple of 2 \\(the patch size\\)"):
        pipe(["a red cube"], height=17, width=16)


def test_tiny_components_are_deterministic(tmp_path):
    from safetensors.torch import load_file

    for name in ("a", "b"):
        make_tiny_t5(tmp_path / name, ["a red cube", "a blue sphere"] * 5, seed=3)
        make_tiny_vae(tmp_path / f"vae-{name}", seed=3)
    for pattern in ("{}/model.safetensors", "vae-{}/diffusion_pytorch_model.safetensors"):
        a, b = (load_file(tmp_path / pattern.format(n)) for n in "ab")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a/spiece.model").read_bytes() == (tmp_path / "b/spiece.model").read_bytes()
    text = TextEncoder(str(tmp_path / "a"), max_length=16)
    captions = text.encode(["a red cube"])
    assert captions.embeddings.shape == (1, 16, 32)
    assert captions.mask[0, 0] == 1 and captions.mask[0, -1] == 0  # padded to max_length, mask kept


#################################################################################
#                                       CLI                                     #
#################################################################################


def _sample(*args: str, env: dict | None = None):
    return runner.invoke(app, ["sample", *args], env=env)


def _pngs(directory: Path) -> dict[str, np.ndarray]:
    from PIL import Image

    return {p.name: np.asarray(Image.open(p)).astype(np.int16) for p in sorted(directory.glob("p*.png"))}


def test_help():
    result = runner.invoke(app, ["sample", "--help"])
    assert result.exit_code == 0
    assert "--sampler" in result.output and "--offload" in result.output


def test_cli_seeds_and_batches(models, tmp_path):
    model = str(models["embedding"])
    common = ["a photo of a cat", "two dogs playing in the snow", "--model", model, "--steps", "5", "-n", "4"]
    first = _sample(*common, "--batch-size", "3", "--seed", "11", "-o", str(tmp_path / "a"))
    assert first.exit_code == 0, first.output
    assert "wrote 8 images" in first.stdout and str(tmp_path / "a") in first.stdout
    a = _pngs(tmp_path / "a")
    assert sorted(a) == [f"p0000{i}-s{s}.png" for i in (0, 1) for s in (11, 12, 13, 14)]

    assert _sample(*common, "--batch-size", "3", "--seed", "11", "-o", str(tmp_path / "a2")).exit_code == 0
    for name in a:  # same seed → identical files
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "a2" / name).read_bytes()

    assert _sample(*common, "--batch-size", "1", "--seed", "12", "-o", str(tmp_path / "b")).exit_code == 0
    b = _pngs(tmp_path / "b")
    for name in set(a) & set(b):  # seeds 12-14: the same image whatever the batch size and run
        assert np.abs(a[name] - b[name]).max() <= 1
    assert np.abs(a["p00000-s11.png"] - a["p00000-s12.png"]).max() > 10  # different seeds → different images


def test_cli_records_settings_and_resumes(models, tmp_path):
    from PIL import Image

    out = tmp_path / "out"
    args = ["a photo of a cat", "--model", str(models["embedding"]), "--steps", "3", "-n", "2", "-o", str(out)]
    assert _sample(*args, "--grid").exit_code == 0
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["file"] for r in records] == ["p00000-s0.png", "p00000-s1.png"]
    assert records[1] | {"model": None} == {
        "file": "p00000-s1.png",
        "prompt_index": 0,
        "prompt": "a photo of a cat",
        "seed": 1,
        "sampler": "dpm-solver",
        "steps": 3,
        "cfg": 4.5,
        "negative_prompt": "",
        "height": 64,
        "width": 64,
        "model": None,
    }
    with Image.open(out / "p00000-s1.png") as image:
        assert json.loads(image.info["pixart"]) == records[1]
        assert image.info["prompt"] == "a photo of a cat" and image.info["seed"] == "1"
    assert Image.open(out / "grid.png").size == (128, 64)

    (out / "p00000-s1.png").unlink()  # an interrupted run: one image missing, the manifest's last line cut short
    (out / "manifest.jsonl").write_text((out / "manifest.jsonl").read_text()[:-20])
    before = (out / "p00000-s0.png").stat().st_mtime_ns
    again = _sample(*args)
    assert again.exit_code == 0 and "wrote 1 image" in again.stdout and "skipped 1" in again.stdout
    assert (out / "p00000-s0.png").stat().st_mtime_ns == before
    files = []
    for line in (out / "manifest.jsonl").read_text().splitlines():
        with contextlib.suppress(ValueError):  # the line cut short stays broken
            files.append(json.loads(line)["file"])
    assert set(files) == {"p00000-s0.png", "p00000-s1.png"}

    changed = _sample(*args, "--cfg", "2")
    assert changed.exit_code == 2 and "different settings (cfg)" in changed.stderr


def test_cli_model_sources(models, tmp_path, tiny_t5, tiny_vae):
    """A diffusers pipeline directory (components found inside it) and an official .pth with --t5/--vae."""
    # Official files do not record the head count: use a width of the DiT family (384: PixArt-S, 6 heads).
    config = dataclasses.replace(TINY, depth=1, hidden_size=384, num_heads=6)
    ours = make_tiny_pixart(tmp_path / "ours", config, text_encoder=str(tiny_t5), vae=str(tiny_vae), seed=4)
    write_official(read_any(ours), tmp_path / "model.pth")
    runs = {
        "diffusers": ["--model", str(models["diffusers"])],
        "official": ["--model", str(tmp_path / "model.pth"), "--t5", str(tiny_t5), "--vae", str(tiny_vae)],
        "ours": ["--model", str(ours)],
    }
    images = {}
    for name, args in runs.items():
        result = _sample("a red cube", *args, "--steps", "3", "-n", "1", "-o", str(tmp_path / name))
        assert result.exit_code == 0, result.output
        images[name] = _pngs(tmp_path / name)["p00000-s0.png"]
    assert np.array_equal(images["official"], images["ours"])  # same weights, same null caption
    assert images["diffusers"].shape == (64, 64, 3)


def test_cli_output_must_be_a_directory(models, tmp_path):
    (tmp_path / "file").write_text("")
    result = _sample("a cat", "--model", str(models["embedding"]), "-o", str(tmp_path / "file"))
    assert result.exit_code == 2 and "exists and is not a directory" in result.stderr


def test_cli_warns_about_truncated_prompts(models, tmp_path):
    long_prompt = " ".join(["a photo of a cat sitting on a red chair"] * 30)
    result = _sample(long_prompt, "--model", str(models["embedding"]), "--steps", "2", "-n", "1", "-o", str(tmp_path))
    assert result.exit_code == 0
    assert "truncated to 120 tokens" in result.stderr


def _bad_inputs(models: dict[str, Path], tmp_path: Path, tiny_vae: Path) -> dict[str, tuple[list[str], str]]:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    no_refs = make_tiny_pixart(tmp_path / "no-refs", TINY)
    model = ["--model", str(models["embedding"])]
    return {
        "missing model": (["a cat", "--model", str(tmp_path / "nowhere")], "no such model file or directory"),
        "unreadable model": (["a cat", "--model", str(garbage)], "garbage.pth: not a"),
        "hub id offline": (["a cat", "--model", "someone/some-pixart"], "huggingface-cli download someone/some-pixart"),
        "no model": (["a cat"], "no model given"),
        "size": (["a cat", *model, "--size", "100"], "multiple of 16 (8 (VAE) × 2 (patch))"),
        "size and height": (["a cat", *model, "--size", "64", "--height", "64"], "not both"),
        "no prompts": ([*model], "no prompts given"),
        "blank prompts file": ([*model, "--prompts-file", str(empty)], "no prompts given"),
        "missing prompts file": ([*model, "--prompts-file", str(tmp_path / "nope.txt")], "cannot read the prompts"),
        "unknown sampler": (["a cat", *model, "--sampler", "euler"], "unknown sampler 'euler'; choose one of"),
        "steps": (["a cat", *model, "--steps", "0"], "--steps must be positive"),
        "too many steps": (["a cat", *model, "--steps", "1001"], "--steps can be at most 1000"),
        "too many images": (["a cat", "a dog", *model, "-n", "600000"], "at most 1,000,000 images"),
        "huge size": (["a cat", *model, "--width", "100000"], "is 39,062,500 patches, over this model's limit of 256"),
        "huge height": (["a cat", *model, "--height", "4096", "--width", "64"], "limit of 256"),
        "images per prompt": (["a cat", *model, "-n", "0"], "images per prompt must be positive"),
        "batch size": (["a cat", *model, "--batch-size", "0"], "--batch-size must be positive"),
        "negative cfg": (["a cat", *model, "--cfg", "-1"], "--cfg must be a non-negative number"),
        "no text encoder": (["a cat", "--model", str(no_refs)], "names no text encoder; pass --t5"),
        "missing t5": (["a cat", *model, "--t5", str(tmp_path / "no-t5")], "no such T5 directory"),
        "wrong vae": (["a cat", *model, "--vae", "none"], "takes 4 input channels but the pixel space gives 3"),
        "wrong t5": (
            ["a cat", "--model", str(no_refs), "--t5", str(tmp_path), "--vae", str(tiny_vae)],
            "not a T5 directory",
        ),
    }


BAD_INPUTS = [
    "missing model",
    "unreadable model",
    "hub id offline",
    "no model",
    "size",
    "size and height",
    "no prompts",
    "blank prompts file",
    "missing prompts file",
    "unknown sampler",
    "steps",
    "too many steps",
    "too many images",
    "huge size",
    "huge height",
    "images per prompt",
    "batch size",
    "negative cfg",
    "no text encoder",
    "missing t5",
    "wrong vae",
    "wrong t5",
]


def _no_sampling(*args, **kwargs):
    raise AssertionError("sampling started: the input should have been refused")


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_cli_bad_input_fails_cleanly(case, models, tmp_path, tiny_vae, monkeypatch):
    if case == "no model":  # an installation without the bundled demo model
        monkeypatch.setattr("pixart_cli.sampling.pipeline.default_model", lambda: None)
    monkeypatch.setattr("pixart_cli.sampling.pipeline.seeded_noise", _no_sampling)  # a bad input must not get that far
    args, message = _bad_inputs(models, tmp_path, tiny_vae)[case]
    out = tmp_path / "out"
    result = _sample(*args, "-o", str(out), env={"HF_HUB_OFFLINE": "1"})
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()


def _shapes_model(directory: Path, prompt_completion: str | None, **config: object) -> Path:
    """A random pixel-space PixArt (16 px, 4×4 patches) reading builtin:shapes-t5, recording ``prompt_completion``."""
    from pixart_cli.checkpoints.format import save_checkpoint

    shape = dict(depth=1, hidden_size=48, num_heads=2, patch_size=4, input_size=16, in_channels=3, max_length=16)
    model = PixArtConfig(**{**shape, "caption_channels": 64, **config})
    path = make_tiny_pixart(directory, model, text_encoder="builtin:shapes-t5", vae="none")
    checkpoint = load_checkpoint(path)
    checkpoint.meta = dataclasses.replace(checkpoint.meta, prompt_completion=prompt_completion)
    return save_checkpoint(checkpoint, path, overwrite=True)


def test_cli_refuses_a_size_beyond_the_model_before_creating_anything(tmp_path, monkeypatch):
    """Issue #24: `pixart sample "a red circle" --width 100000` on the demo tried to allocate ~120 GB. The demo is
    multi-scale and now snaps any size into its buckets (test_sampling_snaps_to_the_buckets_training_used); a
    single-scale model that completes prompts, as the demo does, refuses it with one line."""
    monkeypatch.setattr("pixart_cli.sampling.pipeline.seeded_noise", _no_sampling)
    model = _shapes_model(tmp_path / "model", "shapesworld")
    out = tmp_path / "x"
    result = _sample("a red circle", "-m", str(model), "--width", "100000", "-o", str(out), "--device", "cpu")
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: image size 100000×100000 is 625,000,000 patches, over this model's limit of 256 "
        "(16 × its trained 4×4 grid; 64×64 for a square)"
    ]
    assert "Traceback" not in result.output and not out.exists()
    assert result.stderr.strip().splitlines() == errors  # the only line: not even the prompt-completion note


def test_sampling_snaps_to_the_buckets_training_used(caplog):
    """One bucket rule (pixart_cli.data.buckets) for training data and sampling: a multi-scale model samples at
    the buckets its images were resized to, at official base sizes (diffusers' tables) and at others (the
    ShapesWorld demo's 64 px, whose sizes were not snapped before)."""
    import itertools

    from pixart_cli.checkpoints.format import read_config
    from pixart_cli.components.resolve import resolve_builtin
    from pixart_cli.data.buckets import Buckets, official_bucket_table
    from pixart_cli.shapesworld.demo import SHAPES_DEMO
    from pixart_cli.training.recipe import load_recipe

    recipe, _ = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "shapes" / "stage3.yaml")
    config = read_config(resolve_builtin(SHAPES_DEMO))[0]  # the end of that recipe's run
    assert (config.input_size, config.patch_size, config.multi_scale) == (recipe.data.resolution, 4, True)
    trained = Buckets.for_resolution(recipe.data.resolution, True, config.patch_size)  # as training.batches does
    for width, height in recipe.data.shapes.resolution:  # the scenes' own sizes are buckets: drawn as asked
        assert resolve_size(config, 1, height, width) == (height, width) == trained.nearest(height, width)
    for height, width in itertools.product(range(8, 400, 12), repeat=2):
        assert resolve_size(config, 1, height, width) == trained.nearest(height, width)
    with caplog.at_level(logging.WARNING, logger="pixart_cli"):
        assert resolve_size(config, 1, 64, 96) == (52, 76)  # h/w 0.67: the 0.68 bucket, not 96×64
    assert "size 96×64 snapped to 76×52 (width×height)" in caplog.text
    assert resolve_size(config, 1, 100000, 100000) == (64, 64)  # issue #24's size stays inside the buckets

    official = dataclasses.replace(TINY, hidden_size=48, input_size=128, multi_scale=True)  # 1024 px
    table = Buckets.from_table(official_bucket_table(1024))
    for height, width in itertools.product(range(64, 3000, 96), repeat=2):
        assert resolve_size(official, 8, height, width) == table.nearest(height, width)
    # 256 px with 4-pixel patches: the official table's 16-px sides do not fit 8 × 4; training made its own.
    coarse = dataclasses.replace(TINY, hidden_size=48, input_size=32, patch_size=4, multi_scale=True)
    generated = Buckets.for_resolution(256, True, 32)
    assert generated != Buckets.from_table(official_bucket_table(256))
    for height, width in itertools.product(range(64, 1000, 40), repeat=2):
        assert resolve_size(coarse, 8, height, width) == generated.nearest(height, width)


def test_size_limit_is_relative_to_the_trained_grid():
    """TINY samples 64 px (a 4×4 patch grid): up to 16× that many patches, in any aspect ratio."""
    assert resolve_size(TINY, 8, 256, 256) == (256, 256)
    assert resolve_size(TINY, 8, 64, 1024) == (64, 1024)
    for height, width in ((272, 256), (64, 1040), (100000, 100000)):
        with pytest.raises(PixartError, match="over this model's limit of 256"):
            resolve_size(TINY, 8, height, width)
    config = dataclasses.replace(TINY, hidden_size=48, input_size=128, multi_scale=True)  # buckets: always inside
    assert resolve_size(config, 8, 100000, 10) == (2048, 512)


def test_cli_refuses_a_batch_beyond_memory_before_creating_anything(models, tmp_path, monkeypatch):
    """One batch's activations are checked against the device's memory: 2 images with guidance on TINY's 16
    patches need at least 2 × 2 × 16 × (32 + 2 × 128) × 4 bytes = 73,728; one at a time, half."""
    monkeypatch.setattr("pixart_cli.sampling.pipeline.available_memory", lambda device: 50_000)
    out = tmp_path / "out"
    args = ["a cat", "--model", str(models["embedding"]), "-n", "2", "--steps", "2", "--device", "cpu", "-o", str(out)]
    result = _sample(*args, "--batch-size", "2")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: a batch of 2 image(s) at 64×64 needs at least"), lines
    assert "GiB of memory on cpu; lower --batch-size" in lines[0] and not out.exists()
    result = _sample(*args, "--batch-size", "1")
    assert result.exit_code == 0, result.output
    assert "wrote 2 images" in result.stdout


def test_sigma_model_matches_diffusers_sigma_pipeline(tmp_path, tiny_t5):
    """PixArt-Σ's shapes: 300-token captions, an SDXL-style VAE (scaling factor 0.13025), no size conditioning.
    `pixart convert --t5 --vae` writes a PixArtSigmaPipeline, and our images equal its own (±2/255)."""
    import diffusers

    vae = make_tiny_vae(tmp_path / "sdxl-vae", scaling_factor=0.13025, seed=3)
    config = dataclasses.replace(TINY, max_length=300, interpolation_scale=2.0, input_size=16)
    ours_dir = make_tiny_pixart(
        tmp_path / "sigma", config, text_encoder=str(tiny_t5), vae=str(vae), null_caption="t5-empty", seed=4
    )
    result = runner.invoke(app, ["convert", str(ours_dir), "-o", str(tmp_path / "pipe"), "--to", "diffusers",
                                 "--t5", str(tiny_t5), "--vae", str(vae)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "pipe" / "model_index.json").read_text())["_class_name"] == "PixArtSigmaPipeline"
    assert read_any(tmp_path / "pipe").config.max_length == 300  # a Σ pipeline's caption length, read back

    pipe = diffusers.PixArtSigmaPipeline.from_pretrained(str(tmp_path / "pipe"))
    assert pipe.vae.config.scaling_factor == 0.13025
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler(**PUBLISHED_SCHEDULERS["dpm-solver"][1])
    pipe.set_progress_bar_config(disable=True)
    long_prompt = " ".join(["a red square above a blue circle"] * 30)  # > 120 tokens: Σ reads all of it
    prompts = [PROMPTS[0], long_prompt]
    ours = Pipeline.from_pretrained(ours_dir, device="cpu", clean_captions=False)
    assert ours.text_encoder.max_length == 300
    images = _array(ours(prompts, sampler="dpm-solver", steps=12, cfg=4.5, seed=11, height=128, width=192))
    noise, _ = seeded_noise([11, 11], (4, 16, 24))
    reference = pipe(
        prompts, num_inference_steps=12, guidance_scale=4.5, latents=noise, height=128, width=192,
        clean_caption=False, use_resolution_binning=False, max_sequence_length=300, output_type="np",
    ).images  # fmt: skip
    reference = np.round(reference * 255).astype(np.int16)
    assert np.abs(images - reference).max() <= 2
    assert (images[0] != images[1]).any()
