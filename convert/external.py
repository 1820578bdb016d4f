"""External validation: does a model find tumours and spare healthy brains on scans from elsewhere?

A model trained on one public collection can score 99% on its test split and still call half the tumours of
another hospital "no tumour". This runs one model over the test split (raw and de-duplicated, through
:func:`convert.evaluate.evaluate`) and over external sets (:mod:`convert.external_sets`), and reports, per set,
per source and per variant (e.g. MRI sequence), each as k of n with a Wilson 95% interval:

- tumour found: tumour images given any tumour class (sensitivity of tumour vs notumor);
- healthy spared: healthy images given ``notumor`` (specificity);
- right class: images of a known class given that class;
- accuracy (test split only): four-class accuracy;

and, threshold-free, the ROC AUC of the model's tumour probability (1 - P(notumor)) for every group of tumour
images against every group of healthy images (:func:`separation_rows`) and, within a set, of one variant's
tumours against the same variant's healthy images (:func:`variant_separation_rows`).

Predictions go through the same predictor as ``edge-evaluate`` (``edge.Classifier`` for a .tflite), so the
figures are what a device would answer.
"""
from __future__ import annotations

import hashlib
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from . import metrics
from .evaluate import evaluate, load_dedup, load_predictor, match_key
from .external_sets import HEALTHY, TUMOUR, SetSpec, check_expectations, list_set

#: The model label that means "no tumour"; every other label is a tumour class.
HEALTHY_LABEL = "notumor"
TEST_RAW, TEST_DEDUP = "Test split (raw)", "Test split (de-duplicated)"
#: One-line definitions, written into the JSON and the markdown so a table is never read without them.
DEFINITIONS = {
    "accuracy": "four-class accuracy",
    "tumour found": "tumour images given any tumour class (sensitivity, tumour vs notumor)",
    "healthy spared": "healthy images given notumor (specificity)",
    "right class": "images of a known tumour class given that class",
}

#: Wraps the paths of one set in a progress bar labelled with the set's name.
SetProgress = Callable[[Sequence[Path], str], Iterable[Path]]
Row = dict[str, Any]


def rate_row(name: str, measure: str, k: int, n: int, **extra: Any) -> Row:
    """One table row: k of n, the rate and its Wilson 95% interval."""
    lo, hi = metrics.wilson_interval(int(k), int(n))
    return {"name": name, "measure": measure, "k": int(k), "n": int(n), "rate": k / n,
            "ci95": [round(lo, 6), round(hi, 6)], **extra}


def score(expected: Sequence[str], predicted: Sequence[str], classes: Sequence[str], name: str,
          names: Mapping[str, str] | None = None, per_class: bool = True, **extra: Any) -> list[Row]:
    """Tumour found, healthy spared and right class for parallel lists of expectations and predicted labels.

    ``per_class`` gives one right-class row per tumour class (``<name> right class``, named by ``names``)
    for sets; without it right class is pooled over all known-class images, as for a source. Measures
    without images are left out rather than reported as an empty 0 of 0.
    """
    e, p = np.asarray(expected, object), np.asarray(predicted, object)
    names = names or {}
    rows: list[Row] = []
    tumour = e != HEALTHY
    if tumour.any():
        rows.append(rate_row(names.get(TUMOUR, name), "tumour found", (p[tumour] != HEALTHY_LABEL).sum(),
                             tumour.sum(), **extra))
    healthy = e == HEALTHY
    if healthy.any():
        rows.append(rate_row(names.get(HEALTHY, name), "healthy spared", (p[healthy] == HEALTHY_LABEL).sum(),
                             healthy.sum(), **extra))
    known = np.isin(e, list(classes))
    if per_class:
        for c in classes:
            mask = e == c
            if mask.any():
                rows.append(rate_row(f"{names.get(c, name)} right class", "right class", (p[mask] == c).sum(),
                                     mask.sum(), **extra))
    elif known.any():
        rows.append(rate_row(name, "right class", (p[known] == e[known]).sum(), known.sum(), **extra))
    return rows


def separation_rows(items: Sequence[dict], labels: Sequence[str],
                    names: Mapping[str, Mapping[str, str]] | None = None) -> list[Row]:
    """ROC AUC of P(any tumour) = 1 - P(notumor), each set's tumour images against each set's healthy images,
    with a 95% interval (:func:`convert.metrics.auc_interval`) and the best common rate (:func:`convert.metrics.best_common_rate`).

    Why: tumour found and healthy spared are read at one border between "notumor" and the tumour classes, so
    a change of either mixes two things: where the border sits (an operating point, moved by an offset) and
    how well the model separates tumours from healthy slices at any border. The AUC is the second alone: a
    model change that only trades one rate for the other leaves it where it was. Groups are named as the
    set's tumour-found and healthy-spared rows (``names``: each set's own row names, as in its spec), so the
    test split's tumours and healthy slices pair with every external set's.
    """
    names = names or {}
    healthy_index = list(labels).index(HEALTHY_LABEL)
    tumours: dict[str, list[float]] = {}
    healthy: dict[str, list[float]] = {}
    for q in items:
        kind = _kind(q)
        (healthy if kind == HEALTHY else tumours).setdefault(_row_name(names, q["set"], kind), []).append(
            _tumour_score(q, healthy_index))
    return [_separation_row(t_scores, h_scores, tumours=t_name, healthy=h_name)
            for t_name, t_scores in tumours.items() for h_name, h_scores in healthy.items()]


