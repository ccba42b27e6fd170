"""``Pipeline``: prompts → PIL images, from our checkpoint, a diffusers pipeline or an official ``.pth``.

It loads the transformer, the T5 text encoder and the autoencoder once, encodes each distinct prompt once, and
makes images ``batch_size`` at a time; image j of a prompt uses seed + j.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import torch
from huggingface_hub import snapshot_download
from PIL import Image
from torch import nn

from pixart_cli.adapters.format import apply_adapters
from pixart_cli.checkpoints.convert import read_any
from pixart_cli.checkpoints.format import instantiate, is_checkpoint_dir, latest_in_run, read_config
from pixart_cli.components.autoencoders import Autoencoder, load_autoencoder
from pixart_cli.components.resolve import offline_hint, resolve_builtin
from pixart_cli.components.t5 import T5Quantization
from pixart_cli.components.text import Captions, TextEncoder
from pixart_cli.errors import PixartError
from pixart_cli.models import PixArtConfig
from pixart_cli.sampling.guidance import sample_latents, seeded_noise, to_pil
from pixart_cli.sampling.settings import Job, SampleSettings
from pixart_cli.sampling.size import activation_bytes, available_memory, resolve_size
from pixart_cli.sampling.solvers import DEFAULT_CFG
from pixart_cli.shapesworld.demo import demo_model, prompt_completion

logger = logging.getLogger(__name__)


NullCaption = Literal["embedding", "t5-empty"]


PromptCompletion = Callable[[str, int], str]  # (prompt, seed) -> the caption to encode


def default_model() -> str | None:
    """The model ``pixart sample`` uses without ``--model``: the bundled ShapesWorld demo, when installed."""
    return demo_model()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on CUDA (T5 overflows in fp16), fp32 elsewhere."""
    device = torch.device(device)
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_model(name: str | os.PathLike) -> Path:
    """A local path, a built-in asset (``builtin:shapes-demo``), or a diffusers pipeline hub id resolved through
    the Hugging Face cache (download if online)."""
    path = Path(resolve_builtin(str(name))).expanduser()
    if path.exists():
        if not os.access(path, os.R_OK):
            raise PixartError(f"{name}: not readable")
        return path
    text = str(name)
    if _HUB_ID.fullmatch(text) and not text.startswith((".", "~")):
        try:
            return Path(snapshot_download(text, local_files_only=bool(os.environ.get("HF_HUB_OFFLINE"))))
        except (OSError, ValueError):
            raise PixartError(
                f"{offline_hint(text, 'model')} (or, if you meant a local path, it does not exist)"
            ) from None
    raise PixartError(f"{name}: no such model file or directory")


def _prompt_completion(model: object, recorded: str | None, complete_prompts: bool | None) -> PromptCompletion | None:
    """The completion the checkpoint records (``meta.prompt_completion``) unless ``complete_prompts`` is False;
    True where it records none is an error."""
    completion = prompt_completion(recorded) if complete_prompts is not False else None
    if complete_prompts and completion is None:
        raise PixartError(
            f"{model}: prompt completion knows only the ShapesWorld captions, and this model's checkpoint records no "
            "training on them (meta.prompt_completion; a ShapesWorld checkpoint written before that key needs "
            "'prompt_completion: shapesworld' added under 'meta:' in its config.yaml)"
        )
    return completion


def check_prompt_completion(model: str | os.PathLike, t5: str | None = None) -> None:
    """Raise, before any work, the error ``Pipeline.from_pretrained(model, t5=t5, complete_prompts=True)`` would
    raise, reading only the checkpoint's config (not its weights). ``t5`` does not matter: completion is what the
    model was trained on, not which encoder reads the prompts."""
    path = latest_in_run(resolve_model(model))
    # Diffusers pipelines and official files record no completion: their captions were real ones.
    recorded = read_config(path)[1].prompt_completion if is_checkpoint_dir(path) else None
    _prompt_completion(model, recorded, True)


