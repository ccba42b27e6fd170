"""Does a ShapesWorld checkpoint know its shape words? Denoise real scenes with the true and a swapped shape word.

One-object training scenes are noised to step ``t0`` and denoised (DDIM, clipped, CFG) twice: with their own
dense caption and with the same caption whose shape word names another shape. The exact detector reads the
shape of each result. A model that knows shape words follows the swapped word once ``t0`` is high enough for
the noisy image to no longer show the shape; one that does not keeps the image's shape (low ``t0``) or draws
an arbitrary one (high ``t0``). Colour words can be swapped the same way (``--word colour``) as a control.

``--loss`` is the sampling-free reading: one denoising step at each ``t0`` (same noise for both captions), and how
much the swapped word raises the error of the predicted clean image (in % of the error with the true caption; 0:
the model ignores the word). It moves long before the detector can see a difference in samples.

    python experiments/shapesworld/shape_word_probe.py outputs/mixed-xavier/checkpoints/step-0003000
    python experiments/shapesworld/shape_word_probe.py RUN --t0 300,500,700 --scenes 96 --word colour
    python experiments/shapesworld/shape_word_probe.py RUN --loss --scenes 512 --t0 200,300,400,500,700
"""

from __future__ import annotations

import argparse
import re

import numpy as np
import torch

from pixart_cli.checkpoints.format import instantiate, latest_in_run, load_checkpoint
from pixart_cli.components.text import TextEncoder
from pixart_cli.diffusion import GaussianDiffusion
from pixart_cli.sampling.guidance import call_model, classifier_free_guidance
from pixart_cli.sampling.solvers import make_scheduler, step_options
from pixart_cli.shapesworld import prompts
from pixart_cli.shapesworld import world as shapes
from pixart_cli.shapesworld.detect import detect


def swapped(caption: str, word: str, options: tuple[str, ...], rng: np.random.Generator) -> tuple[str, str]:
    """``caption`` with ``word`` replaced by another of ``options`` (whole words only), and that word."""
    other = str(rng.choice([o for o in options if o != word]))
    return re.sub(rf"\b{word}\b", other, caption), other


@torch.no_grad()
def denoise_from(model, images: torch.Tensor, t0: int, captions, null, *, steps: int, cfg: float, seed: int):
    """DDIM from ``images`` noised to the last solver step at or below ``t0`` (SDEdit), clipped, guided."""
    scheduler = make_scheduler("ddim", clip_x0=True, prediction_type=model.config.prediction_type)
    scheduler.set_timesteps(steps)
    timesteps = [t for t in scheduler.timesteps.tolist() if t <= t0]
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    x = scheduler.add_noise(images, noise, torch.tensor([timesteps[0]]))
    channels, size = images.shape[1], tuple(images.shape[2:])
    denoiser = classifier_free_guidance(lambda x, t, c: call_model(model, x, t, c, size), captions, null, cfg, channels)
    options = step_options("ddim", clip_x0=True)
    for t in timesteps:
        x = scheduler.step(denoiser(x, torch.tensor(t))[:, :channels], t, x, **options, return_dict=False)[0]
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def clean_image_error(model, images: torch.Tensor, t0: int, captions, seed: int) -> float:
    """Mean squared error of the model's predicted clean image (clipped) from ``images`` noised to ``t0``."""
    diffusion = GaussianDiffusion.for_model(model.config)
    t = torch.full((len(images),), t0)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    x_t = diffusion.q_sample(images, t, noise)
    output = call_model(model, x_t, t, captions, tuple(images.shape[2:]))
    pred_x0 = diffusion.p_mean_variance(output, x_t, t).pred_x0
    return ((pred_x0.clamp(-1, 1) - images) ** 2).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="checkpoint directory or training run (its latest checkpoint)")
    parser.add_argument("--t0", default="300,500,700,999", help="noise levels to start from")
    parser.add_argument("--scenes", type=int, default=96)
    parser.add_argument("--word", choices=("shape", "colour"), default="shape")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps over the whole schedule")
    parser.add_argument("--cfg", type=float, default=4.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loss", action="store_true", help="clean-image error increase instead of sampling")
    args = parser.parse_args()

    checkpoint = load_checkpoint(latest_in_run(args.run))
    model = instantiate(checkpoint).float().eval()
    # The encoder the checkpoint was trained with (the shipped demo reads builtin:shapes-t5-roles).
    text_encoder = checkpoint.meta.text_encoder or "builtin:shapes-t5"
    encoder = TextEncoder(text_encoder, max_length=model.config.max_length).load()
    rng = np.random.default_rng(args.seed)
    scenes = [shapes.sample_scene(rng, num_objects=1) for _ in range(args.scenes)]
    pixels = np.stack([np.asarray(shapes.render(scene, model.config.input_size)) for scene in scenes])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    field, options = ("shape", shapes.SHAPES) if args.word == "shape" else ("colour", tuple(shapes.COLOUR_NAMES))
    truth = [getattr(scene.objects[0], field) for scene in scenes]
    true_captions = [prompts.caption(scene, "dense", rng) for scene in scenes]
    pairs = [swapped(c, w, options, rng) for c, w in zip(true_captions, truth, strict=True)]
    null = encoder.encode([""] * len(scenes))

    def read(images: np.ndarray) -> list[str | None]:
        found = [detect(image).objects for image in images]
        return [getattr(objects[0], field) if objects else None for objects in found]

    if args.loss:
        right, wrong = encoder.encode(true_captions), encoder.encode([c for c, _ in pairs])
        print(f"{args.run}: {args.scenes} one-object scenes, {args.word} word swapped; clean-image error")
        for t0 in (int(v) for v in args.t0.split(",")):
            base = clean_image_error(model, images, t0, right, args.seed)
            worse = clean_image_error(model, images, t0, wrong, args.seed)
            print(f"t0={t0:4d}  true caption {base:.4f}   swapped {worse:.4f}   (+{100 * (worse - base) / base:.1f}%)")
        return
    print(f"{args.run}: {args.scenes} one-object scenes, {args.word} word swapped; chance 1/{len(options)}")
    for t0 in (int(v) for v in args.t0.split(",")):
        kept = read(denoise_from(model, images, t0, encoder.encode(true_captions), null, **vars_of(args)))
        moved = read(denoise_from(model, images, t0, encoder.encode([c for c, _ in pairs]), null, **vars_of(args)))
        right = np.mean([a == b for a, b in zip(kept, truth, strict=True)])
        follows = np.mean([a == w for a, (_, w) in zip(moved, pairs, strict=True)])
        stays = np.mean([a == b for a, b in zip(moved, truth, strict=True)])
        print(
            f"t0={t0:4d}  true caption: {args.word} right {right:.2f}   swapped caption: follows the caption "
            f"{follows:.2f}, keeps the image's {stays:.2f}"
        )


def vars_of(args: argparse.Namespace) -> dict:
    return {"steps": args.steps, "cfg": args.cfg, "seed": args.seed}


if __name__ == "__main__":
    main()
