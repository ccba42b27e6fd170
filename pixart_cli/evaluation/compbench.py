"""T2I-CompBench and the ShapesWorld benchmark: generate in T2I-CompBench's layout, score each category.

Layout (T2I-CompBench's own): ``<out>/<category>/samples/<prompt>_<index:06d>.png`` where ``index`` runs over the
whole category, prompt ``i`` owning indices ``i·n … i·n + n − 1`` (``n`` images per prompt), and image ``j`` of every
prompt uses seed ``seed + j`` (as the benchmark's reference script does with seed 42). Prompts come from
``<category>_val.txt`` files (a T2I-CompBench checkout's ``examples/dataset/``), one per line.

Evaluators, weights read from local directories (nothing is downloaded):

* ``color``, ``shape``, ``texture`` — BLIP-VQA (``BlipForQuestionAnswering``): every noun phrase of the prompt is
  asked as ``"<phrase>?"``; the answer probability is the first decoded token's P(yes) / (P(yes) + P(no)), and the
  image's score is the product over its phrases (1 when a prompt has none), as in T2I-CompBench.
* ``spatial`` — an object detector (``AutoModelForObjectDetection`` such as DETR, or a zero-shot detector such as
  OWL-ViT queried with the two object names) and T2I-CompBench's rule: both objects found → ¼·(score₁ + score₂)
  plus ½·the position score; one found → ¼·its score; scores under 0.5 become 0. The original uses UniDet (a
  unified label space of several detection datasets); a COCO-label DETR knows fewer objects, so absolute numbers
  are not comparable with published ones.
* ``non_spatial`` — CLIP score: the cosine between CLIP's image and text embeddings (raw, not ×100).
* ``complex`` — "3-in-1": the average of the BLIP-VQA score, the spatial score and the CLIP score of the prompt
  with its attribute words removed. With ``complex_val_spatial.txt`` and ``complex_val_action.txt`` beside the
  prompts, T2I-CompBench's rule is followed exactly (spatial-only prompts average BLIP and spatial, action-only
  prompts BLIP and CLIP, the rest all three); without them, prompts that name a spatial relation average all three
  and the others average BLIP and CLIP (our rule).

Noun phrases are found without spaCy (whose model cannot be downloaded here) by ``noun_phrases``, a small rule-based
chunker: a phrase starts at a determiner or a content word and ends before a conjunction, preposition, auxiliary
verb, pronoun or punctuation, or at a word ending in -ed/-ing (or a common verb) once the phrase has its noun.
Phrases that only name a side ("the left", "top") are dropped, as in T2I-CompBench. "a green bench and a blue
bowl" → ["a green bench", "a blue bowl"]. spaCy chunks some complex sentences differently.

``--scorer vqascore`` scores every category with VQAScore from t2v-metrics, run with another Python interpreter
(its own environment; t2v-metrics pins an older torch and transformers) through ``VqaScoreSubprocess``.

ShapesWorld (``evaluate_shapes``): held-out prompts from ``pixart_cli.data.shapes.heldout_prompts``, scored exactly
by ``pixart_cli.data.shapes_detect.score_images``; categories color, shape, spatial, complex.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pixart_cli.errors import PixartError
from pixart_cli.evaluation import Progress, no_progress
from pixart_cli.evaluation.generate import GenItem, ImageMaker, Shard, generate_images
from pixart_cli.io import atomic_file

logger = logging.getLogger(__name__)

CATEGORIES: tuple[str, ...] = ("color", "shape", "texture", "spatial", "non_spatial", "complex")
SHAPES_CATEGORIES: tuple[str, ...] = ("color", "shape", "spatial", "complex")
EVALUATORS: dict[str, str] = {
    "color": "blip-vqa",
    "shape": "blip-vqa",
    "texture": "blip-vqa",
    "spatial": "detector",
    "non_spatial": "clip",
    "complex": "3-in-1",
}
SCORERS: tuple[str, ...] = ("auto", "clip", "vqascore")
FLAGS = {"blip": "--blip", "clip": "--clip", "detector": "--detector", "vqascore": "--vqascore-python"}
REPORT_FILE = "compbench_report.json"
SCORES_FILE = "scores.json"

#################################################################################
#                           Prompts, layout, phrases                            #
#################################################################################


def read_prompts(directory: str | os.PathLike, category: str) -> list[str]:
    """The prompts of ``<directory>/<category>_val.txt``: one per line (tab-separated extras dropped)."""
    path = Path(directory) / f"{category}_val.txt"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PixartError(f"{path}: not found; --prompts must be T2I-CompBench's examples/dataset directory") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PixartError(f"{path}: cannot read the prompts ({type(exc).__name__})") from None
    prompts = [line.split("\t")[0].strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise PixartError(f"{path}: holds no prompts")
    return prompts


def sample_name(prompt: str, index: int) -> str:
    """T2I-CompBench's file name for image ``index`` of a category."""
    if "/" in prompt or "\0" in prompt:
        raise PixartError(f"prompt {prompt!r} cannot be a file name")
    return f"{prompt}_{index:06d}.png"


def layout(category: str, prompts: Sequence[str], images_per_prompt: int, seed: int) -> list[GenItem]:
    """The images of a category: prompt i, image j → index i·n + j, seed + j."""
    if images_per_prompt <= 0:
        raise PixartError(f"--images-per-prompt must be positive, got {images_per_prompt}")
    n = images_per_prompt
    return [
        GenItem(f"{category}/samples/{sample_name(p, i * n + j)}", p, seed + j)
        for i, p in enumerate(prompts)
        for j in range(n)
    ]


