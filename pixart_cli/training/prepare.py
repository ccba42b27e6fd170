"""The feature cache a recipe trains on: ``pixart prepare RECIPE`` as a library call.

``pixart train`` uses a cache only if its recorded settings fit the recipe (``batches._check_cache``), so here
they come from the recipe and its model rather than from defaults: the dataset, the cache directory, the encoders,
the resolution and buckets, the dataset layout, the caption length and the caption fields (``data.captions``).
Under ``torchrun``/``accelerate launch`` the processes share the work as ``data.cache.prepare`` describes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from pixart_cli.components.autoencoders import Autoencoder, load_autoencoder
from pixart_cli.components.t5 import T5Quantization
from pixart_cli.data.cache import PrepareProgress, PrepareReport, PrepareSettings, prepare
from pixart_cli.data.sources import UnknownCaptionField
from pixart_cli.distributed import Dist
from pixart_cli.errors import PixartError
from pixart_cli.models import DiTConfig
from pixart_cli.training.batches import ensure_shapes_dataset
from pixart_cli.training.recipe import caption_field_error, load_recipe


@dataclass(frozen=True)
class RecipeCache:
    """A recipe's cache, resolved: its dataset, directory and settings, and the encoders that fill it.

    ``device`` and ``dtype`` are those the VAE was loaded with; ``prepare`` runs the encoders there.
    """

    data: Path
    output: Path
    settings: PrepareSettings
    t5: str | None
    vae: Autoencoder
    device: torch.device | str = "cpu"
    dtype: torch.dtype | None = None
    t5_quant: T5Quantization = "none"

    def prepare(
        self, *, overwrite: bool = False, progress: Callable[[PrepareProgress], None] | None = None
    ) -> PrepareReport | None:
        """Build (or resume, or find complete) the cache; see ``data.cache.prepare`` (None in the processes of a
        launch other than the first)."""
        try:
            return prepare(
                self.data,
                self.output,
                self.settings,
                t5=self.t5,
                vae=self.vae,
                device=self.device,
                dtype=self.dtype,
                overwrite=overwrite,
                progress=progress,
                t5_quant=self.t5_quant,
            )
        except UnknownCaptionField as exc:
            raise caption_field_error(exc) from None


def recipe_cache(
    recipe: str | os.PathLike,
    overrides: Sequence[str] = (),
    *,
    output: str | os.PathLike | None = None,
    t5: str | None = None,
    vae: str | None = None,
    max_length: int = 120,
    batch_size: int = 32,
    shard_size: int = 1024,
    storage_dtype: Literal["float16", "float32"] = "float16",
    keep_empty_captions: bool = False,
    max_bad_fraction: float | None = None,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    t5_quant: T5Quantization = "none",
) -> RecipeCache:
    """Resolve the cache ``recipe`` trains on; ``.prepare()`` on the result builds it.

    Loads the recipe (with ``--set``-style ``overrides``), generates its ShapesWorld dataset if it asks for one and
    is not there yet (in process 0 of a launch, the others waiting), and loads its VAE on ``device`` (a bare
    ``cuda``: each process's own GPU). ``output``, ``t5`` and ``vae`` replace the recipe's
    ``data.cache``, ``data.text_encoder`` and ``data.vae``; ``max_length`` serves only a model without its own
    (DiT: no captions); ``max_bad_fraction`` defaults to the recipe's. The other arguments are ``PrepareSettings``'.
    """
    loaded, _ = load_recipe(recipe, tuple(overrides))
    config = loaded.model_config()
    data = loaded.data
    if data.path is None:
        raise PixartError(f"{recipe}: data.path is not set")
    output = output or (Path(data.cache) if data.cache else None)
    if output is None:
        raise PixartError(f"{recipe}: data.cache is not set; pass -o")
    # Validated before a dataset is generated or a VAE loaded; the bucket multiple is filled in once the VAE is.
    settings = PrepareSettings(
        resolution=data.resolution,
        multi_scale=data.multi_scale,
        kind=data.kind,
        batch_size=batch_size,
        shard_size=shard_size,
        max_length=getattr(config, "max_length", max_length),
        storage_dtype=storage_dtype,
        keep_empty_captions=keep_empty_captions,
        max_bad_fraction=data.max_bad_fraction if max_bad_fraction is None else max_bad_fraction,
        num_workers=num_workers,
        caption_fields=data.caption_fields,
    )
    dist = Dist.from_environment()
    device = dist.device(device)
    t5 = t5 or (None if isinstance(config, DiTConfig) else data.text_encoder)
    autoencoder = load_autoencoder(vae or data.vae, dtype=dtype, device=device)
    if data.shapes is not None and dist.world > 1:  # one process writes the dataset, the others then read it
        if dist.is_main:
            ensure_shapes_dataset(loaded)
        dist.barrier()
    else:
        ensure_shapes_dataset(loaded)
    # Buckets must tile into whole patches of latent pixels: the encoder's own downsampling × the patch size.
    settings = dataclasses.replace(settings, bucket_multiple=autoencoder.downsample * config.patch_size)
    return RecipeCache(Path(data.path), Path(output), settings, t5, autoencoder, device, dtype, t5_quant)
