"""Robust image loading and the resize-and-centre-crop that turns a photo into a training tensor.

Any file that cannot be decoded — zero bytes, truncated, not an image, too many pixels (a decompression bomb) —
comes back as a ``BadImage`` instead of raising, so that callers can skip it and count it. Every decodable image
becomes 8-bit RGB: grayscale and palette images are expanded, transparency is composited on white, 16-bit
images are scaled (not clipped) to 8 bits, and the EXIF orientation is applied.

An image is given as a path or as a ``Record``: a file, or a member of a container (a tar shard, a datasets row),
which ``open_image`` opens for all of them.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps

from pixart_cli.data.containers import MemberError, image_name, open_member
from pixart_cli.data.sources import Record

# PIL's own default limit (Image.MAX_IMAGE_PIXELS): ~89 MPixels. Above it, PIL warns; at twice it, PIL raises.
# We refuse anything above the limit, before any pixel is decoded.
DEFAULT_MAX_PIXELS = 89_478_485

Resample = Literal["lanczos", "bicubic"]
_RESAMPLE = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC}


ImageRef = str | os.PathLike | Record  # an image file, or a record (a file or a container's member)


@dataclass(frozen=True)
class BadImage:
    """A file that could not be used as an image, and why (one line). A container's member is named
    ``container:member`` (``shards/00001.tar:000123.jpg``)."""

    path: Path
    reason: str


def image_label(image: ImageRef) -> Path:
    """The name a ``BadImage`` of ``image`` carries."""
    if isinstance(image, Record):
        return Path(image_name(image.path, image.member))
    return Path(image)


def open_image(image: ImageRef) -> Any:
    """What ``PIL.Image.open`` reads for ``image``: the file's path, or a file object over a container's member
    (``containers.open_member``, which raises ``MemberError`` when the member cannot be read)."""
    if isinstance(image, Record):
        return image.path if image.member is None else open_member(image.path, image.member)
    return Path(image)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    # PIL names what it read; for a container's member that is a file object's repr, which says nothing.
    text = re.sub(r" <_io\.\w+[^>]*>$", "", text)[:160]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) after the EXIF rotation that ``exif_transpose`` would apply (read from the header)."""
    width, height = image.size
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # a corrupt EXIF block does not make the pixels unusable
        orientation = 1
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def image_size(image: ImageRef, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int] | BadImage:
    """(width, height) from the header only (fast), EXIF orientation applied; ``BadImage`` if unreadable."""
    path = image_label(image)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(open_image(image)) as opened:
                width, height = _oriented_size(opened)
    except MemberError as exc:
        return BadImage(path, str(exc))
    except Exception as exc:  # PIL raises many types on malformed files (OSError, SyntaxError, struct.error, ...)
        return BadImage(path, _reason(exc))
    if max_pixels is not None and width * height > max_pixels:
        return BadImage(path, f"too many pixels ({width}×{height} > {max_pixels}: possible decompression bomb)")
    return width, height


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: alpha composited on white, 16/32-bit and float images scaled into 0..255."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        # Palette images may carry transparency in their info; RGBA keeps it for the compositing below.
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        # 16-bit sources span 0..65535; PIL's own convert would clip everything above 255 to white.
        if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
            values = values / 257.0
        elif image.mode == "F" and values.max(initial=0) <= 1.0:
            values = values * 255.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode != "RGB" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(source: ImageRef, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image | BadImage:
    """Decode ``source`` fully into an 8-bit RGB image (EXIF orientation applied), or say why it is unusable."""
    path = image_label(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(open_image(source)) as image:
                width, height = image.size
                if max_pixels is not None and width * height > max_pixels:
                    return BadImage(
                        path, f"too many pixels ({width}×{height} > {max_pixels}: possible decompression bomb)"
                    )
                image.load()  # decodes now: truncated data raises here, not later in a worker
                rgb = to_rgb(ImageOps.exif_transpose(image))
                # Leaving the ``with`` closes ``image`` and frees its pixels: never return the object itself.
                return rgb.copy() if rgb is image else rgb
    except MemberError as exc:
        return BadImage(path, str(exc))
    except Exception as exc:
        return BadImage(path, _reason(exc))


def resize_and_crop(image: Image.Image, size: tuple[int, int], resample: Resample = "lanczos") -> Image.Image:
    """Scale so the image covers ``size`` = (height, width) with its aspect ratio kept, then centre-crop.

    PIL's Lanczos and bicubic filters widen their support when shrinking, i.e. they antialias.
    """
    target_h, target_w = size
    width, height = image.size
    scale = max(target_h / height, target_w / width)
    # max(): float rounding must never leave the covering side one pixel short of the target.
    new_w, new_h = max(target_w, round(width * scale)), max(target_h, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), _RESAMPLE[resample])
    left, top = (new_w - target_w) // 2, (new_h - target_h) // 2
    if (left, top, target_w, target_h) != (0, 0, new_w, new_h):
        image = image.crop((left, top, left + target_w, top + target_h))
    return image


def to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB → float32 (3, H, W) in [-1, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def load_pixels(
    source: ImageRef,
    size: tuple[int, int],
    *,
    resample: Resample = "lanczos",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> torch.Tensor | BadImage:
    """``load_image`` → ``resize_and_crop`` to ``size`` (H, W) → ``to_tensor``; ``BadImage`` if unusable."""
    image = load_image(source, max_pixels)
    if isinstance(image, BadImage):
        return image
    return to_tensor(resize_and_crop(image, size, resample))
