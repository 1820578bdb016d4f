"""Heatmap overlay PNGs: the scan in grayscale, the Grad-CAM in colour on top, and a caption with the verdict.

Drawn with numpy and Pillow only, because matplotlib is a large install that a device does not need for one
colormap. The colormap is inferno (perceptually uniform and readable in grayscale print), stored as 17
stops sampled from matplotlib's table and interpolated to 256 entries. Blending weights each pixel by its
heat, so cold areas show the untouched scan and only the regions the model used are coloured.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .preprocess import stretch, to_gray_float

if TYPE_CHECKING:
    from .classifier import Result

_INFERNO_STOPS = np.array([
    (0, 0, 4), (11, 7, 36), (33, 12, 74), (61, 9, 101), (87, 16, 110), (113, 25, 110), (138, 34, 106),
    (163, 44, 97), (188, 55, 84), (210, 70, 68), (228, 90, 49), (241, 115, 29), (249, 142, 9),
    (252, 172, 17), (249, 203, 53), (242, 234, 105), (252, 255, 164),
], dtype=np.float64)
#: 256-entry inferno lookup table, uint8 RGB.
INFERNO = np.stack(
    [np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_INFERNO_STOPS)), column) for column in _INFERNO_STOPS.T],
    axis=1,
).round().astype(np.uint8)

#: Strongest opacity of the heatmap (reached where the heat is 1).
ALPHA = 0.6
#: zlib level of overlay PNGs: level 1 encodes ~2.5x faster than Pillow's 6 for ~15% larger files, and a
#: device writing one overlay per scan is short of CPU, not of storage.
PNG_LEVEL = 1
#: Overlays of small scans are enlarged (nearest neighbour) to at least this width, so the caption fits.
MIN_WIDTH = 256


def colorize(heat: np.ndarray) -> np.ndarray:
    """Map heat in [0, 1] to inferno RGB (uint8 [..., 3])."""
    index = np.clip(np.nan_to_num(np.asarray(heat, np.float32)), 0.0, 1.0) * 255.0 + 0.5
    return INFERNO[index.astype(np.uint8)]


def display_gray(image: np.ndarray) -> np.ndarray:
    """The scan as 8-bit grayscale for display: 8-bit scans as they are, deeper ones contrast-stretched."""
    gray = to_gray_float(image)
    if np.asarray(image).dtype == np.uint8:
        return np.clip(gray + 0.5, 0, 255).astype(np.uint8)
    return stretch(gray)


def blend(image: np.ndarray, heat: np.ndarray | None, alpha: float = ALPHA) -> np.ndarray:
    """Grayscale scan with the heatmap (on the scan's pixel grid) alpha-blended by heat, uint8 RGB."""
    base = np.repeat(display_gray(image)[..., None], 3, axis=2).astype(np.float32)
    if heat is None:
        return base.astype(np.uint8)
    if heat.shape != base.shape[:2]:
        raise ValueError(f"heatmap shape {heat.shape} does not match the image {base.shape[:2]}")
    weight = alpha * np.clip(np.nan_to_num(heat.astype(np.float32)), 0.0, 1.0)[..., None]
    out = base * (1.0 - weight) + colorize(heat).astype(np.float32) * weight
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError):  # a Pillow built without FreeType only has the fixed bitmap font
        return ImageFont.load_default()


def render(image: np.ndarray, heat: np.ndarray | None, caption: str) -> Image.Image:
    """The overlay picture: blended scan, enlarged if small, above a black caption bar."""
    picture = Image.fromarray(blend(image, heat))
    if picture.width < MIN_WIDTH:
        factor = math.ceil(MIN_WIDTH / picture.width)
        picture = picture.resize((picture.width * factor, picture.height * factor), Image.NEAREST)
    bar = max(22, picture.width // 14)
    canvas = Image.new("RGB", (picture.width, picture.height + bar), (0, 0, 0))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = _font(int(bar * 0.6))
    left, top, _, bottom = draw.textbbox((0, 0), caption, font=font)
    y = picture.height + (bar - (bottom - top)) // 2 - top
    draw.text((bar // 3 - left, y), caption, fill=(255, 255, 255), font=font)
    return canvas


def caption_for(label: str, confidence: float, model: str, has_heatmap: bool) -> str:
    """The caption text: verdict first, then which model said so."""
    note = "" if has_heatmap else "  (model has no heatmap)"
    return f"{label}  {confidence * 100:.1f}%  -  {model}{note}"


def save_overlay(result: Result, path: str | Path) -> Path:
    """Write the overlay PNG of a :class:`edge.classifier.Result` to ``path`` and return the path."""
    if result.image is None:
        raise ValueError("the result carries no decoded image to draw on")
    path = Path(path)
    caption = caption_for(result.label, result.confidence, result.model, result.heatmap is not None)
    render(result.image, result.heatmap_on_image(), caption).save(path, format="PNG", compress_level=PNG_LEVEL)
    return path
