"""Tumour copy-paste (TumorCP, Yang et al. 2021): a real lesion, cut out by its mask, in a healthy brain of
another source.

Why: in the training data nearly every healthy slice comes from one public source (Br35H "no") and none of
that source's tumours, so "looks like Br35H" predicts "no tumour". Pasting real tumours into healthy slices
of that source and of another (IXI) makes the source uninformative: the same canvas now appears with and
without a lesion, and only the lesion tells them apart. It also gives every pasted sample an exact mask for
the mask-guided loss.

Works in model space (prepared uint8 inputs): every image there is already cropped to the head and
contrast-stretched, so a lesion keeps roughly its anatomical place (pituitary tumours stay central) when
pasted at the same coordinates. All functions are numpy only and take an explicit ``rng``.
"""
from __future__ import annotations

import numpy as np

#: Binomial kernel of the feathering blur (a 5-tap approximation of a Gaussian with sigma ~1 px).
_KERNEL = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0
#: Smallest lesion (model pixels) worth pasting; smaller masks are annotation specks.
MIN_AREA = 6.0
#: A canvas must have tissue where the lesion goes (mean stretched intensity above this), not background.
MIN_TISSUE = 25.0


def blur(a: np.ndarray, passes: int = 1) -> np.ndarray:
    """Separable binomial blur of a 2-D float map, ``passes`` times (edges clamp)."""
    out = np.asarray(a, np.float32)
    for _ in range(passes):
        for axis in (0, 1):
            p = np.pad(out, [(2, 2) if i == axis else (0, 0) for i in range(2)], mode="edge")
            n = out.shape[axis]
            out = sum(w * np.take(p, np.arange(k, k + n), axis=axis) for k, w in enumerate(_KERNEL))
    return out.astype(np.float32)


def _shift(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate a 2-D map by (dy, dx) pixels, filling with zeros (no wrap-around)."""
    out = np.zeros_like(a)
    h, w = a.shape
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = a[ys, xs]
    return out


def paste(canvas: np.ndarray, donor: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
          max_shift: int = 4) -> tuple[np.ndarray, np.ndarray] | None:
    """Paste ``donor``'s lesion (``mask``) into ``canvas``; returns (image, mask) or None if it cannot go there.

    ``canvas`` and ``donor`` are prepared model inputs [S, S, 1] uint8, ``mask`` the donor's model-space
    mask [S, S] uint8 (0..255). The lesion may be mirrored and moved by up to ``max_shift`` pixels; its
    intensities are scaled so that the tissue ring around it matches the canvas's tissue at the same place
    (lesions are judged against their surroundings, and the two slices' contrast differs), and its edge is
    feathered so no cut line is left for the network to learn. The returned mask is where the lesion now is.
    """
    m = mask.astype(np.float32) / 255.0
    d = donor[..., 0].astype(np.float32)
    c = canvas[..., 0].astype(np.float32)
    if m.sum() < MIN_AREA:
        return None
    if rng.random() < 0.5:
        m, d = m[:, ::-1].copy(), d[:, ::-1].copy()
    dy, dx = (int(v) for v in rng.integers(-max_shift, max_shift + 1, size=2))
    m, d = _shift(m, dy, dx), _shift(d, dy, dx)
    core = m > 0.5
    if core.sum() < MIN_AREA or c[core].mean() < MIN_TISSUE:
        return None
    ring = (blur(core.astype(np.float32), passes=3) > 0.05) & ~core
    tissue_c, tissue_d = c[ring], d[ring]
    tissue_c, tissue_d = tissue_c[tissue_d > 5], tissue_d[tissue_d > 5]
    gain = (tissue_c.mean() + 1.0) / (tissue_d.mean() + 1.0) if tissue_c.size >= 4 else 1.0
    gain = float(np.clip(gain, 0.6, 1.7))
    alpha = np.clip(blur(m), 0.0, 1.0)
    out = alpha * np.clip(d * gain, 0, 255) + (1.0 - alpha) * c
    image = np.clip(out + 0.5, 0, 255).astype(np.uint8)[..., None]
    return image, np.round(m * 255).astype(np.uint8)


def paste_batch(canvases: np.ndarray, donors: np.ndarray, masks: np.ndarray, donor_labels: np.ndarray, n: int,
                rng: np.random.Generator, max_tries: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` pasted samples (images [n,S,S,1], masks [n,S,S], labels [n]) from random canvas/donor pairs.

    A pair whose lesion would land outside the canvas's head is redrawn (up to ``max_tries`` per sample);
    fewer than ``n`` come back only if the pools are that incompatible (none if either pool is empty).
    """
    xs, ms, ys = [], [], []
    for _ in range(n if len(canvases) and len(donors) else 0):
        for _ in range(max_tries):
            i, j = int(rng.integers(len(canvases))), int(rng.integers(len(donors)))
            got = paste(canvases[i], donors[j], masks[j], rng)
            if got is not None:
                xs.append(got[0])
                ms.append(got[1])
                ys.append(int(donor_labels[j]))
                break
    size = canvases.shape[1]
    if not xs:
        return (np.zeros((0, size, size, 1), np.uint8), np.zeros((0, size, size), np.uint8),
                np.zeros((0,), np.int64))
    return np.stack(xs), np.stack(ms), np.asarray(ys, np.int64)
