"""Glue between a recipe and the trainer: the batch source and the validation sampler.

The batch source reads the feature cache (`pixart prepare`) when ``data.cache`` holds one, and otherwise decodes
and encodes images on the fly with the same encoders. Both give the same batches layout (see
``train.BatchSource``); each process reads its own slice of every global batch.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from pixart_cli.components.autoencoders import load_autoencoder
from pixart_cli.components.text import TextEncoder
from pixart_cli.data.buckets import Buckets
from pixart_cli.data.cache import INDEX, same_component
from pixart_cli.data.loader import CachedDataset, LoaderBatches, OnTheFlyDataset, make_loader
from pixart_cli.data.sources import Source, UnknownCaptionField, read_source
from pixart_cli.errors import PixartError
from pixart_cli.models import DiTConfig
from pixart_cli.sampling.pipeline import Pipeline
from pixart_cli.sampling.settings import SampleSettings
from pixart_cli.shapesworld.dataset import write_dataset
from pixart_cli.training.recipe import Recipe, caption_field_error

logger = logging.getLogger(__name__)


def ensure_shapes_dataset(recipe: Recipe) -> None:
    """Generate the ShapesWorld dataset a recipe asks for (``data.shapes``, validated when the recipe loaded) on
    first use."""
    shapes = recipe.data.shapes
    if shapes is None or recipe.data.path is None:
        return

    path = Path(recipe.data.path)
    target = path.parent if path.suffix == ".jsonl" else path
    if target.exists() and any(target.iterdir()):
        return
    logger.info("generating ShapesWorld data in %s", target)
    write_dataset(target, **dataclasses.asdict(shapes))


def _check_cache(index: dict, recipe: Recipe, cache: Path, prepare_command: str) -> None:
    config = recipe.model_config()
    problems = []
    if isinstance(config, DiTConfig):
        if index.get("conditioning") != "label":
            problems.append("stage 1 needs a class-labelled cache")
    else:
        if index.get("conditioning") != "caption":
            problems.append(f"stage {recipe.stage} needs captions, the cache has class labels")
        if index.get("caption_channels") not in (None, config.caption_channels):
            problems.append(
                f"caption features are {index['caption_channels']} wide, the model takes {config.caption_channels}"
            )
        if index.get("max_length") not in (None, config.max_length):
            problems.append(f"captions are {index['max_length']} tokens, the model takes {config.max_length}")
        # Features of another encoder would train the model on the wrong inputs without a sound.
        if not same_component(index.get("text_encoder"), recipe.data.text_encoder):
            problems.append(
                f"its captions were encoded by {index['text_encoder']}, data.text_encoder is "
                f"{recipe.data.text_encoder} (prepare another cache, or name that encoder)"
            )
    if not same_component(index.get("vae"), recipe.data.vae):
        problems.append(f"it was encoded by the VAE {index['vae']}, data.vae is {recipe.data.vae}")
    if index.get("latent_channels") not in (None, config.in_channels):
        problems.append(f"latents have {index['latent_channels']} channels, the model takes {config.in_channels}")
    if problems:
        raise PixartError(f"data.cache: {cache} does not fit the recipe ({'; '.join(problems)})")
    if index.get("conditioning") == "caption":
        held = index.get("caption_fields") or ["caption"]  # caches that predate caption fields hold `caption`
        if missing := [f for f in recipe.data.caption_fields if f not in held]:
            key = f"data.captions.{missing[0]}" if recipe.data.captions else "data.cache"
            raise PixartError(
                f"{key}: the cache {cache} has no caption field {missing[0]!r} (it holds {', '.join(held)}); "
                f"`{prepare_command}` makes one with every field the recipe names"
            )


def batch_source(
    recipe: Recipe, accelerator: Any, *, prepare_command: str = "pixart prepare RECIPE --overwrite"
) -> LoaderBatches:
    """This process's bucketed, resumable batches for ``recipe``.

    ``prepare_command``: the command that makes the recipe's cache, for the error on a cache without a caption
    field the recipe asks for.
    """
    data = recipe.data
    if accelerator.is_main_process:  # one writer; the others wait, then read the finished dataset
        ensure_shapes_dataset(recipe)
    accelerator.wait_for_everyone()
    cache = Path(data.cache) if data.cache else None
    if cache is not None and (cache / INDEX).is_file():
        dataset = CachedDataset(cache)
        _check_cache(dataset.info, recipe, cache, prepare_command)
        logger.info("data: %d cached items from %s", len(dataset), cache)
        _check_fills_a_batch(len(dataset), recipe, accelerator)
        loader = make_loader(
            dataset,
            recipe.train.batch_size,
            seed=recipe.train.seed,
            num_replicas=accelerator.num_processes,
            rank=accelerator.process_index,
            num_workers=data.num_workers,
            captions=data.caption_mix,  # each item's caption field: a pure function of (seed, epoch, item)
        )
        return LoaderBatches(loader, seed=recipe.train.seed, rank=accelerator.process_index)
    if data.path is None:
        raise PixartError("data.path: no dataset given (and no feature cache at data.cache)")
    try:
        source = read_source(data.path, data.kind, caption_fields=data.caption_fields)
    except UnknownCaptionField as exc:
        raise caption_field_error(exc) from None
    logger.info("data: %d images from %s, encoded on the fly", len(source.records), data.path)
    return on_the_fly_batches(source, recipe, accelerator)


def _check_fills_a_batch(items: int, recipe: Recipe, accelerator: Any) -> None:
    if items < recipe.train.batch_size * accelerator.num_processes:
        raise PixartError(
            f"data: {items} items cannot fill one global batch of {recipe.train.batch_size * accelerator.num_processes}"
        )


def on_the_fly_batches(
    source: Source, recipe: Recipe, accelerator: Any, *, seed: int | None = None, encoders: tuple | None = None
) -> LoaderBatches:
    """Batches of ``source``'s images and captions, encoded as they are read with the recipe's encoders
    (``encoders``: an (autoencoder, text encoder) pair already loaded, to share); ``seed``: default train.seed."""
    data, config = recipe.data, recipe.model_config()
    if encoders is not None:
        autoencoder, text_encoder = encoders
    else:
        autoencoder, text_encoder = load_autoencoder(data.vae, device=accelerator.device), None
        if not isinstance(config, DiTConfig):
            if not data.text_encoder:
                raise PixartError("data.text_encoder: a PixArt stage needs a T5 text encoder")
            text_encoder = TextEncoder(data.text_encoder, max_length=config.max_length, device=accelerator.device)
    multiple = autoencoder.downsample * config.patch_size
    dataset = OnTheFlyDataset(source.records, Buckets.for_resolution(data.resolution, data.multi_scale, multiple))
    _check_fills_a_batch(len(dataset), recipe, accelerator)
    seed = recipe.train.seed if seed is None else seed
    loader = make_loader(
        dataset,
        recipe.train.batch_size,
        seed=seed,
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
        num_workers=data.num_workers,
        captions=data.caption_mix,
    )
    batches = LoaderBatches(
        loader, seed=seed, rank=accelerator.process_index, autoencoder=autoencoder, text_encoder=text_encoder
    )
    # What the data left out so far; decoding adds to it as it goes.
    batches.faults.missing_captions = source.skipped_captions
    batches.faults.unreadable.update({str(path): reason for path, reason in source.bad})  # caption not text
    batches.faults.unreadable.update({str(bad.path): bad.reason for bad in dataset.bad})
    batches.max_unreadable = int(data.max_bad_fraction * (len(source.records) + len(source.bad)))
    batches.check_faults()  # too many known already: stop before the first step
    return batches


class HeldOutBatches:
    """This process's held-out micro-batches (``validation``), on the CPU, each with its ``x0`` drawn once: the
    same inputs at every measurement. The data is found and checked when this is made; it is read and encoded at
    the first measurement, once the training loader's worker processes exist (forking them after this process ran
    its encoders' thread pools can hang them)."""

    def __init__(self, source: Any, count: int) -> None:
        self._source, self._count = source, count
        self._batches: list[dict] | None = None

    def __call__(self) -> list[dict]:
        if self._batches is None:
            stream = self._source.iterate(0, 0, "cpu")
            self._batches = [
                {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
                for _, _, batch in itertools.islice(stream, self._count)
            ]
            stream.close()
        return self._batches


def validation_batches(recipe: Recipe, accelerator: Any) -> HeldOutBatches | None:
    """The held-out batches of ``validation`` (None when it is off); see :class:`HeldOutBatches`."""
    validation = recipe.validation
    if not validation.every:
        return None
    data = dataclasses.replace(  # read in this process: a few batches, once (no loader workers left running)
        recipe.data,
        path=validation.path,
        cache=validation.cache,
        shapes=validation.shapes,
        captions=None,
        num_workers=0,
    )
    held_out = dataclasses.replace(recipe, data=data, dreambooth=None)
    source = batch_source(held_out, accelerator, prepare_command="pixart prepare VALIDATION_DATA")
    logger.info("validation: %d batches of %s every %d steps", validation.batches, validation.path or validation.cache,
                validation.every)  # fmt: skip
    return HeldOutBatches(source, validation.batches)


def validation_sampler(recipe: Recipe) -> Callable[[nn.Module, int], None] | None:
    """A function that writes a grid of ``log.sample_prompts`` with the EMA model (None when not configured)."""
    if not recipe.log.sample_every or not recipe.log.sample_prompts or recipe.model.architecture != "PixArt":
        return None

    # Built (validated) before training starts, not at the first grid hours in.
    settings = SampleSettings(steps=recipe.log.sample_steps, cfg=recipe.log.sample_cfg, seed=recipe.train.seed)
    jobs = settings.jobs(list(recipe.log.sample_prompts))
    state: dict[str, Any] = {}
    out_dir = Path(recipe.output.dir) / "samples"

    def sample(model: nn.Module, step: int) -> None:
        device = next(model.parameters()).device
        if not state:
            state["text"] = TextEncoder(recipe.data.text_encoder, max_length=model.config.max_length, device=device)
            state["autoencoder"] = load_autoencoder(recipe.data.vae, device=device)
        pipeline = Pipeline(model, state["text"], state["autoencoder"], device=device, name=f"step {step}")
        images = [image for _, image in pipeline.generate(jobs, settings)]
        out_dir.mkdir(parents=True, exist_ok=True)
        grid(images).save(out_dir / f"step-{step:07d}.png")

    return sample


def grid(images: list, columns: int | None = None):
    """Images side by side (rows of ``columns``)."""

    columns = columns or len(images)
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        canvas.paste(image, ((i % columns) * w, (i // columns) * h))
    return canvas