_NAME = re.compile(r"^(?P<prompt>.+)_(?P<index>\d{6,})\.png$")


def discover_samples(category_dir: str | os.PathLike) -> list[tuple[Path, str]]:
    """(file, prompt) of the images in ``<category_dir>/samples`` named as T2I-CompBench names them, by index."""
    samples = Path(category_dir) / "samples"
    if not samples.is_dir():
        raise PixartError(f"{samples}: no such directory (generate with --model first)")
    found = []
    for path in samples.iterdir():
        match = _NAME.match(path.name)
        if match:
            found.append((int(match["index"]), path, match["prompt"]))
    if not found:
        raise PixartError(f"{samples}: holds no images named <prompt>_<6-digit index>.png")
    return [(path, prompt) for _, path, prompt in sorted(found)]


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


DETERMINERS = _words(
    "a an the this that these those some many several few one two three four five six seven eight nine ten "
    "his her its their my your our each every another"
)
BOUNDARY_WORDS = _words(
    # conjunctions, prepositions, auxiliaries, pronouns and adverbs: never inside a noun phrase
    "and or but nor while as so yet with without on in at of to near next beside besides behind under underneath "
    "above below over between among inside into onto through past from by for against around across along atop "
    "beneath toward towards up down off out after before during like than then is are was were be been being am "
    "has have had does do did it they them he she him we you i there here which who whom whose what where when "
    "very too also not can could will would should may might must while themselves itself himself herself "
    "ourselves yourself"
)
VERBS = _words(
    "sits sat lay lies stands stood hangs hung rests rose shines flies flew runs ran holds held grows grew sings "
    "sang swims swam eats ate drinks drank looks flash flashes sleeps slept plays jumps walks leans reads hold led "
    "give gives gave make makes made take takes took go goes went come comes came sit stand lie hang fly run"
)
ING_ED_NOUNS = _words("building painting ceiling wedding clothing earring bedding pudding stocking railing drawing")
SIDE_WORDS = _words("top bottom side left right front back middle center centre")
ATTRIBUTE_WORDS = _words(
    # colours
    "red orange yellow green blue purple pink brown black white gray grey silver gold golden beige tan "
    "colorful colourful dark light bright pale "
    # shapes and sizes
    "oblong teardrop spherical rectangular pyramidal pentagonal triangular round cylindrical cubic conical square "
    "oval diamond circular crescent hexagonal octagonal heart-shaped star-shaped big small large little tiny huge "
    "short long tall "
    # materials and textures
    "metallic wooden fluffy leather glass fabric rubber plastic soft smooth rough hard sleek shiny striped jagged "
    "fuzzy bumpy spiky prickly glossy textured translucent silky velvety furry woolen knitted "
    # other frequent adjectives in the complex prompts
    "warm cool hot cold sharp sweet crisp crispy fresh crunchy juicy delicate intricate fragrant bold vibrant tired "
    "old new ancient cozy calm gentle dull clean comfortable rich sticky tender spicy ripe heavy rusty twisted "
    "gnarled grand sturdy thorny distant glowing flickering"
)
SPATIAL_RELATIONS: tuple[str, ...] = (
    # T2I-CompBench's locality words, searched in this order
    "on side of",
    "next to",
    "near",
    "on the left of",
    "on the right of",
    "on the bottom of",
    "on the top of",
    "on top of",
)
PERSON_WORDS = frozenset({"girl", "boy", "man", "woman"})  # T2I-CompBench maps these to the detector's "person"

_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9'\-]*|[^\sA-Za-z0-9]")


def _is_word(token: str) -> bool:
    return token[0].isalnum()


def _looks_like_verb(word: str) -> bool:
    if word in ATTRIBUTE_WORDS or word in ING_ED_NOUNS:  # "striped", "twisted", "painting"
        return False
    return word in VERBS or (len(word) > 4 and word.endswith(("ed", "ing")))


def _chunks(prompt: str) -> list[list[tuple[int, str]]]:
    """Noun-phrase chunks as lists of (token position, word)."""
    chunks: list[list[tuple[int, str]]] = []
    current: list[tuple[int, str]] = []
    has_noun = False

    def close() -> None:
        nonlocal current, has_noun
        if current and any(w.lower() not in DETERMINERS for _, w in current):
            chunks.append(current)
        current, has_noun = [], False

    tokens = _TOKEN.findall(prompt)
    for pos, token in enumerate(tokens):
        word = token.lower()
        if token == "," and current and not has_noun and pos + 1 < len(tokens) and _is_word(tokens[pos + 1]):
            continue  # "the bold, vibrant colors": a comma between adjectives stays inside the phrase
        if not _is_word(token) or word in BOUNDARY_WORDS:
            close()
        elif word in DETERMINERS:
            close()
            current.append((pos, token))
        elif _looks_like_verb(word) and (has_noun or not current):
            close()  # "the omelet cooked the eggs", "is chasing a ball": a verb ends a phrase and starts none
        else:
            current.append((pos, token))
            if word not in ATTRIBUTE_WORDS and not _looks_like_verb(word):
                has_noun = True
    close()
    return [c for c in chunks if not all(w.lower() in SIDE_WORDS | DETERMINERS for _, w in c)]


