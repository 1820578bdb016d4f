"""Calibrate the input gate (`edge.gate`) of a model file on its training data and embed it in the file.

Host side, once per model: the features of every training scan go through the device's own code path
(`edge.Classifier` on the model file, so decode, crop and int8 arithmetic are the device's), and

1. the references are the training data's groups: each class folder, and each extra healthy source (a flat
   folder such as IXI ``train/``);
2. a share of each reference is held out (whole near-duplicate groups of the class folders when an
   ``edge-dedup`` file is given, whole subjects of a flat folder), never seen by the fit;
3. the fit is a Mahalanobis distance to the nearest reference mean with one covariance shared by all
   (Lee et al. 2018), kept as its leading principal directions plus one variance for the rest
   (:class:`edge.gate.OodGate`), so the parameters stay a few hundred kB;
4. the threshold is the distance below which every reference keeps ``quantile`` percent of its held-out
   scans (the largest of the references' percentiles), so that no class pays for the others with a long
   tail of its own (meningioma slices sit farthest out); the share of each held-out reference above it is
   measured and recorded.

Only training folders are accepted: the validation-only folders (``external-dev``, IXI ``dev``) are refused
by name (`convert.training_sources.check_trainable`), as for training. Features are cached under
``cache_dir`` by the weights' checksum, the features tensor and the file list, since an Xception pass over
9,000 scans costs many minutes on a small CPU.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import click
import numpy as np

from convert.dataset import images_under
from convert.training_sources import check_trainable, subject_of
from edge.gate import OodGate, encode_array

METHOD = "mahalanobis-pca"
#: Principal directions kept; the rest of the feature space is one shared variance.
COMPONENTS = 16
#: Held-out share of every reference.
HOLDOUT = 0.2
#: Percentile of each reference's held-out distances; the largest of them becomes the threshold.
QUANTILE = 99.0
#: Fewer in-distribution scans than this give no gate: the held-out quantile would be a guess.
MIN_IMAGES = 500

Progress = Callable[[Sequence[Path], str], Iterable[Path]]


@dataclass(frozen=True)
class Reference:
    """One reference of the fit: a class folder, or one flat folder of extra healthy scans."""

    name: str
    paths: tuple[Path, ...]
    groups: tuple[str, ...]  # hold-out unit of each path: a near-duplicate group, a subject, or the file


def references(folders: Sequence[Path], dedup: Path | None = None) -> list[Reference]:
    """The references in ``folders``: class sub-folders, or the folder itself when it holds images directly.

    ``dedup`` (an ``edge-dedup`` report) keeps near-duplicate training scans on one side of the hold-out,
    so the threshold is not measured on copies of the scans it was fitted on.
    """
    groups = _dedup_groups(dedup)
    refs: list[Reference] = []
    for folder in folders:
        folder = Path(folder)
        try:
            check_trainable(folder)
        except click.BadParameter as exc:
            raise ValueError(exc.format_message()) from None
        if not folder.is_dir():
            raise OSError(f"{folder}: not a directory")
        subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        direct = [p for p in images_under(folder) if p.parent == folder]
        if direct or not subdirs:
            paths = images_under(folder)
            refs.append(Reference(f"{folder.parent.name}/{folder.name}", tuple(paths), tuple(subject_of(p) for p in paths)))
            continue
        for sub in subdirs:
            paths = images_under(sub)
            keys = [groups.get(f"{folder.name}/{sub.name}/{p.name}", str(p)) for p in paths]
            refs.append(Reference(sub.name, tuple(paths), tuple(keys)))
    empty = [r.name for r in refs if not r.paths]
    if empty:
        raise OSError(f"no images in the gate's reference folder(s): {', '.join(empty)}")
    return refs


def _dedup_groups(dedup: Path | None) -> dict[str, str]:
    if dedup is None:
        return {}
    doc = json.loads(Path(dedup).read_text(encoding="utf-8"))
    return {member: f"dup{i}" for i, group in enumerate(doc.get("train_groups", [])) for member in group}


def split(ref: Reference, fraction: float = HOLDOUT, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, held out) with ``fraction`` of the reference's groups held out, whole."""
    keys = sorted(set(ref.groups))
    rng = np.random.default_rng(seed)
    held = set(rng.permutation(keys)[:max(1, int(round(fraction * len(keys))))].tolist())
    is_held = np.array([g in held for g in ref.groups])
    return np.flatnonzero(~is_held), np.flatnonzero(is_held)


