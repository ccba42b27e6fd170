"""Training recipes: YAML validated into typed, frozen config objects.

A recipe describes one training stage completely: the model (and what it starts from), the data, the optimiser,
the schedule, where checkpoints go, logging and sampling, and the cluster layout it was sized for. Unknown keys
and wrong types are errors naming the dotted path (``optim.lr``); ``--set optim.lr=1e-4`` overrides go through the
same validation.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pixart_cli.adapters.settings import AdapterSection
from pixart_cli.config import ConfigError, apply_overrides, from_dict, read_yaml_mapping, to_dict
from pixart_cli.data.sources import DEFAULT_CAPTION_FIELDS, UnknownCaptionField, check_caption_field
from pixart_cli.errors import PixartError
from pixart_cli.models import DIT_VARIANTS, PIXART_VARIANTS, DiTConfig, PixArtConfig
from pixart_cli.shapesworld.dataset import check_dataset_args
from pixart_cli.shapesworld.world import CaptionStyle, DatasetFormat, Split

if TYPE_CHECKING:
    from pixart_cli.checkpoints.format import PromptCompletionName


def _positive(section: object, *names: str) -> None:
    for name in names:
        if not getattr(section, name) > 0:
            raise ValueError(f"{name}: must be positive, got {getattr(section, name)}")


def _non_negative(section: object, *names: str) -> None:
    for name in names:
        if not getattr(section, name) >= 0:
            raise ValueError(f"{name}: must be 0 or more, got {getattr(section, name)}")


@dataclass(frozen=True)
class ModelSection:
    architecture: Literal["PixArt", "DiT"] = "PixArt"
    variant: str = "PixArt-XL/2"  # a named variant (PixArt-*/DiT-*), refined by `config`
    config: dict[str, Any] = field(default_factory=dict)  # PixArtConfig / DiTConfig fields overriding the variant
    init: str | None = None  # checkpoint to start from: ours, official .pth, diffusers, or a DiT file (stage 1)
    init_weights: Literal["model", "ema"] = "ema"  # which weights of `init` to start from, when it has both
    gradient_checkpointing: bool = True
    compile: bool = False  # torch.compile each transformer block
    # A caption projection (y_embedder) that starts fresh: "official" N(0, 0.02), sized for T5-XXL's 4096 channels,
    # or "xavier" (uniform, scaled by width): faster text alignment with a narrow text encoder (ShapesWorld:
    # experiments/shapesworld/LOG.md). Ignored when the projection comes from a PixArt checkpoint.
    caption_init: Literal["official", "xavier"] = "official"
    # Start from a model that reads another caption length (PixArt-α's 120 tokens → PixArt-Σ's 300): its null
    # caption is rebuilt as T5("") over the new length, as PixArt-Σ's code does. Off: such an init is an error.
    rebuild_null_caption: bool = False

    def variants(self) -> dict[str, PixArtConfig | DiTConfig]:
        """The named variants of this architecture."""
        return PIXART_VARIANTS if self.architecture == "PixArt" else DIT_VARIANTS

    def __post_init__(self) -> None:
        known = self.variants()
        if self.variant not in known:
            raise ValueError(
                f"variant: unknown {self.architecture} variant {self.variant!r} (known: {', '.join(known)})"
            )


@dataclass(frozen=True)
class ShapesSection:
    """A ShapesWorld dataset to generate at ``data.path`` on first use: ``write_dataset``'s arguments."""

    n: int  # scenes
    # A side, one (width, height), or a list of (width, height) sizes each scene draws from (multi-aspect data).
    resolution: int | tuple[int, int] | tuple[tuple[int, int], ...] = 32
    seed: int = 0  # scene i is drawn from (seed, i)
    caption_style: CaptionStyle = "dense"
    fmt: DatasetFormat = "folder"
    split: Split = "train"
    objects: int | None = None  # objects in every scene; None: 1 to 3
    workers: int = 1  # processes writing it
    colours: tuple[str, ...] | None = None  # only these object colours (concept colours too, e.g. [pink]); None: all

    def __post_init__(self) -> None:
        # Checked when the recipe loads, not only when the data is generated: a bad value (or a typo, caught by
        # the typed keys) must not pass unnoticed because the dataset happens to exist already.
        check_dataset_args(self.n, self.resolution, self.caption_style, self.fmt, self.objects, self.colours)