def noun_phrases(prompt: str) -> list[str]:
    """The noun phrases of a prompt, in order (see the module docstring)."""
    return [" ".join(w for _, w in chunk) for chunk in _chunks(prompt)]


def spatial_relation(prompt: str) -> str | None:
    """The first of T2I-CompBench's locality words found in the prompt, or None."""
    text = " ".join(prompt.lower().split())
    return next((r for r in SPATIAL_RELATIONS if r in text), None)


def spatial_objects(prompt: str) -> tuple[str | None, str | None, str | None]:
    """(first object, relation, second object): the nouns just before and just after the locality words."""
    relation = spatial_relation(prompt)
    if relation is None:
        return None, None, None
    text = " ".join(prompt.split())
    at = text.lower().find(relation)
    before, after = _chunks(text[:at]), _chunks(text[at + len(relation) :])
    first = before[-1][-1][1].lower() if before else None
    second = after[0][-1][1].lower() if after else None
    return first, relation, second


def without_attributes(prompt: str) -> str:
    """The prompt with its attribute words (colours, shapes, materials, ...) removed: complex's CLIP text."""
    return " ".join(w for w in prompt.split() if w.lower().strip(".,;:!?") not in ATTRIBUTE_WORDS)


#################################################################################
#                               The spatial rule                                #
#################################################################################


@dataclass(frozen=True)
class Detection:
    label: str
    score: float
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels


def position_score(relation: str, box1: Sequence[float], box2: Sequence[float], image_width: int) -> float:
    """How well ``box1`` stands ``relation`` ``box2`` (T2I-CompBench's soft rule; image y grows downwards).

    Left/right/top/bottom: 1 when the centres are offset mostly along that axis, in that direction, and the boxes
    overlap little (IoU < 0.1), 0.1/IoU when they overlap more, 0 otherwise. Next to / near / on side of: 1 when
    the centres are closer than 150 px on either axis, else 150 / the larger offset. The 150 px are for the
    benchmark's 512-px images: we scale them with the image width. "on top of" counts as "on the top of" (the
    reference scores it 0, which we take for an oversight).
    """
    cx1, cy1 = (box1[0] + box1[2]) / 2, (box1[1] + box1[3]) / 2
    cx2, cy2 = (box2[0] + box2[2]) / 2, (box2[1] + box2[3]) / 2
    dx, dy = cx2 - cx1, cy2 - cy1
    inter_w = max(0.0, min(box1[2], box2[2]) - max(box1[0], box2[0]))
    inter_h = max(0.0, min(box1[3], box2[3]) - max(box1[1], box2[1]))
    inter = inter_w * inter_h
    union = (box1[2] - box1[0]) * (box1[3] - box1[1]) + (box2[2] - box2[0]) * (box2[3] - box2[1]) - inter
    iou = inter / union if union > 0 else 0.0
    if relation in ("next to", "on side of", "near"):
        threshold = 150.0 * image_width / 512
        if abs(dx) < threshold or abs(dy) < threshold:
            return 1.0
        return threshold / max(abs(dx), abs(dy))
    along, across, sign = {
        "on the left of": (dx, dy, 1),
        "on the right of": (dx, dy, -1),
        "on the top of": (dy, dx, 1),
        "on top of": (dy, dx, 1),
        "on the bottom of": (dy, dx, -1),
    }.get(relation, (0.0, 0.0, 0))
    if sign == 0 or along * sign <= 0 or abs(along) <= abs(across):
        return 0.0
    return 1.0 if iou < 0.1 else 0.1 / iou


def _matches(label: str, name: str) -> bool:
    label, name = label.lower().strip(), name.lower().strip()
    if name in PERSON_WORDS:
        name = "person"
    return label == name or (name.endswith("s") and not name.endswith("ss") and label == name[:-1])


def spatial_score(
    detections: Sequence[Detection], first: str | None, relation: str | None, second: str | None, image_width: int
) -> float:
    """T2I-CompBench's spatial score of one image from its detections (best-scoring one per object name)."""
    if first is None or second is None or relation is None:
        return 0.0

    def best(name: str) -> Detection | None:
        found = [d for d in detections if _matches(d.label, name)]
        return max(found, key=lambda d: d.score) if found else None

    a, b = best(first), best(second)
    if a is not None and b is not None:
        score = 0.25 * a.score + 0.25 * b.score + position_score(relation, a.box, b.box, image_width) / 2
    elif a is not None or b is not None:
        score = 0.25 * (a or b).score
    else:
        score = 0.0
    return score if score >= 0.5 else 0.0


#################################################################################
#                                   Scorers                                     #
#################################################################################

StepProgress = Callable[[float], None]


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:
        raise PixartError(f"{path}: cannot read the image ({type(exc).__name__})") from None


def _load_model_and_processor(directory, flag: str, what: str, model_cls, processor_cls) -> tuple[Path, Any, Any]:
    """A transformers model and its processor from one local directory, with one-line errors."""
    path = _local_dir(directory, flag, what)
    try:
        return path, model_cls.from_pretrained(str(path)), processor_cls.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as exc:
        raise _load_failure(path, exc) from None


def _local_dir(directory: str | os.PathLike, flag: str, what: str) -> Path:
    path = Path(directory).expanduser()
    if not (path / "config.json").is_file():
        raise PixartError(f"{flag} {path}: not a {what} directory (no config.json); pass a local save_pretrained copy")
    return path


