"""GaussianDiffusion against independent references: diffusers' DDPMScheduler, closed forms and torch.distributions."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler
from torch.distributions import Normal

from pixart_cli.diffusion import GaussianDiffusion, discretized_gaussian_log_likelihood, normal_kl

SHAPE = (3, 4, 4)  # (C, H, W) of a tiny latent


def ddpm(variance_type: str = "fixed_small", float64: bool = True) -> DDPMScheduler:
    """diffusers' DDPM scheduler with PixArt's schedule.

    diffusers keeps the schedule in float32, where β̃_t's 1 − ᾱ_t/ᾱ_{t−1} cancels to ~3e-4 relative error at small
    t; unless ``float64`` is False, its own betas are carried to float64 so that comparisons can be tight.
    """
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        variance_type=variance_type,
        clip_sample=False,
    )
    if float64:
        scheduler.betas = scheduler.betas.double()
        scheduler.alphas = 1.0 - scheduler.betas
        scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
        scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    return scheduler


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def diffusers_reverse_step(
    scheduler: DDPMScheduler, eps: torch.Tensor, v: torch.Tensor, t: int, x_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, log-variance, x̂_0) of DDPMScheduler's learned-range step, its sampling noise removed."""
    out = scheduler.step(torch.cat([eps, v], dim=1), t, x_t, generator=torch.Generator().manual_seed(7))
    log_variance = scheduler._get_variance(t, predicted_variance=v, variance_type="learned_range")
    mean = out.prev_sample
    if t > 0:  # step draws its noise as randn(shape, generator) and adds exp(log_var / 2) * noise
        z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(7), dtype=x_t.dtype)
        mean = mean - torch.exp(0.5 * log_variance) * z
    return mean, log_variance, out.pred_original_sample


