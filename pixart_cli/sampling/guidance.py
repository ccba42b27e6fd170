"""Model calls and classifier-free guidance: a conditional model becomes a ``Denoiser`` (x_t, t) → output.

Guidance mixes the ε (or v) channels in one batched forward; the learned-variance channels come from the
conditional branch (as in the official samplers). ``sample_latents`` runs a solver over a guided PixArt from
precomputed caption features (the parity tests use it). Seeds are per image: each row of the initial noise comes
from its own CPU ``torch.Generator``, so an image depends neither on its batch nor on the device.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from PIL import Image
from torch import nn

from pixart_cli.components.text import Captions
from pixart_cli.models import PixArtConfig
from pixart_cli.sampling.solvers import DEFAULT_CFG, Denoiser, sample

logger = logging.getLogger(__name__)


# What a model is conditioned on, batched along dim 0: caption features, or a tensor (class labels).
Conditioning = TypeVar("Conditioning", Captions, torch.Tensor)


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
