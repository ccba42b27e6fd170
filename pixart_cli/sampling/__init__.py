"""Sampling: prompts → images with a PixArt transformer.

Layers, from the bottom (each module imports only those above it in this list):

* ``solvers``: every solver is a diffusers scheduler on the training noise schedule, run by one loop (``sample``).
* ``guidance``: a model call, classifier-free guidance as one wrapper, ``sample_latents`` over caption features.
* ``size``: the image size to sample (base size, aspect-ratio buckets) and the memory a batch needs.
* ``settings``: ``SampleSettings``, a run's sampling settings, validated once and passed down; ``Job``, one image.
* ``pipeline``: ``Pipeline``, prompts → PIL images from a checkpoint, a diffusers pipeline or an official ``.pth``.
* ``writer``: ``write_samples``, the library side of `pixart sample` (PNGs + manifest, resumable).

Seeds are per image: image j of a prompt uses ``seed + j``, drawn from its own CPU ``torch.Generator`` (initial
noise first, then any noise a stochastic solver needs), so an image does not depend on the batch it ran in nor on
the device.
"""

from pixart_cli.sampling.guidance import call_model, classifier_free_guidance, sample_latents, seeded_noise, to_pil
from pixart_cli.sampling.pipeline import Pipeline
from pixart_cli.sampling.settings import Job, SampleSettings, make_jobs
from pixart_cli.sampling.size import resolve_size
from pixart_cli.sampling.solvers import DEFAULT_CFG, SAMPLERS, make_scheduler, sample
from pixart_cli.sampling.writer import SampleReport, write_samples

__all__ = [
    "DEFAULT_CFG",
    "SAMPLERS",
    "Job",
    "Pipeline",
    "SampleReport",
    "SampleSettings",
    "call_model",
    "classifier_free_guidance",
    "make_jobs",
    "make_scheduler",
    "resolve_size",
    "sample",
    "sample_latents",
    "seeded_noise",
    "to_pil",
    "write_samples",
]
