"""Calibrate the input gate (`edge.gate`) of a model file on its training data and embed it in the file.

Host side, once per model: the features of every training scan go through the device's own code path
(`edge.Classifier` on the model file, so decode, crop and int8 arithmetic are the device's), and

1. the references are the training data's groups: each class folder, and each extra healthy source (a flat
   folder such as IXI ``train/``); every scan counts twice, as read and as one seeded export-style variant
   (:func:`export_variant`: reduced to one or two model inputs, then gain, contrast, gamma, blur, noise and
   edge enhancement), because scans from another site differ from the training sources in just these ways
   and a gate fitted on the scans as read refers real MRI of other sources for them;
2. a share of each reference is held out (whole near-duplicate groups of the class folders when an
   ``edge-dedup`` file is given, whole subjects of a flat folder; a scan's variant goes with it), never
   seen by the fit;
3. the fit is a Mahalanobis distance to the nearest reference mean with one covariance shared by all
   (Lee et al. 2018), kept as its leading principal directions plus one variance for the rest
   (:class:`edge.gate.OodGate`), so the parameters stay a few hundred kB;
4. the threshold is the distance below which every reference keeps ``quantile`` percent of its held-out
   scans (the largest of the references' percentiles), so that no class pays for the others with a long
   tail of its own (meningioma slices sit farthest out); the share of each held-out reference above it is
   measured and recorded, and so is how steady the layer is (``variants_referred_unseen``: the held-out
   variants that a gate fitted on the scans as read alone refers), the figure to choose ``--layer`` by.

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
#: Seeds the export-style variant of each reference's scans (times the reference's place, plus ``seed``).
VARIANT_SEED = 1000
#: Names the variant recipe in feature cache files, so a changed recipe never reuses old variants.
VARIANT_RECIPE = "export-v2"

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
             progress: Progress | None = None, threads: int | None = None,
             prepare: Callable[[Path, int], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, D] float32, readable [N] bool) of every path, through `edge.Classifier` on the file
    (or on ``prepare(path, index)``, an image made from it).

    An unreadable scan gets a row of zeros and False. The cache key is the model's weights checksum plus
    its features output, so a file whose metadata changed (the gate embedded) reuses its own features;
    ``label`` tells prepared images from the files as read.
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
    for index, path in enumerate(progress(paths, label) if progress else paths):
        try:
            rows.append(clf.classify(path if prepare is None else prepare(path, index)).features)
            readable.append(True)
        except Exception:  # one unreadable training file must not stop a calibration; it is counted
            rows.append(np.zeros(width, np.float32))
            readable.append(False)
    out = np.asarray(rows, np.float32).reshape(len(paths), width), np.asarray(readable, bool)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cached, features=out[0], readable=out[1])
    return out


def export_variant(image: np.ndarray, side: int, seed: int, index: int) -> np.ndarray:
    """One export-style variant of a decoded scan, uint8, for a model whose input is ``side`` px.

    The scan is reduced to a random size between one and two model inputs (a small export: another site's
    viewer or PACS) and then changed by `convert.augment.scanner_variants` with `convert.augment.EXPORT_STYLE`
    (gain, contrast, gamma, blur, noise, then edge enhancement on half of them). Why the reduction comes first:
    exports come in every size, and a change of noise, blur or sharpness made on a larger scan is partly
    averaged away when the device resizes it to the model's input, while on a small export it is not (the
    Kaggle scans are 224 px, custom-cnn reads 96 px). ``seed`` and ``index`` (the scan's place) seed it.
    """
    from PIL import Image

    from convert import augment

    if image.dtype != np.uint8:  # DICOM and 16-bit scans decode to float in [0, 255]
        image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    longest = int(np.random.default_rng((seed, index)).integers(side, 2 * side + 1))
    scale = longest / max(image.shape[:2])
    if scale < 1:
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))
    stacked = image[None, ..., None] if image.ndim == 2 else image[None]
    changed = augment.scanner_variants(stacked, seed + index, augment.EXPORT_STYLE)[0]
    return changed[..., 0] if image.ndim == 2 else changed


def variant_features(model_path: Path, paths: Sequence[Path], seed: int, *, cache_dir: Path | None,
                     label: str = "", progress: Progress | None = None,
                     threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`features` of the :func:`export_variant` of each scan (seeded by ``seed`` and its place in ``paths``),
    decoded as the device decodes it."""
    from edge.decode import decode
    from edge.model_file import read_spec

    side = read_spec(Path(model_path).read_bytes()).input_size
    return features(model_path, paths, cache_dir=cache_dir, label=f"{label or 'features'}-{VARIANT_RECIPE}-{seed}",
                    progress=progress, threads=threads,
                    prepare=lambda path, index: export_variant(np.asarray(decode(path)), side, seed, index))


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


def _threshold(per_reference: Iterable[np.ndarray], quantile: float) -> float:
    """The threshold rule: the largest of the references' ``quantile`` percentiles of held-out distances, so
    every reference keeps that share of its held-out scans below it."""
    return max(float(np.percentile(d, quantile)) for d in per_reference)


def _variants_referred_unseen(xs: list[np.ndarray], held_x: list[np.ndarray], components: int,
                              quantile: float) -> float:
    """Share of the held-out variants that a gate fitted and thresholded on the scans as read only refers.

    Why: it measures, from training data alone, how far a scanner-style change moves a layer's features
    against the spread of real scans, and so tells a steady layer for ``--layer`` from a brittle one (on the
    bundled Xception it ranked the layers as the external sets did: the model card's "Input gate").
    ``xs`` and ``held_x`` alternate each reference's scans as read and their variants, in reference order.
    """
    as_read, variants = xs[0::2], held_x[1::2]
    plain = fit(np.concatenate(as_read), np.concatenate([np.full(len(x), i) for i, x in enumerate(as_read)]),
                components)
    threshold = _threshold((plain.squared_distances(h) for h in held_x[0::2]), quantile)
    return float(np.mean(plain.squared_distances(np.concatenate(variants)) > threshold))


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
        xv, ok_v = variant_features(model_path, ref.paths, VARIANT_SEED * (index + 1) + seed,
                                    cache_dir=cache_dir, label=ref.name, progress=progress, threads=threads)
        fit_idx, held_idx = split(ref, seed=seed)
        fit_idx, held_idx = fit_idx[ok[fit_idx] & ok_v[fit_idx]], held_idx[ok[held_idx] & ok_v[held_idx]]
        xs += [x[fit_idx], xv[fit_idx]]
        ys.append(np.full(2 * len(fit_idx), index))
        held_x += [x[held_idx], xv[held_idx]]
        held_y.append(np.full(2 * len(held_idx), index))
        counts.append({"reference": ref.name, "images": len(ref.paths), "unreadable": int((~(ok & ok_v)).sum()),
                       "fit": len(fit_idx), "held_out": len(held_idx)})
    total = sum(c["fit"] + c["held_out"] for c in counts)  # scans; each is fitted or held out twice
    if total < MIN_IMAGES:
        raise ValueError(f"the gate needs at least {MIN_IMAGES} readable training scans, the folders hold {total}")
    gate = fit(np.concatenate(xs), np.concatenate(ys), components)
    held = np.concatenate(held_x)
    which = np.concatenate(held_y)
    distances = gate.squared_distances(held)
    threshold = _threshold((distances[which == i] for i in range(len(refs))), quantile)
    unseen = _variants_referred_unseen(xs, held_x, components, quantile)
    for index, entry in enumerate(counts):
        mine = distances[which == index].reshape(2, -1)  # the scans as read, then their variants
        entry["held_out_referred"] = int((mine[0] > threshold).sum())
        entry["held_out_variants_referred"] = int((mine[1] > threshold).sum())
    held_scans = max(1, sum(c["held_out"] for c in counts))
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
            "variants": "each scan as read and one export-style variant (reduced to 1-2 model inputs; gain, "
                        "contrast, gamma, blur, noise, edge enhancement: convert.augment.EXPORT_STYLE)",
            "held_out_referred": round(sum(c["held_out_referred"] for c in counts) / held_scans, 5),
            "held_out_variants_referred": round(sum(c["held_out_variants_referred"] for c in counts) / held_scans, 5),
            "variants_referred_unseen": round(unseen, 5),
            "per_reference": counts,
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
    }
