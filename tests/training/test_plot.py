"""The loss plot written at the end of training: debiased smoothing, a legend in the lines' colours, a PNG."""

from __future__ import annotations

import math

import pytest
from PIL import Image

from pixart_cli.training.plot import COLOURS, line_plot, smooth


def test_smoothing_a_constant_is_the_constant_from_the_first_point():
    """Debiased: no pull towards 0 (or anything else) at the start, whatever the span."""
    for span in (1, 4, 10):
        assert smooth([0.25] * 30, span) == pytest.approx([0.25] * 30, rel=1e-12)
    assert smooth([]) == []


def test_smoothing_a_decreasing_series_tracks_it_to_the_end():
    raw = [0.08 + 0.5 * math.exp(-k / 20) for k in range(80)]  # a loss curve levelling off
    smoothed = smooth(raw)
    assert smoothed[0] == pytest.approx(raw[0])
    assert all(s >= r for s, r in zip(smoothed, raw, strict=True))  # one-sided: it trails a falling curve...
    assert smoothed[-1] == pytest.approx(raw[-1], rel=0.02)  # ...but only by about 1.5 points (TensorBoard's 0.6)
    line = [1 - 0.01 * k for k in range(200)]
    for span in (4, 10):  # on a straight line the lag settles at (span - 1) / 2 points
        assert smooth(line, span)[-1] - line[-1] == pytest.approx(0.01 * (span - 1) / 2, abs=1e-6)


def test_smoothing_steps_over_non_finite_values():
    assert smooth([1.0, math.nan, 1.0, math.inf])[::2] == pytest.approx([1.0, 1.0])
    assert all(math.isnan(v) for v in smooth([1.0, math.nan, 1.0, math.inf])[1::2])
    with pytest.raises(ValueError, match="span"):
        smooth([1.0], 0.5)


def _longest_run(image: Image.Image, hex_colour: str) -> int:
    """The longest horizontal run of pixels exactly ``hex_colour`` in ``image``."""
    colour = tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    pixels, best = image.load(), 0
    for y in range(image.height):
        run = 0
        for x in range(image.width):
            run = run + 1 if pixels[x, y] == colour else 0
            best = max(best, run)
    return best


def test_the_plot_is_a_png_of_the_size_asked_with_the_lines_colours_in_its_legend(tmp_path):
    xs = list(range(25, 2001, 25))
    raw = [0.08 + 0.5 * math.exp(-x / 300) for x in xs]
    path = line_plot(xs, {"loss": raw, "smoothed": smooth(raw)}, tmp_path / "loss.png", title="run", size=(640, 360))
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (640, 360)
        top_margin = image.convert("RGB").crop((0, 0, 640, 30))  # above the plot: the title and the legend
    assert all(_longest_run(top_margin, c) >= 15 for c in COLOURS[:2])  # a stroke of each line's colour, not a box
    with Image.open(line_plot([], {"loss": []}, tmp_path / "empty.png")) as image:
        assert image.size == (800, 480)
