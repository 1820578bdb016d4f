"""Counterfactual lesion removal: a tumour slice with its lesion replaced by the mirror-image tissue of the
other hemisphere of the same slice, labelled healthy.

Why: the training set's healthy slices come from Br35H "no" and IXI only; the sources of its tumours
(figshare post-contrast T1, SARTAJ) have no healthy slices at all, so "looks like a tumour source" still
predicts a tumour after copy-paste has taught the reverse for the healthy sources. Removing the lesion
shows the tumour sources' own anatomy, scanner and contrast without a lesion: the same canvas with and
without it, from the other direction (:mod:`convert.copy_paste`).

The brain is close to left-right symmetric on axial and coronal slices, so the contralateral tissue is a
plausible stand-in for what the lesion displaced; slices that are not symmetric outside the lesion
(sagittal, tilted) and lesions whose mirror image overlaps themselves (midline: most pituitary tumours)
are skipped rather than filled with something implausible. Mass effect and oedema outside the mask stay,
which is label noise toward "healthy" the run's validation has to show is affordable.

Works in model space (prepared uint8 inputs [S, S, 1], masks [S, S] 0..255); numpy only, deterministic.
"""
from __future__ import annotations

import numpy as np

from convert.copy_paste import MIN_AREA, blur

#: Pixels darker than this (stretched intensity) are background, not head.
BACKGROUND = 10.0
#: Least Pearson r between a slice and its mirror image (both blurred) over the head outside the lesion:
#: below it the slice is not symmetric enough (sagittal, tilted) for the other side to stand in for the
#: lesion's. Training's healthy axial slices score 0.88 at the median, its tumour slices 0.69.
MIN_SYMMETRY = 0.6
#: Largest share of the filled region whose mirror source lies inside that region (midline lesions).
MAX_SELF_OVERLAP = 0.1


def _mirror(a: np.ndarray, axis_x: float) -> np.ndarray:
    """``a`` (2-D) mirrored about the vertical line x = ``axis_x`` (pixel units), zeros where nothing maps."""
    h, w = a.shape
    src = np.rint(2.0 * axis_x - np.arange(w)).astype(int)
    ok = (src >= 0) & (src < w)
    out = np.zeros_like(a)
    out[:, ok] = a[:, src[ok]]
    return out


def _symmetry_axis(img: np.ndarray, head: np.ndarray, region: np.ndarray) -> tuple[float, float]:
    """(axis x, r): the vertical mirror line near the head's centre (searched over +-4 px) at which the slice,
    blurred to its coarse anatomy and with the lesion and its mirror left out, best matches its mirror image.

    Why blurred: gyri are not symmetric pixel by pixel at 96 px, while the hemispheres' outline, ventricles and
    grey/white layout are; the head's bounding box alone misses a tilted or off-centre midline by a few pixels.
    """
    cols = np.nonzero(head)[1]
    centre = 0.5 * (cols.min() + cols.max())
    coarse = blur(img, passes=3)
    best = (-1.0, centre)
    for axis_x in centre + np.arange(-4.0, 4.5, 0.5):
        source = _mirror(region.astype(np.uint8), axis_x).astype(bool)
        outside = head & _mirror(head.astype(np.uint8), axis_x).astype(bool) & ~region & ~source
        if outside.sum() < 100:
            continue
        a, b = coarse[outside], _mirror(coarse, axis_x)[outside]
        if np.std(a) == 0 or np.std(b) == 0:
            continue
        best = max(best, (float(np.corrcoef(a, b)[0, 1]), float(axis_x)))
    return best[1], best[0]


def remove(image: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """``image`` with the lesion of ``mask`` replaced by the mirrored other side, or None where that is not
    plausible (lesion too small, slice not symmetric, lesion on the midline, mirror source outside the head).

    The filled region is the lesion grown by about two pixels, feathered at its edge so that no seam is left
    for the network to learn.
    """
    img = image[..., 0].astype(np.float32)
    core = mask > 127
    head = img > BACKGROUND
    if core.sum() < MIN_AREA or not head.any():
        return None
    region = blur(core.astype(np.float32), passes=2) > 0.05
    axis_x, r = _symmetry_axis(img, head, region)
    if r < MIN_SYMMETRY:
        return None
    source = _mirror(region.astype(np.uint8), axis_x).astype(bool)
    if (source & region).sum() > MAX_SELF_OVERLAP * region.sum():
        return None
    mirrored = _mirror(img, axis_x)
    if (mirrored[region] <= BACKGROUND).mean() > 0.1:
        return None
    alpha = np.clip(blur(region.astype(np.float32)), 0.0, 1.0)
    out = alpha * mirrored + (1.0 - alpha) * img
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)[..., None]


def counterparts(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """The lesion-free counterparts [k, S, S, 1] of every slice in ``images`` / ``masks`` that can be filled
    plausibly (about a third of gliomas and meningiomas, almost no pituitary tumours, which sit on the
    midline). Deterministic, so a run computes them once and draws from them every epoch."""
    out = [got for got in (remove(x, m) for x, m in zip(images, masks)) if got is not None]
    size = images.shape[1]
    return np.stack(out) if out else np.zeros((0, size, size, 1), np.uint8)
