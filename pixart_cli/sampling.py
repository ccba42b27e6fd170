"""Sampling: diffusers schedulers driven by one loop, classifier-free guidance as one wrapper, and ``Pipeline``.

Layers, from the bottom:

* ``make_scheduler`` / ``sample``: every solver is a diffusers scheduler on the training noise schedule (1000
  linear betas 1e-4..0.02) and runs through the same loop with the same signature.
* ``classifier_free_guidance``: wraps a conditional model call (captions, or class labels) into a ``Denoiser``
  (x_t, t) → output; guidance is applied to the ε (or v) channels in one batched forward, the learned-variance
  channels come from the conditional branch (as in the official samplers).
* ``sample_latents``: precomputed caption features + initial noise → final latents (used by the parity tests).
* ``Pipeline``: prompts → PIL images, from a checkpoint directory, a diffusers pipeline or an official ``.pth``.
* ``write_samples``: the ``pixart sample`` command: PNGs with their settings, a JSONL manifest, resumable.

Seeds are per image: image j of a prompt uses ``seed + j``, drawn from its own CPU ``torch.Generator`` (initial
noise first, then any noise a stochastic solver needs), so an image does not depend on the batch it ran in nor on
the device.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

import torch
from PIL import Image, PngImagePlugin
from torch import nn

from pixart_cli.components import Autoencoder, _offline_hint, load_autoencoder, resolve_builtin
from pixart_cli.convert import PIXART_SCHEDULER_CONFIG
from pixart_cli.errors import PixartError
from pixart_cli.io import atomic_file, exclusive_output, png_is_complete, remove_stale_temporaries
from pixart_cli.models import PixArtConfig
from pixart_cli.models.layers import PredictionType
from pixart_cli.text import Captions, TextEncoder

logger = logging.getLogger(__name__)

NullCaption = Literal["embedding", "t5-empty"]
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> model output (ε or v[, variance])
# What a model is conditioned on, batched along dim 0: caption features, or a tensor (class labels).
Conditioning = TypeVar("Conditioning", Captions, torch.Tensor)
PromptCompletion = Callable[[str, int], str]  # (prompt, seed) -> the caption to encode

DEFAULT_CFG = 4.5
MAX_IMAGES = 1_000_000  # per run: the job list, the records and the resume scan are held in memory
MAX_TOKEN_FACTOR = 16  # a sampled patch grid may hold 16× the model's trained one (4× each side of a square)

#################################################################################
#                                   Solvers                                     #
#################################################################################


@dataclass(frozen=True)
class SamplerSpec:
    default_steps: int
    uses_variance: bool  # the scheduler consumes the model's learned-variance channels
    stochastic: bool  # the scheduler draws noise while sampling (takes the per-image generators)
    reference: str


SAMPLERS: dict[str, SamplerSpec] = {
    "dpm-solver": SamplerSpec(20, False, False, "DPM-Solver++ multistep, order 2 (Lu et al. 2022, arXiv 2211.01095)"),
    "sa-solver": SamplerSpec(25, False, True, "SA-Solver, stochastic Adams (Xue et al. 2023, arXiv 2309.05019)"),
    "ddim": SamplerSpec(50, False, False, "DDIM, eta = 0 (Song et al. 2020, arXiv 2010.02502)"),
    "iddpm": SamplerSpec(
        100, True, True, "ancestral DDPM, learned-range variance, respaced (Nichol & Dhariwal 2021, arXiv 2102.09672)"
    ),
}

# The training noise schedule, shared by every solver.
NOISE_SCHEDULE = {
    k: PIXART_SCHEDULER_CONFIG[k]
    for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
}
# One step per training timestep at most: DDIM and IDDPM cannot take more, the others would repeat timesteps.
MAX_STEPS = NOISE_SCHEDULE["num_train_timesteps"]


def check_sampler(sampler: str) -> SamplerSpec:
    if sampler not in SAMPLERS:
        raise PixartError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    return SAMPLERS[sampler]


def make_scheduler(
    sampler: str, learned_variance: bool = True, clip_x0: bool = False, prediction_type: PredictionType = "epsilon"
):
    """A fresh diffusers scheduler for ``sampler`` on the training noise schedule, for an ε or v model.

    ``learned_variance``: whether the model predicts the variance (``iddpm`` then uses it; without it, the
    posterior variance, as IDDPM's fixed-small option). ``clip_x0``: clip each step's predicted clean image to
    [-1, 1], as DDPM does for pixel-space models; latents are not bounded, so latent models never clip.
    """
    check_sampler(sampler)
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, SASolverScheduler

    # Dynamic thresholding capped at 1.0 is a plain clip to [-1, 1] (the quantile is floored at 1).
    threshold = {"thresholding": True, "sample_max_value": 1.0} if clip_x0 else {}
    schedule = {**NOISE_SCHEDULE, "prediction_type": prediction_type}
    if sampler == "dpm-solver":  # the public checkpoints' config
        return DPMSolverMultistepScheduler(**{**PIXART_SCHEDULER_CONFIG, **schedule}, **threshold)
    if sampler == "sa-solver":
        return SASolverScheduler(**schedule, predictor_order=2, corrector_order=2, **threshold)
    if sampler == "ddim":
        # Offset 1 and no alpha=1 at the end: the usual choice for a 1000-step linear schedule (Stable Diffusion's).
        return DDIMScheduler(**schedule, clip_sample=clip_x0, set_alpha_to_one=False, steps_offset=1)
    # "linspace" rounds evenly spaced steps over [0, 999], which is IDDPM's own respacing ("100").
    return DDPMScheduler(
        **schedule,
        variance_type="learned_range" if learned_variance else "fixed_small",
        clip_sample=clip_x0,
        timestep_spacing="linspace",
    )


def step_options(sampler: str, clip_x0: bool, generators: list[torch.Generator] | None = None) -> dict:
    """Keyword arguments for ``scheduler.step`` of ``sampler`` (from ``make_scheduler``), for every solver loop."""
    options = {"generator": generators} if check_sampler(sampler).stochastic and generators is not None else {}
    if sampler == "ddim" and clip_x0:
        # Re-derive ε from the clipped image, as the other solvers do implicitly: DDIM otherwise moves x along the
        # unclipped ε, which guidance can make huge (a pixel model at CFG 4.5 then ends in noise).
        options["use_clipped_model_output"] = True
    return options


def sample(
    denoiser: Denoiser,
    noise: torch.Tensor,
    *,
    sampler: str = "dpm-solver",
    steps: int | None = None,
    generators: list[torch.Generator] | None = None,
    learned_variance: bool = False,
    clip_x0: bool = False,
    prediction_type: PredictionType = "epsilon",
    callback: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Run ``sampler`` for ``steps`` from ``noise`` (B, C, H, W); the one loop every solver shares.

    ``denoiser`` returns the model's prediction (ε or v, as ``prediction_type`` says), alone or with the
    learned-variance channels (2C); solvers that do not use the variance get the prediction only.
    ``generators`` (one per image) feed stochastic solvers. ``callback(step, steps)`` after each step. The state
    is kept in float32 whatever the model's dtype.
    """
    spec = check_sampler(sampler)
    steps = spec.default_steps if steps is None else steps
    if steps <= 0:
        raise PixartError(f"steps must be positive, got {steps}")
    scheduler = make_scheduler(sampler, learned_variance, clip_x0, prediction_type)
    scheduler.set_timesteps(steps, device=noise.device)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    channels = noise.shape[1]
    step_kwargs = step_options(sampler, clip_x0, generators)
    x = noise.float() * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        out = denoiser(scheduler.scale_model_input(x, t), t).float()
        if not (spec.uses_variance and learned_variance):
            out = out[:, :channels]
        x = scheduler.step(out, t, x, **step_kwargs, return_dict=False)[0]
        if callback is not None:
            callback(i + 1, len(timesteps))
    return x


#################################################################################
#                          Model calls and guidance                             #
#################################################################################


def _size_conditions(config: PixArtConfig, batch: int, image_size: tuple[int, int] | None, device: torch.device):
    """(resolution (B, 2) = [H, W] pixels, aspect ratio (B, 1) = H / W) for a multi-scale model, else Nones."""
    if not config.multi_scale:
        return None, None
    if image_size is None:
        raise ValueError("a multi-scale model needs the image size (height, width) in pixels")
    h, w = image_size
    resolution = torch.tensor([[float(h), float(w)]], device=device).expand(batch, 2)
    aspect_ratio = torch.tensor([[h / w]], device=device).expand(batch, 1)
    return resolution, aspect_ratio


def call_model(
    model: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    captions: Captions,
    image_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """One forward of the PixArt transformer in its own dtype; returns float32 (epsilon[, variance])."""
    dtype = next(model.parameters()).dtype
    b = x.shape[0]
    resolution, aspect_ratio = _size_conditions(model.config, b, image_size, x.device)
    out = model(
        x.to(dtype),
        t.reshape(-1).expand(b) if t.numel() == 1 else t,
        captions.embeddings.to(dtype),
        captions.mask,
        resolution=resolution,
        aspect_ratio=aspect_ratio,
    )
    return out.float()


def classifier_free_guidance(
    model_fn: Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor],
    cond: Conditioning,
    uncond: Conditioning | None,
    scale: float,
    channels: int,
) -> Denoiser:
    """Guide ``model_fn(x, t, cond)``: eps = eps_u + scale·(eps_c − eps_u), in one batched forward.

    The conditioning is ``Captions`` (PixArt; padding no caption uses is trimmed once) or a tensor batched along
    dim 0, e.g. class labels with the null class as ``uncond`` (a class-conditional DiT). Only the first
    ``channels`` (ε, or v: guidance is the same affine mix either way) are guided; the rest (learned variance) come
    from the conditional branch. ``scale == 1`` (or no ``uncond``) is plain conditional sampling with a single
    forward.
    """
    if uncond is None or scale == 1.0:
        cond = _trimmed(cond)
        return lambda x, t: model_fn(x, t, cond)
    both = _trimmed(Captions.cat([uncond, cond]) if isinstance(cond, Captions) else torch.cat([uncond, cond]))

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out_u, out_c = model_fn(torch.cat([x, x]), t, both).chunk(2)
        eps = out_u[:, :channels] + scale * (out_c[:, :channels] - out_u[:, :channels])
        return torch.cat([eps, out_c[:, channels:]], dim=1)

    return denoise


def _trimmed(conditioning: Conditioning) -> Conditioning:
    """Captions without the padding every row masks out (it costs every step: drop it once); tensors as they are."""
    return conditioning.trimmed() if isinstance(conditioning, Captions) else conditioning


@torch.no_grad()
def sample_latents(
    model: nn.Module,
    noise: torch.Tensor,
    captions: Captions,
    null_captions: Captions | None,
    *,
    sampler: str = "dpm-solver",
    steps: int | None = None,
    cfg: float = DEFAULT_CFG,
    image_size: tuple[int, int] | None = None,
    generators: list[torch.Generator] | None = None,
    clip_x0: bool = False,
    callback: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Final latents from initial ``noise`` and precomputed caption features (the lower-level API).

    Args:
        noise: (B, C, h, w) initial noise (standard normal; scaled by the solver's initial sigma here).
        captions: B caption features and masks on the model's device.
        null_captions: B unconditional captions for guidance (None: no guidance).
        image_size: (H, W) of the image in pixels; needed by multi-scale models.
        generators: one per image, for stochastic solvers.
        clip_x0: clip predicted clean images to [-1, 1] at every step (pixel-space models; ``make_scheduler``).
    """
    if len(captions) != noise.shape[0] or (null_captions is not None and len(null_captions) != noise.shape[0]):
        raise ValueError("noise, captions and null captions must have the same batch size")
    model_fn = functools.partial(_call_with_size, model, image_size)
    denoiser = classifier_free_guidance(model_fn, captions, null_captions, cfg, noise.shape[1])
    return sample(
        denoiser,
        noise,
        sampler=sampler,
        steps=steps,
        generators=generators,
        learned_variance=model.config.learn_sigma,
        clip_x0=clip_x0,
        prediction_type=model.config.prediction_type,
        callback=callback,
    )


def _call_with_size(model, image_size, x, t, captions):
    return call_model(model, x, t, captions, image_size)


def seeded_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Initial noise (B, *shape) where row i comes from ``seeds[i]``, and the generators to keep drawing from.

    CPU generators: the same seed gives the same image on any device.
    """
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
    return noise, generators


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) images in [-1, 1] → 8-bit RGB PIL images (rounded, as diffusers does)."""
    array = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in array]


#################################################################################
#                           Image size and buckets                              #
#################################################################################


def aspect_ratio_buckets(base_size: int) -> dict[str, list[float]] | None:
    """The official aspect-ratio buckets ({"h/w": [h, w]}) for a 256, 512 or 1024 px model, else None."""
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
        ASPECT_RATIO_256_BIN,
        ASPECT_RATIO_512_BIN,
        ASPECT_RATIO_1024_BIN,
    )

    return {256: ASPECT_RATIO_256_BIN, 512: ASPECT_RATIO_512_BIN, 1024: ASPECT_RATIO_1024_BIN}.get(base_size)


def snap_to_bucket(height: int, width: int, buckets: dict[str, list[float]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to height / width."""
    ratio = height / width
    key = min(buckets, key=lambda r: abs(float(r) - ratio))
    h, w = buckets[key]
    return int(h), int(w)


def resolve_size(config: PixArtConfig, downsample: int, height: int | None, width: int | None) -> tuple[int, int]:
    """The image size to sample: the model's base size by default; multi-scale models snap to their buckets.

    Raises PixartError when a side is not a multiple of downsample × patch (the model's token grid).
    """
    base = config.input_size * downsample
    if height is None and width is None:
        height = width = base
    height, width = (width if height is None else height), (height if width is None else width)  # one side: square
    if height <= 0 or width <= 0:
        raise PixartError(f"image size must be positive, got {width}×{height} (width×height)")
    if config.multi_scale:
        buckets = aspect_ratio_buckets(base)
        if buckets is not None:
            snapped = snap_to_bucket(height, width, buckets)
            if snapped != (height, width):
                logger.warning(
                    "size %d×%d snapped to %d×%d (width×height), the nearest aspect-ratio bucket of this "
                    "multi-scale model",
                    width,
                    height,
                    snapped[1],
                    snapped[0],
                )
            height, width = snapped
    multiple = downsample * config.patch_size
    if height % multiple or width % multiple:
        what = f"{downsample} (VAE) × {config.patch_size} (patch)" if downsample > 1 else "the patch size"
        raise PixartError(f"image size {width}×{height}: each side must be a multiple of {multiple} ({what})")
    # Far beyond the trained grid a model draws nothing useful, and the tensors can outgrow any machine: refuse
    # before anything is allocated (multi-scale models with buckets never get here, their buckets are smaller).
    patches = (height // multiple) * (width // multiple)
    limit = MAX_TOKEN_FACTOR * config.base_size**2
    if patches > limit:
        side = math.isqrt(limit) * multiple
        raise PixartError(
            f"image size {width}×{height} is {patches:,} patches, over this model's limit of {limit:,} "
            f"({MAX_TOKEN_FACTOR} × its trained {config.base_size}×{config.base_size} grid; {side}×{side} for a square)"
        )
    return height, width


def available_memory(device: torch.device) -> int | None:
    """Bytes ``device`` could give this process at most: a GPU's memory less what other processes hold, the
    machine's RAM otherwise (the CPU; MPS shares it); None where unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device)  # what this process holds could be freed for sampling
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system that reports it
        return None


def activation_bytes(config: PixArtConfig, height: int, width: int, downsample: int, rows: int, itemsize: int) -> int:
    """A lower bound on one transformer forward's activations for ``rows`` images (2 per image with guidance):
    the residual stream and the MLP's hidden tensor before and after GELU, which coexist in every block."""
    multiple = downsample * config.patch_size
    patches = (height // multiple) * (width // multiple)
    return rows * patches * (config.hidden_size + 2 * config.mlp_hidden) * itemsize


#################################################################################
#                                  Pipeline                                     #
#################################################################################


def default_model() -> str | None:
    """The model ``pixart sample`` uses without ``--model``: the bundled ShapesWorld demo, when installed."""
    from pixart_cli.demo import demo_model

    return demo_model()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on CUDA (T5 overflows in fp16), fp32 elsewhere."""
    device = torch.device(device)
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_model(name: str | os.PathLike) -> Path:
    """A local path, a built-in asset (``builtin:shapes-demo``), or a diffusers pipeline hub id resolved through
    the Hugging Face cache (download if online)."""
    path = Path(resolve_builtin(str(name))).expanduser()
    if path.exists():
        if not os.access(path, os.R_OK):
            raise PixartError(f"{name}: not readable")
        return path
    text = str(name)
    if _HUB_ID.fullmatch(text) and not text.startswith((".", "~")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(text, local_files_only=bool(os.environ.get("HF_HUB_OFFLINE"))))
        except (OSError, ValueError):
            raise PixartError(
                f"{_offline_hint(text, 'model')} (or, if you meant a local path, it does not exist)"
            ) from None
    raise PixartError(f"{name}: no such model file or directory")


def _prompt_completion(model: object, t5: str, complete_prompts: bool | None) -> PromptCompletion | None:
    """``complete_prompts`` None: completion where the text encoder tells how (ShapesWorld); True: that, or an error."""
    from pixart_cli.demo import prompt_completion

    completion = prompt_completion(t5) if complete_prompts is not False else None
    if complete_prompts and completion is None:
        raise PixartError(f"{model}: prompt completion knows only the ShapesWorld captions; this model reads {t5}")
    return completion


def check_prompt_completion(model: str | os.PathLike, t5: str | None = None) -> None:
    """Raise, before any work, the error ``Pipeline.from_pretrained(model, t5=t5, complete_prompts=True)`` would
    raise, reading only the checkpoint's config (not its weights)."""
    from pixart_cli.checkpoint import is_checkpoint_dir, latest_in_run, read_config

    path = latest_in_run(resolve_model(model))
    if t5 is None and is_checkpoint_dir(path):
        recorded = read_config(path)[1].text_encoder
        t5 = recorded and _component_path(recorded, path)
    # Diffusers pipelines and official files bring (or need) a T5 of their own: never a built-in ShapesWorld one.
    _prompt_completion(model, t5 or "a text encoder of its own", True)


def _component_path(reference: str, model_path: Path) -> str:
    """A checkpoint's recorded text-encoder/VAE path: relative ones may be relative to the checkpoint."""
    if reference.lower() == "none" or Path(reference).is_absolute():
        return reference
    beside = (model_path if model_path.is_dir() else model_path.parent) / reference
    return str(beside) if beside.exists() else reference


@dataclass(frozen=True)
class Job:
    """One image to make: prompt ``prompt_index`` of the list, with its own seed."""

    prompt_index: int
    prompt: str
    seed: int


def make_jobs(prompts: Sequence[str], num_images_per_prompt: int, seed: int) -> list[Job]:
    """Image j of prompt i uses seed + j (prompts share seeds, so a seed gives comparable images across prompts)."""
    if not prompts:
        raise PixartError("no prompts given")
    check_image_count(len(prompts), num_images_per_prompt)
    if not -(2**63) <= seed <= 2**64 - num_images_per_prompt:  # what torch.Generator.manual_seed accepts
        raise PixartError(f"--seed must be in [-2^63, 2^64 - {num_images_per_prompt}], got {seed}")
    return [Job(i, p, seed + j) for i, p in enumerate(prompts) for j in range(num_images_per_prompt)]


def check_image_count(prompts: int, num_images_per_prompt: int) -> None:
    """Refuse a non-positive ``-n`` and runs of more than ``MAX_IMAGES`` images, before any list is built."""
    if num_images_per_prompt <= 0:
        raise PixartError(f"number of images per prompt must be positive, got {num_images_per_prompt}")
    if prompts * num_images_per_prompt > MAX_IMAGES:
        raise PixartError(
            f"a run makes at most {MAX_IMAGES:,} images; {prompts:,} prompt(s) × {num_images_per_prompt:,} images "
            f"is {prompts * num_images_per_prompt:,}"
        )


class Pipeline:
    """Prompts → images with a PixArt transformer, a T5 text encoder and an autoencoder (or pixel space).

    Args:
        null_caption: the unconditional input for guidance when no negative prompt is given: "embedding" uses
            the model's stored null caption ``y_embedding`` with each prompt's own mask (as the official sampler,
            and as captions are dropped in training); "t5-empty" encodes "" (diffusers-origin weights).
        offload: keep GPU memory to one component at a time: the text encoder encodes every prompt once and is
            freed before the transformer runs; transformer and autoencoder stay on the CPU between runs.
        prompt_completion: ``(prompt, seed) -> caption``, rewrites each image's prompt into the form the model's
            training captions took before it is encoded (``Pipeline.caption``); None feeds prompts as given.
    """

    def __init__(
        self,
        model: nn.Module,
        text_encoder: TextEncoder,
        autoencoder: Autoencoder,
        *,
        null_caption: NullCaption = "embedding",
        device: torch.device | str = "cpu",
        offload: bool = False,
        name: str = "model",
        prompt_completion: PromptCompletion | None = None,
    ) -> None:
        _check_channels(model.config, autoencoder, name)
        if null_caption not in ("embedding", "t5-empty"):
            raise ValueError(f"null_caption must be 'embedding' or 't5-empty', got {null_caption!r}")
        self.model = model.eval().requires_grad_(False)
        self.text_encoder = text_encoder
        self.autoencoder = autoencoder
        self.null_caption = null_caption
        self.device = torch.device(device)
        self.offload = offload
        self.name = name
        self.prompt_completion = prompt_completion
        self._rest_device = torch.device("cpu") if offload else self.device
        self.model.to(self._rest_device)
        self.autoencoder.to(self._rest_device)

    @property
    def config(self) -> PixArtConfig:
        return self.model.config

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike,
        *,
        t5: str | None = None,
        vae: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        offload: bool = False,
        ema: bool | None = None,
        clean_captions: bool = True,
        complete_prompts: bool | None = None,
    ) -> Pipeline:
        """Load from our checkpoint directory, a diffusers pipeline directory (or hub id), or an official ``.pth``.

        ``t5`` and ``vae`` override the checkpoint's own references (needed for an official ``.pth`` and a bare
        diffusers transformer); ``vae="none"`` is pixel space. Defaults: CUDA when available; bf16 on CUDA and
        fp32 on CPU; EMA weights when present. ``complete_prompts``: word prompts as the training captions were
        (``pixart_cli.demo.prompt_completion``); None (default) does so where the text encoder tells how, i.e. for
        ShapesWorld models; True where it cannot tell is an error.
        """
        from pixart_cli.checkpoint import instantiate
        from pixart_cli.convert import read_any

        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        path = resolve_model(model)
        checkpoint = read_any(path)
        t5 = t5 or (checkpoint.meta.text_encoder and _component_path(checkpoint.meta.text_encoder, path))
        vae = vae or (checkpoint.meta.vae and _component_path(checkpoint.meta.vae, path))
        if not t5:
            raise PixartError(f"{model}: the checkpoint names no text encoder; pass --t5 (a T5 directory or hub id)")
        if not vae:
            raise PixartError(
                f"{model}: the checkpoint names no VAE; pass --vae (an AutoencoderKL directory or hub id, "
                "or 'none' for a pixel-space model)"
            )
        null_caption = checkpoint.meta.null_caption
        completion = _prompt_completion(model, t5, complete_prompts)
        rest = torch.device("cpu") if offload else device
        autoencoder = load_autoencoder(vae, dtype=dtype, device=rest)
        _check_channels(checkpoint.config, autoencoder, str(model))
        transformer = instantiate(checkpoint, ema=ema, device=rest, dtype=dtype)
        del checkpoint
        text = TextEncoder(
            t5, max_length=transformer.config.max_length, dtype=dtype, device=device, clean=clean_captions
        )
        width = text.load().encoder.config.d_model
        if width != transformer.config.caption_channels:
            raise PixartError(
                f"{t5}: T5 features are {width} wide but the model expects {transformer.config.caption_channels}"
            )
        return cls(
            transformer,
            text,
            autoencoder,
            null_caption=null_caption,
            device=device,
            offload=offload,
            name=str(model),
            prompt_completion=completion,
        )

    # -- pieces -----------------------------------------------------------------------------------------------
    def image_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        return resolve_size(self.config, self.autoencoder.downsample, height, width)

    def check_memory(self, height: int, width: int, images: int, cfg: float) -> None:
        """Refuse a batch of ``images`` at ``height``×``width`` whose activations cannot fit the sampling device."""
        rows = images * (2 if cfg != 1.0 else 1)  # guidance runs the unconditional half in the same forward
        itemsize = next(self.model.parameters()).element_size()
        need = activation_bytes(self.config, height, width, self.autoencoder.downsample, rows, itemsize)
        have = available_memory(self.device)
        if have is not None and need > have:
            raise PixartError(
                f"a batch of {images:,} image(s) at {width}×{height} needs at least {need / 2**30:,.1f} GiB of "
                f"activations, over the {have / 2**30:,.1f} GiB of memory on {self.device}; lower --batch-size "
                "or the size"
            )

    def caption(self, job: Job) -> str:
        """The text encoded for ``job``: its prompt, completed with the job's seed when the pipeline completes."""
        if self.prompt_completion is None:
            return job.prompt
        return self.prompt_completion(job.prompt, job.seed)

    def encode(self, prompts: Sequence[str]) -> dict[str, Captions]:
        """Each distinct prompt encoded once (kept on the CPU, one row each)."""
        unique = list(dict.fromkeys(prompts))
        self.text_encoder.to(self.device)
        out: dict[str, Captions] = {}
        for start in range(0, len(unique), 64):  # bounded T5 batches
            chunk = unique[start : start + 64]
            enc = self.text_encoder.encode(chunk).to("cpu")
            out.update({p: enc[i] for i, p in enumerate(chunk)})
        return out

    def unconditional(self, cond: Captions, negative: Captions | None) -> Captions:
        """The guidance baseline for a batch: the encoded negative prompt / T5(""), or the stored null caption."""
        b = len(cond)
        if negative is not None:
            return Captions(negative.embeddings.expand(b, -1, -1), negative.mask.expand(b, -1))
        null = self.model.y_embedder.y_embedding[: cond.embeddings.shape[1]]
        return Captions(null[None].expand(b, -1, -1).to(cond.embeddings.device), cond.mask)

    def _release_text_encoder(self) -> None:
        if self.text_encoder.source is not None:
            self.text_encoder.release()
        else:  # built from in-memory modules: cannot reload, so park it on the CPU
            self.text_encoder.to("cpu")

    @contextlib.contextmanager
    def _on_device(self) -> Iterator[None]:
        """Transformer and autoencoder on the device for the sampling phase (a no-op without offload)."""
        if not self.offload:
            yield
            return
        self.model.to(self.device)
        self.autoencoder.to(self.device)
        try:
            yield
        finally:
            self.model.to(self._rest_device)
            self.autoencoder.to(self._rest_device)
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    # -- generation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        jobs: Sequence[Job],
        *,
        sampler: str = "dpm-solver",
        steps: int | None = None,
        cfg: float = DEFAULT_CFG,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str | None = None,
        batch_size: int = 4,
        progress: Callable[[float], None] | None = None,
    ) -> Iterator[tuple[Job, Image.Image]]:
        """Make each job's image, ``batch_size`` at a time (jobs of different prompts share batches).

        ``progress(images)`` is called after each solver step with the number of images done so far (fractional
        within a batch, exact at its end).
        """
        spec = check_sampler(sampler)
        steps = spec.default_steps if steps is None else steps
        check_numbers(steps, cfg, batch_size)
        h, w = self.image_size(height, width)
        if not jobs:
            return
        self.check_memory(h, w, min(batch_size, len(jobs)), cfg)
        texts = {j: self.caption(j) for j in jobs}
        captions = self.encode(list(texts.values()))
        negative = None
        if cfg != 1.0 and (negative_prompt or self.null_caption == "t5-empty"):
            negative = self.text_encoder.encode([negative_prompt or ""]).to("cpu")
        if self.offload:
            self._release_text_encoder()
        f = self.autoencoder.downsample
        shape = (self.config.in_channels, h // f, w // f)
        with self._on_device():
            for start in range(0, len(jobs), batch_size):
                batch = jobs[start : start + batch_size]
                cond = Captions.cat([captions[texts[j]] for j in batch]).to(self.device)
                uncond = self.unconditional(cond, negative.to(self.device) if negative is not None else None)
                noise, generators = seeded_noise([j.seed for j in batch], shape)
                step_progress = None
                if progress is not None:
                    step_progress = functools.partial(_report_steps, progress, start, len(batch))
                latents = sample_latents(
                    self.model,
                    noise.to(self.device),
                    cond,
                    uncond if cfg != 1.0 else None,
                    sampler=sampler,
                    steps=steps,
                    cfg=cfg,
                    image_size=(h, w),
                    generators=generators,
                    clip_x0=self.autoencoder.bounded,
                    callback=step_progress,
                )
                images = to_pil(self.autoencoder.decode(latents))
                yield from zip(batch, images, strict=True)

    def __call__(
        self,
        prompts: str | Sequence[str],
        *,
        num_images_per_prompt: int = 1,
        sampler: str = "dpm-solver",
        steps: int | None = None,
        cfg: float = DEFAULT_CFG,
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str | None = None,
        batch_size: int = 4,
    ) -> list[Image.Image]:
        """Images for ``prompts``, grouped by prompt (image j of prompt i uses seed + j)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        jobs = make_jobs(prompts, num_images_per_prompt, seed)
        made = self.generate(
            jobs,
            sampler=sampler,
            steps=steps,
            cfg=cfg,
            height=height,
            width=width,
            negative_prompt=negative_prompt,
            batch_size=batch_size,
        )
        return [image for _, image in made]


def _check_channels(config: PixArtConfig, autoencoder: Autoencoder, name: str) -> None:
    if config.in_channels != autoencoder.channels:
        space = "pixel space" if autoencoder.downsample == 1 else "VAE"
        raise PixartError(
            f"{name}: the model takes {config.in_channels} input channels but the {space} gives "
            f"{autoencoder.channels} (wrong --vae?)"
        )


def _report_steps(progress: Callable[[float], None], start: int, images: int, step: int, steps: int) -> None:
    progress(start + images * step / steps)


def check_numbers(steps: int | None, cfg: float, batch_size: int) -> None:
    """Refuse out-of-range settings (``steps`` None: the sampler's default, always in range)."""
    if steps is not None and steps <= 0:
        raise PixartError(f"--steps must be positive, got {steps}")
    if steps is not None and steps > MAX_STEPS:
        raise PixartError(f"--steps can be at most {MAX_STEPS} (the training schedule's timesteps), got {steps}")
    if not math.isfinite(cfg) or cfg < 0:
        raise PixartError(f"--cfg must be a non-negative number, got {cfg}")
    if batch_size <= 0:
        raise PixartError(f"--batch-size must be positive, got {batch_size}")


#################################################################################
#                          Writing samples to a directory                       #
#################################################################################

MANIFEST = "manifest.jsonl"
GRID = "grid.png"
PNG_KEY = "pixart"  # PNG text chunk holding the JSON record of the image's settings
MAX_GRID_IMAGES = 256


def image_name(job: Job) -> str:
    return f"p{job.prompt_index:05d}-s{job.seed}.png"


@dataclass
class SampleReport:
    output_dir: Path
    manifest: Path
    size: tuple[int, int]  # (height, width), the tensors' order; print it as width×height
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    grid: Path | None = None


def _png_record(path: Path) -> dict | None:
    """The settings stored in one of our PNGs; None when the file is not one (or not readable, or cut short)."""
    if not png_is_complete(path):  # the settings chunk comes before the pixels: a truncated file still has it
        return None
    try:
        with Image.open(path) as image:
            return json.loads(image.info[PNG_KEY])
    except (OSError, KeyError, ValueError, SyntaxError):
        return None


def _save_png(image: Image.Image, path: Path, record: dict) -> None:
    """Write atomically (temporary file + rename): a file with the final name is always complete."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_KEY, json.dumps(record, ensure_ascii=False))
    for key in ("prompt", "seed", "sampler", "steps", "cfg", "model"):  # readable in any PNG viewer
        info.add_text(key, str(record[key]))
    with atomic_file(path, overwrite=True) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def _read_manifest(path: Path) -> dict[str, dict]:
    """The manifest's records by file name, in order; a later record for a file supersedes an earlier one, and
    lines that are not records (one cut short by a kill) are dropped."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise PixartError(f"{path}: cannot read the manifest ({exc.strerror})") from None
    found: dict[str, dict] = {}
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            name = record.get("file") if isinstance(record, dict) else None
            if isinstance(name, str) and name == Path(name).name:  # an image of this directory
                found[name] = record
    return found


class _Manifest:
    """JSONL, one record per finished image: rewritten at the start of a run, then appended to image by image."""

    def __init__(self, path: Path, records: dict[str, dict]) -> None:
        self.path = path
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records.values())
        try:
            current = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            current = ""
        if text != current:  # atomic: a kill leaves the old manifest or the new one
            with atomic_file(path, overwrite=True) as tmp:
                tmp.write_text(text, encoding="utf-8")

    def add(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_samples(
    pipeline: Pipeline,
    prompts: Sequence[str],
    output_dir: str | os.PathLike,
    *,
    num_images_per_prompt: int = 1,
    seed: int = 0,
    batch_size: int = 4,
    sampler: str = "dpm-solver",
    steps: int | None = None,
    cfg: float = DEFAULT_CFG,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    grid: bool = False,
    progress: Callable[[float, int], None] | None = None,
) -> SampleReport:
    """Generate into ``output_dir``: one PNG per image (settings in its text chunk) and ``manifest.jsonl``.

    Resumable: an image whose file already holds the same settings is skipped; one that holds different settings
    is an error (nothing is written then). Everything is validated before the first file is written.
    ``progress(images_done, images_to_make)`` is called as sampling advances.
    """
    spec = check_sampler(sampler)
    steps = spec.default_steps if steps is None else steps
    check_numbers(steps, cfg, batch_size)
    jobs = make_jobs(prompts, num_images_per_prompt, seed)
    if grid and len(jobs) > MAX_GRID_IMAGES:
        raise PixartError(f"--grid is for at most {MAX_GRID_IMAGES} images, this run makes {len(jobs)}")
    h, w = pipeline.image_size(height, width)
    pipeline.check_memory(h, w, min(batch_size, len(jobs)), cfg)
    settings = {
        "sampler": sampler,
        "steps": steps,
        "cfg": cfg,
        "negative_prompt": negative_prompt or "",
        "height": h,
        "width": w,
        "model": pipeline.name,
    }
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise PixartError(f"{out}: exists and is not a directory")
    records = {
        j: {"file": image_name(j), "prompt_index": j.prompt_index, "prompt": j.prompt, "seed": j.seed, **settings}
        for j in jobs
    }
    for job, record in records.items():  # what the model read, where prompt completion changed it
        if (text := pipeline.caption(job)) != job.prompt:
            record["caption"] = text
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PixartError(f"{out}: cannot create the output directory ({exc.strerror})") from None
    if not os.access(out, os.W_OK):
        raise PixartError(f"{out}: output directory is not writable")
    # One writer at a time (a second `pixart sample` into this folder is refused, naming the holder); the folder's
    # state is read under the lock, so two runs never both decide to make the same image.
    with exclusive_output(out, "sample"):
        todo, skipped = [], []
        for job in jobs:
            path = out / image_name(job)
            if not path.exists():
                todo.append(job)
                continue
            found = _png_record(path)
            if found == records[job]:
                skipped.append(job)
            elif found is None:
                todo.append(job)  # not one of ours, or unreadable: replace it
            else:
                differ = sorted(k for k in records[job] if found.get(k) != records[job][k])
                raise PixartError(
                    f"{path}: exists from a run with different settings ({', '.join(differ)}); use another "
                    "output directory"
                )
        # One record per finished image: an image made again loses its old record (it gets a new one when written),
        # and one written by a run stopped before recording it gets its record now.
        redo = {image_name(j) for j in todo}
        kept = {
            name: record
            for name, record in _read_manifest(out / MANIFEST).items()
            if name not in redo and png_is_complete(out / name)
        }
        kept.update({image_name(j): records[j] for j in skipped})

        remove_stale_temporaries(out, redo | {MANIFEST})  # what a killed run was writing
        manifest = _Manifest(out / MANIFEST, kept)
        report = SampleReport(out, manifest.path, (h, w), skipped=[out / image_name(j) for j in skipped])

        def advance(images: float) -> None:
            if progress is not None:
                progress(images, len(todo))

        advance(0.0)
        made = pipeline.generate(
            todo,
            sampler=sampler,
            steps=steps,
            cfg=cfg,
            height=h,
            width=w,
            negative_prompt=negative_prompt,
            batch_size=batch_size,
            progress=advance,
        )
        for job, image in made:
            path = out / image_name(job)
            _save_png(image, path, records[job])
            manifest.add(records[job])
            report.written.append(path)
        if grid:
            report.grid = _write_grid([out / image_name(j) for j in jobs], num_images_per_prompt, out / GRID)
        return report


def _write_grid(paths: list[Path], columns: int, dst: Path) -> Path:
    """One row per prompt, one column per image."""
    images = [Image.open(p).convert("RGB") for p in paths]
    w, h = images[0].size
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * w, rows * h))
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * w, (i // columns) * h))
    with atomic_file(dst, overwrite=True) as tmp:
        sheet.save(tmp, format="PNG")
    return dst
