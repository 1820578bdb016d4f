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

A crop is padded to a square canvas of its longer side, at most ``CANVAS_SIDE``; a longer crop (a thin strip,
20000 x 16) is resized into model space first and padded there, so no side x side canvas is ever built.
:class:`Geometry` and :func:`model_rect` record where the crop went, and every map between image and model
space (:func:`heatmap_to_image`, :func:`mask_to_model`) follows them without building the canvas either.
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
#: A bright box smaller than this share of the image's height or width is not a head.
MIN_HEAD_SHARE = 0.2
#: Percentiles mapped to 0 and 255 by the contrast stretch.
STRETCH_PERCENTILES = (0.5, 99.5)
#: Longest side of the square canvas a crop is padded onto before it is resized to the model's input; a
#: longer crop is resized into model space first and padded there. Above the longest side of any scan in the
#: training and validation data (1200 px), so what they are answered with does not change.
CANVAS_SIDE = 2048


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


def head_extent(gray: np.ndarray, ref: float | None = None) -> tuple[int, int, int, int] | None:
    """Tight bounding box (top, left, bottom, right) of the head, or None when none stands out.

    A row or column counts when at least 2% of it is brighter than ``HEAD_THRESHOLD`` of the 99th
    percentile (``ref`` when the caller has it), which ignores isolated bright specks (text burnt into the
    image, JPEG ringing) outside the skull; a box under ``MIN_HEAD_SHARE`` of the image either way is none.
    The crop (:func:`head_box`) and the input gate's "no head" check (`edge.gate`) share this one test.
    """
    h, w = gray.shape
    ref = float(np.percentile(gray, 99)) if ref is None else ref
    if ref <= 0:
        return None
    mask = gray > HEAD_THRESHOLD * ref
    rows = np.flatnonzero(mask.mean(axis=1) > 0.02)
    cols = np.flatnonzero(mask.mean(axis=0) > 0.02)
    if rows.size == 0 or cols.size == 0:
        return None
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    if (bottom - top) < MIN_HEAD_SHARE * h or (right - left) < MIN_HEAD_SHARE * w:
        return None
    return top, left, bottom, right


def head_box(gray: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box (top, left, bottom, right) of the head with a margin, or the whole image when none
    stands out (:func:`head_extent`)."""
    h, w = gray.shape
    extent = head_extent(gray)
    if extent is None:
        return 0, 0, h, w
    top, left, bottom, right = extent
    margin = int(round(HEAD_MARGIN * max(bottom - top, right - left)))
    return max(0, top - margin), max(0, left - margin), min(h, bottom + margin), min(w, right + margin)


def stretch(gray: np.ndarray) -> np.ndarray:
    """Map the 0.5th..99.5th percentile to 0..255 (uint8), so scanner gain and window do not matter."""
    lo, hi = np.percentile(gray, STRETCH_PERCENTILES)
    if hi - lo < 1e-6:
        return np.zeros(gray.shape, np.uint8)
    out = (gray - lo) * (255.0 / (hi - lo))
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def resize_uint8(img: np.ndarray, size: int) -> np.ndarray:
    """Resize a 2-D uint8 image to size x size with PIL's antialiased bilinear filter."""
    return np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))


def prepare(image: np.ndarray, size: int, channels: int, pipeline: str = "mri-crop-v1") -> np.ndarray:
    """Return the uint8 model input [size, size, channels] for a decoded image of any size and depth.

    ``image`` may be 2-D (grayscale, any integer or float depth) or H x W x C. Grayscale models get one
    channel; RGB models get the grayscale result repeated three times, because MRI has no colour and a
    colour cast is a property of the file, not of the patient.
    """
    return prepare_with_geometry(image, size, channels, pipeline)[0]


