"""Image encoders: pixels in [-1, 1] → the diffusion model's input space, as a Gaussian posterior (mean, std).

Training pre-extracts the posterior of every image once and draws a fresh latent ``mean + std · ε`` each time
an item is read (the official recipe, FACTS §4), so the cache stores mean and std, not a sample. ``VaeEncoder``
wraps a diffusers ``AutoencoderKL``; ``PixelEncoder`` is the identity for pixel-space models (``vae: none``),
whose posterior is a point mass (std 0). Both return *scaled* values, ready for the diffusion model:
``(latent - shift_factor) · scaling_factor`` (0.18215 and no shift for the SD VAE).
"""

from __future__ import annotations

import torch

from pixart_cli.errors import PixartError


class ImageEncoder:
    """Maps pixels (B, 3, H, W) in [-1, 1] to the model's space and back.

    ``name``: what the cache records as the encoder's identity (the VAE path or ``"none"``).
    ``downsample``: pixels per latent pixel along each side. ``channels``: latent channels.
    """

    name: str
    downsample: int
    channels: int
    scaling_factor: float = 1.0

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the scaled latent posterior, each (B, channels, H / downsample, W / downsample)."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → pixels in [-1, 1] (not clamped for a VAE)."""
        raise NotImplementedError

    @property
    def stochastic(self) -> bool:
        """Whether ``encode`` can return a non-zero std (the cache skips storing an all-zero std)."""
        return True

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        if height % self.downsample or width % self.downsample:
            raise ValueError(f"{height}×{width} px is not divisible by the encoder's downsampling {self.downsample}")
        return self.channels, height // self.downsample, width // self.downsample


class PixelEncoder(ImageEncoder):
    """No autoencoder: the model denoises RGB pixels directly (mean = pixels, std = 0)."""

    name = "none"
    downsample = 1
    channels = 3

    @property
    def stochastic(self) -> bool:
        return False

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return pixels, torch.zeros_like(pixels)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1, 1)


class VaeEncoder(ImageEncoder):
    """A diffusers ``AutoencoderKL`` with its latent scaling (``vae.config.scaling_factor``, ``shift_factor``)."""

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


def load_image_encoder(name: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> ImageEncoder:
    """``"none"`` → ``PixelEncoder``; otherwise a VAE directory or hub id (``components.load_vae``)."""
    if not name or not name.strip():
        raise PixartError("no VAE given: pass a VAE directory, or 'none' for a pixel-space model")
    if name.strip().lower() == "none":
        return PixelEncoder()
    from pixart_cli.components import load_vae

    return VaeEncoder(load_vae(name, dtype=dtype, device=device), name=name)


def sample_latents(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw ``mean + std · ε`` from the posterior, in float32; ``ε`` comes from ``generator``'s device."""
    mean, std = mean.float(), std.float()
    device = generator.device if generator is not None else mean.device
    noise = torch.randn(mean.shape, generator=generator, device=device, dtype=torch.float32).to(mean.device)
    return mean + std * noise
