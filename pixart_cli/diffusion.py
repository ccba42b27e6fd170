"""Gaussian diffusion for training: the IDDPM hybrid loss used by PixArt-α and DiT.

Improved DDPM (Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models", arXiv:2102.09672),
with the settings PixArt-α trains with: T = 1000 steps, linear betas 1e-4..0.02, epsilon prediction and a
learned variance in "learned range" form.

Forward process, with ᾱ_t = ∏_{s≤t} (1 − β_s)::

    q(x_t | x_0) = N(√ᾱ_t · x_0, (1 − ᾱ_t) · I)                                    (q_sample)

Posterior, with β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t) and ᾱ_{−1} = 1::

    q(x_{t−1} | x_t, x_0) = N(c1_t · x_0 + c2_t · x_t, β̃_t · I),
    c1_t = β_t √ᾱ_{t−1} / (1 − ᾱ_t),   c2_t = (1 − ᾱ_{t−1}) √(1 − β_t) / (1 − ᾱ_t)

Model, p(x_{t−1} | x_t) = N(μ_θ, Σ_θ): the network predicts ε (first C channels), from which
x̂_0 = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t and μ_θ is the posterior mean at x̂_0. With ``prediction_type="v_prediction"``
those channels predict v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 instead (Salimans & Ho 2022, arXiv 2202.00512), so that
ε = √ᾱ_t v + √(1 − ᾱ_t) x_t, and the MSE below is taken on v: per step that is the ε error weighted by
1 / ᾱ_t = 1 + 1 / SNR_t, which gives the high-noise steps, where the layout is decided, far more weight.

When ``learn_sigma`` the network also predicts IDDPM's variance interpolation v (last C channels, nominally in
[−1, 1]; not the velocity above) and, with frac = (v + 1) / 2 (IDDPM eq. 15)::

    log Σ_θ = frac · log β_t + (1 − frac) · log β̃_t^clipped

where β̃^clipped is β̃ with its first entry (β̃_0 = 0) replaced by β̃_1, so that the log stays finite.

Training loss (IDDPM "hybrid", L_simple + λ L_vlb with λ = 1 for 1000 steps)::

    loss = mean(‖ε − ε_θ‖²) + L_vlb(t)            (‖v − v_θ‖² with v-prediction)

L_vlb is in bits per dimension and is computed with μ_θ built from a *detached* ε_θ, so it trains only the
variance channels (IDDPM §3.1: L_simple drives the mean, L_vlb the variance). For t > 0 it is
KL(q(x_{t−1} | x_t, x_0) ‖ p(x_{t−1} | x_t)); for t = 0 it is the negative log-likelihood of x_0 under a
discretised Gaussian decoder (8-bit bins of width 2/255 on [−1, 1], open-ended at the ±1 edges; DDPM §3.3).
PixArt applies it unchanged to VAE latents, which are not confined to [−1, 1]: values past ±0.999 land in the
open-ended edge bins.

Schedules are kept in float64 and cast when gathered; losses are computed in (at least) float32, so a bf16
model output is fine.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch

from pixart_cli.models.layers import PredictionType, check_prediction_type

if TYPE_CHECKING:
    from pixart_cli.models import DiTConfig, PixArtConfig

# Each term of the VLB is divided by this to express it in bits rather than nats.
LOG_2 = math.log(2.0)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) ‖ N(mean2, exp(logvar2))) in nats; arguments broadcast."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Elementwise log-probability (nats) of data ``x`` in [-1, 1] under N(mean, exp(log_scale)²) binned to 8 bits.

    Each value owns the bin [x − 1/255, x + 1/255]; the two edge bins are open-ended: x < −0.999 gets
    P(X ≤ −1 + 1/255) and x > 0.999 gets P(X ≥ 1 − 1/255). Uses the exact normal CDF (IDDPM uses a tanh
    approximation) and floors probabilities at 1e-12 as IDDPM does.
    """
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (centered + 1.0 / 255.0)
    lower = inv_std * (centered - 1.0 / 255.0)
    # Take the bin mass from whichever tail is nearer, where the CDF difference does not cancel to zero.
    bin_mass = torch.where(
        centered > 0,
        torch.special.ndtr(-lower) - torch.special.ndtr(-upper),
        torch.special.ndtr(upper) - torch.special.ndtr(lower),
    )
    log_bin = torch.log(bin_mass.clamp(min=1e-12))
    log_below_upper = torch.log(torch.special.ndtr(upper).clamp(min=1e-12))
    log_above_lower = torch.log(torch.special.ndtr(-lower).clamp(min=1e-12))
    return torch.where(x < -0.999, log_below_upper, torch.where(x > 0.999, log_above_lower, log_bin))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch one: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


class MeanVariance(NamedTuple):
    """The model's reverse step p(x_{t−1} | x_t) = N(mean, exp(log_variance)) and its x_0 estimate."""

    mean: torch.Tensor
    log_variance: torch.Tensor
    pred_x0: torch.Tensor


