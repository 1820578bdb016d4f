"""Heatmap overlay PNGs a clinician can read: the scan in grayscale, the Grad-CAM in colour over the head
only, the verdict, "Decision support, not a diagnosis", and a colour scale; or, for a scan the input gate
refused or referred (`edge.gate`), the scan alone and why there is no verdict.

Drawn with numpy and Pillow only, because matplotlib is a large install that a device does not need for one
colormap. The colormap is inferno (perceptually uniform and readable in grayscale print), stored as 17
stops sampled from matplotlib's table and interpolated to 256 entries.

Where colour goes: a pixel's opacity is ``ALPHA`` times a ramp of its heat (0 below ``HEAT_FLOOR``) times a
soft head mask. The ramp keeps the weak, diffuse part of a Grad-CAM from tinting the whole brain; the mask
(pixels brighter than the head threshold of :func:`edge.preprocess.head_box`, holes filled, feathered
outwards a little) keeps heat off the black background and the corners of the crop box, where the
model-space map would otherwise end in a hard rectangle. The colour scale is drawn the same way (heat
blended over mid-grey with the same opacity ramp), so what it shows is what the picture shows.

Size is bounded: the picture is at most ``MAX_SIDE`` pixels on its longer side whatever the scan (a huge
scan is strided, then resized with antialiasing, so no full-size float copy is made), small scans are
enlarged to ``MIN_WIDTH``, and the heatmap is mapped straight onto the picture's grid.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont

from .preprocess import HEAD_THRESHOLD, Geometry, heatmap_to_image, stretch, to_gray_float

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
#: Heat below this is not drawn; above it opacity rises linearly to ALPHA at heat 1.
HEAT_FLOOR = 0.3
#: Feathering of the head mask, as a fraction of the picture's longer side (well inside the crop box's
#: 4% margin, so the feathered edge never reaches the box edge).
MASK_FEATHER = 0.01
#: Longest side of the reduced copy the head mask is worked out on.
MASK_SIDE = 128
#: zlib level of overlay PNGs: level 1 encodes ~2.5x faster than Pillow's 6 for ~15% larger files, and a
#: device writing one overlay per scan is short of CPU, not of storage.
PNG_LEVEL = 1
#: Overlays of small scans are enlarged (nearest neighbour) to at least this width, so the caption fits.
MIN_WIDTH = 256
#: Longest side of the drawn scan: bigger scans are reduced, so memory and time stay bounded.
MAX_SIDE = 1024
#: Grey the colour scale is blended over (the tone of brain tissue on a typical scan).
SCALE_GREY = 128
#: The caption's fixed second line.
DISCLAIMER = "Decision support, not a diagnosis"
#: First caption line of a scan the input gate refused or referred (`edge.gate`): no label is drawn.
NO_VERDICT = "No verdict"

_WHITE, _NOTE, _WARN = (255, 255, 255), (200, 200, 200), (255, 170, 60)
#: A caption line: its text and its RGB colour.
Line = tuple[str, tuple[int, int, int]]


def _heat_index(heat: np.ndarray) -> np.ndarray:
    """Heat in [0, 1] (NaN as 0) as an index 0..255 into the lookup tables."""
    return (np.clip(np.nan_to_num(np.asarray(heat, np.float32)), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def colorize(heat: np.ndarray) -> np.ndarray:
    """Map heat in [0, 1] to inferno RGB (uint8 [..., 3])."""
    return INFERNO[_heat_index(heat)]


def opacity(heat: np.ndarray) -> np.ndarray:
    """Opacity of the colour at each heat value: 0 up to ``HEAT_FLOOR``, then linear up to ``ALPHA`` at 1."""
    ramp = (np.nan_to_num(np.asarray(heat, np.float32)) - HEAT_FLOOR) / (1.0 - HEAT_FLOOR)
    return ALPHA * np.clip(ramp, 0.0, 1.0)


#: :func:`opacity` of each heat index, as 0..255 (Pillow's alpha scale).
_OPACITY8 = (opacity(np.linspace(0.0, 1.0, 256)) * 255.0 + 0.5).astype(np.uint8)
_PALETTE = INFERNO.tobytes()


def _to_display(gray: np.ndarray, is_uint8: bool) -> np.ndarray:
    """The scan as 8-bit grayscale for display: 8-bit scans as they are, deeper ones contrast-stretched."""
    return np.clip(gray + 0.5, 0, 255).astype(np.uint8) if is_uint8 else stretch(gray)


def head_mask(gray: np.ndarray) -> np.ndarray:
    """Soft mask of the head (float32 [H, W], 1 on the head, 0 on the background, a feathered edge).

    Pixels brighter than ``HEAD_THRESHOLD`` of the 99th percentile (the test :func:`edge.preprocess.head_box`
    crops by), with isolated specks dropped and interior holes (ventricles, a dark tumour core, sinuses)
    filled: a pixel is filled when the head lies on both sides of it along its row and along its column.
    The edge is then feathered outwards by ``MASK_FEATHER`` of the longer side, so heat fades out at the
    scalp instead of stopping on a jagged threshold line.
    """
    return np.asarray(_mask_image(gray), np.float32) * np.float32(1 / 255)


def _mask_image(gray: np.ndarray) -> Image.Image:
    """:func:`head_mask` as an 8-bit Pillow image (255 = head). Worked out on a copy reduced (area average)
    to at most ``MASK_SIDE`` px and enlarged again: the feathering is wider than the reduction's blocks, and
    a full-size blur and fill would cost most of an overlay's drawing time."""
    gray = np.ascontiguousarray(gray, np.float32)
    h, w = gray.shape
    factor = max(1.0, max(h, w) / MASK_SIDE)
    small = Image.fromarray(gray)
    if factor > 1:
        small = small.resize((max(1, round(w / factor)), max(1, round(h / factor))), Image.BOX)
    values = np.asarray(small, np.float32)
    ref = float(np.percentile(values, 99))
    if ref <= 0:
        return Image.new("L", (w, h), 0)
    bright = Image.fromarray((values > HEAD_THRESHOLD * ref) * np.uint8(255))
    mask = np.asarray(bright.filter(ImageFilter.GaussianBlur(1))) > 127
    mask = _fill_spans(mask, axis=1) & _fill_spans(mask, axis=0)
    feather = max(1.0, MASK_FEATHER * max(mask.shape))
    soft = Image.fromarray(mask * np.uint8(255)).filter(ImageFilter.GaussianBlur(feather))
    soft = soft.point([min(255, 2 * v) for v in range(256)])  # the blur's half-way line becomes the edge
    return soft.resize((w, h), Image.BILINEAR) if soft.size != (w, h) else soft


