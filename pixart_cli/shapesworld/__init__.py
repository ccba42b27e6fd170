"""ShapesWorld: a miniature text-to-image world with exact ground truth, and the demo trained on it.

``world`` (scenes, classes, the held-out split, rendering), ``prompts`` (captions, held-out benchmark prompts,
prompt completion), ``dataset`` (writing datasets), ``detect`` (reading images back exactly), ``bench``
(ShapesBench), ``text_encoder`` (the tiny T5 the demo reads with), ``demo`` (the shipped model and its
vocabulary) and ``assets/`` (the shipped weights, addressed as ``builtin:NAME``).
"""
