"""Counterfactual lesion removal: on a symmetric head the lesion is replaced by what the other side shows,
implausible fills are refused, and the counterparts enter an epoch as healthy samples without a mask."""
from __future__ import annotations

import numpy as np

from convert.dataset import FolderData
from convert.lesion_removal import counterparts, remove
from convert.training_sources import Pools, compose

LABELS = ["glioma", "meningioma", "notumor", "pituitary"]


def _phantom() -> np.ndarray:
    """A 64-px head, left-right symmetric about x = 31.5, with anatomy-like structure (not a flat disc)."""
    yy, xx = np.mgrid[:64, :64].astype(np.float32)
    inside = (yy - 32) ** 2 / 28 ** 2 + (xx - 31.5) ** 2 / 24 ** 2 < 1
    tissue = 110 + 50 * np.cos(yy / 5.0) * np.cos(np.abs(xx - 31.5) / 4.0)
    return np.where(inside, tissue, 0).astype(np.uint8)


def _lesion(rows: slice, cols: slice) -> tuple[np.ndarray, np.ndarray]:
    """The phantom with a bright lesion at ``rows`` x ``cols`` and its mask."""
    image = _phantom()
    image[rows, cols] = 240
    mask = np.zeros((64, 64), np.uint8)
    mask[rows, cols] = 255
    return image[..., None], mask


def test_removal_gives_back_the_healthy_head():
    image, mask = _lesion(slice(22, 32), slice(14, 22))
    out = remove(image, mask)
    assert out is not None and out.shape == image.shape and out.dtype == np.uint8
    healthy = _phantom().astype(int)
    assert np.abs(out[..., 0].astype(int) - healthy).max() <= 1  # the other side is this head's own tissue
    assert out[22:32, 14:22, 0].max() < 200


def test_midline_lesion_and_asymmetric_slice_are_refused():
    image, mask = _lesion(slice(40, 48), slice(28, 36))  # on the midline: its mirror is itself
    assert remove(image, mask) is None
    image, mask = _lesion(slice(22, 32), slice(14, 22))
    lopsided = image.copy()
    yy, xx = np.mgrid[:64, :64]
    lopsided[..., 0] = np.where((image[..., 0] > 0) & (xx > 32), (yy * 4 + 20) % 250, image[..., 0])
    assert remove(lopsided, mask) is None
    assert remove(image, np.zeros_like(mask)) is None  # no lesion to remove


def test_counterparts_keep_only_plausible_fills_and_enter_epochs_as_healthy():
    good, good_mask = _lesion(slice(22, 32), slice(14, 22))
    midline, midline_mask = _lesion(slice(40, 48), slice(28, 36))
    assert len(counterparts(np.stack([good, midline]), np.stack([good_mask, midline_mask]))) == 1
    main = FolderData(np.stack([good, midline, _phantom()[..., None]]), np.array([0, 3, 2]), LABELS,
                      ["a", "b", "c"], [], np.stack([good_mask, midline_mask, np.zeros_like(good_mask)]),
                      np.array([True, True, False]))
    e = compose(Pools(main, None), np.random.default_rng(0), None, 0, 5)
    assert e.y.size == 3 + 5 and list(e.y[-5:]) == [2] * 5
    assert not e.has_mask[-5:].any() and not e.is_main[-5:].any() and np.all(e.masks[-5:] == 0)
    assert all(np.array_equal(x, remove(good, good_mask)) for x in e.x[-5:])
    assert abs(e.weight[e.y == 0].sum() - e.weight[e.y == 2].sum()) < 1e-5  # classes still weigh the same
