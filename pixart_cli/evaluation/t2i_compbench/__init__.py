"""T2I-CompBench: ``layout`` (categories, prompt files, image names), ``phrases`` (noun phrases and spatial
relations without spaCy), ``scorers`` (BLIP-VQA, detector, CLIP, VQAScore) and ``bench`` (a scoring run)."""

from pixart_cli.evaluation.t2i_compbench.bench import BenchReport, CategoryResult, evaluate_compbench
from pixart_cli.evaluation.t2i_compbench.layout import CATEGORIES, layout
from pixart_cli.evaluation.t2i_compbench.phrases import noun_phrases, spatial_objects
from pixart_cli.evaluation.t2i_compbench.scorers import (
    BlipVqaScorer,
    ClipScorer,
    DetectorScorer,
    Scorers,
    VqaScoreSubprocess,
    position_score,
    spatial_score,
)

__all__ = [
    "CATEGORIES",
    "BenchReport",
    "BlipVqaScorer",
    "CategoryResult",
    "ClipScorer",
    "DetectorScorer",
    "Scorers",
    "VqaScoreSubprocess",
    "evaluate_compbench",
    "layout",
    "noun_phrases",
    "position_score",
    "spatial_objects",
    "spatial_score",
]