def _check_caption_mix(captions: dict[str, float]) -> None:
    if not captions:
        raise ValueError("captions: name at least one caption field, e.g. {caption_vlm: 0.9, caption: 0.1}")
    for name, share in captions.items():
        try:
            check_caption_field(name)
        except PixartError as exc:
            raise ValueError(f"captions: {exc}") from None
        if not (math.isfinite(share) and share > 0):
            raise ValueError(f"captions: the proportion of {name} must be positive, got {share}")
    total = math.fsum(captions.values())
    if abs(total - 1) > 1e-6:
        raise ValueError(f"captions: the proportions must sum to 1, got {total:g} ({_mix(captions)})")


def _mix(captions: dict[str, float]) -> str:
    return ", ".join(f"{name}: {share:g}" for name, share in captions.items())


def caption_field_error(exc: UnknownCaptionField) -> PixartError:
    """The error for a ``data.captions`` field the data lacks, naming the recipe key and the fields it has."""
    return PixartError(
        f"data.captions.{exc.field}: {exc.path} has no caption field {exc.field!r} (fields found: {exc.fields_found})"
    )


@dataclass(frozen=True)
class DataSection:
    # Image folder with .txt captions, JSONL manifest, class-folder tree (stage 1), tar shards (a .tar, a folder of
    # them, or shards/{00000..00009}.tar), a datasets save_to_disk folder, or .parquet files (data/sources.py).
    path: str | None = None
    kind: Literal["auto", "captions", "manifest", "classes", "webdataset", "hf-dataset", "parquet"] = "auto"
    cache: str | None = None  # feature cache from `pixart prepare`; used when it exists, else encode on the fly
    resolution: int = 256  # pixels (the bucket table's base size when multi_scale)
    multi_scale: bool = False  # aspect-ratio buckets; every batch holds one bucket
    text_encoder: str | None = "DeepFloyd/t5-v1_1-xxl"  # T5 directory or hub id (PixArt stages)
    vae: str = "stabilityai/sd-vae-ft-ema"  # AutoencoderKL directory or hub id, or "none" (pixel space)
    shapes: ShapesSection | None = None  # generate a ShapesWorld dataset at `path` on first use
    num_workers: int = 2
    max_bad_fraction: float = 0.01  # abort when more of the images than this are unreadable
    # Caption fields of a manifest → the proportion of examples trained on each (PixArt-Σ's mix of real and VLM
    # captions, e.g. {caption_vlm: 0.9, caption: 0.1}); None: the `caption` field alone. Each example's choice is a
    # pure function of (train.seed, epoch, item): the same on a resumed run (docs/training.md).
    captions: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if self.resolution <= 0 or self.resolution % 8:
            raise ValueError(f"resolution: must be a positive multiple of 8, got {self.resolution}")
        if self.captions is not None:
            _check_caption_mix(self.captions)
        if not 0 <= self.max_bad_fraction < 1:
            raise ValueError(f"max_bad_fraction: must be in [0, 1), got {self.max_bad_fraction}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers: must be 0 or more, got {self.num_workers}")

    @property
    def caption_fields(self) -> tuple[str, ...]:
        """The caption fields the data must have and a cache holds, sorted."""
        return tuple(sorted(self.captions)) if self.captions else DEFAULT_CAPTION_FIELDS

    @property
    def caption_mix(self) -> tuple[tuple[str, float], ...] | None:
        """(field, proportion) sorted by field, None without ``captions``: the order they are written in changes
        nothing (resuming compares the keys, not their order)."""
        return tuple(sorted(self.captions.items())) if self.captions else None