def _fill_spans(mask: np.ndarray, axis: int) -> np.ndarray:
    """True from the first to the last True of each row (axis=1) or column (axis=0)."""
    n = mask.shape[axis]
    first = mask.argmax(axis=axis)
    last = n - 1 - np.flip(mask, axis=axis).argmax(axis=axis)
    any_ = mask.any(axis=axis)
    index = np.arange(n)
    if axis == 1:
        return (index[None, :] >= first[:, None]) & (index[None, :] <= last[:, None]) & any_[:, None]
    return (index[:, None] >= first[None, :]) & (index[:, None] <= last[None, :]) & any_[None, :]


def _blend(base: np.ndarray, heat: np.ndarray, mask: Image.Image | None) -> Image.Image:
    """uint8 gray [H, W] with inferno heat [H, W] at :func:`opacity` (times ``mask``, 255 = 1), as RGB.

    Lookup tables and Pillow's compositing rather than float arithmetic per pixel and channel, which cost
    several times more.
    """
    index = _heat_index(heat)
    alpha = Image.fromarray(_OPACITY8[index])
    if mask is not None:
        alpha = ImageChops.multiply(alpha, mask)
    colour = Image.frombytes("P", alpha.size, index.tobytes())  # the colormap as a palette: no RGB gather
    colour.putpalette(_PALETTE)
    return Image.composite(colour.convert("RGB"), Image.fromarray(base).convert("RGB"), alpha)


def blend(image: np.ndarray, heat: np.ndarray | None) -> np.ndarray:
    """Grayscale scan with the heatmap (on the scan's pixel grid) over the head, uint8 RGB.

    Opacity is :func:`opacity` of the heat times :func:`head_mask` of the scan, so the background and
    pixels with weak heat show the untouched scan.
    """
    gray = to_gray_float(image)
    base = _to_display(gray, np.asarray(image).dtype == np.uint8)
    if heat is None:
        return np.repeat(base[..., None], 3, axis=2)
    if heat.shape != base.shape:
        raise ValueError(f"heatmap shape {heat.shape} does not match the image {base.shape}")
    return np.asarray(_blend(base, heat, _mask_image(gray)))


