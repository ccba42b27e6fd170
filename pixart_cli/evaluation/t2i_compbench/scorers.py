"""T2I-CompBench's evaluators, weights read from local directories (nothing is downloaded).

* ``color``, ``shape``, ``texture`` — BLIP-VQA (``BlipForQuestionAnswering``): every noun phrase of the prompt is
  asked as ``"<phrase>?"``; the answer probability is the first decoded token's P(yes) / (P(yes) + P(no)), and the
  image's score is the product over its phrases (1 when a prompt has none), as in T2I-CompBench.
* ``spatial`` — an object detector (``AutoModelForObjectDetection`` such as DETR, or a zero-shot detector such as
  OWL-ViT queried with the two object names) and T2I-CompBench's rule: both objects found → ¼·(score₁ + score₂)
  plus ½·the position score; one found → ¼·its score; scores under 0.5 become 0. The original uses UniDet (a
  unified label space of several detection datasets); a COCO-label DETR knows fewer objects, so absolute numbers
  are not comparable with published ones.
* ``non_spatial`` — CLIP score: the cosine between CLIP's image and text embeddings (raw, not ×100).
* ``--scorer vqascore`` scores every category with VQAScore from t2v-metrics, run with another Python interpreter
  (its own environment; t2v-metrics pins an older torch and transformers) through ``VqaScoreSubprocess``.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pixart_cli.errors import PixartError
from pixart_cli.evaluation import Progress, no_progress
from pixart_cli.evaluation.t2i_compbench.layout import CATEGORIES, EVALUATORS, SCORERS
from pixart_cli.evaluation.t2i_compbench.phrases import PERSON_WORDS, noun_phrases, spatial_objects


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


StepProgress = Callable[[float], None]


def open_rgb(path: Path) -> Image.Image:
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
        from transformers import (  # lazy: transformers adds ~4 s to start-up (docs/reference.md §8)
            CLIPModel,
            CLIPProcessor,
        )

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
            images = [open_rgb(Path(p)) for p in paths[chunk]]
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
        from transformers import (  # lazy: transformers adds ~4 s to start-up (docs/reference.md §8)
            BlipForQuestionAnswering,
            BlipProcessor,
        )

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
            images = {i: open_rgb(Path(paths[i])) for i in dict.fromkeys(i for i, _ in chunk)}
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
        from transformers import (  # lazy: transformers adds ~4 s to start-up (docs/reference.md §8)
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
                image = open_rgb(Path(path))
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
