"""A dependency-free line plot (PIL) for loss curves: enough to see a run at a glance."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def smooth(values: Sequence[float], span: float = 4) -> list[float]:
    """Debiased exponential moving average, as TensorBoard smooths scalars.

    ``span`` is in points: the weight of the past is 1 - 2 / (span + 1), so the default 4 is TensorBoard's 0.6.
    Dividing by the total weight so far (the debiasing) makes the first output the first value instead of a pull
    towards 0. Non-finite values come out as NaN and leave the average alone.
    """
    if span < 1:
        raise ValueError(f"span must be at least 1, got {span}")
    weight = 1 - 2 / (span + 1)
    out, average, total = [], 0.0, 0.0
    for v in values:
        if not math.isfinite(v):
            out.append(math.nan)
            continue
        average = weight * average + (1 - weight) * v
        total = weight * total + (1 - weight)  # 1 - weight**n over the n finite values so far
        out.append(average / total)
    return out


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled font; its bitmap fallback ignores the size


def _text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font, align: str = "lm") -> None:
    """Draw ``text`` with its ink box aligned at ``xy``: ``align`` is l/m/r then t/m/b, like PIL's anchors,
    which the bitmap fallback font ignores."""
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    x = xy[0] - {"l": x0, "m": (x0 + x1) / 2, "r": x1}[align[0]]
    y = xy[1] - {"t": y0, "m": (y0 + y1) / 2, "b": y1}[align[1]]
    draw.text((x, y), text, fill="black", font=font)


def line_plot(
    xs: list[float],
    series: dict[str, list[float]],
    path: str | Path,
    title: str = "",
    size: tuple[int, int] = (800, 480),
    xlabel: str = "step",
    ylabel: str = "loss",
) -> Path:
    """Plot each series against ``xs`` (log-scaled y when the values span more than a decade) to a PNG."""
    width, height = size
    left, right, top, bottom = 84, 20, 36, 52
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = _font(12)
    values = [v for s in series.values() for v in s if math.isfinite(v)]
    if not xs or not values:
        _text(draw, (left, top), "no data", font, "lt")
        image.save(path)
        return Path(path)
    use_log = min(values) > 0 and max(values) / min(values) > 10
    f = math.log10 if use_log else (lambda v: v)
    lo, hi = f(min(values)), f(max(values))
    hi = hi if hi > lo else lo + 1
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1

    def to_px(x: float, y: float) -> tuple[float, float]:
        px = left + (x - x0) / (x1 - x0) * (width - left - right)
        py = height - bottom - (f(y) - lo) / (hi - lo) * (height - top - bottom)
        return px, py

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for i in range(5):  # y ticks, labels right-aligned against the axis
        level = lo + (hi - lo) * i / 4
        y = height - bottom - i / 4 * (height - top - bottom)
        _text(draw, (left - 7, y), f"{10**level if use_log else level:.3g}", font, "rm")
        draw.line([left - 4, y, left, y], fill="black")
    for i in range(5):  # x ticks
        x = left + i / 4 * (width - left - right)
        _text(draw, (x, height - bottom + 7), f"{x0 + (x1 - x0) * i / 4:.0f}", font, "mt")
        draw.line([x, height - bottom, x, height - bottom + 4], fill="black")
    _text(draw, ((left + width - right) / 2, height - 8), xlabel, font, "mb")
    if ylabel:  # PIL draws no vertical text: render it flat, then turn it
        box = draw.textbbox((0, 0), ylabel, font=font)
        flat = Image.new("RGB", (box[2] + 2, box[3] + 2), "white")
        ImageDraw.Draw(flat).text((1, 1), ylabel, fill="black", font=font)
        turned = flat.rotate(90, expand=True)
        image.paste(turned, (4, round((top + height - bottom - turned.height) / 2)))
    _text(draw, (left, top / 2), title + (" (log scale)" if use_log else ""), font, "lm")

    # Legend in the top margin, right-aligned: a stroke of each line's colour, then its name. The default font
    # has no dash glyph, so the stroke is drawn, not typed.
    entries = list(zip(series.items(), COLOURS, strict=False))
    x = width - right
    for (name, _), colour in reversed(entries):
        _text(draw, (x, top / 2), name, font, "rm")
        x -= draw.textlength(name, font=font)
        x -= 26
        draw.line([x, top / 2, x + 20, top / 2], fill=colour, width=3)
        x -= 16
    for (_, ys), colour in entries:
        points = [to_px(x, y) for x, y in zip(xs, ys, strict=False) if math.isfinite(y)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2, joint="curve")
    image.save(path)
    return Path(path)
