"""Turn a decoded scan into the exact uint8 tensor a model was trained on.

Training (`convert/`) and the device (`edge/`) call these same functions, so a scan is never prepared one
way in the lab and another way in the clinic. Normalisation to the network's range ([-1, 1], ImageNet
mean/std, ...) is *not* done here: the converter folds it into the TFLite graph, so a device only
decodes, crops and resizes.

Pipelines, named in each model's metadata:

- ``mri-crop-v1``: grayscale -> crop to the head -> percentile contrast stretch -> pad to a square
  -> resize. Cropping removes the black border whose size and shape differ per scanner and per public
  source; the stretch removes global brightness/contrast differences between scanners. Both make the
  model look at anatomy rather than at where a slice came from.
- ``resize``: plain resize of the whole image, for models converted from elsewhere that were trained so.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

PIPELINES = ("mri-crop-v1", "resize")

#: A pixel belongs to the head when it is brighter than this fraction of the 99th percentile.
HEAD_THRESHOLD = 0.08
#: Margin kept around the head's bounding box, as a fraction of the box's longer side.
HEAD_MARGIN = 0.04
#: Percentiles mapped to 0 and 255 by the contrast stretch.
STRETCH_PERCENTILES = (0.5, 99.5)


def to_gray_float(image: np.ndarray) -> np.ndarray:
    """Collapse any channel layout to one float32 channel without changing the intensity scale."""
    a = np.asarray(image)
    if a.ndim == 3:
        if a.shape[2] == 1:
            a = a[..., 0]
        else:
            rgb = a[..., :3].astype(np.float32)
            a = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D or 3-D image array, got shape {np.shape(image)}")
    return a.astype(np.float32, copy=False)


def head_box(gray: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box (top, left, bottom, right) of the head, or the whole image when none stands out.

    A row or column counts when at least 2% of it is brighter than the threshold, which ignores
    isolated bright specks (text burnt into the image, JPEG ringing) outside the skull.
    """
    h, w = gray.shape
    ref = float(np.percentile(gray, 99))
    if ref <= 0:
        return 0, 0, h, w
    mask = gray > HEAD_THRESHOLD * ref
    rows = np.flatnonzero(mask.mean(axis=1) > 0.02)
    cols = np.flatnonzero(mask.mean(axis=0) > 0.02)
    if rows.size == 0 or cols.size == 0:
        return 0, 0, h, w
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    if (bottom - top) < 0.2 * h or (right - left) < 0.2 * w:
        return 0, 0, h, w
    margin = int(round(HEAD_MARGIN * max(bottom - top, right - left)))
    return max(0, top - margin), max(0, left - margin), min(h, bottom + margin), min(w, right + margin)


def stretch(gray: np.ndarray) -> np.ndarray:
    """Map the 0.5th..99.5th percentile to 0..255 (uint8), so scanner gain and window do not matter."""
    lo, hi = np.percentile(gray, STRETCH_PERCENTILES)
    if hi - lo < 1e-6:
        return np.zeros(gray.shape, np.uint8)
    out = (gray - lo) * (255.0 / (hi - lo))
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def pad_square(img: np.ndarray) -> np.ndarray:
    """Centre the image on a black square canvas, keeping its aspect ratio."""
    h, w = img.shape[:2]
    s = max(h, w)
    if h == w:
        return img
    out = np.zeros((s, s) + img.shape[2:], img.dtype)
    top, left = (s - h) // 2, (s - w) // 2
    out[top:top + h, left:left + w] = img
    return out


def resize_uint8(img: np.ndarray, size: int) -> np.ndarray:
    """Resize a 2-D uint8 image to size x size with PIL's antialiased bilinear filter."""
    return np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))


def prepare(image: np.ndarray, size: int, channels: int, pipeline: str = "mri-crop-v1") -> np.ndarray:
    """Return the uint8 model input [size, size, channels] for a decoded image of any size and depth.

    ``image`` may be 2-D (grayscale, any integer or float depth) or H x W x C. Grayscale models get one
    channel; RGB models get the grayscale result repeated three times, because MRI has no colour and a
    colour cast is a property of the file, not of the patient.
    """
    if pipeline not in PIPELINES:
        raise ValueError(f"unknown preprocessing pipeline {pipeline!r}; known: {', '.join(PIPELINES)}")
    gray = to_gray_float(image)
    if pipeline == "mri-crop-v1":
        top, left, bottom, right = head_box(gray)
        gray8 = stretch(gray[top:bottom, left:right])
        out = resize_uint8(pad_square(gray8), size)
    else:
        if gray.dtype != np.uint8:
            gray = np.clip(gray if gray.max() <= 255 else gray * (255.0 / gray.max()), 0, 255)
        out = resize_uint8(np.asarray(gray + 0.5 if gray.dtype != np.uint8 else gray).astype(np.uint8), size)
    out = out[..., None]
    return np.repeat(out, channels, axis=2) if channels == 3 else out


