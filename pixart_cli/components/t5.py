"""Loading the frozen T5 text encoder (+ tokenizer) from a local directory or a hub id."""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path
from typing import Literal

import torch

from pixart_cli.components.resolve import locate, offline_hint
from pixart_cli.errors import PixartError

# Weight-only quantisation of the T5 encoder's linear layers with bitsandbytes, through transformers (CPU and GPU):
# "int8" is LLM.int8 (Dettmers et al. 2022, arXiv 2208.07339: outlier features kept in 16 bits), "nf4" 4-bit
# NormalFloat (QLoRA, arXiv 2305.14314). The embedding and layer norms stay in the compute dtype. Measured in
# docs/performance.md (memory, time, feature distance to bf16).
T5Quantization = Literal["none", "int8", "nf4"]


def quantization_config(quantize: T5Quantization, dtype: torch.dtype | None):
    """transformers' BitsAndBytesConfig for ``quantize`` (None for "none"); a clear error without bitsandbytes."""
    if quantize == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise PixartError(
            f"--t5-quant {quantize} needs the bitsandbytes package: pip install -e '.[lean]' (or pip install "
            "bitsandbytes)"
        )
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        # Said at every forward on a CPU, where the int8 matmul computes in fp16: expected, not news to the user.
        warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = dtype if dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)


def load_t5(
    name: str,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    quantize: T5Quantization = "none",
):
    """(tokenizer, encoder) from a directory holding both (e.g. ``t5-v1_1-xxl``) or a hub id; ``quantize``:
    the encoder's linear layers in 8 or 4 bits (weights only), loaded straight onto ``device``."""
    from transformers import (  # lazy: transformers adds ~4 s to start-up (docs/reference.md §8)
        AutoTokenizer,
        T5EncoderModel,
    )

    if quantize != "none" and dtype is None:
        # What stays unquantised (embedding, norms, and the `wo` projections transformers keeps out of 8-bit for
        # T5, whose activations there overflow fp16) would otherwise load in fp32: more memory than bf16 T5.
        dtype = torch.bfloat16
    quantized = quantization_config(quantize, dtype)

    path, local_only = locate(name, "T5")
    sub = Path(path) / "tokenizer" if (Path(path) / "tokenizer").is_dir() else None
    if sub is None and Path(path).name == "text_encoder" and (Path(path).parent / "tokenizer").is_dir():
        sub = Path(path).parent / "tokenizer"  # a diffusers pipeline's text_encoder/: tokenizer is its sibling
    enc = Path(path) / "text_encoder" if (Path(path) / "text_encoder").is_dir() else None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(sub or path), local_files_only=local_only)
        if quantized is not None:
            try:
                encoder = T5EncoderModel.from_pretrained(
                    str(enc or path), torch_dtype=dtype, local_files_only=local_only, quantization_config=quantized,
                    device_map={"": str(torch.device(device))},
                )  # fmt: skip
            except (ImportError, RuntimeError) as exc:  # bitsandbytes present but unusable here
                detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                raise PixartError(f"--t5-quant {quantize}: bitsandbytes cannot load T5 here ({detail})") from None
            return tokenizer, encoder.eval().requires_grad_(False)
        encoder = T5EncoderModel.from_pretrained(str(enc or path), torch_dtype=dtype, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        if os.path.isdir(path):
            raise PixartError(f"{name}: not a T5 directory ({str(exc).splitlines()[0][:200]})") from None
        raise PixartError(offline_hint(name, "T5 text encoder")) from None
    return tokenizer, encoder.to(device).eval().requires_grad_(False)
