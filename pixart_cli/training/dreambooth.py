"""DreamBooth (Ruiz et al. 2023, arXiv 2208.12242): one subject from a few images, under an identifier prompt.

Every image at ``data.path`` is captioned ``dreambooth.instance_prompt`` (or keeps its own caption). With
``class_prompts`` (prior preservation), the base model first draws ``class_images`` images per prompt — with
``pixart sample``'s writer, at ``data.resolution``, so they are resumable, recorded and reused by later runs — and
every micro-batch then holds ``train.batch_size`` instance images followed by as many class images; the loss is the
instance images' mean plus ``prior_loss_weight`` times the class images' mean (per-sample weights ``loss_weight``
in the batch).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pixart_cli.data.loader import DataFaults, LoaderBatches
from pixart_cli.data.sources import Record, Source, read_source
from pixart_cli.errors import PixartError
from pixart_cli.sampling.pipeline import Pipeline
from pixart_cli.sampling.settings import SampleSettings
from pixart_cli.sampling.writer import MANIFEST, image_name, read_manifest, write_samples
from pixart_cli.training.batches import ensure_shapes_dataset, on_the_fly_batches
from pixart_cli.training.recipe import Recipe

logger = logging.getLogger(__name__)

CLASS_DIR = "class-images"
_CLASS_SEED_OFFSET = 1  # the class images' loader draws from its own stream


def class_dir(recipe: Recipe) -> Path:
    section = recipe.dreambooth
    assert section is not None
    return Path(section.class_dir) if section.class_dir else Path(recipe.output.dir) / CLASS_DIR


def class_settings(recipe: Recipe) -> SampleSettings:
    """How the class images are drawn: ``class_images`` per class prompt, square at ``data.resolution``."""
    section = recipe.dreambooth
    assert section is not None
    side = recipe.data.resolution
    return SampleSettings(
        steps=section.class_steps, cfg=section.class_cfg, seed=recipe.train.seed,
        num_images_per_prompt=section.class_images, batch_size=min(8, section.class_images), height=side, width=side,
    )  # fmt: skip


def _class_files(recipe: Recipe) -> list[tuple[str, str]]:
    """(file name, prompt) of each class image this recipe asks for."""
    section = recipe.dreambooth
    assert section is not None
    return [(image_name(job), job.prompt) for job in class_settings(recipe).jobs(list(section.class_prompts))]


def make_class_images(recipe: Recipe, device: torch.device) -> Path:
    """Draw the class images with the base model (``model.init``) into :func:`class_dir`, in the run's
    precision (bf16 on a GPU); when every one is there already, the base is not even loaded."""
    section = recipe.dreambooth
    assert section is not None and section.class_prompts
    out = class_dir(recipe)
    records = read_manifest(out / MANIFEST) if (out / MANIFEST).is_file() else {}
    missing = [name for name, _ in _class_files(recipe) if name not in records or not (out / name).is_file()]
    if not missing:
        logger.info("class images: all %d in %s", len(records), out)
        return out
    pipeline = Pipeline.from_pretrained(
        recipe.model.init, t5=recipe.data.text_encoder, vae=recipe.data.vae, device=device
    )
    report = write_samples(pipeline, list(section.class_prompts), out, class_settings(recipe))
    logger.info("class images: %d drawn, %d kept from before, in %s", len(report.written), len(report.skipped), out)
    del pipeline
    return out


def instance_source(recipe: Recipe) -> Source:
    """The subject's images, each captioned with the instance prompt (their own captions are not read), or with
    its own caption without one."""
    section = recipe.dreambooth
    assert section is not None
    if recipe.data.path is None:
        raise PixartError("data.path: DreamBooth needs the subject's images (a folder of a few images)")
    if recipe.data.cache:
        raise PixartError("data.cache: DreamBooth encodes its few images as it trains; leave data.cache out")
    if section.instance_prompt is None:
        return read_source(recipe.data.path, recipe.data.kind)
    source = read_source(recipe.data.path, recipe.data.kind, keep_empty_captions=True)
    records = [dataclasses.replace(r, caption=section.instance_prompt, captions={}) for r in source.records]
    return dataclasses.replace(source, records=records)


def class_source(recipe: Recipe) -> Source:
    """The class images this recipe asked for (others in a shared ``class_dir`` are not read), each captioned as
    the base read its prompt (a completed prompt, for a model that completes them)."""
    directory = class_dir(recipe)
    records = read_manifest(directory / MANIFEST) if (directory / MANIFEST).is_file() else {}
    out = []
    for name, prompt in _class_files(recipe):
        record = records.get(name)
        if record is None or record.get("prompt") != prompt or not (directory / name).is_file():
            raise PixartError(f"{directory / name}: a class image of {prompt!r} is missing; run again to draw it")
        out.append(Record(path=(directory / name).resolve(), caption=record.get("caption", prompt)))
    return Source("captions", directory, out)


class PriorPreservationBatches:
    """Instance batches followed, in the same micro-batch, by class batches: the trainer's batch source.

    The data position is the instance source's; the class source's is the same count of batches into its own
    epochs, so a resumed run reads the same class images at every step.
    """

    def __init__(self, instance: LoaderBatches, prior: LoaderBatches, prior_loss_weight: float) -> None:
        self.instance, self.prior, self.weight = instance, prior, prior_loss_weight

    @property
    def faults(self) -> DataFaults:
        """What both sources left out."""
        both = DataFaults(dict(self.instance.faults.unreadable), self.instance.faults.missing_captions)
        both.unreadable.update(self.prior.faults.unreadable)
        both.missing_captions += self.prior.faults.missing_captions
        return both

    def iterate(self, epoch: int, start: int, device: torch.device | str) -> Iterator[tuple[int, int, dict]]:
        done = epoch * len(self.instance) + start  # micro-batches already read
        prior = self.prior.iterate(done // len(self.prior), done % len(self.prior), device)
        instance = self.instance.iterate(epoch, start, device)
        # Both are endless: zip ends only when the trainer stops asking.
        for (at_epoch, position, batch), (_, _, extra) in zip(instance, prior, strict=False):
            yield at_epoch, position, combine(batch, extra, self.weight)


def _pad_tokens(tensor: torch.Tensor, length: int) -> torch.Tensor:
    if tensor.shape[1] == length:
        return tensor
    pad = tensor.new_zeros((tensor.shape[0], length - tensor.shape[1], *tensor.shape[2:]))
    return torch.cat([tensor, pad], dim=1)


def combine(instance: dict[str, Any], prior: dict[str, Any], prior_loss_weight: float) -> dict[str, Any]:
    """One batch of both, captions padded to a common length; ``loss_weight`` makes the summed loss the
    instance mean plus ``prior_loss_weight`` × the class mean."""
    if instance["x0"].shape[1:] != prior["x0"].shape[1:]:
        raise PixartError(
            f"dreambooth: instance images of {tuple(instance['x0'].shape[2:])} and class images of "
            f"{tuple(prior['x0'].shape[2:])} cannot share a batch (give the instance images the class images' size)"
        )
    length = max(instance["caption"].shape[1], prior["caption"].shape[1])
    a, b = instance["x0"].shape[0], prior["x0"].shape[0]
    out = {key: torch.cat([instance[key], prior[key]]) for key in ("resolution", "aspect_ratio") if key in instance}
    out |= {
        "x0": torch.cat([instance["x0"], prior["x0"]]),
        "caption": torch.cat([_pad_tokens(instance["caption"], length), _pad_tokens(prior["caption"], length)]),
        "caption_mask": torch.cat(
            [_pad_tokens(instance["caption_mask"], length), _pad_tokens(prior["caption_mask"], length)]
        ),
    }
    device = out["x0"].device
    out["loss_weight"] = torch.cat([torch.full((a,), 1.0 / a), torch.full((b,), prior_loss_weight / b)]).to(device)
    return out


def dreambooth_batches(recipe: Recipe, accelerator: Any) -> LoaderBatches | PriorPreservationBatches:
    """The batch source of a ``dreambooth:`` recipe (class images drawn first where prior preservation asks)."""
    section = recipe.dreambooth
    assert section is not None
    if section.class_prompts:
        wanted = recipe.train.batch_size * accelerator.num_processes
        if section.class_images * len(section.class_prompts) < wanted:
            raise PixartError(
                f"dreambooth.class_images: {section.class_images} per prompt × {len(section.class_prompts)} "
                f"prompts cannot fill a global batch of {wanted}"
            )
        if accelerator.is_main_process:  # first: the base's pipeline is freed before the training encoders load
            make_class_images(recipe, accelerator.device)
    if accelerator.is_main_process:
        ensure_shapes_dataset(recipe)
    accelerator.wait_for_everyone()
    instance = on_the_fly_batches(instance_source(recipe), recipe, accelerator)
    captioned = repr(section.instance_prompt) if section.instance_prompt else "with their own captions"
    logger.info("data: %d instance images, captioned %s", len(instance.loader.dataset), captioned)
    if not section.class_prompts:
        return instance
    source = class_source(recipe)
    prior = on_the_fly_batches(
        source, recipe, accelerator, seed=recipe.train.seed + _CLASS_SEED_OFFSET,
        encoders=(instance.autoencoder, instance.text_encoder),
    )  # fmt: skip
    logger.info("data: %d class images of %s", len(source.records), ", ".join(map(repr, section.class_prompts)))
    square = set(prior.loader.dataset.bucket_of)
    if other := set(instance.loader.dataset.bucket_of) - square:
        raise PixartError(
            f"dreambooth: {sum(b in other for b in instance.loader.dataset.bucket_of)} instance images fall in other "
            "aspect-ratio buckets than the square class images; crop them square, or set data.multi_scale: false"
        )
    return PriorPreservationBatches(instance, prior, section.prior_loss_weight)
