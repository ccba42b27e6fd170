"""The autoencoder: a diffusers ``AutoencoderKL``, or pixel space ("none": the model works on pixels in [-1, 1]).

``Autoencoder`` puts both behind one interface, used alike by sampling, `pixart prepare` and training.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pixart_cli.components.resolve import locate, offline_hint
from pixart_cli.errors import PixartError


def load_vae(name: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"):
    """A diffusers ``AutoencoderKL`` from a directory (or a pipeline's ``vae/``) or a hub id."""
    from diffusers import AutoencoderKL  # lazy: diffusers adds ~5 s to start-up (docs/reference.md §8)

    path, local_only = locate(name, "VAE")
    sub = Path(path) / "vae" if (Path(path) / "vae").is_dir() else None
    try:
        vae = AutoencoderKL.from_pretrained(str(sub or path), torch_dtype=dtype, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        if os.path.isdir(path):
            raise PixartError(f"{name}: not an AutoencoderKL directory ({str(exc).splitlines()[0][:200]})") from None
        raise PixartError(offline_hint(name, "VAE")) from None
    return vae.to(device).eval().requires_grad_(False)


class Autoencoder:
    """Maps pixels (B, 3, H, W) in [-1, 1] to the diffusion model's space and back.

    ``encode`` returns the *scaled* Gaussian posterior (mean, std): training pre-extracts it once per image and
    draws a fresh latent ``mean + std · ε`` each time an item is read (the official recipe; ``draw_latents``),
    so a feature cache stores mean and std, not a sample. ``name``: the identity a cache records (the VAE path or
    ``"none"``); ``downsample``: pixels per latent pixel along each side; ``channels``: latent channels.
    """

    name: str
    downsample: int
    channels: int
    scaling_factor: float = 1.0
    bounded: bool = False  # the model's space is confined to [-1, 1] (pixels): solvers may clip predictions to it
    stochastic: bool = True  # encode can return a non-zero std (a cache skips storing an all-zero one)

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the scaled latent posterior, each (B, channels, H / downsample, W / downsample)."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → pixels in [-1, 1] (not clamped for a VAE)."""
        raise NotImplementedError

    def to(self, device: torch.device | str) -> Autoencoder:
        return self

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        if height % self.downsample or width % self.downsample:
            raise ValueError(f"{width}×{height} px is not divisible by the encoder's downsampling {self.downsample}")
        return self.channels, height // self.downsample, width // self.downsample


class PixelSpace(Autoencoder):
    """No autoencoder: the model denoises RGB pixels in [-1, 1] directly (``vae: none``; posterior std 0)."""

    name = "none"
    downsample = 1
    channels = 3
    bounded = True
    stochastic = False

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return pixels, torch.zeros_like(pixels)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1, 1)


class VAE(Autoencoder):
    """A diffusers ``AutoencoderKL`` with its latent scaling: ``(latent - shift_factor) · scaling_factor``
    (0.18215 and no shift for the SD VAE)."""

    def __init__(self, vae, name: str = "vae") -> None:
        self.vae = vae
        self.name = name
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        self.channels = vae.config.latent_channels
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        param = next(self.vae.parameters())
        posterior = self.vae.encode(pixels.to(device=param.device, dtype=param.dtype)).latent_dist
        # The shift moves the mean only; the scale multiplies both (the affine map of a Gaussian).
        return (posterior.mean - self.shift_factor) * self.scaling_factor, posterior.std * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        param = next(self.vae.parameters())
        latents = latents.to(device=param.device, dtype=param.dtype) / self.scaling_factor + self.shift_factor
        return self.vae.decode(latents).sample

    def to(self, device: torch.device | str) -> VAE:
        self.vae.to(device)
        return self


def load_autoencoder(name: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> Autoencoder:
    """``"none"`` for pixel space, else a VAE directory or hub id (see ``load_vae``)."""
    if not name or not name.strip():
        raise PixartError("no VAE given: pass a VAE directory, or 'none' for a pixel-space model")
    if name.strip().lower() == "none":
        return PixelSpace()
    return VAE(load_vae(name, dtype=dtype, device=device), name=name)


def draw_latents(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw ``mean + std · ε`` from an ``Autoencoder.encode`` posterior, in float32 (a fresh latent each time an
    item is read, as the official loader does: docs/reference.md §4); ``ε`` comes from ``generator``'s device."""
    mean, std = mean.float(), std.float()
    device = generator.device if generator is not None else mean.device
    noise = torch.randn(mean.shape, generator=generator, device=device, dtype=torch.float32).to(mean.device)
    return mean + std * noise
