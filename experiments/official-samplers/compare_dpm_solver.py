"""Our DPM-Solver++ (diffusers' DPMSolverMultistepScheduler) against the official PixArt-α sampler, on random weights.

The official repository samples with its own ``diffusion/model/dpm_solver.py`` (continuous-time DPM-Solver++,
``skip_type="time_uniform"``, multistep, order 2; ``scripts/inference.py``). We sample with diffusers, at parity
with ``PixArtAlphaPipeline``. This script runs both on the same random tiny PixArt, captions and initial noise and
prints the timesteps each visits and how far the final latents are apart. It imports the official file from a
checkout given on the command line (it is not part of this project):

    python experiments/official-samplers/compare_dpm_solver.py PATH/TO/PixArt-alpha [--steps 20]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

from pixart_cli.checkpoints.format import build_model
from pixart_cli.components.text import Captions
from pixart_cli.models import PixArtConfig
from pixart_cli.sampling.guidance import sample_latents


def load_official_solver(repo: Path):
    spec = importlib.util.spec_from_file_location("official_dpm_solver", repo / "diffusion/model/dpm_solver.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("official", type=Path, help="a checkout of github.com/PixArt-alpha/PixArt-alpha")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=4.5)
    args = parser.parse_args()
    official = load_official_solver(args.official)

    torch.manual_seed(0)
    config = PixArtConfig(depth=2, hidden_size=64, num_heads=4, patch_size=2, input_size=16, caption_channels=32,
                          max_length=8)  # fmt: skip
    model = build_model(config).eval()
    for p in model.parameters():  # random weights of a useful scale (a fresh model's zero-initialised output is 0)
        p.data.normal_(0, 0.05)
    b = 4
    cond = Captions(torch.randn(b, 8, 32), torch.ones(b, 8, dtype=torch.long))
    null = Captions(torch.randn(b, 8, 32), torch.ones(b, 8, dtype=torch.long))
    noise = torch.randn(b, 4, 16, 16, generator=torch.Generator().manual_seed(1))

    with torch.no_grad():
        ours = sample_latents(model, noise, cond, null, sampler="dpm-solver", steps=args.steps, cfg=args.cfg)

        visited = []

        def eps(x, t, y, mask=None, **kwargs):  # forward_with_dpmsolver: the ε half of the output
            visited.append(float(t[0]))
            return model(x, t, y, mask)[:, :4]

        betas = torch.linspace(0.0001, 0.02, 1000, dtype=torch.float64)  # get_named_beta_schedule("linear", 1000)
        schedule = official.NoiseScheduleVP(schedule="discrete", betas=betas)
        # model_wrapper concatenates [uncondition, condition] along the batch; the mask goes with the condition.
        model_fn = official.model_wrapper(
            lambda x, t, y, **kw: eps(x, t, y, torch.ones(y.shape[0], 8, dtype=torch.long)),
            schedule, model_type="noise", model_kwargs={}, guidance_type="classifier-free",
            condition=cond.embeddings, unconditional_condition=null.embeddings, guidance_scale=args.cfg,
        )  # fmt: skip
        solver = official.DPM_Solver(model_fn, schedule, algorithm_type="dpmsolver++")
        # (the official solver shows a tqdm bar on stderr)
        theirs = solver.sample(noise.clone(), steps=args.steps, order=2, skip_type="time_uniform", method="multistep")

    print(f"torch {torch.__version__}; {args.steps} steps, CFG {args.cfg}", file=sys.stderr)
    print("official model times (first 4, last 2):", [round(t, 2) for t in visited[:4]], visited[-2:])
    rel = ((ours - theirs).norm() / theirs.norm()).item()
    diff = (ours - theirs).abs().max().item()
    print(
        f"final latents: relative L2 difference {rel:.2e}; max |diff| {diff:.2e} where max |latent| is "
        f"{theirs.abs().max().item():.2e}"
    )


if __name__ == "__main__":
    main()