def _load_failure(path: Path, exc: Exception) -> PixartError:
    detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return PixartError(f"{path}: cannot load ({detail})")


class ClipScorer:
    """CLIP score: cosine similarity of CLIP image and text embeddings (``transformers.CLIPModel``)."""

    def __init__(self, model, processor, *, device: torch.device | str = "cpu", source: str = "", batch_size: int = 32):
        self.model = model.eval().requires_grad_(False).to(device)
        self.processor = processor
        self.device = torch.device(device)
        self.source = source
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, device: torch.device | str = "cpu") -> ClipScorer:
        from transformers import CLIPModel, CLIPProcessor

        path, model, processor = _load_model_and_processor(directory, "--clip", "CLIP model", CLIPModel, CLIPProcessor)
        return cls(model, processor, device=device, source=str(path))

    @torch.inference_mode()
    def cosine(self, images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
        """Cosine similarity of each image with its text."""
        max_length = self.model.config.text_config.max_position_embeddings
        inputs = self.processor(
            text=list(texts), images=list(images), return_tensors="pt", padding=True, truncation=True,
            max_length=max_length,
        )  # fmt: skip
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        image = _embedding(self.model.get_image_features(pixel_values=inputs["pixel_values"]))
        text = _embedding(
            self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        )
        image = torch.nn.functional.normalize(image.float(), dim=-1)
        text = torch.nn.functional.normalize(text.float(), dim=-1)
        return (image * text).sum(-1).cpu().numpy()

    def score_files(
        self, paths: Sequence[Path], texts: Sequence[str], progress: Progress = no_progress, stage: str = "clip"
    ) -> list[float]:
        out: list[float] = []
        progress(stage, 0, len(paths))
        for start in range(0, len(paths), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            images = [_open_rgb(Path(p)) for p in paths[chunk]]
            out += self.cosine(images, texts[chunk]).tolist()
            progress(stage, len(out), len(paths))
        return out


def _embedding(output) -> torch.Tensor:
    """transformers returns a tensor or, in some versions, an output object holding the pooled embedding."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


class BlipVqaScorer:
    """BLIP-VQA: P(yes) for a question about an image (``transformers.BlipForQuestionAnswering``)."""

    MAX_QUESTION_TOKENS = 35  # T2I-CompBench's BLIP truncates questions there

    def __init__(self, model, processor, *, device: torch.device | str = "cpu", source: str = "", batch_size: int = 16):
        self.model = model.eval().requires_grad_(False).to(device)
        self.processor = processor
        self.device = torch.device(device)
        self.source = source
        self.batch_size = batch_size
        tokenizer = processor.tokenizer
        self.yes_id, self.no_id = (tokenizer.convert_tokens_to_ids(w) for w in ("yes", "no"))
        if tokenizer.unk_token_id in (self.yes_id, self.no_id) or None in (self.yes_id, self.no_id):
            raise PixartError(f"{source}: the BLIP tokenizer has no 'yes'/'no' tokens")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, device: torch.device | str = "cpu") -> BlipVqaScorer:
        from transformers import BlipForQuestionAnswering, BlipProcessor

        path, model, processor = _load_model_and_processor(
            directory, "--blip", "BLIP VQA model", BlipForQuestionAnswering, BlipProcessor
        )
        return cls(model, processor, device=device, source=str(path))

    def _lengths(self, questions: Sequence[str]) -> list[int]:
        tokens = self.processor.tokenizer(list(questions), truncation=True, max_length=self.MAX_QUESTION_TOKENS)
        return [len(ids) for ids in tokens["input_ids"]]

    def yes_probability(self, images: Sequence[Image.Image], questions: Sequence[str]) -> np.ndarray:
        """P(yes) / (P(yes) + P(no)) of the first answer token, for each (image, question).

        Questions run in groups of one token length: transformers 5.24's BLIP text layer drops the cross-attention
        mask, so the answer decoder would otherwise attend to the padding of shorter questions.
        """
        lengths = self._lengths(questions)
        out = np.empty(len(questions))
        for length in sorted(set(lengths)):
            group = [i for i, n in enumerate(lengths) if n == length]
            out[group] = self._yes_probability([images[i] for i in group], [questions[i] for i in group])
        return out

    @torch.inference_mode()
    def _yes_probability(self, images: Sequence[Image.Image], questions: Sequence[str]) -> np.ndarray:
        inputs = self.processor(
            images=list(images), text=list(questions), return_tensors="pt", padding=True, truncation=True,
            max_length=self.MAX_QUESTION_TOKENS,
        )  # fmt: skip
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        model = self.model
        image_embeds = model.vision_model(pixel_values=inputs["pixel_values"].to(model.dtype))[0]
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        question = model.text_encoder(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        )[0]
        start = torch.full((len(questions), 1), model.decoder_start_token_id, dtype=torch.long, device=self.device)
        logits = model.text_decoder(
            input_ids=start, encoder_hidden_states=question, encoder_attention_mask=inputs["attention_mask"]
        ).logits[:, 0]
        probs = logits.float().softmax(-1)
        yes, no = probs[:, self.yes_id], probs[:, self.no_id]
        return (yes / (yes + no)).cpu().numpy()

    def score_files(
        self, paths: Sequence[Path], prompts: Sequence[str], progress: Progress = no_progress, stage: str = "blip-vqa"
    ) -> list[float]:
        """Per image: the product of P(yes) over the prompt's noun phrases (1 for a prompt without any)."""
        pairs = [(i, f"{phrase}?") for i, prompt in enumerate(prompts) for phrase in noun_phrases(prompt)]
        lengths = self._lengths([q for _, q in pairs]) if pairs else []
        pairs = [pair for _, pair in sorted(zip(lengths, pairs, strict=True))]  # batches of one question length
        scores = np.ones(len(paths))
        progress(stage, 0, len(pairs))
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            images = {i: _open_rgb(Path(paths[i])) for i in dict.fromkeys(i for i, _ in chunk)}
            probs = self.yes_probability([images[i] for i, _ in chunk], [q for _, q in chunk])
            for (i, _), p in zip(chunk, probs, strict=True):
                scores[i] *= p
            progress(stage, start + len(chunk), len(pairs))
        return scores.tolist()


class DetectorScorer:
    """The spatial evaluator: a transformers object detector and T2I-CompBench's spatial rule.

    Closed-set detectors (``AutoModelForObjectDetection``: DETR, Conditional/Deformable DETR, YOLOS, RT-DETR …) match
    object names to their ``id2label`` names (plural "s" dropped, girl/boy/man/woman → person). Zero-shot detectors
    (OWL-ViT, OWLv2, Grounding DINO: ``AutoModelForZeroShotObjectDetection``) are queried with the two names.
    """

    ZERO_SHOT_TYPES = ("owlvit", "owlv2", "grounding-dino", "omdet-turbo")

    def __init__(
        self,
        model,
        processor,
        *,
        zero_shot: bool,
        threshold: float = 0.3,
        device: torch.device | str = "cpu",
        source: str = "",
    ):
        self.model = model.eval().requires_grad_(False).to(device)
        self.processor = processor
        self.zero_shot = zero_shot
        self.threshold = threshold
        self.device = torch.device(device)
        self.source = source

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, *, threshold: float = 0.3, device: torch.device | str = "cpu"
    ) -> DetectorScorer:
        from transformers import (
            AutoConfig,
            AutoModelForObjectDetection,
            AutoModelForZeroShotObjectDetection,
            AutoProcessor,
        )

        path = _local_dir(directory, "--detector", "object detector")
        try:
            config = AutoConfig.from_pretrained(str(path))
            zero_shot = config.model_type in cls.ZERO_SHOT_TYPES
            auto = AutoModelForZeroShotObjectDetection if zero_shot else AutoModelForObjectDetection
            model = auto.from_pretrained(str(path))
            processor = AutoProcessor.from_pretrained(str(path))
        except (OSError, ValueError, KeyError) as exc:
            raise _load_failure(path, exc) from None
        return cls(model, processor, zero_shot=zero_shot, threshold=threshold, device=device, source=str(path))

    @torch.inference_mode()
    def detect(self, image: Image.Image, names: Sequence[str]) -> list[Detection]:
        """Detections above the threshold, in pixels of ``image``; ``names`` are the queries of zero-shot models."""
        target = [(image.height, image.width)]
        if self.zero_shot:
            queries = [[f"a photo of a {n}" for n in names]]
            inputs = self.processor(text=queries, images=image, return_tensors="pt", padding=True, truncation=True)
            inputs = inputs.to(self.device)
            outputs = self.model(**inputs)
            result = self.processor.post_process_grounded_object_detection(
                outputs, threshold=self.threshold, target_sizes=target, text_labels=queries
            )[0]
            labels = [names[int(i)] for i in result["labels"]]
        else:
            inputs = self.processor(images=image, return_tensors="pt").to(self.device)
            outputs = self.model(**inputs)
            processor = getattr(self.processor, "image_processor", self.processor)
            result = processor.post_process_object_detection(outputs, threshold=self.threshold, target_sizes=target)[0]
            labels = [self.model.config.id2label[int(i)] for i in result["labels"]]
        return [
            Detection(label, float(score), tuple(float(v) for v in box))
            for label, score, box in zip(labels, result["scores"], result["boxes"], strict=True)
        ]

    def score_files(
        self, paths: Sequence[Path], prompts: Sequence[str], progress: Progress = no_progress, stage: str = "detector"
    ) -> list[float]:
        out = []
        progress(stage, 0, len(paths))
        for path, prompt in zip(paths, prompts, strict=True):
            first, relation, second = spatial_objects(prompt)
            if first is None or second is None:
                out.append(0.0)
            else:
                image = _open_rgb(Path(path))
                names = ["person" if n in PERSON_WORDS else n for n in (first, second)]
                detections = self.detect(image, names)
                out.append(spatial_score(detections, first, relation, second, image.width))
            progress(stage, len(out), len(paths))
        return out


VQASCORE_SCRIPT = """\
import json, sys
import t2v_metrics
requests, result, model = sys.argv[1], sys.argv[2], sys.argv[3]
pairs = json.load(open(requests, encoding="utf-8"))
score = t2v_metrics.VQAScore(model=model)
out = []
for pair in pairs:
    value = score(images=[pair["image"]], texts=[pair["text"]])
    out.append(float(value.reshape(-1)[0]))
json.dump(out, open(result, "w"))
"""


class VqaScoreSubprocess:
    """VQAScore (t2v-metrics) computed by another Python interpreter that has t2v-metrics installed.

    t2v-metrics pins older torch/transformers releases and downloads its models at run time, so it lives in its
    own environment: we write the (image path, prompt) pairs to a JSON file, run a small script with that
    interpreter, and read the scores back.
    """

    def __init__(self, python: str | os.PathLike, model: str = "clip-flant5-xxl", timeout: float | None = None):
        self.python = str(python)
        self.model = model
        self.timeout = timeout
        self.source = f"t2v-metrics VQAScore ({model}) via {self.python}"

    def check(self) -> None:
        """Raise PixartError unless the interpreter runs and imports t2v_metrics."""
        try:
            done = subprocess.run(
                [self.python, "-c", "import t2v_metrics"], capture_output=True, text=True, timeout=600, check=False
            )
        except OSError as exc:
            raise PixartError(f"--vqascore-python {self.python}: cannot run it ({exc.strerror})") from None
        if done.returncode != 0:
            raise PixartError(
                f"--vqascore-python {self.python}: cannot import t2v_metrics there "
                "(install it in that environment: pip install t2v-metrics)"
            )

    def score_files(
        self, paths: Sequence[Path], prompts: Sequence[str], progress: Progress = no_progress, stage: str = "vqascore"
    ) -> list[float]:
        progress(stage, 0, len(paths))
        with tempfile.TemporaryDirectory(prefix="pixart-vqascore-") as tmp:
            requests, result, script = Path(tmp) / "requests.json", Path(tmp) / "scores.json", Path(tmp) / "score.py"
            pairs = [{"image": str(Path(p).resolve()), "text": t} for p, t in zip(paths, prompts, strict=True)]
            requests.write_text(json.dumps(pairs, ensure_ascii=False), encoding="utf-8")
            script.write_text(VQASCORE_SCRIPT, encoding="utf-8")
            try:
                done = subprocess.run(
                    [self.python, str(script), str(requests), str(result), self.model],
                    capture_output=True, text=True, timeout=self.timeout, check=False,
                )  # fmt: skip
            except OSError as exc:
                raise PixartError(f"--vqascore-python {self.python}: cannot run it ({exc.strerror})") from None
            except subprocess.TimeoutExpired:
                raise PixartError(f"VQAScore did not finish within {self.timeout} s") from None
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["no error output"])[-1]
                raise PixartError(f"VQAScore failed in {self.python}: {last}")
            scores = json.loads(result.read_text(encoding="utf-8"))
        if len(scores) != len(paths):
            raise PixartError(f"VQAScore returned {len(scores)} scores for {len(paths)} images")
        progress(stage, len(paths), len(paths))
        return [float(s) for s in scores]