def draw_outline(rgb: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = (0, 255, 255),
                 width: int = 1) -> np.ndarray:
    """A copy of ``rgb`` (uint8 [H, W, 3]) with the outline of ``mask`` (bool [H, W]) in ``colour``.

    The outline is the mask's own boundary pixels: those of the mask within ``width`` 4-neighbour steps of
    a pixel outside it (the image's edge counts as outside), so it never covers the scan beyond the lesion.
    For evaluation grids that show a lesion mask on an overlay, without matplotlib.
    """
    mask = np.asarray(mask, bool)
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match the image {rgb.shape[:2]}")
    inner = mask.copy()
    for _ in range(max(1, width)):
        eroded = inner.copy()
        eroded[1:] &= inner[:-1]
        eroded[:-1] &= inner[1:]
        eroded[:, 1:] &= inner[:, :-1]
        eroded[:, :-1] &= inner[:, 1:]
        eroded[0] = eroded[-1] = False
        eroded[:, 0] = eroded[:, -1] = False
        inner = eroded
    out = np.array(rgb, np.uint8, copy=True)
    out[mask & ~inner] = colour
    return out


def display_size(shape: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the drawn scan: small scans enlarged by a whole factor to ``MIN_WIDTH``, then any
    scan whose longer side would exceed ``MAX_SIDE`` reduced to it."""
    h, w = int(shape[0]), int(shape[1])
    scale: float = math.ceil(MIN_WIDTH / w) if w < MIN_WIDTH else 1
    if max(h, w) * scale > MAX_SIDE:
        scale = MAX_SIDE / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def reduced_gray(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The scan as one float32 channel (its own intensity scale) resized to ``shape``, without a full-size copy.

    A scan more than 4x the target is first strided to at most ~2x it (a view, no copy), then resized with
    Pillow's antialiased bilinear filter; enlarging is nearest neighbour, so a small scan's pixels stay crisp.
    """
    a = np.asarray(image)
    h, w = shape
    step = max(1, min(a.shape[0] // h, a.shape[1] // w) // 2)
    gray = np.ascontiguousarray(to_gray_float(a[::step, ::step]))
    if gray.shape == (h, w):
        return gray
    resample = Image.NEAREST if h >= gray.shape[0] and w >= gray.shape[1] else Image.BILINEAR
    return np.asarray(Image.fromarray(gray).resize((w, h), resample), np.float32)


def heat_on_grid(heatmap: np.ndarray, geometry: Geometry, shape: tuple[int, int]) -> np.ndarray:
    """A model-space heatmap put back on a ``shape`` (h, w) picture of the scan (float32, 0 outside the crop).

    :func:`edge.preprocess.heatmap_to_image` onto the picture's grid, so the heat is never built at the scan's
    full size.
    """
    return heatmap_to_image(heatmap, geometry, shape)


def scale_colours(n: int) -> np.ndarray:
    """The colour scale, low to high: ``n`` heats from 0 to 1 drawn as the picture draws them over grey."""
    heat = np.linspace(0.0, 1.0, n, dtype=np.float32)[None]
    return np.asarray(_blend(np.full(heat.shape, SCALE_GREY, np.uint8), heat, None))[0]


@dataclass(frozen=True)
class Layout:
    """Where everything goes on an overlay, in pixels; boxes are (left, top, right, bottom), right/bottom exclusive.

    ``lines`` are the caption lines' boxes (the first, the verdict, in ``font`` + 20%, the rest in
    ``font``); ``scale`` is the colour strip of the colour scale (None without a heatmap), with its
    "low" / "high" labels on either side of it.
    """

    size: tuple[int, int]
    picture: tuple[int, int, int, int]
    lines: tuple[tuple[int, int, int, int], ...]
    font: int
    scale: tuple[int, int, int, int] | None


_SCALE_LABELS = ("evidence:  low", "high")


def layout(picture: tuple[int, int], n_lines: int, has_scale: bool) -> Layout:
    """The overlay's layout for a picture of (height, width) with ``n_lines`` caption lines."""
    ph, pw = picture
    width = max(pw, MIN_WIDTH)
    font = int(np.clip(round(width / 25), 11, 40))
    margin, row = max(6, font // 2), round(font * 1.45)
    left = (width - pw) // 2
    y = ph + margin // 2
    lines = []
    for i in range(n_lines):
        height = row + (round(font * 0.3) if i == 0 else 0)
        lines.append((margin, y, width - margin, y + height))
        y += height
    scale = None
    if has_scale:
        f = _font(font)
        low = _text_width(_SCALE_LABELS[0], f)
        high = _text_width(_SCALE_LABELS[1], f)
        gap = font // 2
        x0, x1 = margin + low + gap, min(width - margin - high - gap, margin + low + gap + 12 * font)
        strip = max(4, round(font * 0.8))
        top = y + (row - strip) // 2
        scale = (x0, top, max(x0 + 8, x1), top + strip)
        y += row
    return Layout((width, y + margin // 2), (left, 0, left + pw, ph), tuple(lines), font, scale)


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):  # no FreeType, or Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _text_width(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
    left, _, right, _ = font.getbbox(text)
    return int(math.ceil(right - left))


def _fitting_font(text: str, size: int, room: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """The default font at ``size``, or smaller so that ``text`` fits in ``room`` pixels (a long label)."""
    font = _font(size)
    width = _text_width(text, font)
    if width > room and size > 8:
        font = _font(max(8, int(size * room / width)))
    return font


def caption_lines(label: str, confidence: float, model: str, has_heatmap: bool, status: str = "ok",
                  message: str | None = None) -> list[Line]:
    """The caption as (text, colour) lines. A verdict: the label, its confidence and which model said so,
    the disclaimer, and a note when there is no heatmap. A scan without one (status ``refer`` or
    ``refused``): "No verdict" and the model, then ``message``, the gate's plain sentence, both in amber so
    they are not missed, then the disclaimer; the label is never drawn."""
    if status != "ok":
        words = message or f"Status: {status.replace('_', ' ')}: no verdict"
        return [(f"{NO_VERDICT}  -  {model}", _WARN), (words, _WARN), (DISCLAIMER, _NOTE)]
    lines = [(f"{label}  {confidence * 100:.1f}%  -  {model}", _WHITE), (DISCLAIMER, _NOTE)]
    if not has_heatmap:
        lines.append(("This model shows no heatmap", _NOTE))
    return lines


def render(gray: np.ndarray, is_uint8: bool, heat: np.ndarray | None, lines: Sequence[Line]) -> Image.Image:
    """The overlay picture from the scan already at its display size (``gray``, float32, the scan's own scale;
    ``is_uint8``: the scan was 8-bit) and the heat on the same grid: the blended scan above a black caption
    panel with the caption ``lines`` and, with a heatmap, the colour scale."""
    base = _to_display(gray, is_uint8)
    picture = Image.fromarray(base) if heat is None else _blend(base, heat, _mask_image(gray))
    lay = layout(base.shape, len(lines), heat is not None)
    canvas = Image.new("RGB", lay.size, (0, 0, 0))
    canvas.paste(picture, lay.picture[:2])
    draw = ImageDraw.Draw(canvas)
    for i, ((text, colour), (x, y, right, _)) in enumerate(zip(lines, lay.lines)):
        font = _fitting_font(text, round(lay.font * 1.2) if i == 0 else lay.font, right - x)
        left, top, _, _ = font.getbbox(text)
        draw.text((x - left, y - top), text, fill=colour, font=font)
    if lay.scale is not None:
        x0, y0, x1, y1 = lay.scale
        strip = np.broadcast_to(scale_colours(x1 - x0)[None], (y1 - y0, x1 - x0, 3))
        canvas.paste(Image.fromarray(np.ascontiguousarray(strip)), (x0, y0))
        font = _font(lay.font)
        for text, x in ((_SCALE_LABELS[0], x0 - lay.font // 2 - _text_width(_SCALE_LABELS[0], font)),
                        (_SCALE_LABELS[1], x1 + lay.font // 2)):
            left, top, _, bottom = font.getbbox(text)
            draw.text((x - left, (y0 + y1 - (bottom - top)) // 2 - top), text, fill=_NOTE, font=font)
    return canvas


def overlay_image(result: Result, status: str | None = None) -> Image.Image:
    """The overlay of a :class:`edge.classifier.Result` as a PIL image (at most ``MAX_SIDE`` px of scan).

    ``status`` is the record's status (docs/RECORDS.md), by default the result's own. A scan without a
    verdict (``refer``, ``refused``) is drawn without heat and with the reason in words instead of a label.
    """
    status = result.status if status is None else status
    if result.image is None:
        raise ValueError("the result carries no decoded image to draw on")
    shape = display_size(np.shape(result.image)[:2])
    gray = reduced_gray(result.image, shape)
    heat = None
    if status == "ok" and result.heatmap is not None and result.geometry is not None:
        heat = heat_on_grid(result.heatmap, result.geometry, shape)
    lines = caption_lines(result.label, result.confidence, result.model, heat is not None, status, result.message)
    return render(gray, np.asarray(result.image).dtype == np.uint8, heat, lines)


def save_overlay(result: Result, path: str | Path, status: str | None = None) -> Path:
    """Write the overlay PNG of a :class:`edge.classifier.Result` to ``path`` and return the path."""
    path = Path(path)
    overlay_image(result, status).save(path, format="PNG", compress_level=PNG_LEVEL)
    return path
