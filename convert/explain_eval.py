"""Explanation quality of a TFLite model against lesion masks: run the device's Classifier, score, report.

The heatmaps are the ones a device shows: each scan goes through :class:`edge.Classifier` (decode, crop,
one int8 invoke), the model-space map is put back on the decoded scan with ``Result.heatmap_on_image``
and compared there with the mask, which is drawn on the scan. The arithmetic is in
`convert/explain_metrics.py`; this module pairs scans with masks, runs the model, aggregates and writes
the JSON, the markdown table and the overlay grids.

Masks mirror the image folder: ``DATA/<rel>.jpg`` has its mask at ``MASKS/<rel>.png`` (a class-folder set
such as ``Testing/glioma/x.jpg`` -> ``masks/Testing/glioma/x.png``, or a flat folder). A scan whose first
folder is one of the model's labels is grouped by that (true) class; otherwise scans are grouped by the
predicted class. Scans without a mask are counted and skipped.

Choices made once, here:

- Head = the model's crop box (``Geometry.box``): the pixels where ``heatmap_on_image`` can be non-zero.
  The mass ratio divides by the mask's share of the head, not of the whole image, so a black border
  neither helps nor hurts a map.
- The average map is the mean model-space heatmap over the evaluated scans, mapped to each scan with its
  own geometry: a scan-independent baseline for the pointing game and the mass ratio.
- Deletion/insertion run on the uint8 model input in ``STEPS`` steps and follow the probability of the
  class predicted on the intact scan. A removed pixel takes the value of a blurred copy of the input
  (Gaussian, sigma = input size / ``BLUR_DIVISOR``), not 0: zeroing a random 5% of the pixels is a
  salt-and-pepper pattern that alone collapses the prediction, so a random order would "delete" faster
  than any map and the comparison would measure that artefact (on 30 custom-cnn test slices, heatmap-order
  deletion beat random on 60% of them with zeros, 87% with this blur). The blurred copy keeps the head's
  low-frequency shape and drops its detail (the intact scan's class keeps ~3% probability on it). The
  random order (seeded per scan) is the baseline; a map that ranks the evidence first deletes faster.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageFilter

from edge.decode import decode
from edge.errors import InputError, ModelError
from edge.preprocess import Geometry, heatmap_to_image, prepare

from . import explain_metrics as em
from .dataset import images_under

#: Perturbation steps per deletion/insertion curve (Petsiuk et al. use 224 px in 224-px steps; 20 steps is
#: enough resolution for an area and keeps 80 invokes per scan).
STEPS = 20
#: The deletion/insertion substrate is the input blurred with sigma = size / BLUR_DIVISOR (6 px at 96 px).
BLUR_DIVISOR = 16
#: Seed of the deletion subset and of every random order (per scan: [SEED, index]).
SEED = 0
#: Targets of issue 12 for the shipped models, shown beside the figures.
TARGETS = {"pointing_game": ">= 85%", "mass_ratio": ">= 4x", "r_average": "<= 0.6", "deletion_below_random": ">= 80%"}

Progress = Callable[[Sequence[Any], str], Iterable[Any]]


@dataclass(frozen=True)
class MaskedScan:
    """A scan, its mask (None when the mask folder has none) and its true class (None outside class folders)."""

    image: Path
    mask: Path | None
    true: str | None


@dataclass
class Explained:
    """The JSON-ready report plus what the figures need: per evaluated scan its model-space heatmap and
    geometry (parallel to ``report['per_image']``), and the set's average map."""

    report: dict[str, Any]
    heatmaps: list[np.ndarray]
    geometries: list[Geometry]
    average: np.ndarray


def list_masked(data_dir: Path, masks_dir: Path, labels: Sequence[str], limit: int | None = None) -> list[MaskedScan]:
    """Every image under ``data_dir`` (sorted, hidden paths skipped) with its mirrored mask path, if it exists.

    ``limit`` caps the scans *with* a mask per group (class folder, or the whole flat folder).
    """
    data_dir, masks_dir = Path(data_dir), Path(masks_dir)
    for folder, what in ((data_dir, "image folder"), (masks_dir, "mask folder")):
        if not folder.is_dir():
            raise ValueError(f"{folder}: not a directory ({what})")
    files = images_under(data_dir)
    scans, taken = [], {}
    for p in files:
        rel = p.relative_to(data_dir)
        true = rel.parts[0] if len(rel.parts) > 1 and rel.parts[0] in labels else None
        mask = masks_dir / rel.with_suffix(".png")
        if not mask.is_file():
            scans.append(MaskedScan(p, None, true))
            continue
        if limit is not None and taken.get(true, 0) >= limit:
            continue
        taken[true] = taken.get(true, 0) + 1
        scans.append(MaskedScan(p, mask, true))
    if not any(s.mask for s in scans):
        raise ValueError(f"{masks_dir}: none of the {len(files)} images under {data_dir} has a mask there "
                         "(a mask mirrors the image's relative path with .png: DATA/a/b.jpg -> MASKS/a/b.png)")
    return scans