@dataclass
class Scorers:
    """The evaluators a run may use; each category needs some of them (``required``)."""

    blip: BlipVqaScorer | None = None
    clip: ClipScorer | None = None
    detector: DetectorScorer | None = None
    vqascore: VqaScoreSubprocess | None = None


def required(categories: Sequence[str], scorer: str = "auto") -> set[str]:
    """Which of blip / clip / detector / vqascore scoring ``categories`` with ``scorer`` needs."""
    if scorer == "vqascore":
        return {"vqascore"}
    if scorer == "clip":
        return {"clip"}
    if scorer != "auto":
        raise PixartError(f"--scorer must be one of {', '.join(SCORERS)}, got {scorer!r}")
    need: set[str] = set()
    for category in categories:
        evaluator = EVALUATORS[category]
        need |= {"blip", "clip", "detector"} if evaluator == "3-in-1" else {evaluator.replace("blip-vqa", "blip")}
    return need


def check_categories(categories: Sequence[str]) -> list[str]:
    categories = list(dict.fromkeys(categories))
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown or not categories:
        raise PixartError(f"unknown categories {', '.join(unknown) or '(none)'}; choose from {', '.join(CATEGORIES)}")
    return categories


#################################################################################
#                                  Scoring runs                                 #
#################################################################################


