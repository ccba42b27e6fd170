"""Adapters on our PixArt through peft: add them, read and load their weights, merge them into the base.

peft wraps each target layer in place (``blocks.0.attn.qkv`` becomes a LoRA layer holding the frozen
``base_layer`` and the adapter's ``lora_A``/``lora_B``, plus ``lora_magnitude_vector`` for DoRA), so the model keeps
its forward and every caller of it (the training loop, the sampler) is unchanged. peft is imported only here and
only when an adapter is used: it costs ~3 s of start-up (it imports transformers).
"""

from __future__ import annotations

import copy
import hashlib
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from pixart_cli.adapters.settings import PRESETS, AdapterSection
from pixart_cli.checkpoints.format import StateDict, build_model
from pixart_cli.errors import PixartError

DEFAULT_NAME = "default"


def target_layers(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """The layers ``targets`` name (peft's rule: a module name equal to a target or ending in ``.target``; presets
    expanded), each a linear layer or a convolution; an error naming ``adapter.targets`` for a target that names
    none (a preset's layers that this model lacks, such as multi-scale embedders, are left out)."""
    names = dict(model.named_modules())
    found: dict[str, None] = {}
    expanded = [(name, preset is None) for t in targets for preset in [PRESETS.get(t)] for name in preset or (t,)]
    for target, required in expanded:
        hits = [n for n in names if n == target or n.endswith("." + target)]
        if not hits and not required:
            continue
        if not hits:
            raise PixartError(
                f"adapter.targets: {target!r} names no layer of this model (layer names such as blocks.0.attn.qkv; "
                "a target may be a suffix, e.g. attn.qkv, or a preset: blocks, official)"
            )
        for hit in hits:
            layer = getattr(names[hit], "base_layer", names[hit])  # a layer that holds an adapter already
            if not isinstance(layer, (nn.Linear, nn.Conv2d)):
                raise PixartError(
                    f"adapter.targets: {target!r} names {hit}, a {type(names[hit]).__name__}; adapters go on linear "
                    "layers and convolutions"
                )
            if isinstance(layer, nn.Conv2d) and layer.groups > 1:  # e.g. PixArt-Σ's depthwise attn.sr
                raise PixartError(
                    f"adapter.targets: {target!r} names {hit}, a grouped convolution, which takes no low-rank adapter"
                )
            found[hit] = None
    return sorted(found)


def lora_config(section: AdapterSection, layers: list[str]):  # -> peft.LoraConfig
    from peft import LoraConfig  # lazy: peft imports transformers (~3 s)

    return LoraConfig(
        r=section.rank,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        use_dora=section.type == "dora",
        target_modules=layers,
    )


def add_adapter(model: nn.Module, section: AdapterSection, name: str = DEFAULT_NAME) -> list[str]:
    """Freeze ``model`` and add a fresh adapter (B = 0: the model is unchanged until it trains); returns the
    layers it adapts. Calling it again with another ``name`` adds another adapter beside the first."""
    from peft import inject_adapter_in_model  # lazy: as above

    layers = target_layers(model, section.targets)
    for param in model.parameters():
        param.requires_grad_(False)
    with warnings.catch_warnings():  # several adapters on one model are what apply_adapters wants
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(lora_config(section, layers), model, adapter_name=name)
    for param_name, param in model.named_parameters():
        param.requires_grad_(f".{name}." in param_name or param_name.endswith(f".{name}"))
    return layers


def hold_base_in(model: nn.Module, dtype: torch.dtype) -> None:
    """Store the frozen weights in ``dtype`` (the trainable adapter stays fp32)."""
    for param in model.parameters():
        if not param.requires_grad:
            param.data = param.data.to(dtype)


def adapter_state_dict(model: nn.Module, name: str = DEFAULT_NAME, state_dict: StateDict | None = None) -> StateDict:
    """The adapter's weights in peft's layout (``blocks.0.attn.qkv.lora_A.weight``), from the model or from a full
    ``state_dict`` of it (e.g. one holding the EMA weights)."""
    from peft import get_peft_model_state_dict  # lazy: as above

    weights = get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=name)
    return {k: v.detach().clone() for k, v in weights.items()}


def check_adapter_weights(expected: StateDict, weights: StateDict, what: str) -> None:
    """Strict: the same keys, shapes and floating-point tensors as the adapter the settings build."""
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    wrong += [k for k in expected if k in weights and not weights[k].is_floating_point()]
    problems = [
        f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape or type", wrong))
        if keys
    ]
    if problems:
        raise PixartError(f"{what}: not the adapter its settings describe ({'; '.join(problems)})")


def load_adapter_weights(model: nn.Module, weights: StateDict, name: str = DEFAULT_NAME, what: str = "adapter") -> None:
    """Load an adapter's weights (peft's layout) into the adapter ``name`` of ``model``, strictly."""
    from peft import set_peft_model_state_dict  # lazy: as above

    check_adapter_weights(adapter_state_dict(model, name), weights, what)
    set_peft_model_state_dict(model, weights, adapter_name=name)


def scale_adapter(model: nn.Module, name: str, scale: float) -> None:
    """Multiply adapter ``name``'s update by ``scale`` (its alpha / rank times ``scale``)."""
    from peft.tuners.lora import LoraLayer  # lazy: as above

    for module in model.modules():
        if isinstance(module, LoraLayer) and name in module.lora_A:
            module.set_scale(name, scale)


def merged_state_dict(model: nn.Module, names: list[str]) -> StateDict:
    """Fold the adapters ``names`` into the base weights (peft's merge) and return the plain model's state dict
    (our key layout, no adapter keys). ``model`` is changed: pass a copy to keep it."""
    from peft.tuners.tuners_utils import BaseTunerLayer  # lazy: as above

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            mine = [n for n in names if n in module.lora_A]
            if mine:
                module.merge(adapter_names=mine)
    out: StateDict = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value.detach()
    return out


def merged_model(model: nn.Module, names: list[str] | None = None, state_dict: StateDict | None = None) -> nn.Module:
    """A plain copy of an adapted ``model`` with its adapters folded in (fp32; ``model`` is left as it is), from
    ``state_dict`` (a full state dict of the adapted model, e.g. with EMA weights) when given."""
    names = names or [DEFAULT_NAME]
    work = copy.deepcopy(model).float()
    if state_dict is not None:
        work.load_state_dict(state_dict, strict=True)
    weights = merged_state_dict(work, names)
    with torch.device("meta"):
        plain = build_model(model.config)
    plain.load_state_dict(weights, strict=True, assign=True)
    return plain.to(next(iter(weights.values())).device).eval()


# Buffers a copy of the same model may hold differently: diffusers keeps no null caption, and reading its weights
# makes a fresh one (pixart_cli.checkpoints.convert.DIFFUSERS_CREATED). Not trained, so not part of the identity.
UNHASHED = ("y_embedder.y_embedding",)


def weights_hash(state_dict: StateDict) -> str:
    """SHA-256 of a model's weights (names, shapes and values rounded to bf16), independent of the file format:
    the official .pth, our directory and a diffusers copy of one model hash alike, and so do its fp32 and bf16
    copies (an fp16 copy rounds differently: it is another base to this check)."""
    digest = hashlib.sha256()
    for key in sorted(k for k in state_dict if k not in UNHASHED):
        tensor = state_dict[key].detach().to("cpu", torch.bfloat16).contiguous()
        digest.update(f"{key}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()