@dataclass(frozen=True)
class Geometry:
    """Where the model input came from in the decoded image, so model-space maps can be drawn back on it.

    The model saw ``box`` (top, left, bottom, right) of an image of ``image_shape`` (H, W), placed at
    ``offset`` (top, left) on a canvas of ``canvas`` (h, w) that was resized to ``size`` x ``size``; a canvas
    over ``CANVAS_SIDE`` is never built, the crop going straight to its :func:`model_rect` instead.
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

    One function for both, so that the geometry is always that of the pixels the model was given.
    """
    if pipeline not in PIPELINES:
        raise ValueError(f"unknown preprocessing pipeline {pipeline!r}; known: {', '.join(PIPELINES)}")
    gray = to_gray_float(image)
    if pipeline == "mri-crop-v1":
        top, left, bottom, right = head_box(gray)
        gray8 = stretch(gray[top:bottom, left:right])
        ch, cw = gray8.shape
        side = max(ch, cw)
        geometry = Geometry(gray.shape, (top, left, bottom, right), (side, side), ((side - ch) // 2, (side - cw) // 2),
                            size)
        out = to_model(gray8, geometry, Image.BILINEAR)
    else:
        if gray.dtype != np.uint8:
            gray = np.clip(gray if gray.max() <= 255 else gray * (255.0 / gray.max()), 0, 255)
        h, w = gray.shape
        geometry = Geometry((h, w), (0, 0, h, w), (h, w), (0, 0), size)
        out = resize_uint8(np.asarray(gray + 0.5 if gray.dtype != np.uint8 else gray).astype(np.uint8), size)
    out = out[..., None]
    return (np.repeat(out, channels, axis=2) if channels == 3 else out), geometry


def model_rect(geometry: Geometry) -> tuple[float, float, float, float]:
    """Where the crop lies in model space: (top, left, bottom, right) in model pixels, bottom/right exclusive.

    Exact fractions when the crop was padded on its canvas and the canvas resized; whole pixels (at least one
    row and column) when the canvas is over ``CANVAS_SIDE`` and the crop was resized into model space itself.
    """
    (ch, cw), (oy, ox), size = geometry.canvas, geometry.offset, geometry.size
    top, left, bottom, right = geometry.box
    fy, fx = size / ch, size / cw
    rect = (oy * fy, ox * fx, (oy + bottom - top) * fy, (ox + right - left) * fx)
    if max(ch, cw) <= CANVAS_SIDE:
        return rect
    t, l = min(size - 1, round(rect[0])), min(size - 1, round(rect[1]))
    return t, l, max(t + 1, min(size, round(rect[2]))), max(l + 1, min(size, round(rect[3])))


def to_model(crop: np.ndarray, geometry: Geometry, resample: int) -> np.ndarray:
    """A 2-D crop (uint8 or float32) of the image at ``geometry.box`` as the model sees it, [size, size].

    Padded on its canvas and resized with ``resample`` while the canvas is at most ``CANVAS_SIDE``; otherwise
    resized to its place in model space (:func:`model_rect`) and padded there.
    """
    size = geometry.size
    if max(geometry.canvas) <= CANVAS_SIDE:
        (oy, ox), (h, w) = geometry.offset, crop.shape
        canvas = crop
        if geometry.canvas != crop.shape:
            canvas = np.zeros(geometry.canvas, crop.dtype)
            canvas[oy:oy + h, ox:ox + w] = crop
        return _resize(canvas, (size, size), resample)
    t, l, b, r = (int(v) for v in model_rect(geometry))
    out = np.zeros((size, size), crop.dtype)
    out[t:b, l:r] = _resize(crop, (b - t, r - l), resample)
    return out


def _resize(a: np.ndarray, shape: tuple[int, int], resample: int,
            box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """Pillow's resize of a 2-D array (or of its ``box``: left, top, right, bottom) to ``shape`` (h, w)."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(a)).resize(shape[::-1], resample, box=box))


def heatmap_to_image(heatmap: np.ndarray, geometry: Geometry, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Map a model-space heatmap [size, size] onto the decoded image's pixel grid (float32 [H, W]).

    Inverts :func:`prepare_with_geometry`: the part of the heatmap where the crop lies (:func:`model_rect`) is
    resized to the crop and placed where the crop came from, so the canvas is never built. Pixels the model
    never saw (outside the head box) get 0. ``shape`` (h, w) puts the map on a picture of the whole image at
    another size instead (an overlay), with the crop box scaled to it.
    """
    heat = np.ascontiguousarray(heatmap, np.float32)
    H, W = geometry.image_shape
    h, w = shape or (H, W)
    top, left, bottom, right = geometry.box
    if (h, w) != (H, W):
        fy, fx = h / H, w / W
        top, left = min(h - 1, round(top * fy)), min(w - 1, round(left * fx))
        bottom, right = max(top + 1, min(h, round(bottom * fy))), max(left + 1, min(w, round(right * fx)))
    t, l, b, r = model_rect(geometry)
    out = np.zeros((h, w), np.float32)
    out[top:bottom, left:right] = _resize(heat, (bottom - top, right - left), Image.BILINEAR, box=(l, t, r, b))
    return out


def mask_to_model(mask: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Map an image-space mask [H, W] (any 0/nonzero or 0..1 map) into model space (float32 [size, size], 0..1).

    The forward twin of :func:`heatmap_to_image`: crop to the head box, pad and resize to the model's size
    as the scan was (:func:`to_model`; a mask of another size is first resized to the decoded image, which
    is smaller than the file when it was reduced while decoding). A box filter (area average) rather than nearest neighbour keeps thin or
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
    out = to_model(m[top:bottom, left:right], geometry, Image.BOX)
    return np.clip(out, 0.0, 1.0)
