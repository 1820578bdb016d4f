"""Explanation-quality arithmetic: how well a heatmap marks a lesion, and whether the model relies on what it marks.

Pure numpy on arrays, so every figure can be checked on hand-made maps with known answers; running a model
and reporting live in `convert/explain_eval.py`. Localisation compares an image-space heatmap with an
image-space mask (both [H, W], the decoded scan's grid); faithfulness (deletion/insertion) works on the
model input, where pixels can be removed without resampling.

- Pointing game (Zhang et al. 2016, "Top-down neural attention by excitation backprop"): a hit when the
  heatmap's peak lies within ``TOLERANCE_PX`` pixels of the mask, at a ``REFERENCE_SIZE``-pixel scale.
- Energy-based pointing game (Wang et al. 2020, Score-CAM): the share of the heatmap's mass inside the mask,
  and the *mass ratio*, that share divided by the share of the head the mask covers (1 = no better than a
  uniform map over the head).
- Deletion / insertion (Petsiuk et al. 2018, RISE): remove (or reveal) input pixels in heatmap order and
  follow the predicted class's probability; the area under that curve is low for deletion and high for
  insertion when the heatmap ranks the pixels the model needs first.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

#: Pointing-game tolerance in pixels at a REFERENCE_SIZE-pixel image (Zhang et al. use 15 px at 224 px).
TOLERANCE_PX = 15.0
REFERENCE_SIZE = 224


def tolerance(shape: tuple[int, ...]) -> float:
    """The pointing-game tolerance for an image of ``shape`` (H, W): 15 px scaled by max(H, W) / 224."""
    return TOLERANCE_PX * max(shape[:2]) / REFERENCE_SIZE


def peak(heat: np.ndarray) -> tuple[int, int] | None:
    """(row, column) of the heatmap's maximum, or None for a map with no positive value.

    Quantised or upsampled maps often have a plateau of equal maxima; the plateau pixel nearest to the
    plateau's centroid is taken, so the choice is symmetric instead of favouring the top-left pixel as a
    plain argmax would.
    """
    h = np.nan_to_num(np.asarray(heat, np.float64))
    top = h.max() if h.size else 0.0
    if top <= 0:
        return None
    ys, xs = np.nonzero(h >= top - 1e-6 * top)
    k = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
    return int(ys[k]), int(xs[k])


def distance_to_mask(point: tuple[int, int], mask: np.ndarray) -> float:
    """Euclidean distance in pixels from ``point`` to the nearest mask pixel (0 inside; inf for an empty mask)."""
    ys, xs = np.nonzero(np.asarray(mask, bool))
    if ys.size == 0:
        return float("inf")
    return float(np.sqrt(((ys - point[0]) ** 2 + (xs - point[1]) ** 2).min()))


def pointing_hit(heat: np.ndarray, mask: np.ndarray, tol: float | None = None) -> bool:
    """True when the heatmap's peak lies within ``tol`` px of the mask (default: :func:`tolerance` of the image).

    A map with no positive value points nowhere and counts as a miss.
    """
    p = peak(heat)
    if p is None:
        return False
    return distance_to_mask(p, mask) <= (tolerance(np.shape(heat)) if tol is None else tol)


def energy_inside(heat: np.ndarray, mask: np.ndarray) -> float:
    """Share of the heatmap's total mass that lies inside the mask (0..1; 0 for a map with no mass)."""
    h = np.clip(np.nan_to_num(np.asarray(heat, np.float64)), 0.0, None)
    total = h.sum()
    if total <= 0:
        return 0.0
    return float(h[np.asarray(mask, bool)].sum() / total)


def mass_ratio(heat: np.ndarray, mask: np.ndarray, head: np.ndarray) -> float:
    """Energy inside the mask divided by the mask's share of the head: 1.0 for a uniform map over the head.

    ``head`` marks the pixels the heatmap could cover at all (for `edge` results: the model's crop box,
    where ``heatmap_on_image`` can be non-zero), so a map is not credited for ignoring the black border.
    Mass and mask are both counted inside ``head`` only. NaN when the mask does not meet the head.
    """
    head = np.asarray(head, bool)
    inside = np.asarray(mask, bool) & head
    share = inside.sum() / max(int(head.sum()), 1)
    if share == 0:
        return float("nan")
    return energy_inside(np.where(head, heat, 0.0), inside) / share


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two maps of the same shape; NaN when either is constant."""
    x = np.asarray(a, np.float64).ravel()
    y = np.asarray(b, np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"maps of different sizes: {np.shape(a)} and {np.shape(b)}")
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom > 0 else float("nan")


def r_with_average(maps: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """Pearson r of each map with the maps' own average (the specificity figure of `edge-evaluate --masks`):
    1.0 for every map when they are all the same map, whatever the scan. NaN for a flat map."""
    stack = np.asarray(maps, np.float64)
    average = stack.mean(axis=0)
    return np.array([pearson(m, average) for m in stack])


def heat_order(heat: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flat pixel indices of a model-space map, hottest first; equal values in random (seeded) order.

    Grad-CAM maps are 0 over large areas; without a random tie-break those pixels would be removed in
    scan order (top rows first), which is itself an ordering that could look better or worse than chance.
    """
    h = np.nan_to_num(np.asarray(heat, np.float64)).ravel()
    return np.lexsort((rng.random(h.size), -h))


def perturbation_curve(score: Callable[[np.ndarray], float], image: np.ndarray, baseline: np.ndarray,
                       order: np.ndarray, steps: int, mode: str) -> np.ndarray:
    """The score at ``steps + 1`` evenly spaced fractions 0..1 of the pixels, changed in ``order``.

    ``mode="deletion"`` starts from ``image`` and replaces pixels by ``baseline``; ``"insertion"`` starts
    from ``baseline`` and puts the image's pixels back. ``image`` and ``baseline`` are [S, S] or [S, S, C]
    (every channel of a pixel changes together); ``order`` holds flat indices into [S, S]; ``score`` maps
    one input to a number (the predicted class's probability).
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    image, baseline = np.asarray(image), np.asarray(baseline)
    if image.shape != baseline.shape:
        raise ValueError(f"image {image.shape} and baseline {baseline.shape} differ in shape")
    s, w = image.shape[:2]
    n = s * w
    if sorted(np.shape(order)) != [n]:
        raise ValueError(f"order must hold {n} pixel indices, got shape {np.shape(order)}")
    start, end = (image, baseline) if mode == "deletion" else (baseline, image)
    current = start.reshape(n, -1).copy()
    source = end.reshape(n, -1)
    scores, done = [], 0
    for k in range(steps + 1):
        upto = int(round(k * n / steps))
        idx = order[done:upto]
        current[idx] = source[idx]
        done = upto
        scores.append(float(score(current.reshape(image.shape))))
    return np.array(scores)


def auc(curve: np.ndarray) -> float:
    """Area under a curve sampled at evenly spaced fractions 0..1 (trapezoid rule); the mean of a flat curve."""
    c = np.asarray(curve, np.float64)
    if c.size < 2:
        raise ValueError("a curve needs at least two points")
    return float((c[:-1] + c[1:]).sum() / (2 * (c.size - 1)))


def summary(values: list[float] | np.ndarray) -> dict[str, float | int | None]:
    """n, median and mean of the finite values (None when there are none)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"n": 0, "median": None, "mean": None}
    return {"n": int(v.size), "median": float(np.median(v)), "mean": float(v.mean())}