def load_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """A 0/255 mask PNG as bool [H, W] on the scan's grid (resized with nearest neighbour if its size differs)."""
    try:
        with Image.open(path) as img:
            img = img.convert("L")
            if img.size != (shape[1], shape[0]):
                img = img.resize((shape[1], shape[0]), Image.NEAREST)
            return np.asarray(img) > 127
    except OSError as exc:
        raise InputError(f"{path}: cannot read the mask ({exc})") from None


def head_region(geometry: Geometry) -> np.ndarray:
    """Bool [H, W]: the model's crop box, the pixels where a heatmap on the image can be non-zero."""
    region = np.zeros(geometry.image_shape, bool)
    top, left, bottom, right = geometry.box
    region[top:bottom, left:right] = True
    return region


def evaluate_explanations(model_path: str | Path, data_dir: str | Path, masks_dir: str | Path,
                          limit: int | None = None, threads: int | None = None,
                          deletion_limit: int | None = None, progress: Progress | None = None) -> Explained:
    """Score the heatmaps of a .tflite model on every scan of ``data_dir`` that has a mask in ``masks_dir``.

    ``deletion_limit`` caps the scans that also get deletion/insertion curves (a seeded random choice;
    None: all, 0: none), the expensive part (4 x (STEPS + 1) invokes per scan). ``progress`` wraps each
    loop with a label (a progress bar).
    """
    from edge import Classifier

    model_path, data_dir, masks_dir = Path(model_path), Path(data_dir), Path(masks_dir)
    if model_path.suffix.lower() != ".tflite":
        raise ValueError(f"{model_path}: explanation metrics run through the TFLite model a device runs "
                         "(the heatmap is computed in its graph); convert the model with edge-convert first")
    clf = Classifier(model=model_path, threads=threads)
    if not clf.has_heatmap:
        raise ModelError(f"{model_path}: the model has no heatmap output to evaluate")
    spec = clf.spec
    scans = list_masked(data_dir, masks_dir, clf.labels, limit)
    masked = [s for s in scans if s.mask is not None]
    wrap = progress or (lambda items, label: items)

    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    heatmaps: list[np.ndarray] = []
    geometries: list[Geometry] = []
    unreadable: list[dict[str, str]] = []
    for scan in wrap(masked, "Localisation"):
        try:
            r = clf.classify(scan.image)
            mask = load_mask(scan.mask, r.image.shape[:2])
        except InputError as exc:
            unreadable.append({"path": str(scan.image), "error": str(exc)})
            continue
        heat = r.heatmap_on_image()
        head = head_region(r.geometry)
        p = em.peak(heat)
        distance = em.distance_to_mask(p, mask) if p is not None else None
        tol = em.tolerance(heat.shape)
        rows.append({
            "path": str(scan.image), "mask": str(scan.mask), "true": scan.true, "predicted": r.label,
            "confidence": round(r.confidence, 6), "image_shape": list(heat.shape), "tolerance_px": round(tol, 2),
            "peak": list(p) if p is not None else None,
            "distance_px": None if distance is None else round(distance, 2),
            "hit": distance is not None and distance <= tol,
            "mask_share": round(float((mask & head).sum() / head.sum()), 6),
            "energy": round(em.energy_inside(heat, mask), 6),
            "mass_ratio": _round(em.mass_ratio(heat, mask, head)),
        })
        heatmaps.append(r.heatmap)
        geometries.append(r.geometry)
    if not rows:
        raise ValueError(f"{data_dir}: none of the {len(masked)} scans with a mask could be read")

    average = np.mean(np.stack(heatmaps), axis=0).astype(np.float32)
    for row, h, g in zip(wrap(rows, "Average map"), heatmaps, geometries):
        mask = load_mask(Path(row["mask"]), g.image_shape)
        avg = heatmap_to_image(average, g)
        row["r_average"] = _round(em.pearson(h, average))
        row["average_hit"] = em.pointing_hit(avg, mask)
        row["average_mass_ratio"] = _round(em.mass_ratio(avg, mask, head_region(g)))

    chosen = _deletion_subset(len(rows), deletion_limit)
    for i in wrap(chosen, "Deletion/insertion"):
        row = rows[i]
        pixels = prepare(decode(row["path"]), spec.input_size, spec.channels, spec.pipeline)
        row.update(_perturbation_aucs(clf, pixels, heatmaps[i], np.random.default_rng([SEED, i])))

    groups = "true" if all(r["true"] is not None for r in rows) else "predicted"
    report: dict[str, Any] = {
        "schema": 1,
        "model": {"path": str(model_path), "name": spec.name, "input_size": spec.input_size,
                  "channels": spec.channels, "pipeline": spec.pipeline, "labels": list(clf.labels),
                  "backend": f"{clf.backend.name} {clf.backend.version}", "threads": threads,
                  "gradcam": spec.metadata.get("gradcam")},
        "data_dir": str(data_dir),
        "masks_dir": str(masks_dir),
        "settings": {"tolerance_px": em.TOLERANCE_PX, "reference_size": em.REFERENCE_SIZE, "steps": STEPS,
                     "perturbation_baseline": f"gaussian blur, sigma = size/{BLUR_DIVISOR}", "seed": SEED,
                     "limit": limit, "deletion_limit": deletion_limit, "head": "model crop box"},
        "images": {"found": len(scans), "with_mask": len(masked), "without_mask": len(scans) - len(masked),
                   "unreadable": len(unreadable), "evaluated": len(rows), "deletion_evaluated": len(chosen)},
        "grouped_by": groups,
        "summary": summarise(rows, groups, clf.labels),
        "seconds": round(time.perf_counter() - start, 2),
        "unreadable": unreadable,
        "per_image": rows,
    }
    return Explained(report, heatmaps, geometries, average)


