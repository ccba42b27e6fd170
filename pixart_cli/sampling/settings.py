"""``SampleSettings``: how to sample, validated once where a run starts and then passed down unchanged.

`pixart sample`, `pixart eval-*`, training's validation grids and ``Pipeline.__call__`` each build one;
``write_samples``, ``Pipeline.generate`` and the benchmark image maker only read it. Also the unit of work,
``Job`` (one image: a prompt and its seed), and ``make_jobs``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pixart_cli.errors import PixartError
from pixart_cli.sampling.solvers import DEFAULT_CFG, MAX_STEPS, check_sampler

MAX_IMAGES = 1_000_000  # per run: the job list, the records and the resume scan are held in memory


@dataclass(frozen=True)
class Job:
    """One image to make: prompt ``prompt_index`` of the list, with its own seed."""

    prompt_index: int
    prompt: str
    seed: int


@dataclass(frozen=True)
class SampleSettings:
    """The settings of one sampling run; constructing one validates it (``PixartError`` naming the CLI flag).

    ``steps`` None becomes the sampler's default here, so the settings (and what is recorded) name the number
    actually run. ``height``/``width`` None: the model's own size, which ``Pipeline.image_size`` resolves.
    ``seed`` and ``num_images_per_prompt`` describe the jobs (``jobs``): image j of every prompt uses seed + j;
    ``Pipeline.generate`` reads the seeds from the jobs it is given, so benchmarks can lay out their own.
    """

    sampler: str = "dpm-solver"
    steps: int | None = None
    cfg: float = DEFAULT_CFG
    seed: int = 0
    num_images_per_prompt: int = 1
    batch_size: int = 4
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None

    def __post_init__(self) -> None:
        spec = check_sampler(self.sampler)
        if self.steps is None:
            object.__setattr__(self, "steps", spec.default_steps)  # frozen: resolved once, here
        elif self.steps <= 0:
            raise PixartError(f"--steps must be positive, got {self.steps}")
        elif self.steps > MAX_STEPS:
            raise PixartError(
                f"--steps can be at most {MAX_STEPS} (the training schedule's timesteps), got {self.steps}"
            )
        if not math.isfinite(self.cfg) or self.cfg < 0:
            raise PixartError(f"--cfg must be a non-negative number, got {self.cfg}")
        if self.batch_size <= 0:
            raise PixartError(f"--batch-size must be positive, got {self.batch_size}")
        _check_count(self.num_images_per_prompt)
        _check_seed(self.seed, self.num_images_per_prompt)

    def check_image_count(self, prompts: int) -> None:
        """Refuse a run of more than ``MAX_IMAGES`` images for ``prompts`` prompts, before any list is built."""
        check_image_count(prompts, self.num_images_per_prompt)

    def jobs(self, prompts: Sequence[str]) -> list[Job]:
        """The run's images: image j of prompt i uses seed + j."""
        _check_prompts(prompts)
        self.check_image_count(len(prompts))
        return _jobs(prompts, self.num_images_per_prompt, self.seed)

    def record(self, size: tuple[int, int], model: str) -> dict[str, object]:
        """The settings each image's record holds (PNG text chunk and manifest line), at the resolved ``size``
        (height, width) for ``model``. Keys and values as every earlier version wrote them, so folders resume."""
        height, width = size
        return {
            "sampler": self.sampler,
            "steps": self.steps,
            "cfg": self.cfg,
            "negative_prompt": self.negative_prompt or "",
            "height": height,
            "width": width,
            "model": model,
        }


def make_jobs(prompts: Sequence[str], num_images_per_prompt: int, seed: int) -> list[Job]:
    """Image j of prompt i uses seed + j (prompts share seeds, so a seed gives comparable images across prompts)."""
    _check_prompts(prompts)
    check_image_count(len(prompts), num_images_per_prompt)
    _check_seed(seed, num_images_per_prompt)
    return _jobs(prompts, num_images_per_prompt, seed)


def check_image_count(prompts: int, num_images_per_prompt: int) -> None:
    """Refuse a non-positive ``-n`` and runs of more than ``MAX_IMAGES`` images, before any list is built."""
    _check_count(num_images_per_prompt)
    if prompts * num_images_per_prompt > MAX_IMAGES:
        raise PixartError(
            f"a run makes at most {MAX_IMAGES:,} images; {prompts:,} prompt(s) × {num_images_per_prompt:,} images "
            f"is {prompts * num_images_per_prompt:,}"
        )


def _jobs(prompts: Sequence[str], num_images_per_prompt: int, seed: int) -> list[Job]:
    return [Job(i, p, seed + j) for i, p in enumerate(prompts) for j in range(num_images_per_prompt)]


def _check_prompts(prompts: Sequence[str]) -> None:
    if not prompts:
        raise PixartError("no prompts given")


def _check_count(num_images_per_prompt: int) -> None:
    if num_images_per_prompt <= 0:
        raise PixartError(f"number of images per prompt must be positive, got {num_images_per_prompt}")


def _check_seed(seed: int, num_images_per_prompt: int) -> None:
    if not -(2**63) <= seed <= 2**64 - num_images_per_prompt:  # what torch.Generator.manual_seed accepts
        raise PixartError(f"--seed must be in [-2^63, 2^64 - {num_images_per_prompt}], got {seed}")