def variant_separation_rows(items: Sequence[dict], labels: Sequence[str],
                            names: Mapping[str, Mapping[str, str]] | None = None) -> list[Row]:
    """The same AUC within one set and one variant: its tumours of variant V against its healthy images of V.

    Why: a set whose tumours come in several MRI sequences but whose healthy slices in fewer (the 44-class
    set has T1 post-contrast tumours and no post-contrast normals) mixes, in :func:`separation_rows`, "is
    there a tumour" with "which sequence is this". Within one sequence only the first is left, which says
    whether a model fails to see tumours on that sequence or only to set one border for all of them.
    Variants with tumours but no healthy images of their own (or the reverse) give no row.
    """
    names = names or {}
    healthy_index = list(labels).index(HEALTHY_LABEL)
    groups: dict[tuple[str, str], dict[str, list[float]]] = {}
    for q in items:
        if q.get("variant"):
            groups.setdefault((q["set"], q["variant"]), {}).setdefault(_kind(q), []).append(
                _tumour_score(q, healthy_index))
    return [_separation_row(g[TUMOUR], g[HEALTHY], set=set_name, variant=variant,
                            tumours=_row_name(names, set_name, TUMOUR), healthy=_row_name(names, set_name, HEALTHY))
            for (set_name, variant), g in sorted(groups.items()) if TUMOUR in g and HEALTHY in g]


def _kind(item: Mapping[str, Any]) -> str:
    """HEALTHY for an image expected healthy, TUMOUR for any other expectation (a tumour or a tumour class)."""
    return HEALTHY if item["expected"] == HEALTHY else TUMOUR


def _row_name(names: Mapping[str, Mapping[str, str]], set_name: str, kind: str) -> str:
    """A set's own name for its tumour-found or healthy-spared row (its spec's ``names``), else the set's name."""
    return names.get(set_name, {}).get(kind, set_name)


def _tumour_score(item: Mapping[str, Any], healthy_index: int) -> float:
    """P(any tumour) = 1 - P(notumor) of one prediction."""
    return 1.0 - float(item["probabilities"][healthy_index])


def _separation_row(t_scores: list[float], h_scores: list[float], **names: str) -> Row:
    """AUC with its 95% interval, the counts and the best common rate of one tumour group against one healthy."""
    auc = metrics.binary_auc([True] * len(t_scores) + [False] * len(h_scores), t_scores + h_scores)
    lo, hi = metrics.auc_interval(auc, len(t_scores), len(h_scores))
    return {**names, "auc": round(auc, 6), "ci95": [round(lo, 6), round(hi, 6)], "n_tumours": len(t_scores),
            "n_healthy": len(h_scores), "balanced": round(metrics.best_common_rate(t_scores, h_scores), 6)}


