"""Masks follow a scan into model space exactly as the pixels do (training and localisation metrics rely on it)."""
import numpy as np

from edge.preprocess import heatmap_to_image, mask_to_model, prepare_with_geometry


def _scan_with_lesion() -> tuple[np.ndarray, np.ndarray]:
    """A 200x140 'head' on a black 260x300 image with a bright square lesion and its mask."""
    img = np.zeros((260, 300), np.uint8)
    img[30:230, 80:220] = 90
    img[60:100, 150:190] = 250
    mask = np.zeros_like(img)
    mask[60:100, 150:190] = 255
    return img, mask


def test_mask_lands_on_the_lesion_in_model_space():
    img, mask = _scan_with_lesion()
    x, geo = prepare_with_geometry(img, 96, 1)
    m = mask_to_model(mask, geo)
    assert m.shape == (96, 96) and m.dtype == np.float32 and 0 <= m.min() and m.max() <= 1
    lesion = x[..., 0] > 200
    assert m[lesion].mean() > 0.9 and m[~lesion].mean() < 0.02
    scale = 96 / geo.canvas[0]
    assert abs(m.sum() - 40 * 40 * scale * scale) < 0.05 * 40 * 40 * scale * scale  # area is preserved


def test_mask_round_trip_and_size_mismatch():
    img, mask = _scan_with_lesion()
    _, geo = prepare_with_geometry(img, 96, 1)
    back = heatmap_to_image(mask_to_model(mask, geo), geo)
    assert np.corrcoef(back.ravel(), (mask > 0).ravel())[0, 1] > 0.95
    small = mask[::2, ::2]  # a mask stored at half the image's size is resized, not misplaced
    assert np.corrcoef(mask_to_model(small, geo).ravel(), mask_to_model(mask, geo).ravel())[0, 1] > 0.95
