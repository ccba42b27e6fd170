"""A dependency-free line plot (PIL) for loss curves: enough to see a run at a glance."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def line_plot(
    xs: list[float], series: dict[str, list[float]], path: str | Path, title: str = "", size=(800, 480)
) -> Path:
    """Plot each series against ``xs`` (log-scaled y when the values span more than a decade) to a PNG."""
    width, height = size
    left, right, top, bottom = 70, 20, 36, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    values = [v for s in series.values() for v in s if math.isfinite(v)]
    if not xs or not values:
        draw.text((left, top), "no data", fill="black")
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
    for i in range(5):  # y ticks
        level = lo + (hi - lo) * i / 4
        y = height - bottom - i / 4 * (height - top - bottom)
        label = 10**level if use_log else level
        draw.text((4, y - 6), f"{label:.3g}", fill="black")
        draw.line([left - 4, y, left, y], fill="black")
    for i in range(5):  # x ticks
        x = left + i / 4 * (width - left - right)
        draw.text((x - 10, height - bottom + 6), f"{x0 + (x1 - x0) * i / 4:.0f}", fill="black")
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    for (name, ys), colour in zip(series.items(), colours, strict=False):
        points = [to_px(x, y) for x, y in zip(xs, ys, strict=False) if math.isfinite(y)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        draw.text((left + 8 + 140 * list(series).index(name), top - 28), f"— {name}", fill=colour)
    draw.text((width // 2 - 60, top - 28 + 14), title + (" (log scale)" if use_log else ""), fill="black")
    image.save(path)
    return Path(path)