@dataclass(frozen=True)
class Geometry:
    """Where the model input came from in the decoded image, so model-space maps can be drawn back on it.

    The model saw ``box`` (top, left, bottom, right) of an image of ``image_shape`` (H, W), placed at
    ``offset`` (top, left) on a canvas of ``canvas`` (h, w) that was resized to ``size`` x ``size``.
    """

    image_shape: tuple[int, int]
    box: tuple[int, int, int, int]
    canvas: tuple[int, int]
    offset: tuple[int, int]
    size: int


def prepare_with_geometry(
    image: np.ndarray, size: int, channels: int, pipeline: str = "mri-crop-v1"
) -> tuple[np.ndarray, Geometry]:
    """Return exactly what :func:`prepare` returns, plus the crop/pad :class:`Geometry` it used.

    The crop pipeline is spelled out with the same helpers (instead of calling ``prepare`` and finding
    the head again) so the head box is computed once per scan; a test pins the two to identical bytes.
    """
    if pipeline != "mri-crop-v1":
        out = prepare(image, size, channels, pipeline)
        h, w = np.shape(image)[:2]
        return out, Geometry((h, w), (0, 0, h, w), (h, w), (0, 0), size)
    gray = to_gray_float(image)
    top, left, bottom, right = head_box(gray)
    gray8 = stretch(gray[top:bottom, left:right])
    ch, cw = gray8.shape
    side = max(ch, cw)
    out = resize_uint8(pad_square(gray8), size)[..., None]
    out = np.repeat(out, channels, axis=2) if channels == 3 else out
    offset = ((side - ch) // 2, (side - cw) // 2)
    return out, Geometry(gray.shape, (top, left, bottom, right), (side, side), offset, size)


def heatmap_to_image(heatmap: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Map a model-space heatmap [size, size] onto the decoded image's pixel grid (float32 [H, W]).

    Inverts :func:`prepare_with_geometry`: resize to the canvas, cut the padding away, and place the rest
    where the crop came from. Pixels the model never saw (outside the head box) get 0.
    """
    heat = np.asarray(heatmap, np.float32)
    ch, cw = geometry.canvas
    canvas = np.asarray(Image.fromarray(np.ascontiguousarray(heat)).resize((cw, ch), Image.BILINEAR))
    top, left, bottom, right = geometry.box
    oy, ox = geometry.offset
    out = np.zeros(geometry.image_shape, np.float32)
    out[top:bottom, left:right] = canvas[oy:oy + bottom - top, ox:ox + right - left]
    return out


def mask_to_model(mask: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Map an image-space mask [H, W] (any 0/nonzero or 0..1 map) into model space (float32 [size, size], 0..1).

    The forward twin of :func:`heatmap_to_image`: crop to the head box, pad as :func:`pad_square` does,
    resize to the model's size. A box filter (area average) rather than nearest neighbour keeps thin or
    small lesions from vanishing: a model pixel gets the fraction of it that the mask covers. Training
    (mask-guided losses, pasted lesions) and localisation metrics both need masks where the model looks.
    """
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m[..., 0]
    m = (m > 0).astype(np.float32) if m.dtype != np.float32 or m.max() > 1 else m
    if m.shape != tuple(geometry.image_shape):
        m = np.asarray(Image.fromarray(m).resize(geometry.image_shape[::-1], Image.NEAREST))
    top, left, bottom, right = geometry.box
    crop = m[top:bottom, left:right]
    canvas = np.zeros(geometry.canvas, np.float32)
    oy, ox = geometry.offset
    canvas[oy:oy + crop.shape[0], ox:ox + crop.shape[1]] = crop
    out = Image.fromarray(canvas).resize((geometry.size, geometry.size), Image.BOX)
    return np.clip(np.asarray(out, np.float32), 0.0, 1.0)
