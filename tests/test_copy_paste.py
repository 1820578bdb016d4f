"""Tumour copy-paste and the training-source guard: a pasted lesion is where its mask says, with its label."""
from __future__ import annotations

import hashlib
from pathlib import Path

import click
import numpy as np
import pytest

from convert.copy_paste import blur, paste, paste_batch
from convert.dataset import FolderData
from convert.training_sources import Pools, check_trainable, compose, subject_of, subject_split

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _head(value: int = 100) -> np.ndarray:
    yy, xx = np.mgrid[:64, :64]
    img = np.where((yy - 32) ** 2 + (xx - 32) ** 2 < 28 ** 2, value, 0).astype(np.uint8)
    return img[..., None]


def _donor() -> tuple[np.ndarray, np.ndarray]:
    donor = _head(60)
    mask = np.zeros((64, 64), np.uint8)
    mask[20:30, 36:46] = 255
    donor[20:30, 36:46, 0] = 240
    return donor, mask


def _sources() -> tuple[FolderData, FolderData]:
    """Class folders (a glioma with its mask, healthy slices of tissue 100 and 80) and another source's healthy
    slices (tissue 120)."""
    donor, mask = _donor()
    x = np.stack([donor, _head(), _head(80)])
    main = FolderData(x, np.array([0, 2, 2]), ["glioma", "meningioma", "notumor", "pituitary"], ["a", "b", "c"], [],
                      np.stack([mask, np.zeros_like(mask), np.zeros_like(mask)]), np.array([True, False, False]))
    return main, FolderData(np.stack([_head(120)] * 4), np.full(4, 2), main.labels, list("defg"), [])


def test_pasted_lesion_matches_its_mask():
    donor, mask = _donor()
    canvas = _head(100)
    rng = np.random.default_rng(3)
    image, new_mask = paste(canvas, donor, mask, rng)
    core = new_mask > 250
    assert core.sum() == 100  # a 10x10 lesion, mirrored and shifted but whole
    far = blur(new_mask.astype(np.float32), passes=3) < 1e-3
    assert np.array_equal(image[far], canvas[far])  # nothing changes away from the lesion
    # lesion/tissue contrast is kept: 240/60 in the donor, the canvas's tissue is 100 -> ~255 (clipped)
    assert image[core].mean() > 200 and image[~core & ~far].mean() < image[core].mean()
    shifted = np.argwhere(core)
    assert np.all(np.abs(shifted.min(0) - [20, 36]) <= 4) or np.all(np.abs(shifted.min(0) - [20, 64 - 46]) <= 4)


def test_lesion_over_background_is_refused_and_batch_keeps_labels():
    donor, mask = _donor()
    empty = np.zeros((64, 64, 1), np.uint8)
    assert paste(empty, donor, mask, np.random.default_rng(0)) is None
    donors = np.stack([donor, donor])
    x, m, y = paste_batch(np.stack([_head(), _head(90)]), donors, np.stack([mask, mask]), np.array([3, 3]), 5,
                          np.random.default_rng(1))
    assert x.shape == (5, 64, 64, 1) and m.shape == (5, 64, 64) and list(y) == [3] * 5
    assert all((mi > 250).sum() == 100 for mi in m)


def test_compose_adds_healthy_draws_and_pastes():
    main, healthy = _sources()
    e = compose(Pools(main, healthy), np.random.default_rng(0), 2, 6)
    assert e.y.size == 3 + 2 + 6 and int(e.has_mask.sum()) == 1 + 6
    assert np.all(e.y[-6:] == 0) and np.all(e.masks[~e.has_mask] == 0)
    assert abs(e.weight[e.y == 0].sum() - e.weight[e.y == 2].sum()) < 1e-5  # classes weigh the same in total


def test_compose_marks_the_class_folders_images_and_can_keep_their_healthy_slices_unpasted():
    """``is_main`` flags exactly the class folders' samples; with ``paste_into_main`` off every paste lies on
    another source's slice (here the other source is 120 grey, the class folders' healthy 100 and 80)."""
    main, healthy = _sources()
    e = compose(Pools(main, healthy), np.random.default_rng(0), 2, 40)
    assert list(e.is_main) == [True] * 3 + [False] * 42
    tissue = lambda img: int(np.median(img[..., 0][(blur((img[..., 0] > 0).astype(np.float32)) > 0.99)]))  # noqa: E731
    assert {tissue(img) for img in e.x[-40:]} >= {100, 120}
    only_other = compose(Pools(main, healthy, paste_into_main=False), np.random.default_rng(0), 2, 40)
    assert {tissue(img) for img in only_other.x[-40:]} == {120}


def test_validation_only_folders_are_refused(tmp_path):
    for bad in ("external-dev/tcga_lgg", "ixi-healthy/dev", "x/external-dev"):
        (tmp_path / bad).mkdir(parents=True)
        with pytest.raises(click.BadParameter, match="validation-only"):
            check_trainable(tmp_path / bad)
    (tmp_path / "ixi-healthy/train").mkdir(parents=True)
    check_trainable(tmp_path / "ixi-healthy/train")


def test_subject_split_keeps_each_subject_on_one_side():
    paths = [f"IXI{s:03d}-HH-1_ax{k:03d}.jpg" for s in range(20) for k in range(5)]
    tr, va = subject_split(paths, 0.2, 0)
    train_subjects = {subject_of(paths[i]) for i in tr}
    val_subjects = {subject_of(paths[i]) for i in va}
    assert len(val_subjects) == 4 and not train_subjects & val_subjects and tr.size + va.size == 100


@pytest.mark.skipif(not (SHARED / "external-dev").is_dir(), reason="needs ../shared/data (the data sets)")
def test_training_sources_hold_no_external_image():
    """The folders the shipped recipe trains on share no file, by content, with the validation-only sets."""
    def digests(root: Path) -> set[str]:
        return {hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}

    held_out = digests(SHARED / "external-dev") | digests(SHARED / "ixi-healthy" / "dev")
    for source in (SHARED / "brain-tumor-mri" / "Training", SHARED / "ixi-healthy" / "train",
                   SHARED / "brain-tumor-mri-masks" / "Training"):
        check_trainable(source)
        assert not digests(source) & held_out, source