@dataclass(frozen=True)
class OptimSection:
    # "adamw" (torch), "adamw8bit" (bitsandbytes: 8-bit moments) or "came" (came-pytorch; PixArt-Σ's optimiser,
    # which takes three betas and two eps): pixart_cli/training/optimizers.py.
    name: Literal["adamw", "adamw8bit", "came"] = "adamw"
    lr: float = 2e-5  # at the reference batch; see lr_scaling
    weight_decay: float = 0.03
    eps: float | tuple[float, float] = 1e-10
    betas: tuple[float, ...] = (0.9, 0.999)
    grad_clip: float = 0.01
    warmup_steps: int = 1000  # linear warm-up, then `decay`
    # After warm-up: "none" keeps the peak lr (the official recipes); "cosine" or "linear" anneal it to
    # `final_lr_fraction` × peak at train.steps (a constant lr degraded long ShapesWorld runs:
    # experiments/shapesworld/LOG.md).
    decay: Literal["none", "cosine", "linear"] = "none"
    final_lr_fraction: float = 0.0
    lr_scaling: Literal["none", "sqrt"] = "sqrt"  # lr × sqrt(global_batch / reference_batch) (official auto_lr)
    reference_batch: int = 256

    def __post_init__(self) -> None:
        for name in ("lr", "weight_decay", "grad_clip"):
            if not math.isfinite(getattr(self, name)):  # nan would pass every comparison below
                raise ValueError(f"{name}: must be a finite number, got {getattr(self, name)}")
        _positive(self, "lr")
        self._check_betas_and_eps()
        _non_negative(self, "weight_decay", "grad_clip", "warmup_steps")
        if not 0 <= self.final_lr_fraction <= 1:
            raise ValueError(f"final_lr_fraction: must be in [0, 1], got {self.final_lr_fraction}")
        if self.reference_batch <= 0:
            raise ValueError(f"reference_batch: must be positive, got {self.reference_batch}")

    def _check_betas_and_eps(self) -> None:
        came = self.name == "came"
        betas, eps = (3, 2) if came else (2, 1)
        example = "[0.9, 0.999, 0.9999] and [1.0e-30, 1.0e-16] (the official PixArt-Σ CAME config)" if came else ""
        if len(self.betas) != betas or not all(0 <= beta < 1 for beta in self.betas):
            hint = f", e.g. {example}" if came else ""
            raise ValueError(f"betas: {self.name} takes {betas} betas in [0, 1), got {list(self.betas)}{hint}")
        values = self.eps if isinstance(self.eps, tuple) else (self.eps,)
        if len(values) != eps:
            raise ValueError(
                f"eps: {self.name} takes {'two values' if came else 'one value'}, got {self.eps}"
                + (f"; e.g. betas and eps {example}" if came else "")
            )
        if not all(math.isfinite(v) and v > 0 for v in values):
            raise ValueError(f"eps: must be positive, got {self.eps}")


@dataclass(frozen=True)
class TrainSection:
    steps: int = 10000  # optimiser steps
    batch_size: int = 32  # per GPU (per process), per micro-step
    grad_accumulation: int = 1
    # Autocast dtype (weights stay fp32). "auto": bf16 where the hardware computes it natively (a GPU with bf16, a CPU
    # with AVX-512 BF16), fp16 on older GPUs, else fp32 — bf16 on an AVX2 CPU is ~17× slower (pixart_cli/precision.py).
    mixed_precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay min(ema_decay, (1+n)/(10+n)); the official recipes (from trained weights) use none
    caption_dropout: float = 0.1  # probability of the null caption (the null class for DiT): CFG training
    # How training timesteps are drawn: "uniform" over [0, 1000) (the paper), or "logit-normal": t/1000 =
    # sigmoid(N(timestep_mean, timestep_std)), which spends more steps at middle noise levels (SD3, Esser et al. 2024).
    timesteps: Literal["uniform", "logit-normal"] = "uniform"
    timestep_mean: float = 0.0
    timestep_std: float = 1.0
    seed: int = 43
    nan_policy: Literal["stop", "skip"] = "stop"  # on a non-finite loss or gradient
    tf32: bool = True

    def __post_init__(self) -> None:
        _positive(self, "steps", "batch_size", "grad_accumulation")
        for name in ("ema_decay", "caption_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}: must be in [0, 1), got {getattr(self, name)}")
        if not (math.isfinite(self.timestep_mean) and math.isfinite(self.timestep_std) and self.timestep_std > 0):
            raise ValueError(
                f"timestep_mean, timestep_std: need a finite mean and a positive std, got "
                f"{self.timestep_mean}, {self.timestep_std}"
            )
        if not 0 <= self.seed < 2**64:
            raise ValueError(f"seed: must be in [0, 2^64), got {self.seed}")


