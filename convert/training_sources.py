"""What the generalising custom-CNN recipe trains on, and what it must never train on.

Three pools, all prepared exactly as the device prepares a scan:

- the class-folder data set (``Training/<class>/``) with its lesion masks carried into model space;
- extra healthy slices of other sources (``--extra-healthy``, e.g. IXI ``train/``), labelled "notumor" and
  split into training and validation *by subject*, so no person's slices sit on both sides;
- tumour copy-paste samples made fresh every epoch from the two (:mod:`convert.copy_paste`).

Folders that are for validation only (``external-dev``, IXI ``dev``) are refused by name, whatever path
leads to them, so a typo cannot leak them into training; the run also writes its exact file lists.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from convert.copy_paste import paste_batch
from convert.dataset import IMAGE_SUFFIXES, FolderData, class_weights, images_under, load_files

#: Path fragments that mark validation-only data (see ../shared/README.md): never training, calibration
#: or checkpoint selection.
VALIDATION_ONLY = ("external-dev", "ixi-healthy/dev")
HEALTHY = "notumor"


def check_trainable(path: Path) -> None:
    """Refuse a folder that is, or lies inside, validation-only data."""
    text = Path(path).resolve().as_posix() + "/"
    for frag in VALIDATION_ONLY:
        if f"/{frag}/" in text:
            raise click.BadParameter(f"{path}: {frag} is validation-only data and never enters training")


def subject_of(path: str | Path) -> str:
    """The subject a slice belongs to: the file name up to its first underscore (``IXI012-HH-1211_ax045``)."""
    return Path(path).stem.split("_", 1)[0]


def subject_split(paths: list[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, validation) with ``fraction`` of the subjects (all their slices) held out."""
    subjects = sorted({subject_of(p) for p in paths})
    rng = np.random.default_rng(seed)
    held = set(rng.permutation(subjects)[: max(1, int(round(fraction * len(subjects))))])
    is_val = np.array([subject_of(p) in held for p in paths])
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def load_healthy(folders: list[Path], labels: list[str], size: int, pipeline: str,
                 cache_dir: Path | None) -> FolderData | None:
    """Every image under the ``folders`` as a "notumor" slice (grayscale model inputs), or None if none given."""
    if not folders:
        return None
    parts = []
    for root in folders:
        check_trainable(root)
        files = images_under(root, IMAGE_SUFFIXES)
        if not files:
            raise click.BadParameter(f"{root}: no images", param_hint="--extra-healthy")
        parts.append(load_files(files, [labels.index(HEALTHY)] * len(files), labels, size, 1, pipeline,
                                Path(root), cache_dir))
    return FolderData(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]), labels,
                      [f for p in parts for f in p.paths], [s for p in parts for s in p.skipped])


@dataclass
class Pools:
    """The images an epoch is drawn from: ``main`` (class folders, with masks) and extra ``healthy`` slices."""

    main: FolderData
    healthy: FolderData | None
    #: Paste into the class folders' own healthy slices too (False: only into the other sources').
    paste_into_main: bool = True

    def canvases(self) -> np.ndarray:
        """Healthy slices the tumours are pasted into: every source's, or only the other sources' when
        ``paste_into_main`` is off (then the class folders' healthy slices are only ever seen healthy)."""
        own = self.main.x[self.main.y == self.main.labels.index(HEALTHY)]
        if self.healthy is None:
            return own
        return np.concatenate([own, self.healthy.x]) if self.paste_into_main else self.healthy.x

    def donors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(images, masks, labels) of the tumour slices that have a mask."""
        ok = self.main.has_mask & (self.main.y != self.main.labels.index(HEALTHY))
        return self.main.x[ok], self.main.masks[ok], self.main.y[ok]


@dataclass
class Epoch:
    """One epoch's (or the validation set's) samples: images, masks, labels, has-mask flags, class weights,
    and which samples are the class folders' own images (not another source's slices, not pastes)."""

    x: np.ndarray
    masks: np.ndarray
    y: np.ndarray
    has_mask: np.ndarray
    weight: np.ndarray
    is_main: np.ndarray


def _weights(y: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-sample inverse-frequency class weights of this composition (every class counts the same in total)."""
    w = class_weights(y, num_classes)
    return np.array([w[int(c)] for c in y], np.float32)


def compose(pools: Pools, rng: np.random.Generator, healthy_n: int | None, paste_n: int) -> Epoch:
    """All of ``main``, ``healthy_n`` random extra healthy slices (all when None) and ``paste_n`` fresh pastes."""
    m = pools.main
    size = m.x.shape[1]
    xs, ms, ys, hs, mains = [m.x], [m.masks], [m.y], [m.has_mask], [np.ones(m.y.size, bool)]
    if pools.healthy is not None and len(pools.healthy.y):
        n = len(pools.healthy.y)
        pick = np.sort(rng.permutation(n)[: n if healthy_n is None else min(n, healthy_n)])
        xs.append(pools.healthy.x[pick])
        ms.append(np.zeros((pick.size, size, size), np.uint8))
        ys.append(pools.healthy.y[pick])
        hs.append(np.zeros(pick.size, bool))
        mains.append(np.zeros(pick.size, bool))
    if paste_n > 0:
        px, pm, py = paste_batch(pools.canvases(), *pools.donors(), paste_n, rng)
        xs.append(px)
        ms.append(pm)
        ys.append(py)
        hs.append(np.ones(py.size, bool))
        mains.append(np.zeros(py.size, bool))
    y = np.concatenate(ys)
    return Epoch(np.concatenate(xs), np.concatenate(ms), y, np.concatenate(hs), _weights(y, len(m.labels)),
                 np.concatenate(mains))


def epochs(pools: Pools, seed: int, healthy_n: int | None, paste_n: int) -> Iterator[Epoch]:
    """An endless stream of shuffled epochs, each with new healthy draws and new pastes."""
    rng = np.random.default_rng(seed)
    while True:
        e = compose(pools, rng, healthy_n, paste_n)
        order = rng.permutation(e.y.size)
        yield Epoch(e.x[order], e.masks[order], e.y[order], e.has_mask[order], e.weight[order], e.is_main[order])