def _round(value: float) -> float | None:
    return round(float(value), 6) if np.isfinite(value) else None


def _deletion_subset(n: int, limit: int | None) -> list[int]:
    """Indices of the scans that get deletion/insertion: all, or ``limit`` drawn with SEED, in order."""
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(np.random.default_rng(SEED).choice(n, size=limit, replace=False).tolist())


def blurred(pixels: np.ndarray) -> np.ndarray:
    """The deletion/insertion substrate: each channel of a uint8 [S, S, C] input, Gaussian-blurred."""
    radius = pixels.shape[0] / BLUR_DIVISOR
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(pixels[..., c])).filter(
        ImageFilter.GaussianBlur(radius))) for c in range(pixels.shape[2])], axis=2)


def _perturbation_aucs(clf: Any, pixels: np.ndarray, heatmap: np.ndarray, rng: np.random.Generator) -> dict[str, float]:
    """Deletion and insertion AUCs in heatmap order and in a random order, for the class predicted on ``pixels``."""
    target = clf.labels.index(clf.classify_input(pixels).label)

    def score(x: np.ndarray) -> float:
        return clf.classify_input(x).probabilities[clf.labels[target]]

    baseline = blurred(pixels)
    orders = {"": em.heat_order(heatmap, rng), "_random": rng.permutation(heatmap.size)}
    out = {}
    for suffix, order in orders.items():
        for mode in ("deletion", "insertion"):
            curve = em.perturbation_curve(score, pixels, baseline, order, STEPS, mode)
            out[f"{mode}_auc{suffix}"] = round(em.auc(curve), 6)
    return out


