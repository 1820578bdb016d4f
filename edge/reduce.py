"""Reduce a very large image while it is decoded, so memory stays bounded whatever arrives.

A scan is at most ~1 Mpx, and the models look at 96-150 px; a 50 Mpx photo of a film or a 16-bit export at
the pixel limit needs no more detail than that. Every decoder (Pillow, numpy arrays, DICOM) hands its pixels
here in bands of rows, still in their own type (uint8, uint16, int32, float32), and gets back the image
averaged over k x k blocks: never a full-size float copy, only one band's.

The factor is a whole number chosen from the pixel count, not the sides, so a thin strip (20000 x 16, a
few hundred kilopixels) is not reduced at all: its memory is bounded later, in model space
(`edge.preprocess`).
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

#: Largest decoded image handed on, in pixels: bigger ones are reduced by a whole factor while they are
#: decoded. Well above the largest scan in the training and validation data (1200 px a side), so a real
#: scan is never reduced and is answered exactly as before.
WORK_PIXELS = 2048 * 2048
#: Pixels of one band of rows read, converted and averaged at a time (a few MB as float64).
BAND_PIXELS = 1 << 20


def factor(width: int, height: int) -> int:
    """The whole factor a width x height image is reduced by (1: not reduced) to at most ~``WORK_PIXELS``."""
    pixels = width * height
    return 1 if pixels <= WORK_PIXELS else math.ceil(math.sqrt(pixels / WORK_PIXELS))


def reduced_size(width: int, height: int, k: int) -> tuple[int, int]:
    """(width, height) after reduction by ``k``: a partial block at the right or bottom edge is kept."""
    return -(-width // k), -(-height // k)


def band_rows(width: int, k: int) -> int:
    """Rows per band for an image ``width`` pixels wide: a multiple of ``k`` near ``BAND_PIXELS`` pixels."""
    return k * max(1, BAND_PIXELS // max(1, width * k))


def block_mean(a: np.ndarray, k: int) -> np.ndarray:
    """Average ``k`` x ``k`` blocks of a 2-D or H x W x C array, in its own dtype (integers rounded).

    Blocks at the right and bottom edges may be partial; each is the mean of the pixels it has. Sums are
    float32 for 8- and 16-bit and float32 images (exact for them at these factors), float64 otherwise.
    """
    h, w = a.shape[:2]
    rows, cols = -(-h // k), -(-w // k)
    wide = a.dtype.itemsize > 2 and a.dtype != np.float32
    padded = np.zeros((rows * k, cols * k) + a.shape[2:], np.float64 if wide else np.float32)
    padded[:h, :w] = a
    across = padded[0::k].copy()  # k strided slice additions: twice as fast as reshape-and-sum
    for i in range(1, k):
        across += padded[i::k]
    sums = across[:, 0::k].copy()
    for i in range(1, k):
        sums += across[:, i::k]
    counts = np.outer(np.minimum(k, h - np.arange(0, h, k)), np.minimum(k, w - np.arange(0, w, k)))
    mean = sums / (counts[..., None] if a.ndim == 3 else counts).astype(sums.dtype)
    if a.dtype.kind in "ui":
        mean = np.rint(mean)
    return mean.astype(a.dtype)


def reduce_bands(bands: Iterable[np.ndarray], k: int) -> np.ndarray:
    """The :func:`block_mean` by ``k`` of an image given as consecutive bands of rows (any heights)."""
    done: list[np.ndarray] = []
    pending: list[np.ndarray] = []
    held = 0
    for band in bands:
        pending.append(band)
        held += band.shape[0]
        if held < k:
            continue
        rows = pending[0] if len(pending) == 1 else np.concatenate(pending)
        cut = held - held % k
        done.append(block_mean(rows[:cut], k))
        pending = [rows[cut:]] if cut < held else []
        held -= cut
    if held:
        done.append(block_mean(pending[0] if len(pending) == 1 else np.concatenate(pending), k))
    if not done:
        raise ValueError("no rows to reduce")
    return done[0] if len(done) == 1 else np.concatenate(done)
