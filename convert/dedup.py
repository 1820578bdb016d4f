"""Find test images that also sit in the training set (byte-identical or near-identical copies).

Public MRI collections were merged into the data set we use, and some slices reached it more than once:
re-encoded, re-windowed, shifted or resized. A test image with a copy in the training set measures memory,
not generalisation, so `edge-evaluate` reports metrics on the test images that have no such copy.

How a copy is recognised
------------------------
- exact: same SHA-256 of the file bytes.
- near: 64-bit pHash and 64-bit dHash of the grayscale image (imagehash), both within ``threshold`` bits
  (Hamming distance). The image is first re-centred on its intensity centroid: the plain pHash of these
  slices moves typically 4-12 bits (up to 20) under a 3-pixel shift (a mostly symmetric head has many DCT coefficients near
  the median), so without re-centring a shifted copy is as far away as a different slice. Requiring the
  gradient-based dHash to agree as well removes the few different slices whose pHash alone comes close.

Why the default threshold is 4 (measured on brain-tumor-mri, 5,708 training and 1,311 test images)
-----------------------------------------------------------------------------------------------------
- Nearest training image of each test image, by max(pHash, dHash) distance: 0: 371, 1: 28, 2: 78,
  3: 7, 4: 63, 5: 35, 6: 141, 7: 36, 8: 182, 9: 34, 10: 169 test images. Copies form the peak at 0-2; the
  valley at 3 is where they stop, and from 4 up the background of merely similar slices rises.
- Looking at pairs side by side (montages of 10 random pairs per distance): at 0-3 they are the same
  slice (re-encoded, re-windowed, resized, with or without burnt-in text); at 4-5 mostly the same slice
  processed harder (sharpened, re-windowed) or the neighbouring slice of the same patient (the tumour a
  little larger or smaller); from 6 on, slices of other patients appear; from 8 on pairs are different
  slices.
- Pairs known to be different (test and training image with different labels, 5.6 M pairs; the
  collections never give one slice two labels): none within 5, 1 within 6, 27 within 8.
- Synthetic copies of 400 random images (two draws of 200), found within 4: JPEG quality 70 re-encode
  97-99%, +20% brightness 99%, a 3-pixel shift with black fill 92-95% (96-97% within 6), shift and
  re-encode 91-95%. Without the re-centring a 3-pixel shift is found within 4 in 9% of cases.
So 4 finds nearly every copy, no pair known to be different, and some neighbouring slices of the same
patient, which is leakage of another kind that a held-out accuracy should not count either.
Result (data/dedup/brain-tumor-mri.json): 547 of the 1,311 test images have a copy in training; the
de-duplicated test set keeps glioma 285/300, meningioma 182/306, notumor 30/405, pituitary 267/300.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from convert.dataset import images_under
from edge.decode import IMAGE_SUFFIXES, decode
from edge.errors import InputError
from edge.preprocess import to_gray_float

DEFAULT_THRESHOLD = 4
METHOD = ("exact: sha256 of the file bytes; near: 64-bit pHash and dHash (imagehash) of the grayscale image "
          "re-centred on its intensity centroid, both Hamming distances <= threshold")
#: Rows of the test set compared at once; bounds the [rows, train] distance matrices to a few MB.
CHUNK = 256

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.uint8)

Progress = Callable[[Sequence[Path]], Iterable[Path]]


@dataclass(frozen=True)
class ImageHashes:
    """The three fingerprints of one image file."""

    sha256: str
    phash: int
    dhash: int


def centred_gray(image: np.ndarray) -> Image.Image:
    """8-bit grayscale PIL image shifted (bilinear, black fill) so its intensity centroid is at the centre."""
    gray = to_gray_float(image)
    top = float(gray.max()) if gray.size else 0.0
    if top > 255.0:
        gray = gray * (255.0 / top)
    gray = np.clip(gray, 0.0, 255.0)
    img = Image.fromarray((gray + 0.5).astype(np.uint8))
    total = float(gray.sum())
    if total <= 0.0:
        return img
    h, w = gray.shape
    cy = float(gray.sum(axis=1) @ np.arange(h)) / total
    cx = float(gray.sum(axis=0) @ np.arange(w)) / total
    return img.transform(img.size, Image.AFFINE, (1, 0, cx - (w - 1) / 2, 0, 1, cy - (h - 1) / 2),
                         resample=Image.BILINEAR, fillcolor=0)


def _as_int(h: "imagehash.ImageHash") -> int:  # noqa: F821 (imported where hashes are made)
    return int.from_bytes(np.packbits(np.asarray(h.hash, bool).ravel()).tobytes(), "big")


def hash_image(path: Path) -> ImageHashes:
    """Fingerprint one image file; raises :class:`edge.errors.InputError` when it cannot be decoded."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    import imagehash  # the `convert` extra; imported here so that `edge-dedup --help` works without it

    img = centred_gray(decode(path))
    return ImageHashes(hashlib.sha256(data).hexdigest(), _as_int(imagehash.phash(img)), _as_int(imagehash.dhash(img)))


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit distances between every 64-bit hash in ``a`` [n] and in ``b`` [m], as uint8 [n, m]."""
    x = np.bitwise_xor(np.asarray(a, np.uint64)[:, None], np.asarray(b, np.uint64)[None, :])
    return _POPCOUNT[x.view(np.uint8)].reshape(x.shape + (8,)).sum(axis=-1, dtype=np.uint8)


def _near(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], threshold: int,
          same: bool = False) -> Iterable[tuple[int, int, int, int]]:
    """Yield (i, j, phash distance, dhash distance) for pairs within ``threshold`` on both hashes."""
    for start in range(0, len(a[0]), CHUNK):
        dp = hamming(a[0][start:start + CHUNK], b[0])
        dd = hamming(a[1][start:start + CHUNK], b[1])
        ii, jj = np.nonzero(np.maximum(dp, dd) <= threshold)
        for i, j in zip(ii.tolist(), jj.tolist()):
            if not same or start + i < j:
                yield start + i, j, int(dp[i, j]), int(dd[i, j])


def _groups(rel: list[str], hashes: list[ImageHashes], threshold: int) -> list[list[str]]:
    """Groups (2+ images) of copies inside one set: connected components of near pairs (exact ones included)."""
    parent = list(range(len(rel)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    arrays = _arrays(hashes)
    for i, j, _, _ in _near(arrays, arrays, threshold, same=True):
        parent[find(i)] = find(j)
    members: dict[int, list[str]] = {}
    for i in range(len(rel)):
        members.setdefault(find(i), []).append(rel[i])
    return sorted(sorted(m) for m in members.values() if len(m) > 1)


def _arrays(hashes: list[ImageHashes]) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([h.phash for h in hashes], np.uint64), np.array([h.dhash for h in hashes], np.uint64))


def _hash_all(paths: Sequence[Path], progress: Progress | None) -> tuple[dict[Path, ImageHashes], dict[Path, str]]:
    hashes, unreadable = {}, {}
    for p in (progress(paths) if progress else paths):
        try:
            hashes[p] = hash_image(p)
        except InputError as exc:
            unreadable[p] = str(exc)
    return hashes, unreadable


def _class_of(rel: str) -> str:
    parts = rel.split("/")
    return parts[1] if len(parts) > 2 else "."


def check_leakage(train_dir: Path, test_dir: Path, threshold: int = DEFAULT_THRESHOLD,
                  progress: Progress | None = None) -> dict[str, Any]:
    """Compare every test image with every training image; return the JSON-ready report.

    Paths in the report are relative to each folder's parent (the data set root), e.g.
    ``Testing/glioma/Te-gl_0001.jpg``, so the report stays valid wherever the data set is copied.
    ``progress`` wraps the list of files being hashed (a progress bar), the slow part.
    """
    train_dir, test_dir = Path(train_dir), Path(test_dir)
    if threshold < 0 or threshold > 64:
        raise ValueError(f"threshold {threshold} is outside 0..64 bits")
    for d in (train_dir, test_dir):
        if not d.is_dir():
            raise ValueError(f"{d}: not a directory")
    train_paths, test_paths = images_under(train_dir), images_under(test_dir)
    for d, paths in ((train_dir, train_paths), (test_dir, test_paths)):
        if not paths:
            raise ValueError(f"{d}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    hashed, failed = _hash_all(train_paths + test_paths, progress)
    rel = {p: p.relative_to(d.parent).as_posix() for d, paths in ((train_dir, train_paths), (test_dir, test_paths))
           for p in paths}
    train = [(rel[p], hashed[p]) for p in train_paths if p in hashed]
    test = [(rel[p], hashed[p]) for p in test_paths if p in hashed]
    unreadable = [{"path": rel[p], "error": message} for p, message in failed.items()]
    train_rel, train_h = [r for r, _ in train], [h for _, h in train]
    test_rel, test_h = [r for r, _ in test], [h for _, h in test]

    pairs = []
    for i, j, dp, dd in _near(_arrays(test_h), _arrays(train_h), threshold):
        exact = test_h[i].sha256 == train_h[j].sha256
        pairs.append({"test": test_rel[i], "train": train_rel[j], "distance": max(dp, dd), "phash": dp,
                      "dhash": dd, "kind": "exact" if exact else "near"})
    pairs.sort(key=lambda p: (p["test"], p["distance"], p["train"]))

    exact_tests = {p["test"] for p in pairs if p["kind"] == "exact"}
    dup_tests = {p["test"] for p in pairs}
    dedup_test = [r for r in test_rel if r not in dup_tests]
    per_class: dict[str, dict[str, int]] = {}
    totals, kept = Counter(_class_of(r) for r in test_rel), Counter(_class_of(r) for r in dedup_test)
    for name in sorted(totals):
        per_class[name] = {"test": totals[name], "with_duplicate": totals[name] - kept[name], "dedup": kept[name]}
    train_groups = _groups(train_rel, train_h, threshold)
    test_groups = _groups(test_rel, test_h, threshold)
    return {
        "schema": 1,
        "method": METHOD,
        "threshold": threshold,
        "train_dir": train_dir.name,
        "test_dir": test_dir.name,
        "counts": {
            "train": len(train_rel),
            "test": len(test_rel),
            "unreadable": len(unreadable),
            "test_with_exact": len(exact_tests),
            "test_with_near_only": len(dup_tests - exact_tests),
            "pairs_exact": sum(p["kind"] == "exact" for p in pairs),
            "pairs_near": sum(p["kind"] == "near" for p in pairs),
            "train_groups": len(train_groups),
            "train_grouped_images": sum(len(g) for g in train_groups),
            "test_groups": len(test_groups),
            "test_grouped_images": sum(len(g) for g in test_groups),
        },
        "per_class": per_class,
        "test_total": len(test_rel),
        "test_with_duplicate": len(dup_tests),
        "dedup_test": dedup_test,
        "pairs": pairs,
        "train_groups": train_groups,
        "test_groups": test_groups,
        "unreadable": unreadable,
    }