class GaussianDiffusion:
    """IDDPM diffusion with a linear beta schedule, epsilon (or v) prediction and optional learned-range variance.

    Without ``learn_sigma`` the model outputs ε only, the loss is the MSE alone, and the reverse variance is
    IDDPM's "fixed large" choice (β_t, with β̃_1 at t = 0), the default of IDDPM and DiT for that case.
    """

    def __init__(
        self,
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        learn_sigma: bool = True,
        prediction_type: PredictionType = "epsilon",
    ) -> None:
        if num_timesteps < 2:
            raise ValueError(f"num_timesteps must be at least 2, got {num_timesteps}")
        if not 0.0 < beta_start <= beta_end < 1.0:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")
        self.num_timesteps = num_timesteps
        self.beta_start = beta_start
        self.beta_end = beta_end
        check_prediction_type(prediction_type)
        self.learn_sigma = learn_sigma
        self.prediction_type = prediction_type

        f64 = torch.float64
        self.betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=f64)
        alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=f64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()

        one_minus_cumprod = 1.0 - self.alphas_cumprod
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / one_minus_cumprod
        # β̃_0 = 0 has no log; IDDPM reuses β̃_1 there (only the decoder term at t = 0 sees it).
        clipped = torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        self.posterior_log_variance_clipped = clipped.log()
        self.posterior_mean_coef1 = self.betas * self.alphas_cumprod_prev.sqrt() / one_minus_cumprod
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / one_minus_cumprod
        self.log_betas = self.betas.log()
        # "Fixed large" log-variance for models without learned sigma.
        self.fixed_large_log_variance = torch.cat([self.posterior_log_variance_clipped[:1], self.log_betas[1:]])
        # Per-device copies of the schedule: copying it from host memory at every gather would be a blocking
        # host-to-device transfer (a synchronisation point) several times per training step.
        self._device_copies: dict[tuple[int, torch.device], torch.Tensor] = {}

    @classmethod
    def for_model(cls, config: PixArtConfig | DiTConfig, num_timesteps: int = 1000) -> GaussianDiffusion:
        """The diffusion a PixArt or DiT config trains with: its ``learn_sigma`` and ``prediction_type``."""
        return cls(num_timesteps, learn_sigma=config.learn_sigma, prediction_type=config.prediction_type)

    # ----------------------------------------------------------------------------------------------------------------
    # Helpers
    # ----------------------------------------------------------------------------------------------------------------

    def _gather(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """values[t] (float64) cast to ``like``'s dtype and shaped (B, 1, ..., 1) to broadcast against it."""
        if values.device != t.device:
            key = (id(values), t.device)
            if key not in self._device_copies:
                self._device_copies[key] = values.to(t.device)
            values = self._device_copies[key]
        return values[t].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    @staticmethod
    def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
        """float32, or float64 if any input is; never a half type (the VLB's exp/log need the range)."""
        dtype = torch.float32
        for tensor in tensors:
            dtype = torch.promote_types(dtype, tensor.dtype)
        return dtype

    def _check_timesteps(self, t: torch.Tensor, x: torch.Tensor) -> None:
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t must have shape ({x.shape[0]},) to match the batch, got {tuple(t.shape)}")

    # ----------------------------------------------------------------------------------------------------------------
    # Forward process and posterior
    # ----------------------------------------------------------------------------------------------------------------

    def sample_timesteps(
        self,
        batch_size: int,
        generator: torch.Generator,
        kind: Literal["uniform", "logit-normal"] = "uniform",
        mean: float = 0.0,
        std: float = 1.0,
    ) -> torch.Tensor:
        """Integer timesteps in [0, num_timesteps), shape (batch_size,), on the generator's device.

        ``uniform`` (the paper), or ``logit-normal``: t / num_timesteps = sigmoid(N(mean, std)), which favours middle
        noise levels (SD3, Esser et al. 2024).
        """
        device = generator.device
        if kind == "uniform":
            return torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=device)
        if kind != "logit-normal":
            raise ValueError(f"timestep sampling must be 'uniform' or 'logit-normal', got {kind!r}")
        u = torch.sigmoid(mean + std * torch.randn(batch_size, generator=generator, device=device))
        return (u * self.num_timesteps).long().clamp_(0, self.num_timesteps - 1)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t · x0 + √(1 − ᾱ_t) · noise, in at least float32."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} does not match x0 shape {tuple(x0.shape)}")
        self._check_timesteps(t, x0)
        dtype = self._compute_dtype(x0, noise)
        x0, noise = x0.to(dtype), noise.to(dtype)
        return (
            self._gather(self.sqrt_alphas_cumprod, t, x0) * x0
            + self._gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def q_posterior_mean_variance(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t−1} | x_t, x_0)."""
        mean = (
            self._gather(self.posterior_mean_coef1, t, x_t) * x0 + self._gather(self.posterior_mean_coef2, t, x_t) * x_t
        )
        variance = self._gather(self.posterior_variance, t, x_t)
        log_variance = self._gather(self.posterior_log_variance_clipped, t, x_t)
        return mean, variance, log_variance

    # ----------------------------------------------------------------------------------------------------------------
    # Reverse process
    # ----------------------------------------------------------------------------------------------------------------

    def split_model_output(
        self, model_output: torch.Tensor, x_t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prediction, v) from a (B, 2C, ...) output when ``learn_sigma``, else (prediction, None) from (B, C, ...).

        The prediction is ε or, with v-prediction, the velocity (``epsilon`` converts it); v is the variance channel.
        """
        channels = x_t.shape[1]
        expected = 2 * channels if self.learn_sigma else channels
        if model_output.shape[0] != x_t.shape[0] or model_output.shape[1] != expected:
            raise ValueError(
                f"model output shape {tuple(model_output.shape)} does not fit x_t shape {tuple(x_t.shape)}: "
                f"expected {expected} channels (learn_sigma={self.learn_sigma})"
            )
        if self.learn_sigma:
            prediction, v = model_output.split(channels, dim=1)
            return prediction, v
        return model_output, None

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the model's first C channels regress on x_t = q_sample(x0, t, noise): ε, or √ᾱ_t ε − √(1 − ᾱ_t) x0."""
        if self.prediction_type == "epsilon":
            return noise
        return (
            self._gather(self.sqrt_alphas_cumprod, t, x0) * noise
            - self._gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0
        )

    def epsilon(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε from the model's first C channels: themselves, or from v as √ᾱ_t v + √(1 − ᾱ_t) x_t."""
        if self.prediction_type == "epsilon":
            return prediction
        return (
            self._gather(self.sqrt_alphas_cumprod, t, x_t) * prediction
            + self._gather(self.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t
        )

    def p_mean_variance(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> MeanVariance:
        """The model's p(x_{t−1} | x_t): mean from ε, log-variance from v (learned range) or fixed large.

        Computed in at least float32; x̂_0 is not clipped (latents are not bounded).
        """
        self._check_timesteps(t, x_t)
        dtype = self._compute_dtype(model_output, x_t)
        model_output, x_t = model_output.to(dtype), x_t.to(dtype)
        prediction, v = self.split_model_output(model_output, x_t)
        eps = self.epsilon(prediction, x_t, t)

        if v is None:
            log_variance = self._gather(self.fixed_large_log_variance, t, x_t).expand_as(x_t)
        else:
            min_log = self._gather(self.posterior_log_variance_clipped, t, x_t)
            max_log = self._gather(self.log_betas, t, x_t)
            frac = (v + 1.0) / 2.0
            log_variance = frac * max_log + (1.0 - frac) * min_log

        pred_x0 = self._gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - (
            self._gather(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        return MeanVariance(mean=mean, log_variance=log_variance, pred_x0=pred_x0)

    # ----------------------------------------------------------------------------------------------------------------
    # Training loss
    # ----------------------------------------------------------------------------------------------------------------

    def vb_terms_bits(
        self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample L_vlb term in bits/dim, shape (B,): KL for t > 0, decoder NLL for t = 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out.mean, out.log_variance)) / LOG_2
        decoder_nll = -discretized_gaussian_log_likelihood(x0, out.mean, 0.5 * out.log_variance)
        decoder_nll = mean_flat(decoder_nll) / LOG_2
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses(
        self, model_output: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses, each of shape (B,): ``loss`` = ``mse`` + ``vb``; the caller averages.

        ``model_output`` is the network's output on ``q_sample(x0, t, noise)``. ``vb`` is zero without
        ``learn_sigma``. Computed in at least float32 whatever the output's dtype.
        """
        dtype = self._compute_dtype(model_output, x0, noise)
        model_output, x0, noise = model_output.to(dtype), x0.to(dtype), noise.to(dtype)
        x_t = self.q_sample(x0, t, noise)
        prediction, v = self.split_model_output(model_output, x_t)
        mse = mean_flat((self.target(x0, t, noise) - prediction) ** 2)

        if v is None:
            vb = torch.zeros_like(mse)
        else:
            # Freeze the mean so the VLB trains only the variance; the mean is left to the MSE (IDDPM §3.1).
            frozen = torch.cat([prediction.detach(), v], dim=1)
            # The full-L_vlb estimate is T · L_t; IDDPM divides it by 1000 (weight 1 at T = 1000) so that it does
            # not swamp the MSE.
            vb = self.vb_terms_bits(frozen, x0, x_t, t) * (self.num_timesteps / 1000.0)
        return {"loss": mse + vb, "mse": mse, "vb": vb}
