"""Adapters leave the toolkit two ways: merged into their base (any checkpoint format), or as a PEFT adapter keyed
for diffusers' ``PixArtTransformer2DModel``, which a diffusers user loads with peft::

    from peft import PeftModel
    pipe.transformer = PeftModel.from_pretrained(pipe.transformer, "my-adapter-diffusers").merge_and_unload()

Our fused layers become diffusers' separate ones exactly: a LoRA on ``attn.qkv`` (W x + s·B A x) is, for each of
q, k and v, the same A with that third of B's rows; DoRA's magnitude is per output row, so it splits the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from safetensors.torch import save_file

from pixart_cli.adapters.format import Adapter, apply_adapters, load_adapter
from pixart_cli.adapters.lora import lora_config
from pixart_cli.checkpoints.convert import ConvertReport, TargetFormat, convert, official_diffusers_modules
from pixart_cli.checkpoints.format import StateDict
from pixart_cli.errors import PixartError
from pixart_cli.io import atomic_directory

PEFT_WEIGHTS = "adapter_model.safetensors"  # peft's file names (PeftModel.from_pretrained reads these)
_PEFT_PREFIX = "base_model.model."


def diffusers_adapter_weights(adapter: Adapter, weights: StateDict) -> tuple[StateDict, list[str]]:
    """The adapter's weights keyed for ``PixArtTransformer2DModel`` (peft's saved layout), and its layers."""
    modules = dict(official_diffusers_modules(adapter.config.depth, adapter.config.multi_scale))
    out: StateDict = {}
    layers: list[str] = []
    for ours in sorted({key.split(".lora_")[0] for key in weights}):
        if ours not in modules:
            raise PixartError(f"{ours}: an adapted layer with no counterpart in diffusers' PixArtTransformer2DModel")
        theirs = modules[ours]
        a, b = weights[f"{ours}.lora_A.weight"], weights[f"{ours}.lora_B.weight"]
        magnitude = weights.get(f"{ours}.lora_magnitude_vector")
        parts = len(theirs)
        bs = b.chunk(parts, dim=0)
        ms = magnitude.chunk(parts, dim=0) if magnitude is not None else (None,) * parts
        for name, b_part, m_part in zip(theirs, bs, ms, strict=True):
            out[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = a.clone()
            out[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = b_part.clone()
            if m_part is not None:
                out[f"{_PEFT_PREFIX}{name}.lora_magnitude_vector"] = m_part.clone()
            layers.append(name)
    return out, layers


def export_to_diffusers(src: str | Path, dst: str | Path, *, ema: bool | None = None, overwrite: bool = False) -> Path:
    """Write the adapter at ``src`` as a PEFT adapter directory for diffusers (``adapter_config.json`` +
    ``adapter_model.safetensors``), from its EMA weights when it has them (``ema`` as :meth:`Adapter.weights`)."""
    adapter = load_adapter(src)
    weights, layers = diffusers_adapter_weights(adapter, adapter.weights(ema))
    config = lora_config(adapter.settings, layers)
    config.base_model_name_or_path = adapter.base.path
    dst = Path(dst)
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        config.save_pretrained(str(tmp))
        tensors = {k: v.float().contiguous() for k, v in weights.items()}
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
    return dst


def merge_into(
    base: str | Path,
    dst: str | Path,
    adapters: Sequence[tuple[str, float]],
    to: TargetFormat = "pixart",
    *,
    ema: bool | None = None,
    **options,
) -> ConvertReport:
    """Write ``base`` with the adapters (directory, scale) merged into its weights, in any target format
    (``options`` as :func:`pixart_cli.checkpoints.convert.convert`). ``ema`` picks each adapter's weights."""
    # ``ema`` chose the adapters' weights; the merged checkpoint holds one weight set, which convert writes as is.
    report = convert(
        base, dst, to, transform=lambda checkpoint: apply_adapters(checkpoint, adapters, str(base), ema=ema), **options
    )
    report.weights = "merged: " + " + ".join(f"{path}:{scale:g}" for path, scale in adapters)
    return report