@dataclass(frozen=True)
class OutputSection:
    dir: str = "outputs/run"
    save_every: int = 1000  # steps between checkpoints (one more at the end)
    keep_last: int = 3  # checkpoints kept (older ones are deleted after a newer one is complete)
    # "full": whole weights and optimiser state gathered into one directory; "sharded" (cluster.strategy fsdp): each
    # process writes the rows it holds, nothing gathered (pixart_cli/checkpoints/sharded.py). Both read everywhere.
    checkpoint: Literal["full", "sharded"] = "full"

    def __post_init__(self) -> None:
        _positive(self, "save_every", "keep_last")


@dataclass(frozen=True)
class LogSection:
    every: int = 10  # steps between metric lines
    sample_every: int = 0  # steps between validation sample grids (EMA weights); 0 = off
    sample_prompts: tuple[str, ...] = ()
    sample_steps: int = 20
    sample_cfg: float = 4.5
    # Trackers that also receive every metric, through accelerate (metrics.jsonl is always written): tensorboard
    # (<output.dir>/tensorboard), wandb (<output.dir>/wandb); pip install -e ".[trackers]". docs/training.md.
    trackers: tuple[Literal["tensorboard", "wandb"], ...] = ()
    wandb_mode: Literal["online", "offline"] = "online"  # offline: written locally, `wandb sync` uploads it later

    def __post_init__(self) -> None:
        _positive(self, "every")
        _non_negative(self, "sample_every")
        if self.sample_steps <= 0 or not (math.isfinite(self.sample_cfg) and self.sample_cfg >= 0):
            raise ValueError(f"sample_steps must be positive and sample_cfg a number ≥ 0, got {self.sample_cfg}")


@dataclass(frozen=True)
class ClusterSection:
    """The layout the recipe was sized for; `pixart train --dry-run` prints the launch command for it."""

    gpu: str = "A100-80GB"
    nodes: int = 1
    gpus_per_node: int = 8
    launcher: Literal["accelerate", "torchrun"] = "accelerate"
    # "ddp": every process holds the whole model and its training state; "fsdp": each holds 1/N of the weights,
    # gradients, optimiser state and EMA, gathering one block at a time (FSDP2 through accelerate; docs/training.md).
    strategy: Literal["ddp", "fsdp"] = "ddp"

    def __post_init__(self) -> None:
        if self.nodes <= 0 or self.gpus_per_node <= 0:
            raise ValueError(f"nodes and gpus_per_node must be positive, got {self.nodes} and {self.gpus_per_node}")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class ValidationSection:
    """A held-out set whose loss is measured every ``every`` steps at fixed timesteps (spread evenly over the
    schedule) and fixed noise: the same numbers at every measurement, so its curve shows the model alone (the
    training loss mixes in which timesteps and images each batch drew)."""

    every: int = 0  # steps between measurements (and one at the end); 0: off
    batches: int = 4  # micro-batches of train.batch_size, the same ones every time
    path: str | None = None  # a held-out dataset, of any kind data.path takes (data.kind)
    cache: str | None = None  # its feature cache from `pixart prepare`
    shapes: ShapesSection | None = None  # generate a ShapesWorld dataset at `path` on first use

    def __post_init__(self) -> None:
        _non_negative(self, "every")
        _positive(self, "batches")
        if self.every and self.path is None and self.cache is None:
            raise ValueError("path: name the held-out data (or its cache) to validate on")