def features(model_path: Path, paths: Sequence[Path], *, cache_dir: Path | None, label: str = "",
             progress: Progress | None = None, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, D] float32, readable [N] bool) of every path, through `edge.Classifier` on the file.

    An unreadable scan gets a row of zeros and False. The cache key is the model's weights checksum plus
    its features output, so a file whose metadata changed (the gate embedded) reuses its own features.
    """
    from edge import Classifier

    clf = Classifier(model_path, threads=threads)
    if "features" not in clf._outputs:
        raise ValueError(f"{model_path}: the model has no 'features' output (add it first)")
    key = _cache_key(clf, paths)
    stem = (label or "features").replace("/", "_")
    cached = Path(cache_dir) / "gate" / f"{stem}-{key}.npz" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        with np.load(cached) as data:
            return data["features"], data["readable"]
    rows, readable = [], []
    width = clf._features_width
    for path in (progress(paths, label) if progress else paths):
        try:
            rows.append(clf.classify(path).features)
            readable.append(True)
        except Exception:  # one unreadable training file must not stop a calibration; it is counted
            rows.append(np.zeros(width, np.float32))
            readable.append(False)
    out = np.asarray(rows, np.float32).reshape(len(paths), width), np.asarray(readable, bool)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cached, features=out[0], readable=out[1])
    return out


def _cache_key(clf: Any, paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    weights = clf.spec.metadata.get("weights", {}).get("sha256") or clf.spec.sha256
    digest.update(json.dumps([weights, clf.spec.output_names.get("features", "features"),
                              clf.spec.metadata["outputs"]["features"]], sort_keys=True).encode())
    for p in paths:
        st = Path(p).stat()
        digest.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def fit(x: np.ndarray, y: np.ndarray, components: int = COMPONENTS) -> OodGate:
    """The gate's distance (threshold 1 for now) from features ``x`` [N, D] and reference indices ``y``."""
    classes = np.unique(y)
    means = np.stack([x[y == c].mean(axis=0) for c in classes]).astype(np.float64)
    centred = x.astype(np.float64) - means[np.searchsorted(classes, y)]
    cov = centred.T @ centred / len(centred)
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    k = min(components, len(values) - 1)
    residual = float(max(values[k:].mean(), 1e-12))
    return OodGate(means.astype(np.float32), vectors[:, :k].astype(np.float32),
                   np.maximum(values[:k], residual).astype(np.float32), residual, 1.0)


def calibrate(model_path: Path, folders: Sequence[Path], *, dedup: Path | None = None,
              components: int = COMPONENTS, quantile: float = QUANTILE, cache_dir: Path | None = None,
              progress: Progress | None = None, threads: int | None = None, seed: int = 0) -> dict[str, Any]:
    """The ``gate`` metadata entry for the model at ``model_path`` (which must have a features output).

    Raises ValueError when the folders hold fewer than :data:`MIN_IMAGES` readable scans.
    """
    refs = references(folders, dedup)
    listed = sum(len(r.paths) for r in refs)
    if listed < MIN_IMAGES:
        raise ValueError(f"the gate needs at least {MIN_IMAGES} readable training scans, the folders hold {listed}")
    xs, ys, held_x, held_y, counts = [], [], [], [], []
    for index, ref in enumerate(refs):
        x, ok = features(model_path, ref.paths, cache_dir=cache_dir, label=ref.name, progress=progress,
                         threads=threads)
        fit_idx, held_idx = split(ref, seed=seed)
        fit_idx, held_idx = fit_idx[ok[fit_idx]], held_idx[ok[held_idx]]
        xs.append(x[fit_idx])
        ys.append(np.full(len(fit_idx), index))
        held_x.append(x[held_idx])
        held_y.append(np.full(len(held_idx), index))
        counts.append({"reference": ref.name, "images": len(ref.paths), "unreadable": int((~ok).sum()),
                       "fit": len(fit_idx), "held_out": len(held_idx)})
    total = sum(c["fit"] + c["held_out"] for c in counts)
    if total < MIN_IMAGES:
        raise ValueError(f"the gate needs at least {MIN_IMAGES} readable training scans, the folders hold {total}")
    gate = fit(np.concatenate(xs), np.concatenate(ys), components)
    held = np.concatenate(held_x)
    which = np.concatenate(held_y)
    distances = gate.squared_distances(held)
    threshold = max(float(np.percentile(distances[which == i], quantile)) for i in range(len(refs)))
    for index, entry in enumerate(counts):
        mine = distances[which == index]
        entry["held_out_referred"] = int((mine > threshold).sum())
    return {
        "method": METHOD,
        "features": "features",
        "references": [r.name for r in refs],
        "means": encode_array(gate.means),
        "basis": encode_array(gate.basis),
        "variances": encode_array(gate.variances),
        "residual_variance": gate.residual_variance,
        "threshold": threshold,
        "calibration": {
            "folders": [str(f) for f in folders], "dedup": str(dedup) if dedup else None,
            "components": int(gate.basis.shape[1]), "quantile": quantile, "holdout": HOLDOUT, "seed": seed,
            "held_out_referred": round(float((distances > threshold).mean()), 5), "per_reference": counts,
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
    }