@dataclass
class CategoryResult:
    category: str
    evaluator: str
    mean: float
    images: int
    prompts: int
    extra: dict[str, float] = field(default_factory=dict)  # further means (ShapesWorld's checks)


@dataclass
class BenchReport:
    benchmark: str
    categories: dict[str, CategoryResult]
    settings: dict
    path: Path | None


def _complex_split(prompts_dir: Path) -> tuple[set[str], set[str]] | None:
    """T2I-CompBench's lists of spatial-only and action-only complex prompts, when present."""

    def read(name: str) -> set[str] | None:
        path = prompts_dir / name
        if not path.is_file():
            return None
        lines = path.read_text(encoding="utf-8").splitlines()
        return {line.strip().split(".")[0].lower() for line in lines if line.strip()}  # how the reference compares

    spatial, action = read("complex_val_spatial.txt"), read("complex_val_action.txt")
    return None if spatial is None or action is None else (spatial, action)


def score_complex(
    paths: Sequence[Path],
    prompts: Sequence[str],
    scorers: Scorers,
    *,
    split: tuple[set[str], set[str]] | None = None,
    progress: Progress = no_progress,
) -> tuple[list[float], dict[str, list[float]]]:
    """The "3-in-1" complex score per image and its parts (see the module docstring)."""
    assert scorers.blip is not None and scorers.clip is not None and scorers.detector is not None
    attribute = scorers.blip.score_files(paths, prompts, progress, "score:complex:blip-vqa")
    spatial = scorers.detector.score_files(paths, prompts, progress, "score:complex:detector")
    action = scorers.clip.score_files(paths, [without_attributes(p) for p in prompts], progress, "score:complex:clip")
    total = []
    for prompt, a, s, c in zip(prompts, attribute, spatial, action, strict=True):
        key = prompt.strip().split(".")[0].lower()
        if split is not None:
            parts = (a, s) if key in split[0] else (a, c) if key in split[1] else (a, s, c)
        else:
            parts = (a, s, c) if spatial_relation(prompt) else (a, c)
        total.append(sum(parts) / len(parts))
    return total, {"blip-vqa": attribute, "detector": spatial, "clip": action}