def assert_all_close_to(tensor: torch.Tensor, value: torch.Tensor) -> None:
    """Every element of a float32 ``tensor`` equals the 0-dim ``value`` to float32 precision."""
    torch.testing.assert_close(tensor, value.float().expand_as(tensor), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# Schedule, forward process, posterior
# --------------------------------------------------------------------------------------------------------------------


def test_schedule_matches_diffusers() -> None:
    diffusion, scheduler = GaussianDiffusion(), ddpm(float64=False)
    assert diffusion.betas.dtype == torch.float64
    torch.testing.assert_close(diffusion.betas.float(), scheduler.betas, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(diffusion.alphas_cumprod.float(), scheduler.alphas_cumprod, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("t", [1, 2, 10, 500, 999])
def test_posterior_variance_matches_diffusers(t: int) -> None:
    expected = ddpm()._get_variance(t, variance_type="fixed_small")
    assert GaussianDiffusion().posterior_variance[t].item() == pytest.approx(expected.item(), rel=1e-5)


def test_posterior_variance_at_zero_is_zero_and_clipped_log_uses_t1() -> None:
    diffusion = GaussianDiffusion()
    assert diffusion.posterior_variance[0].item() == 0.0
    expected = math.log(ddpm()._get_variance(1, variance_type="fixed_small").item())
    assert diffusion.posterior_log_variance_clipped[0].item() == pytest.approx(expected, rel=1e-5)


def test_q_sample_matches_add_noise() -> None:
    x0, noise = randn(4, *SHAPE, seed=1), randn(4, *SHAPE, seed=2)
    t = torch.tensor([0, 3, 500, 999])
    expected = ddpm().add_noise(x0, noise, t)
    torch.testing.assert_close(GaussianDiffusion().q_sample(x0, t, noise), expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# Reverse process
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [1, 2, 100, 999])
def test_learned_range_log_variance_matches_diffusers(t: int) -> None:
    scheduler, fixed = ddpm("learned_range"), ddpm()
    eps = randn(1, *SHAPE, seed=3)
    x_t = randn(1, *SHAPE, seed=4)
    for v in (-torch.ones(1, *SHAPE), torch.ones(1, *SHAPE), randn(1, *SHAPE, seed=5).clamp(-1, 1)):
        ours = GaussianDiffusion().p_mean_variance(torch.cat([eps, v], dim=1), x_t, torch.tensor([t])).log_variance
        expected = scheduler._get_variance(t, predicted_variance=v, variance_type="learned_range")
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    # The two ends of the range: the posterior variance and beta.
    at = GaussianDiffusion().p_mean_variance
    low = at(torch.cat([eps, -torch.ones(1, *SHAPE)], dim=1), x_t, torch.tensor([t])).log_variance
    high = at(torch.cat([eps, torch.ones(1, *SHAPE)], dim=1), x_t, torch.tensor([t])).log_variance
    assert_all_close_to(low, fixed._get_variance(t, variance_type="fixed_small").log())
    assert_all_close_to(high, fixed.betas[t].log())


def test_learned_range_at_t0_uses_clipped_posterior_variance() -> None:
    # diffusers takes log(max(β̃_0, 1e-20)) here; IDDPM (and we) replace β̃_0 = 0 by β̃_1.
    fixed = ddpm()
    eps, x_t = randn(1, *SHAPE, seed=3), randn(1, *SHAPE, seed=4)
    at = GaussianDiffusion().p_mean_variance
    low = at(torch.cat([eps, -torch.ones(1, *SHAPE)], dim=1), x_t, torch.tensor([0])).log_variance
    high = at(torch.cat([eps, torch.ones(1, *SHAPE)], dim=1), x_t, torch.tensor([0])).log_variance
    assert_all_close_to(low, fixed._get_variance(1, variance_type="fixed_small").log())
    assert_all_close_to(high, fixed.betas[0].log())


@pytest.mark.parametrize("t", [0, 1, 50, 999])
def test_model_mean_and_x0_match_diffusers_step(t: int) -> None:
    scheduler = ddpm("learned_range")
    eps, v, x_t = randn(2, *SHAPE, seed=3), randn(2, *SHAPE, seed=5).clamp(-1, 1), randn(2, *SHAPE, seed=4)
    mean, _, pred_x0 = diffusers_reverse_step(scheduler, eps, v, t, x_t)
    out = GaussianDiffusion().p_mean_variance(torch.cat([eps, v], dim=1), x_t, torch.full((2,), t))
    torch.testing.assert_close(out.pred_x0, pred_x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.mean, mean, rtol=1e-4, atol=1e-5)


def test_fixed_variance_without_learn_sigma_is_fixed_large() -> None:
    diffusion, fixed = GaussianDiffusion(learn_sigma=False), ddpm()
    x_t = randn(2, *SHAPE, seed=4)
    out = diffusion.p_mean_variance(randn(2, *SHAPE, seed=3), x_t, torch.tensor([0, 500]))
    assert_all_close_to(out.log_variance[0], fixed._get_variance(1, variance_type="fixed_small").log())
    assert_all_close_to(out.log_variance[1], fixed.betas[500].log())


# --------------------------------------------------------------------------------------------------------------------
# Closed forms
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("m1", "var1", "m2", "var2", "expected"),
    [
        (0.0, 1.0, 0.0, 1.0, 0.0),
        (0.0, 1.0, 1.0, 1.0, 0.5),  # (m1 - m2)² / 2
        (0.0, 1.0, 0.0, 4.0, math.log(2.0) + 1.0 / 8.0 - 0.5),  # log(σ2/σ1) + σ1²/(2σ2²) - 1/2
        (1.5, 0.25, -0.5, 2.0, math.log(math.sqrt(2.0) / 0.5) + (0.25 + 4.0) / 4.0 - 0.5),
    ],
)
def test_normal_kl_closed_form(m1: float, var1: float, m2: float, var2: float, expected: float) -> None:
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    kl = normal_kl(t(m1), t(math.log(var1)), t(m2), t(math.log(var2)))
    assert kl.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_discretized_gaussian_log_likelihood_against_normal_cdf() -> None:
    f64 = torch.float64
    x = torch.tensor([-1.0, -1.0, 1.0, 1.0, 0.0, 0.2, -0.6, 127 / 127.5 - 1], dtype=f64)
    mean = torch.tensor([-0.98, -0.5, 0.97, 1.2, 0.003, 0.1, -0.65, 0.0], dtype=f64)
    scale = torch.tensor([0.02, 0.3, 0.05, 0.1, 0.01, 0.2, 0.04, 0.005], dtype=f64)
    normal, half_bin = Normal(mean, scale), 1.0 / 255.0
    below_top, below_bottom = normal.cdf(x + half_bin), normal.cdf(x - half_bin)
    expected = torch.log(below_top - below_bottom)
    expected[:2] = torch.log(below_top[:2])  # x = -1: everything below the first bin's top
    expected[2:4] = torch.log(1.0 - below_bottom[2:4])  # x = +1: everything above the last bin's bottom
    ours = discretized_gaussian_log_likelihood(x, mean, scale.log())
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------------------------------------
# Training loss
# --------------------------------------------------------------------------------------------------------------------


def quantized_data(batch: int, seed: int) -> torch.Tensor:
    """8-bit data in [-1, 1] with a few exact ±1 values, as the decoder term assumes."""
    x0 = torch.randint(0, 256, (batch, *SHAPE), generator=torch.Generator().manual_seed(seed)) / 127.5 - 1.0
    x0[:, 0, 0, 0], x0[:, 0, 0, 1] = -1.0, 1.0
    return x0


def test_vb_matches_independent_kl_and_decoder_nll() -> None:
    scheduler, fixed = ddpm("learned_range"), ddpm()
    t = torch.tensor([0, 1, 10, 999])
    x0, noise = quantized_data(4, seed=1), randn(4, *SHAPE, seed=2)
    eps = noise + 0.3 * randn(4, *SHAPE, seed=3)
    v = randn(4, *SHAPE, seed=5).clamp(-1, 1)
    x_t = scheduler.add_noise(x0, noise, t)
    losses = GaussianDiffusion().training_losses(torch.cat([eps, v], dim=1), x0, t, noise)

    expected = []
    for i, step in enumerate(t.tolist()):
        sl = slice(i, i + 1)
        p_mean, p_log_var, _ = diffusers_reverse_step(scheduler, eps[sl], v[sl], step, x_t[sl])
        if step == 0:
            # Decoder: IDDPM's clipped variance at t = 0 (diffusers would use β̃_0 = 0 here).
            frac = (v[sl] + 1) / 2
            log_var = frac * fixed.betas[0].log() + (1 - frac) * fixed._get_variance(1).log()
            p = Normal(p_mean.double(), (0.5 * log_var).exp().double())
            x = x0[sl].double()
            prob = torch.where(
                x < -0.999,
                p.cdf(x + 1 / 255),
                torch.where(x > 0.999, 1 - p.cdf(x - 1 / 255), p.cdf(x + 1 / 255) - p.cdf(x - 1 / 255)),
            )
            expected.append(-prob.log().mean() / math.log(2))
        else:
            # q's mean is the step's mean at the true noise, since that recovers x̂_0 = x0.
            q_mean, _, _ = diffusers_reverse_step(scheduler, noise[sl], v[sl], step, x_t[sl])
            q = Normal(q_mean, fixed._get_variance(step).sqrt())
            p = Normal(p_mean, (0.5 * p_log_var).exp())
            expected.append(torch.distributions.kl_divergence(q, p).mean() / math.log(2))
    expected = torch.stack(expected).float()

    assert losses["vb"].shape == (4,)
    torch.testing.assert_close(losses["vb"], expected, rtol=2e-4, atol=1e-5)
    torch.testing.assert_close(losses["mse"], ((eps - noise) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])


def test_vb_gradient_reaches_only_variance_channels_and_mse_only_eps() -> None:
    diffusion, c = GaussianDiffusion(), SHAPE[0]
    t = torch.tensor([0, 1, 400, 999])
    x0, noise = quantized_data(4, seed=1), randn(4, *SHAPE, seed=2)
    output = torch.cat([noise + 0.3 * randn(4, *SHAPE, seed=3), randn(4, *SHAPE, seed=5).clamp(-1, 1)], dim=1)

    output_vb = output.clone().requires_grad_(True)
    diffusion.training_losses(output_vb, x0, t, noise)["vb"].sum().backward()
    assert torch.all(output_vb.grad[:, :c] == 0)
    assert torch.all(output_vb.grad[:, c:].abs().sum(dim=(1, 2, 3)) > 0)

    output_mse = output.clone().requires_grad_(True)
    diffusion.training_losses(output_mse, x0, t, noise)["mse"].sum().backward()
    assert torch.all(output_mse.grad[:, :c].abs().sum(dim=(1, 2, 3)) > 0)
    assert torch.all(output_mse.grad[:, c:] == 0)


def test_perfect_prediction_has_zero_mse_and_zero_kl() -> None:
    t = torch.tensor([1, 10, 500, 999])
    x0, noise = randn(4, *SHAPE, seed=1), randn(4, *SHAPE, seed=2)
    # ε exact and v = -1 (the posterior variance): p(x_{t-1} | x_t) is q(x_{t-1} | x_t, x_0).
    output = torch.cat([noise, -torch.ones_like(noise)], dim=1)
    losses = GaussianDiffusion().training_losses(output, x0, t, noise)
    assert torch.all(losses["mse"] == 0)
    torch.testing.assert_close(losses["vb"], torch.zeros(4), rtol=0, atol=1e-4)


def test_loss_is_finite_float32_for_bf16_output() -> None:
    diffusion = GaussianDiffusion()
    t = torch.tensor([0, 1, 500, 999])
    x0, noise = quantized_data(4, seed=1), randn(4, *SHAPE, seed=2)
    output = torch.cat([noise + 0.1 * randn(4, *SHAPE, seed=3), randn(4, *SHAPE, seed=5).clamp(-1, 1)], dim=1)
    bf16 = diffusion.training_losses(output.bfloat16(), x0, t, noise)
    reference = diffusion.training_losses(output.bfloat16().float(), x0, t, noise)
    for key in ("loss", "mse", "vb"):
        assert bf16[key].dtype == torch.float32 and torch.isfinite(bf16[key]).all()
        torch.testing.assert_close(bf16[key], reference[key])


def test_without_learn_sigma_loss_is_mse() -> None:
    diffusion = GaussianDiffusion(learn_sigma=False)
    x0, noise = randn(2, *SHAPE, seed=1), randn(2, *SHAPE, seed=2)
    eps = noise + randn(2, *SHAPE, seed=3)
    losses = diffusion.training_losses(eps, x0, torch.tensor([0, 999]), noise)
    torch.testing.assert_close(losses["loss"], ((eps - noise) ** 2).mean(dim=(1, 2, 3)))
    assert torch.all(losses["vb"] == 0)


@pytest.mark.parametrize("t", [0, 1, 300, 999])
def test_v_prediction_target_and_epsilon_match_diffusers(t: int) -> None:
    """v = √ᾱ ε − √(1 − ᾱ) x0 is diffusers' get_velocity; ε comes back from (v, x_t); the same mean and variance."""
    scheduler, ts = ddpm(float64=False), torch.full((2,), t)
    x0, noise = randn(2, *SHAPE, seed=1), randn(2, *SHAPE, seed=2)
    v_model, eps_model = GaussianDiffusion(prediction_type="v_prediction"), GaussianDiffusion()
    v = v_model.target(x0, ts, noise)
    torch.testing.assert_close(v, scheduler.get_velocity(x0, noise, ts), rtol=1e-5, atol=1e-6)
    assert torch.equal(eps_model.target(x0, ts, noise), noise)
    x_t = v_model.q_sample(x0, ts, noise)
    torch.testing.assert_close(v_model.epsilon(v, x_t, ts), noise, rtol=1e-5, atol=1e-5)
    variance = randn(2, *SHAPE, seed=3).clamp(-1, 1)
    ours = v_model.p_mean_variance(torch.cat([v, variance], dim=1), x_t, ts)
    reference = eps_model.p_mean_variance(torch.cat([noise, variance], dim=1), x_t, ts)
    for got, want in zip(ours, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_v_prediction_loss_is_the_v_error_and_vb_trains_only_the_variance() -> None:
    diffusion = GaussianDiffusion(prediction_type="v_prediction")
    x0, noise, t = randn(4, *SHAPE, seed=1), randn(4, *SHAPE, seed=2), torch.tensor([0, 10, 500, 999])
    v = diffusion.target(x0, t, noise)
    guess = (v + 0.1 * randn(4, *SHAPE, seed=3)).requires_grad_()
    variance = randn(4, *SHAPE, seed=4).clamp(-1, 1).requires_grad_()
    losses = diffusion.training_losses(torch.cat([guess, variance], dim=1), x0, t, noise)
    torch.testing.assert_close(losses["mse"], ((guess - v) ** 2).mean(dim=(1, 2, 3)))
    losses["vb"].sum().backward()
    assert (guess.grad is None or not guess.grad.any()) and variance.grad.abs().sum() > 0
    perfect = diffusion.training_losses(torch.cat([v, variance.detach()], dim=1), x0, t, noise)
    assert perfect["mse"].abs().max() < 1e-10


def test_wrong_channel_count_is_rejected() -> None:
    x0, noise, t = randn(2, *SHAPE, seed=1), randn(2, *SHAPE, seed=2), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="expected 6 channels"):
        GaussianDiffusion().training_losses(noise, x0, t, noise)
    with pytest.raises(ValueError, match="expected 3 channels"):
        GaussianDiffusion(learn_sigma=False).training_losses(torch.cat([noise, noise], dim=1), x0, t, noise)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_timesteps": 1}, "num_timesteps"),
        ({"beta_start": 0.0}, "beta_start"),
        ({"beta_end": 1e-5}, "beta_end"),
        ({"prediction_type": "sample"}, "prediction_type"),
    ],
)
def test_bad_constructor_arguments_raise(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GaussianDiffusion(**kwargs)


def test_sample_timesteps_uniform_and_seeded() -> None:
    diffusion = GaussianDiffusion()
    t = diffusion.sample_timesteps(20000, torch.Generator().manual_seed(43))
    assert t.dtype == torch.int64 and t.shape == (20000,)
    assert t.min().item() >= 0 and t.max().item() <= 999
    assert torch.equal(t, diffusion.sample_timesteps(20000, torch.Generator().manual_seed(43)))
    # Ten equal bins of 100 steps each get ~2000 draws (binomial sd ≈ 42).
    counts = torch.bincount(t // 100, minlength=10)
    assert counts.numel() == 10 and torch.all((counts - 2000).abs() < 250)
