"""A vision-language model that writes captions: any transformers image-text-to-text model with a chat template.

``AutoProcessor`` + ``AutoModelForImageTextToText`` load LLaVA-1.5/1.6, LLaVA-OneVision, Qwen2-VL and the like from
a local directory (or the hub cache). The prompt goes through the processor's own chat template, so each model
sees the conversation format it was trained on. Generation is batched with left padding (new tokens then start
at the same position for every row) and greedy, so a caption does not depend on the batch it ran in.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pixart_cli.components.resolve import locate, offline_hint
from pixart_cli.errors import PixartError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU that computes it (7B models need it to fit), fp32 elsewhere (CPU bf16 can be slow)."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


class VisionLanguageModel:
    """Images + one prompt → captions, with a transformers image-text-to-text model."""

    def __init__(self, name: str | os.PathLike, *, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        from transformers import (  # lazy: transformers adds ~4 s to start-up (docs/reference.md §8)
            AutoConfig,
            AutoModelForImageTextToText,
            AutoProcessor,
        )
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES  # lazy: as above

        path, local_only = locate(str(name), "vision-language model")
        self.name = str(name)
        self.device = torch.device(device)
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=local_only)
        except OSError:
            raise PixartError(offline_hint(self.name, "vision-language model")) from None
        except ValueError as exc:
            raise PixartError(f"{name}: not a transformers model directory ({exc})") from None
        if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
            raise PixartError(
                f"{name}: a {config.model_type!r} model, not an image-text-to-text model (captioning needs a "
                "vision-language model such as LLaVA or Qwen2-VL)"
            )
        try:
            self.processor = AutoProcessor.from_pretrained(path, local_files_only=local_only)
            self.model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=local_only, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise PixartError(f"{name}: cannot load the model or its processor ({exc})") from None
        if getattr(self.processor, "chat_template", None) is None:
            raise PixartError(f"{name}: the processor has no chat template, so the prompt cannot be formatted")
        self.model.to(self.device).eval().requires_grad_(False)
        self.processor.tokenizer.padding_side = "left"
        if self.processor.tokenizer.pad_token is None:
            self.processor.tokenizer.pad_token = self.processor.tokenizer.eos_token

    def conversation(self, prompt: str) -> str:
        """The prompt in the model's chat format, one image before the text, ready for the assistant's answer."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def inputs(self, images: Sequence[Image.Image], prompt: str) -> Any:
        """The processor's batch for ``images`` (left-padded), on the model's device and dtype.

        CPU work only (resizing, normalising, tokenising): ``pixart caption`` runs it for the next batch in a
        thread while the model generates the current one.
        """
        text = self.conversation(prompt)
        inputs = self.processor(images=list(images), text=[text] * len(images), return_tensors="pt", padding=True)
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    @torch.inference_mode()
    def generate(self, inputs: Any, max_new_tokens: int) -> list[str]:
        """One caption per row of ``inputs`` (greedy, special tokens dropped, surrounding whitespace stripped)."""
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        new = out[:, inputs["input_ids"].shape[1] :]
        return [t.strip() for t in self.processor.batch_decode(new, skip_special_tokens=True)]

    def caption(self, images: Sequence[Image.Image], prompt: str, max_new_tokens: int) -> list[str]:
        """One caption per image: ``generate(inputs(images, prompt), max_new_tokens)``."""
        return self.generate(self.inputs(images, prompt), max_new_tokens)


def model_path(name: str) -> Path | None:
    """The local directory of ``name`` when it is one (recorded beside the captions for reference)."""
    path = Path(name).expanduser()
    return path.resolve() if path.is_dir() else None