def model_sha256(path: Path) -> str:
    """sha256 of the model file (of every file, by relative path, for a SavedModel folder): names exactly
    which model a report describes."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            digest.update(f.relative_to(path).as_posix().encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _test_rows(result: dict[str, Any], dedup: Path | None, classes: Sequence[str]) -> tuple[list[Row], list[dict]]:
    """Rows of the test split (raw and de-duplicated) from an evaluate() result, and its pooled items."""
    source = "/".join(Path(result["data_dir"]).parts[-2:])
    preds = result["predictions"]
    subsets = [(TEST_RAW, preds)]
    if dedup is not None:
        keep = {match_key(p) for p in load_dedup(dedup)["dedup_test"]}
        subsets.append((TEST_DEDUP, [q for q in preds if match_key(q["path"]) in keep]))
    rows: list[Row] = []
    for name, subset in subsets:
        if not subset:
            continue
        expected = [HEALTHY if q["true"] == HEALTHY_LABEL else q["true"] for q in subset]
        predicted = [q["predicted"] for q in subset]
        rows.append(rate_row(name, "accuracy", sum(q["true"] == q["predicted"] for q in subset), len(subset),
                             set=name, source=source))
        rows += score(expected, predicted, classes, name, per_class=False, set=name, source=source)
    items = [{"set": TEST_RAW, "source": source, "path": q["path"],
              "expected": HEALTHY if q["true"] == HEALTHY_LABEL else q["true"], "predicted": q["predicted"],
              "variant": "", "probabilities": q["probabilities"]} for q in preds]
    return rows, items


def run_external(model_path: str | Path, specs: list[SetSpec], *, test_dir: str | Path | None = None,
                 dedup: str | Path | None = None, limit: int | None = None, threads: int | None = None,
                 progress: SetProgress | None = None, command: str | None = None) -> dict[str, Any]:
    """Evaluate one model on the test split (optional) and every set in ``specs``; return the whole report.

    Every set is listed before the model loads (a wrong folder fails in a second, not after minutes of
    classifying). Images that cannot be decoded are listed in ``unreadable`` and left out of the rates.
    ``limit`` caps each class of the test split and each folder of a set (quick checks). ``test`` holds
    the full :func:`convert.evaluate.evaluate` result of the test split, for its confusion matrices.
    """
    model_path = Path(model_path)
    if dedup is not None and test_dir is None:
        raise ValueError("--dedup needs the test split folder DIR")
    listed = [(spec, list_set(spec, limit)) for spec in specs]
    labels, info, predict = predictor = load_predictor(model_path, threads)
    if HEALTHY_LABEL not in labels:
        raise ValueError(f"{model_path}: the model has no '{HEALTHY_LABEL}' label, so tumour found and healthy "
                         f"spared are undefined (labels: {', '.join(labels)})")
    classes = [label for label in labels if label != HEALTHY_LABEL]
    check_expectations(specs, classes)

    start, n_images = time.perf_counter(), 0
    rows: list[Row] = []
    items: list[dict] = []
    test = None
    if test_dir is not None:
        test = evaluate(model_path, test_dir, dedup=dedup, limit=limit, threads=threads,
                        progress=(lambda paths: progress(paths, "Test split")) if progress else None,
                        predictor=predictor)
        test_rows, items = _test_rows(test, Path(dedup) if dedup is not None else None, classes)
        rows += test_rows
        n_images += test["images"]["found"]
    unreadable = [{"set": TEST_RAW, **u} for u in (test["unreadable"] if test else [])]
    variants: list[Row] = []
    for spec, set_items in listed:
        paths = [it.path for it in set_items]
        n_images += len(paths)
        done = {p: (probs, error) for p, probs, error in predict(progress(paths, spec.name) if progress else paths)}
        mine = []
        for it in set_items:
            probs, error = done[it.path]
            if probs is None:
                unreadable.append({"set": spec.name, "path": str(it.path), "error": error})
                continue
            mine.append({"set": spec.name, "source": spec.source, "path": str(it.path), "expected": it.expect,
                         "predicted": labels[int(np.argmax(probs))], "variant": it.variant,
                         "probabilities": [round(float(v), 6) for v in probs]})
        items += mine
        tag = {"set": spec.name, "source": spec.source}
        set_rows = score([q["expected"] for q in mine], [q["predicted"] for q in mine], classes, spec.name,
                         spec.names, **tag)
        rows += set_rows
        by_variant = []
        for variant in sorted({q["variant"] for q in mine} - {""}):
            sub = [q for q in mine if q["variant"] == variant]
            by_variant += score([q["expected"] for q in sub], [q["predicted"] for q in sub], classes, spec.name,
                                spec.names, variant=variant, **tag)
        order = {r["name"]: i for i, r in enumerate(set_rows)}
        variants += sorted(by_variant, key=lambda r: order[r["name"]])  # stable: variants stay sorted per row
    seconds = time.perf_counter() - start
    spec_names = {spec.name: spec.names for spec in specs}
    return {
        "schema": 1,
        "kind": "external-validation",
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "cwd": str(Path.cwd()),
        "model": {**info, "sha256": model_sha256(model_path)},
        "limit": limit,
        "definitions": DEFINITIONS,
        "sets": [{"name": s.name, "source": s.source, "path": str(s.path), "expect": s.expect,
                  "images": len(it)} for s, it in listed],
        "rows": rows,
        "sources": _source_rows(items, classes),
        "variants": variants,
        "separation": separation_rows(items, labels, spec_names),
        "separation_by_variant": variant_separation_rows(items, labels, spec_names),
        "seconds": round(seconds, 3),
        "ms_per_image": round(1000.0 * seconds / max(n_images, 1), 3),
        "unreadable": unreadable,
        "test": test,
        "predictions": items,
    }


def _source_rows(items: list[dict], classes: Sequence[str]) -> list[Row]:
    """Rows pooled per source, each image counted once (the de-duplicated split is a subset of the raw one)."""
    by_source: dict[str, dict[str, dict]] = {}
    for q in items:
        by_source.setdefault(q["source"], {}).setdefault(q["path"], q)
    rows: list[Row] = []
    for source, pooled in by_source.items():
        qs = list(pooled.values())
        rows += score([q["expected"] for q in qs], [q["predicted"] for q in qs], classes, source,
                      per_class=False, source=source)
    return rows