def summarise(rows: list[dict[str, Any]], key: str, labels: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Aggregates over all scans and per group (``key``: 'true' or 'predicted'), groups in label order."""
    groups = {"all": rows}
    for label in labels:
        members = [r for r in rows if r[key] == label]
        if members:
            groups[label] = members
    return {name: _aggregate(members) for name, members in groups.items()}


def _aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def values(key: str) -> list[float]:
        return [np.nan if r.get(key) is None else r[key] for r in rows if key in r]

    deleted = [r for r in rows if "deletion_auc" in r]
    below = [r["deletion_auc"] < r["deletion_auc_random"] for r in deleted]
    out: dict[str, Any] = {
        "n": len(rows),
        "pointing_game": float(np.mean([r["hit"] for r in rows])),
        "pointing_game_average_map": float(np.mean([r["average_hit"] for r in rows])),
        "energy": em.summary(values("energy")),
        "mass_ratio": em.summary(values("mass_ratio")),
        "mass_ratio_average_map": em.summary(values("average_mass_ratio")),
        "r_average": em.summary(values("r_average")),
        "deletion_n": len(deleted),
        "deletion_below_random": float(np.mean(below)) if below else None,
    }
    for key in ("deletion_auc", "deletion_auc_random", "insertion_auc", "insertion_auc_random"):
        out[key] = em.summary(values(key))
    return out


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _med(s: dict[str, Any], digits: int = 3, unit: str = "") -> str:
    return "n/a" if s["median"] is None else f"{s['median']:.{digits}f}{unit}"


def markdown_table(report: dict[str, Any]) -> str:
    """The "explanation quality" table of a model card: one column per group, the issue's targets last."""
    summary = report["summary"]
    names = list(summary)
    rows = [
        ("scans with a mask (evaluated)", lambda s: str(s["n"]), ""),
        (f"pointing game: heatmap peak within {em.TOLERANCE_PX:g} px ({em.REFERENCE_SIZE}-px scale) of the lesion",
         lambda s: _pct(s["pointing_game"]), TARGETS["pointing_game"]),
        ("the same for the set's average map (ignores the scan)", lambda s: _pct(s["pointing_game_average_map"]), ""),
        ("heatmap mass inside the lesion (median)", lambda s: _pct(s["energy"]["median"]), ""),
        ("mass ratio: that share / the lesion's share of the head (median; mean)",
         lambda s: "n/a" if s["mass_ratio"]["median"] is None else
         f"{s['mass_ratio']['median']:.2f}x; {s['mass_ratio']['mean']:.2f}x", TARGETS["mass_ratio"]),
        ("the same for the average map (median)", lambda s: _med(s["mass_ratio_average_map"], 2, "x"), ""),
        ("Pearson r of a map with the average map (median)", lambda s: _med(s["r_average"]), TARGETS["r_average"]),
        ("deletion AUC, heatmap / random order (median; lower is better)",
         lambda s: f"{_med(s['deletion_auc'])} / {_med(s['deletion_auc_random'])}", ""),
        ("insertion AUC, heatmap / random order (median; higher is better)",
         lambda s: f"{_med(s['insertion_auc'])} / {_med(s['insertion_auc_random'])}", ""),
        ("scans whose deletion AUC is below their random-order one",
         lambda s: f"{_pct(s['deletion_below_random'])} of {s['deletion_n']}", TARGETS["deletion_below_random"]),
    ]
    group = "true class" if report["grouped_by"] == "true" else "predicted class"
    lines = [f"| {report['model']['name']} ({group}) | " + " | ".join(names) + " | target |",
             "|---|" + "---|" * (len(names) + 1)]
    if not any(summary[n]["deletion_n"] for n in names):
        rows = rows[:-3]
    for title, cell, target in rows:
        lines.append(f"| {title} | " + " | ".join(cell(summary[n]) for n in names) + f" | {target} |")
    return "\n".join(lines)


def write_explanations(explained: Explained, out_dir: str | Path) -> list[Path]:
    """Write explanations.json, explanations.md and one overlay grid PNG per group into ``out_dir``."""
    import json

    from .explain_plots import best_and_worst_grid

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = explained.report
    written = [out / "explanations.json", out / "explanations.md"]
    written[0].write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    im = report["images"]
    note = (f"{report['data_dir']} with masks from {report['masks_dir']}: {im['evaluated']} scans evaluated "
            f"({im['without_mask']} without a mask, {im['unreadable']} unreadable), deletion/insertion on "
            f"{im['deletion_evaluated']} ({STEPS} steps, pixels replaced by a blurred copy, seed {SEED}).")
    written[1].write_text(f"{markdown_table(report)}\n\n{note}\n", encoding="utf-8")
    rows = report["per_image"]
    key = report["grouped_by"]
    for name in report["summary"]:
        if name == "all":
            continue
        members = [i for i, r in enumerate(rows) if r[key] == name]
        written.append(best_and_worst_grid(rows, members, explained.heatmaps, explained.geometries,
                                           out / f"overlays_{name}.png",
                                           f"{report['model']['name']}: {name} ({len(members)} scans), "
                                           "best and worst by mass ratio"))
    return written