def score_category(
    category: str,
    paths: Sequence[Path],
    prompts: Sequence[str],
    scorers: Scorers,
    *,
    scorer: str = "auto",
    prompts_dir: Path | None = None,
    progress: Progress = no_progress,
) -> tuple[str, list[float], dict[str, list[float]]]:
    """(evaluator name, per-image scores, per-image parts) for one category."""
    stage = f"score:{category}"

    def need(name: str):
        found = getattr(scorers, name)
        if found is None:
            raise PixartError(f"category {category} needs the {name} evaluator (pass {FLAGS[name]})")
        return found

    if scorer == "vqascore":
        return "vqascore", need("vqascore").score_files(paths, prompts, progress, stage), {}
    if scorer == "clip":
        return "clip", need("clip").score_files(paths, prompts, progress, stage), {}
    evaluator = EVALUATORS[category]
    if evaluator == "blip-vqa":
        return evaluator, need("blip").score_files(paths, prompts, progress, stage), {}
    if evaluator == "clip":
        return evaluator, need("clip").score_files(paths, prompts, progress, stage), {}
    if evaluator == "detector":
        return evaluator, need("detector").score_files(paths, prompts, progress, stage), {}
    for name in ("blip", "clip", "detector"):
        need(name)
    split = _complex_split(prompts_dir) if prompts_dir is not None else None
    total, parts = score_complex(paths, prompts, scorers, split=split, progress=progress)
    return "3-in-1" + (" (reference split)" if split else ""), total, parts


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def evaluate_compbench(
    prompts_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    make_images: ImageMaker | None,
    scorers: Scorers | Callable[[], Scorers],
    *,
    generation: dict,
    categories: Sequence[str] = CATEGORIES,
    images_per_prompt: int = 10,
    seed: int = 0,
    limit: int | None = None,
    scorer: str = "auto",
    shard: Shard | None = None,
    progress: Progress = no_progress,
) -> BenchReport | None:
    """Generate (with ``make_images``) and score T2I-CompBench categories; see the module docstring.

    Without ``make_images`` the images already in ``<out>/<category>/samples`` are scored, whoever made them.
    ``scorers`` may be a function that loads them: it is called on the main process once the images are made.
    ``limit``: the first N prompts of each category. Returns the report on the main process, None on the others;
    writes ``<out>/<category>/scores.json`` (per image) and ``<out>/compbench_report.json``.
    """
    started = time.monotonic()
    shard = shard or Shard()
    prompts_dir = Path(prompts_dir).expanduser()
    categories = check_categories(categories)
    need = required(categories, scorer)
    missing_scorers = sorted(n for n in need if isinstance(scorers, Scorers) and getattr(scorers, n) is None)
    if missing_scorers:
        needs = ", ".join(FLAGS[n] for n in missing_scorers)
        raise PixartError(f"scoring {', '.join(categories)} with --scorer {scorer} needs {needs}")
    if limit is not None and limit <= 0:
        raise PixartError(f"--limit must be positive, got {limit}")
    out = Path(output_dir)
    prompts = {c: read_prompts(prompts_dir, c)[:limit] for c in categories}  # read them all before any work
    if make_images is not None:
        items = [item for c in categories for item in layout(c, prompts[c], images_per_prompt, seed)]
        generate_images(items, out, make_images, settings=generation, shard=shard, progress=progress)
    else:
        shard.wait()
    if not shard.is_main:
        return None
    if not isinstance(scorers, Scorers):
        scorers = scorers()

    results: dict[str, CategoryResult] = {}
    for category in categories:
        if make_images is not None:
            files = [(out / i.path, i.prompt) for i in layout(category, prompts[category], images_per_prompt, seed)]
        else:
            files = discover_samples(out / category)
        paths, texts = [f for f, _ in files], [t for _, t in files]
        evaluator, scores, parts = score_category(
            category, paths, texts, scorers, scorer=scorer, prompts_dir=prompts_dir, progress=progress
        )
        per_image = [
            {"file": p.name, "prompt": t, "score": s, **{k: v[i] for k, v in parts.items()}}
            for i, (p, t, s) in enumerate(zip(paths, texts, scores, strict=True))
        ]
        _write_json(out / category / SCORES_FILE, per_image)
        results[category] = CategoryResult(category, evaluator, float(np.mean(scores)), len(paths), len(set(texts)))
    sources = {n: getattr(scorers, n).source for n in ("blip", "clip", "detector", "vqascore") if getattr(scorers, n)}
    settings = {
        "benchmark": "t2i-compbench",
        "prompts": str(prompts_dir),
        "categories": categories,
        "images_per_prompt": images_per_prompt if make_images is not None else None,
        "seed": seed,
        "limit": limit,
        "scorer": scorer,
        "evaluators": sources,
        "detector_threshold": scorers.detector.threshold if scorers.detector else None,
        "noun_phrases": "rule-based chunker (pixart_cli.evaluation.compbench.noun_phrases), not spaCy",
        "generation": generation if make_images is not None else _recorded_generation(out),
        "processes": shard.count,
    }
    return _finish("t2i-compbench", results, settings, out, started)


