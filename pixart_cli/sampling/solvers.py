"""Solvers: every sampler is a diffusers scheduler on the training noise schedule, run by one loop.

The noise schedule is the training one (1000 linear betas 1e-4..0.02); ``sample`` runs any of ``SAMPLERS`` with
the same signature, keeping the state in float32 whatever the model's dtype.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pixart_cli.checkpoints.convert import PIXART_SCHEDULER_CONFIG
from pixart_cli.errors import PixartError
from pixart_cli.models.layers import PredictionType

logger = logging.getLogger(__name__)


Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> model output (ε or v[, variance])


DEFAULT_CFG = 4.5


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
    from diffusers import (  # lazy: diffusers adds ~5 s to start-up (docs/reference.md §8)
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        SASolverScheduler,
    )

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
