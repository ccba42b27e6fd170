"""Text-only pre-training of the ShapesWorld T5 encoder, so that its features say which object is where.

Real PixArt reads captions through T5-XXL, pre-trained on web text: its features carry syntax. A *random* tiny T5
does not. Measured with ``experiments/shapesworld/text_relation_probe.py`` (a cross-attention probe asked where one
colour's object is relative to the other, from the encoder's features alone): the random encoder gives what
word-order-blind token embeddings give (0.55 on fresh captions, 0.00 on held-out colour arrangements: the probe,
like the denoiser trained on it, can only recall how a colour pair was laid out in training). Generic text
objectives did not change that here (text infilling, and paraphrasing every relation into "left of"/"above": both
0.55 / 0.00).

So the encoder is pre-trained, on captions of the training split only and without images, on two objectives at
once: text infilling (T5-style: spans replaced by one ``<unk>``, the decoder writes the whole caption) and
*relation-role tagging*: a linear head on each token of an object phrase ("red circle") in a two-object caption
names that object's place relative to the other (left of / right of / above / below), which the sentence states
in one of several word orders ("A left of B", "B right of A", "there is B; to its left is A"). Only the encoder
is kept; the decoder and the tagging head are thrown away. The objective is about language (who is the subject of
"left of"), read from the text alone; which colours are where in held-out arrangements is never taught.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import torch

from pixart_cli.shapesworld.prompts import caption
from pixart_cli.shapesworld.world import RELATIONS, Scene, sample_scene

logger = logging.getLogger(__name__)

PRETRAIN_STEPS = 1500
SCENES = 30_000  # training-split scenes; each gives a dense and a sparse caption
_BATCH = 128
_LR = 2e-3
_MASK_RATE = 0.15  # fraction of tokens text infilling hides (in spans of mean length 3)


def role_tags(text: str, scene: Scene, offsets: list[tuple[int, int]]) -> list[int]:
    """Per token: the index in ``RELATIONS`` of its object's place relative to the other object, for the tokens
    of each "<colour> <shape>" mention in a two-object caption; -100 (ignored) elsewhere."""
    tags = [-100] * len(offsets)
    if len(scene.objects) != 2:
        return tags
    for k, obj in enumerate(scene.objects):
        role = RELATIONS.index(scene.relation(k, 1 - k))
        for match in re.finditer(rf"\b{obj.colour} {obj.shape}\b", text):
            for j, (start, end) in enumerate(offsets):
                if end > match.start() and start < match.end():
                    tags[j] = role
    return tags


def _corpus(tokenizer, scenes: int) -> tuple[list[list[int]], list[list[int]]]:
    ids, tags = [], []
    for i in range(scenes):
        scene = sample_scene(i, split="train")
        for style in ("dense", "sparse"):
            text = caption(scene, style, seed=i)
            encoded = tokenizer(text, return_offsets_mapping=True)
            ids.append(encoded.input_ids)
            tagged = style == "dense"
            tags.append(role_tags(text, scene, encoded.offset_mapping) if tagged else [-100] * len(encoded.input_ids))
    return ids, tags


def _infill(seq: list[int], tags: list[int], mask: bool, rng: np.random.Generator, unk: int):
    """Hide spans (Poisson(3) tokens each) behind one ``unk`` token; their tags go with them."""
    kept, kept_tags, i = [], [], 0
    body, body_tags = seq[:-1], tags[:-1]  # without </s>
    while i < len(body):
        if mask and rng.random() < _MASK_RATE / 3:
            kept.append(unk)
            kept_tags.append(-100)
            i += max(1, int(rng.poisson(3)))
        else:
            kept.append(body[i])
            kept_tags.append(body_tags[i])
            i += 1
    return [*kept, seq[-1]], [*kept_tags, -100]


def _padded(rows: list[list[int]], fill: int) -> torch.Tensor:
    out = torch.full((len(rows), max(map(len, rows))), fill, dtype=torch.long)
    for b, row in enumerate(rows):
        out[b, : len(row)] = torch.tensor(row)
    return out


def pretrain_shapes_t5(directory: str | Path, steps: int = PRETRAIN_STEPS, seed: int = 0, scenes: int = SCENES) -> Path:
    """Pre-train the T5 encoder in ``directory`` (made by ``make_tiny_t5``) in place; see the module docstring.

    Deterministic for a given seed, torch build and thread count; about 13 minutes on one CPU thread.
    """
    from transformers import (  # lazy: transformers adds ~4 s to start-up (docs/reference.md §8)
        T5Config,
        T5TokenizerFast,
    )

    directory = Path(directory)
    tokenizer = T5TokenizerFast.from_pretrained(str(directory))
    config = T5Config.from_pretrained(str(directory))
    ids, tags = _corpus(tokenizer, scenes)
    with torch.random.fork_rng(devices=[]):  # seeds the initialisation and T5's dropout
        torch.manual_seed(seed)
        encoder = _pretrain(config, ids, tags, tokenizer, steps, np.random.default_rng(seed))
    encoder.save_pretrained(str(directory), safe_serialization=True)
    return directory


def _pretrain(config, ids, tags, tokenizer, steps: int, rng: np.random.Generator):
    """Encoder + decoder + tagging head trained together; returns the encoder alone."""
    from transformers import (  # lazy: transformers adds ~4 s to start-up (docs/reference.md §8)
        T5Config,
        T5EncoderModel,
        T5ForConditionalGeneration,
    )

    model = T5ForConditionalGeneration(
        T5Config(**{**config.to_dict(), "num_decoder_layers": 2, "is_encoder_decoder": True})
    )
    head = torch.nn.Linear(config.d_model, len(RELATIONS))
    params = [*model.parameters(), *head.parameters()]
    optimiser = torch.optim.AdamW(params, lr=_LR, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=_LR, total_steps=steps, pct_start=0.05)
    for step in range(steps):
        picks = rng.integers(len(ids), size=_BATCH)
        # every other item unmasked, so the tagger also learns on whole captions (what the encoder reads in use)
        inputs, input_tags = zip(
            *(_infill(ids[k], tags[k], b % 2 == 1, rng, tokenizer.unk_token_id) for b, k in enumerate(picks)),
            strict=True,
        )
        x = _padded(list(inputs), tokenizer.pad_token_id)
        labels = _padded([ids[k] for k in picks], -100)
        out = model(input_ids=x, attention_mask=(x != tokenizer.pad_token_id).long(), labels=labels)
        tag_logits = head(out.encoder_last_hidden_state).flatten(0, 1)
        tag_loss = torch.nn.functional.cross_entropy(tag_logits, _padded(list(input_tags), -100).flatten())
        loss = out.loss + tag_loss
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info("T5 pre-training step %d: infilling %.3f, tagging %.3f", step, out.loss.item(), tag_loss.item())
    encoder = T5EncoderModel(config)
    kept = {k: v for k, v in model.state_dict().items() if k.startswith(("encoder.", "shared."))}
    encoder.load_state_dict(kept, strict=True)
    return encoder