def _recorded_generation(out: Path) -> dict | None:
    from pixart_cli.evaluation.generate import SETTINGS_FILE

    try:
        return json.loads((out / SETTINGS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _finish(benchmark: str, results: dict[str, CategoryResult], settings: dict, out: Path, started: float):
    data = {
        "benchmark": benchmark,
        "categories": {
            c: {"evaluator": r.evaluator, "mean": r.mean, "images": r.images, "prompts": r.prompts, **r.extra}
            for c, r in results.items()
        },
        "seconds": round(time.monotonic() - started, 2),
        "settings": settings,
    }
    path = out / REPORT_FILE
    _write_json(path, data)
    return BenchReport(benchmark, results, settings, path)


def evaluate_shapes(
    output_dir: str | os.PathLike,
    make_images: ImageMaker | None,
    *,
    generation: dict,
    num_prompts: int = 100,
    images_per_prompt: int = 10,
    seed: int = 0,
    aspect: float = 1.0,
    prompt_style: str = "dense",
    shard: Shard | None = None,
    progress: Progress = no_progress,
) -> BenchReport | None:
    """The ShapesWorld benchmark: held-out prompts, T2I-CompBench's layout (category ``shapes``), exact scoring.

    ``aspect`` (width / height) lays the prompts' scenes out for the images' shape (e.g. 80×48 for a multi-aspect
    model), so that every prompt's objects fit the canvas it is drawn on. ``prompt_style`` ``"short"`` words the
    same scenes without sizes and background, as a newcomer would (``heldout_prompts``); size is then not scored.

    Reports color, shape, spatial and complex (``shapes_detect``'s checks; spatial and complex over the prompts
    they apply to) plus the other checks (presence, count, binding, size) as extras of ``complex``, and the
    acceptance view: ``one_object`` colour and shape (one-object prompts), ``both_objects`` (binding on the
    two-object prompts) beside spatial.
    """
    from pixart_cli.data.shapes import heldout_prompts
    from pixart_cli.data.shapes_detect import CHECKS, score_images

    started = time.monotonic()
    shard = shard or Shard()
    if num_prompts <= 0:
        raise PixartError(f"--limit must be positive, got {num_prompts}")
    prompts = heldout_prompts(num_prompts, seed, aspect=aspect, style=prompt_style)
    out = Path(output_dir)
    items = layout("shapes", [p.text for p in prompts], images_per_prompt, seed)
    generate_images(items, out, make_images, settings=generation, shard=shard, progress=progress)
    if not shard.is_main:
        return None
    progress("score:shapes", 0, len(items))
    specs = [prompts[k // images_per_prompt].spec for k in range(len(items))]
    report = score_images([_open_rgb(out / i.path) for i in items], specs)
    progress("score:shapes", len(items), len(items))
    per_image = [
        {"file": Path(i.path).name, "prompt": i.prompt, **c} for i, c in zip(items, report.per_prompt, strict=True)
    ]
    _write_json(out / "shapes" / SCORES_FILE, per_image)
    results = {}
    for category in SHAPES_CATEGORIES:
        applies = [k for k, checks in enumerate(report.per_prompt) if checks[category] is not None]
        results[category] = CategoryResult(
            category,
            "shapes-detect",
            report.categories.get(category, float("nan")),
            len(applies),
            len({items[k].prompt for k in applies}),
        )
    # Checks that apply to no prompt (size, for short prompts) are left out.
    extras = (c for c in CHECKS if c not in SHAPES_CATEGORIES and c in report.categories)
    results["complex"].extra = {c: report.categories[c] for c in extras}
    # The acceptance view (docs/shapes.md): attributes on one-object prompts, both objects on two-object ones.
    counts = [len(spec.objects) for spec in specs]
    for category, check, n, name in (
        ("color", "color", 1, "one_object"),
        ("shape", "shape", 1, "one_object"),
        ("spatial", "binding", 2, "both_objects"),
    ):
        picked = [checks[check] for checks, k in zip(report.per_prompt, counts, strict=True) if k == n]
        if picked:
            results[category].extra[name] = sum(map(bool, picked)) / len(picked)
    settings = {
        "benchmark": "shapes",
        "num_prompts": num_prompts,
        "images_per_prompt": images_per_prompt,
        "seed": seed,
        "prompts": "pixart_cli.data.shapes.heldout_prompts(num_prompts, seed, aspect=aspect, style=prompt_style)",
        "aspect": aspect,
        "prompt_style": prompt_style,
        "scorer": "pixart_cli.data.shapes_detect.score_images",
        "generation": generation,
        "processes": shard.count,
    }
    return _finish("shapes", results, settings, out, started)


__all__ = [
    "CATEGORIES",
    "BenchReport",
    "BlipVqaScorer",
    "ClipScorer",
    "DetectorScorer",
    "Scorers",
    "VqaScoreSubprocess",
    "evaluate_compbench",
    "evaluate_shapes",
    "layout",
    "noun_phrases",
    "position_score",
    "spatial_objects",
    "spatial_score",
]
