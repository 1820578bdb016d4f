"""Folder data sets (one sub-folder per class) read into memory as prepared uint8 model inputs.

Every image goes through `edge.decode.decode` and `edge.preprocess.prepare`, the functions the device
runs, so the network is trained on exactly what it will see in the field. Prepared arrays are cached as .npz keyed on the
folder listing and the preprocessing settings, because decoding 7,000 JPEGs costs more than an epoch.
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Sequence

import click
import numpy as np
from edge.decode import IMAGE_SUFFIXES as DECODABLE, decode
from edge.errors import InputError
from edge.preprocess import mask_to_model, prepare, prepare_with_geometry

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}


@dataclass
class FolderData:
    """Prepared images ``x`` [N, S, S, C] uint8, integer labels ``y``, class names and file paths.

    ``masks`` [N, S, S] uint8 (0..255, the lesion's share of each model pixel) exist when the images were
    loaded with a mask folder; an image without a mask file gets an all-zero mask and ``has_mask`` False.
    """

    x: np.ndarray
    y: np.ndarray
    labels: list[str]
    paths: list[str]
    skipped: list[str]
    masks: np.ndarray | None = None
    has_mask: np.ndarray | None = None

    def take(self, idx: np.ndarray) -> "FolderData":
        """The rows ``idx`` (masks included); skipped-file notes stay with the whole set."""
        return FolderData(self.x[idx], self.y[idx], self.labels, [self.paths[i] for i in idx], [],
                          None if self.masks is None else self.masks[idx],
                          None if self.has_mask is None else self.has_mask[idx])


def images_under(folder: Path, suffixes: Collection[str] = DECODABLE) -> list[Path]:
    """Image files below ``folder`` at any depth, sorted; hidden files and folders (.ipynb_checkpoints) skipped.

    ``suffixes`` defaults to everything the device decodes (DICOM included); training passes its own set.
    """
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def list_images(root: Path, labels: list[str] | None = None) -> tuple[list[Path], list[int], list[str]]:
    """Image files under ``root/<class>/``, sorted; classes are the sub-folder names unless given."""
    root = Path(root)
    if labels is None:
        labels = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not labels:
        raise click.ClickException(f"{root}: no class sub-folders found")
    files, ys = [], []
    for i, name in enumerate(labels):
        found = images_under(root / name, IMAGE_SUFFIXES) if (root / name).is_dir() else []
        files += found
        ys += [i] * len(found)
    if not files:
        raise click.ClickException(f"{root}: no images in the class sub-folders {labels}")
    return files, ys, labels


def _cache_key(files: list[Path], size: int, channels: int, pipeline: str, mask_root: Path | None) -> str:
    h = hashlib.sha256(json.dumps([size, channels, pipeline, "edge.decode", str(mask_root)]).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def mask_path(image: Path, image_root: Path, mask_root: Path) -> Path:
    """Where an image's lesion mask lives: the same relative path under ``mask_root``, as ``.png``."""
    return (Path(mask_root) / Path(image).relative_to(image_root)).with_suffix(".png")


def load_folder(root: Path, size: int, channels: int, pipeline: str, labels: list[str] | None = None,
                cache_dir: Path | None = None, mask_root: Path | None = None) -> FolderData:
    """Decode and prepare every image of a class-folder data set (cached when ``cache_dir`` is set).

    With ``mask_root`` (a folder mirroring ``root``, one ``.png`` mask per image where known) each mask is
    carried into model space with the image's own crop geometry. Unreadable images are skipped and listed
    rather than aborting a long job.
    """
    files, ys, labels = list_images(root, labels)
    return load_files(files, ys, labels, size, channels, pipeline, Path(root), cache_dir, mask_root)


def load_files(files: Sequence[Path], ys: Sequence[int], labels: list[str], size: int, channels: int,
               pipeline: str, root: Path, cache_dir: Path | None = None,
               mask_root: Path | None = None) -> FolderData:
    """:func:`load_folder` for an explicit file list (``root`` names the cache and anchors mask paths)."""
    files = list(files)
    cache = None
    if cache_dir is not None:
        key = _cache_key(files, size, channels, pipeline, mask_root)
        cache = Path(cache_dir) / f"{Path(root).name}-{key}.npz"
        if cache.exists():
            z = np.load(cache, allow_pickle=False)
            masks = z["masks"] if "masks" in z.files else None
            return FolderData(z["x"], z["y"], labels, list(z["paths"]), list(z["skipped"]), masks,
                              z["has_mask"] if masks is not None else None)
    xs, kept, paths, skipped, masks, has = [], [], [], [], [], []
    with click.progressbar(list(zip(files, ys)), label=f"preparing {root}", file=sys.stderr) as bar:
        for f, y in bar:
            try:
                arr = decode(f)
            except InputError as exc:
                skipped.append(str(exc))
                continue
            if mask_root is None:
                xs.append(prepare(arr, size, channels, pipeline))
            else:
                x, geo = prepare_with_geometry(arr, size, channels, pipeline)
                xs.append(x)
                mp = mask_path(f, root, mask_root)
                has.append(mp.is_file())
                m = mask_to_model(decode(mp), geo) if has[-1] else np.zeros((size, size), np.float32)
                masks.append(np.round(m * 255).astype(np.uint8))
            kept.append(y)
            paths.append(str(f))
    mask_arr = np.stack(masks) if mask_root is not None else None
    has_arr = np.asarray(has, bool) if mask_root is not None else None
    data = FolderData(np.stack(xs), np.asarray(kept, np.int64), labels, paths, skipped, mask_arr, has_arr)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        extra = {} if mask_arr is None else {"masks": mask_arr, "has_mask": has_arr}
        np.savez(cache, x=data.x, y=data.y, paths=np.asarray(paths), skipped=np.asarray(skipped, dtype=str),
                 **extra)
    return data


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, validation) with ``fraction`` of every class held out, reproducibly."""
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        val.extend(idx[: max(1, int(round(fraction * idx.size)))])
    val_idx = np.sort(np.asarray(val))
    train_idx = np.setdiff1d(np.arange(y.size), val_idx)
    return train_idx, val_idx


def class_weights(y: np.ndarray, num_classes: int) -> dict[int, float]:
    """Inverse-frequency weights normalised to mean 1, so rare classes count as much as common ones."""
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    w = counts.sum() / (num_classes * np.maximum(counts, 1))
    return {i: float(v) for i, v in enumerate(w)}