@dataclass(frozen=True)
class DreamBoothSection:
    """DreamBooth (Ruiz et al. 2023, arXiv 2208.12242): the images at ``data.path`` all show one subject, each
    captioned ``instance_prompt`` (an identifier the tokenizer represents distinctly, e.g. "a sks dog"), or each its
    own caption where that names the new concept (a new word). With ``class_prompts`` (prior preservation),
    ``class_images`` images per prompt drawn by the base model itself join every batch, their loss weighted by
    ``prior_loss_weight``, so the model keeps what it knew."""

    instance_prompt: str | None = None  # None: each image's own caption
    class_prompts: tuple[str, ...] = ()  # empty: no prior preservation
    class_images: int = 100  # per class prompt; drawn once into class_dir (kept: reruns and resumes reuse them)
    class_dir: str | None = None  # default: <output.dir>/class-images
    prior_loss_weight: float = 1.0
    class_steps: int = 20  # sampler steps for the class images (dpm-solver)
    class_cfg: float = 4.5

    def __post_init__(self) -> None:
        if self.instance_prompt is not None and not self.instance_prompt.strip():
            raise ValueError("instance_prompt: empty; give the identifier prompt (e.g. 'a sks dog') or leave it out")
        if any(not prompt.strip() for prompt in self.class_prompts):
            raise ValueError("class_prompts: an empty prompt")
        _positive(self, "class_images", "class_steps")
        if not (math.isfinite(self.prior_loss_weight) and self.prior_loss_weight >= 0):
            raise ValueError(f"prior_loss_weight: must be a number ≥ 0, got {self.prior_loss_weight}")
        if not (math.isfinite(self.class_cfg) and self.class_cfg >= 0):
            raise ValueError(f"class_cfg: must be a number ≥ 0, got {self.class_cfg}")


@dataclass(frozen=True)
class Recipe:
    name: str
    stage: int
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    output: OutputSection = field(default_factory=OutputSection)
    log: LogSection = field(default_factory=LogSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    # Train a low-rank adapter on the frozen model.init instead of every weight (fine-tuning; docs/adapters.md).
    adapter: AdapterSection | None = None
    # Teach one subject from a few images under an identifier prompt (docs/adapters.md#dreambooth).
    dreambooth: DreamBoothSection | None = None
    # The loss on held-out data at fixed timesteps and noise (docs/training.md#validation-loss).
    validation: ValidationSection = field(default_factory=ValidationSection)
    description: str | None = None

    def __post_init__(self) -> None:
        if self.stage not in (1, 2, 3):
            raise ValueError(f"stage: must be 1, 2 or 3, got {self.stage}")
        if self.stage == 1 and self.model.architecture != "DiT":
            raise ValueError("stage 1 trains the class-conditional DiT: model.architecture must be DiT")
        if self.stage > 1 and self.model.architecture != "PixArt":
            raise ValueError(f"stage {self.stage} trains PixArt: model.architecture must be PixArt")
        if self.stage == 1 and self.data.captions is not None:
            raise ValueError("data.captions: stage 1 trains on class labels, not captions")
        if self.adapter is not None and (self.model.architecture != "PixArt" or self.model.init is None):
            raise ValueError("adapter: an adapter fine-tunes a trained PixArt: set model.init to the base model")
        if self.output.checkpoint == "sharded" and self.cluster.strategy != "fsdp":
            raise ValueError("output.checkpoint: sharded checkpoints are written by cluster.strategy=fsdp")
        if self.cluster.strategy == "fsdp":
            if self.adapter is not None:
                raise ValueError("cluster.strategy: fsdp shards full training; an adapter run is small, use ddp")
            if self.optim.name != "adamw":
                raise ValueError(
                    f"cluster.strategy: fsdp shards AdamW's state; {self.optim.name} keeps per-matrix statistics a "
                    "shard would compute differently: use optim.name=adamw, or cluster.strategy=ddp"
                )
        if self.adapter is not None and self.model.rebuild_null_caption:
            raise ValueError(
                "model.rebuild_null_caption: an adapter trains on its base model as it is; change the caption length "
                "in a full fine-tune first"
            )
        if self.dreambooth is not None:
            if self.model.architecture != "PixArt" or self.model.init is None:
                raise ValueError("dreambooth: DreamBooth fine-tunes a trained PixArt: set model.init to the base model")
            if self.data.captions is not None:
                raise ValueError("data.captions: DreamBooth captions every image with dreambooth.instance_prompt")

    # -- derived quantities ---------------------------------------------------------------------------------------
    def model_config(self) -> PixArtConfig | DiTConfig:
        """The variant with `model.config` overrides applied and validated (multi_scale follows the data)."""
        base = self.model.variants()[self.model.variant]
        merged = {**to_dict(base), **self.model.config}
        if isinstance(base, PixArtConfig) and "multi_scale" not in self.model.config:
            merged["multi_scale"] = self.data.multi_scale  # the variants' default (False) must not win
        return from_dict(type(base), merged, "model.config")

    def global_batch(self, world_size: int | None = None) -> int:
        return self.train.batch_size * self.train.grad_accumulation * (world_size or self.cluster.world_size)

    def learning_rate(self, world_size: int | None = None) -> float:
        if self.optim.lr_scaling == "none":
            return self.optim.lr
        return self.optim.lr * math.sqrt(self.global_batch(world_size) / self.optim.reference_batch)

    def prompt_completion(self) -> PromptCompletionName | None:
        """The prompt completion its checkpoints record (``meta.prompt_completion``): "shapesworld" for a PixArt
        trained on generated ShapesWorld data (``data.shapes``), whose captions name what short prompts leave out."""
        return "shapesworld" if self.data.shapes is not None and self.model.architecture == "PixArt" else None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Recipe, dict]:
    """Read, override and validate a recipe; returns the typed recipe and its resolved plain form."""
    path = Path(path)
    raw = read_yaml_mapping(path, "recipe")
    try:
        apply_overrides(raw, list(overrides))
        recipe = from_dict(Recipe, raw)
        recipe.model_config()  # validate model.config now, not at step 0
    except ConfigError as exc:
        raise PixartError(f"{path}: {exc}") from None
    return recipe, to_dict(recipe)