def _component_path(reference: str, model_path: Path) -> str:
    """A checkpoint's recorded text-encoder/VAE path: relative ones may be relative to the checkpoint."""
    if reference.lower() == "none" or Path(reference).is_absolute():
        return reference
    beside = (model_path if model_path.is_dir() else model_path.parent) / reference
    return str(beside) if beside.exists() else reference


class Pipeline:
    """Prompts → images with a PixArt transformer, a T5 text encoder and an autoencoder (or pixel space).

    Args:
        null_caption: the unconditional input for guidance when no negative prompt is given: "embedding" uses
            the model's stored null caption ``y_embedding`` with each prompt's own mask (as the official sampler,
            and as captions are dropped in training); "t5-empty" encodes "" (diffusers-origin weights).
        offload: keep GPU memory to one component at a time: the text encoder encodes every prompt once and is
            freed before the transformer runs; transformer and autoencoder stay on the CPU between runs.
        prompt_completion: ``(prompt, seed) -> caption``, rewrites each image's prompt into the form the model's
            training captions took before it is encoded (``Pipeline.caption``); None feeds prompts as given.
    """

    def __init__(
        self,
        model: nn.Module,
        text_encoder: TextEncoder,
        autoencoder: Autoencoder,
        *,
        null_caption: NullCaption = "embedding",
        device: torch.device | str = "cpu",
        offload: bool = False,
        name: str = "model",
        prompt_completion: PromptCompletion | None = None,
    ) -> None:
        _check_channels(model.config, autoencoder, name)
        if null_caption not in ("embedding", "t5-empty"):
            raise ValueError(f"null_caption must be 'embedding' or 't5-empty', got {null_caption!r}")
        self.model = model.eval().requires_grad_(False)
        self.text_encoder = text_encoder
        self.autoencoder = autoencoder
        self.null_caption = null_caption
        self.device = torch.device(device)
        self.offload = offload
        self.name = name
        self.prompt_completion = prompt_completion
        self._rest_device = torch.device("cpu") if offload else self.device
        self.model.to(self._rest_device)
        self.autoencoder.to(self._rest_device)

    @property
    def config(self) -> PixArtConfig:
        return self.model.config

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike,
        *,
        t5: str | None = None,
        vae: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        offload: bool = False,
        ema: bool | None = None,
        clean_captions: bool = True,
        complete_prompts: bool | None = None,
        adapters: Sequence[tuple[str, float]] = (),
        t5_quant: T5Quantization = "none",
    ) -> Pipeline:
        """Load from our checkpoint directory, a diffusers pipeline directory (or hub id), or an official ``.pth``.

        ``t5`` and ``vae`` override the checkpoint's own references (needed for an official ``.pth`` and a bare
        diffusers transformer); ``vae="none"`` is pixel space. Defaults: CUDA when available; bf16 on CUDA and
        fp32 on CPU; EMA weights when present. ``complete_prompts``: word prompts as the training captions were
        (``pixart_cli.shapesworld.demo.prompt_completion``); None (default) does so where the checkpoint records
        how (``meta.prompt_completion``: ShapesWorld models); True where it records none is an error.
        ``adapters``: (adapter directory, scale) pairs merged into the weights (``pixart sample --lora``); the
        model's name (recorded with each image) then names them too. ``t5_quant``: "int8" or "nf4" loads T5's linear
        layers quantised (bitsandbytes; ``components.t5.load_t5``).
        """
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        path = resolve_model(model)
        checkpoint = read_any(path)
        name = str(model)
        if adapters:
            checkpoint = apply_adapters(checkpoint, adapters, name, ema=ema)
            name += "".join(f" + {adapter}:{scale:g}" for adapter, scale in adapters)
        t5 = t5 or (checkpoint.meta.text_encoder and _component_path(checkpoint.meta.text_encoder, path))
        vae = vae or (checkpoint.meta.vae and _component_path(checkpoint.meta.vae, path))
        if not t5:
            raise PixartError(f"{model}: the checkpoint names no text encoder; pass --t5 (a T5 directory or hub id)")
        if not vae:
            raise PixartError(
                f"{model}: the checkpoint names no VAE; pass --vae (an AutoencoderKL directory or hub id, "
                "or 'none' for a pixel-space model)"
            )
        if t5_quant != "none":  # named with every image: its pixels depend on it
            name += f" (T5 {t5_quant})"
        null_caption = checkpoint.meta.null_caption
        completion = _prompt_completion(model, checkpoint.meta.prompt_completion, complete_prompts)
        rest = torch.device("cpu") if offload else device
        autoencoder = load_autoencoder(vae, dtype=dtype, device=rest)
        _check_channels(checkpoint.config, autoencoder, str(model))
        transformer = instantiate(checkpoint, ema=None if adapters else ema, device=rest, dtype=dtype)
        del checkpoint
        text = TextEncoder(
            t5, max_length=transformer.config.max_length, dtype=dtype, device=device, clean=clean_captions,
            quantize=t5_quant,
        )  # fmt: skip
        width = text.load().encoder.config.d_model
        if width != transformer.config.caption_channels:
            raise PixartError(
                f"{t5}: T5 features are {width} wide but the model expects {transformer.config.caption_channels}"
            )
        return cls(
            transformer,
            text,
            autoencoder,
            null_caption=null_caption,
            device=device,
            offload=offload,
            name=name,
            prompt_completion=completion,
        )

    # -- pieces -----------------------------------------------------------------------------------------------
    def image_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        return resolve_size(self.config, self.autoencoder.downsample, height, width)

    def check_memory(self, height: int, width: int, images: int, cfg: float) -> None:
        """Refuse a batch of ``images`` at ``height``×``width`` whose activations cannot fit the sampling device."""
        rows = images * (2 if cfg != 1.0 else 1)  # guidance runs the unconditional half in the same forward
        itemsize = next(self.model.parameters()).element_size()
        need = activation_bytes(self.config, height, width, self.autoencoder.downsample, rows, itemsize)
        have = available_memory(self.device)
        if have is not None and need > have:
            raise PixartError(
                f"a batch of {images:,} image(s) at {width}×{height} needs at least {need / 2**30:,.1f} GiB of "
                f"activations, over the {have / 2**30:,.1f} GiB of memory on {self.device}; lower --batch-size "
                "or the size"
            )

    def caption(self, job: Job) -> str:
        """The text encoded for ``job``: its prompt, completed with the job's seed when the pipeline completes."""
        if self.prompt_completion is None:
            return job.prompt
        return self.prompt_completion(job.prompt, job.seed)

    def encode(self, prompts: Sequence[str]) -> dict[str, Captions]:
        """Each distinct prompt encoded once (kept on the CPU, one row each)."""
        unique = list(dict.fromkeys(prompts))
        self.text_encoder.to(self.device)
        out: dict[str, Captions] = {}
        for start in range(0, len(unique), 64):  # bounded T5 batches
            chunk = unique[start : start + 64]
            enc = self.text_encoder.encode(chunk).to("cpu")
            out.update({p: enc[i] for i, p in enumerate(chunk)})
        return out

    def unconditional(self, cond: Captions, negative: Captions | None) -> Captions:
        """The guidance baseline for a batch: the encoded negative prompt / T5(""), or the stored null caption."""
        b = len(cond)
        if negative is not None:
            return Captions(negative.embeddings.expand(b, -1, -1), negative.mask.expand(b, -1))
        null = self.model.y_embedder.y_embedding[: cond.embeddings.shape[1]]
        return Captions(null[None].expand(b, -1, -1).to(cond.embeddings.device), cond.mask)

    def _release_text_encoder(self) -> None:
        if self.text_encoder.source is not None:
            self.text_encoder.release()
        else:  # built from in-memory modules: cannot reload, so park it on the CPU
            self.text_encoder.to("cpu")

    @contextlib.contextmanager
    def _on_device(self) -> Iterator[None]:
        """Transformer and autoencoder on the device for the sampling phase (a no-op without offload)."""
        if not self.offload:
            yield
            return
        self.model.to(self.device)
        self.autoencoder.to(self.device)
        try:
            yield
        finally:
            self.model.to(self._rest_device)
            self.autoencoder.to(self._rest_device)
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    # -- generation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        jobs: Sequence[Job],
        settings: SampleSettings,
        progress: Callable[[float], None] | None = None,
    ) -> Iterator[tuple[Job, Image.Image]]:
        """Make each job's image with ``settings``, ``settings.batch_size`` at a time (jobs of different prompts
        share batches). The seeds are the jobs' own (``settings.seed`` made them, where ``settings.jobs`` did).

        ``progress(images)`` is called after each solver step with the number of images done so far (fractional
        within a batch, exact at its end).
        """
        cfg, batch_size, negative_prompt = settings.cfg, settings.batch_size, settings.negative_prompt
        h, w = self.image_size(settings.height, settings.width)
        if not jobs:
            return
        self.check_memory(h, w, min(batch_size, len(jobs)), cfg)
        texts = {j: self.caption(j) for j in jobs}
        captions = self.encode(list(texts.values()))
        negative = None
        if cfg != 1.0 and (negative_prompt or self.null_caption == "t5-empty"):
            negative = self.text_encoder.encode([negative_prompt or ""]).to("cpu")
        if self.offload:
            self._release_text_encoder()
        f = self.autoencoder.downsample
        shape = (self.config.in_channels, h // f, w // f)
        with self._on_device():
            for start in range(0, len(jobs), batch_size):
                batch = jobs[start : start + batch_size]
                cond = Captions.cat([captions[texts[j]] for j in batch]).to(self.device)
                uncond = self.unconditional(cond, negative.to(self.device) if negative is not None else None)
                noise, generators = seeded_noise([j.seed for j in batch], shape)
                step_progress = None
                if progress is not None:
                    step_progress = functools.partial(_report_steps, progress, start, len(batch))
                latents = sample_latents(
                    self.model,
                    noise.to(self.device),
                    cond,
                    uncond if cfg != 1.0 else None,
                    sampler=settings.sampler,
                    steps=settings.steps,
                    cfg=cfg,
                    image_size=(h, w),
                    generators=generators,
                    clip_x0=self.autoencoder.bounded,
                    callback=step_progress,
                )
                images = to_pil(self.autoencoder.decode(latents))
                yield from zip(batch, images, strict=True)

    def __call__(
        self,
        prompts: str | Sequence[str],
        *,
        num_images_per_prompt: int = 1,
        sampler: str = "dpm-solver",
        steps: int | None = None,
        cfg: float = DEFAULT_CFG,
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str | None = None,
        batch_size: int = 4,
    ) -> list[Image.Image]:
        """Images for ``prompts``, grouped by prompt (image j of prompt i uses seed + j)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        settings = SampleSettings(
            sampler=sampler,
            steps=steps,
            cfg=cfg,
            seed=seed,
            num_images_per_prompt=num_images_per_prompt,
            batch_size=batch_size,
            negative_prompt=negative_prompt,
            height=height,
            width=width,
        )
        return [image for _, image in self.generate(settings.jobs(prompts), settings)]


def _check_channels(config: PixArtConfig, autoencoder: Autoencoder, name: str) -> None:
    if config.in_channels != autoencoder.channels:
        space = "pixel space" if autoencoder.downsample == 1 else "VAE"
        raise PixartError(
            f"{name}: the model takes {config.in_channels} input channels but the {space} gives "
            f"{autoencoder.channels} (wrong --vae?)"
        )


def _report_steps(progress: Callable[[float], None], start: int, images: int, step: int, steps: int) -> None:
    progress(start + images * step / steps)