def recipe_from_dict(data: dict) -> Recipe:
    return from_dict(Recipe, data)


def replace(recipe: Recipe, **sections: Any) -> Recipe:
    """A copy of ``recipe`` with sections replaced by ``dataclasses.replace``-style keyword dicts."""
    return dataclasses.replace(
        recipe, **{name: dataclasses.replace(getattr(recipe, name), **values) for name, values in sections.items()}
    )


# -- resuming -----------------------------------------------------------------------------------------------------
# What `--resume` may change, as dotted keys or sections: how long the run is (the lr schedule is re-evaluated for
# the new train.steps), where and how often it saves, logs and samples, how data is loaded (not what), the cluster
# the plan describes, and switches that trade memory or speed without changing the maths. Anything else changes what
# is trained or the random streams, so the result would be neither the old run nor a new one.
RESUME_MAY_CHANGE = (
    "name", "description", "train.steps", "output", "log", "data.num_workers", "data.max_bad_fraction", "cluster",
    "model.gradient_checkpointing", "model.compile", "train.nan_policy", "validation",
)  # fmt: skip
# Allowed, and said in a log line: the precision a machine supports differs, but the run is then no longer
# bit-for-bit the uninterrupted one.
RESUME_NOTED = ("train.mixed_precision", "train.tf32")


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        flat.update(_flatten(value, name) if isinstance(value, dict) else {name: value})  # {}: no keys
    return flat


def _covered(key: str, names: tuple[str, ...]) -> bool:
    return any(key == name or key.startswith(name + ".") for name in names)


_ABSENT = object()


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "(absent)"
    return value if isinstance(value, str) and value.strip() == value != "" else json.dumps(value, default=str)


# Keys earlier versions wrote into every resolved recipe, since replaced (log.tensorboard → log.trackers): dropped from
# a checkpoint's recipe before it is compared, so those runs still resume.
RETIRED_KEYS = ("log.tensorboard",)


def _without_retired_keys(saved: dict) -> dict:
    saved = copy.deepcopy(saved)
    for dotted in RETIRED_KEYS:
        *parents, leaf = dotted.split(".")
        section = saved
        for name in parents:
            section = section.get(name) if isinstance(section, dict) else None
        if isinstance(section, dict):
            section.pop(leaf, None)
    return saved


def resume_changes(saved: dict, resolved: dict) -> tuple[list[str], list[str]]:
    """Differences between the resolved recipe a checkpoint was trained with and the one resuming it, as
    ``"key: old → new"``: (refused, allowed but noted). Other allowed differences are not listed."""
    saved = _without_retired_keys(saved)
    with contextlib.suppress(ConfigError, TypeError, ValueError):  # fill in defaults the saved file may lack
        saved = to_dict(recipe_from_dict(saved))
    old, new = _flatten(saved), _flatten(resolved)
    refused, noted = [], []
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if before == after or _covered(key, RESUME_MAY_CHANGE):
            continue
        (noted if _covered(key, RESUME_NOTED) else refused).append(f"{key}: {_show(before)} → {_show(after)}")
    return refused, noted
