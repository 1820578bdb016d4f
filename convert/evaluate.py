"""Evaluate a Keras or TFLite model on a class-folder test set, whole and without the leaked (duplicated) images.

A .tflite model is run through :class:`edge.Classifier`, the exact code path of the device, so the numbers
describe what a clinic would get (int8 arithmetic included). A Keras model is run the way the converter
expects it was trained: the same decoder and ``edge.preprocess.prepare`` as the device, then the
normalisation named in its carried metadata.

With a de-duplication report from `edge-dedup`, metrics are also computed on the test images that have no
copy in the training set: the raw test split of a public MRI collection rewards memorisation, the
de-duplicated subset does not.
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from edge.decode import decode
from edge.errors import InputError
from edge.preprocess import prepare

from . import metrics
from .dataset import images_under

#: Images predicted per Keras call: large enough to amortise the call, small enough for a Pi-sized host.
BATCH = 32
KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
SUBSETS = {"all": "all images", "dedup": "de-duplicated"}

Progress = Callable[[Sequence[Path]], Iterable[Path]]
#: (path, probabilities or None, error message or None), in input order.
Prediction = tuple[Path, "np.ndarray | None", "str | None"]
#: (labels, model info, predict): ``predict`` maps image paths to :data:`Prediction` s, lazily, in order.
Predictor = tuple[list[str], dict[str, Any], Callable[[Iterable[Path]], Iterator[Prediction]]]


def list_labelled(data_dir: Path, labels: Sequence[str], limit: int | None = None) -> list[tuple[Path, int]]:
    """(image, class index) for every image under ``data_dir/<label>/``, sorted; ``limit`` caps each class.

    Every visible sub-folder must be one of the model's labels: a stray folder means the data set and the
    model disagree, which should stop an evaluation rather than skew it. Hidden folders are skipped.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ValueError(f"{data_dir}: not a directory")
    folders = sorted(p.name for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [f for f in folders if f not in labels]
    if unknown:
        raise ValueError(f"{data_dir}: sub-folder(s) {', '.join(unknown)} are not labels of the model "
                         f"({', '.join(labels)})")
    items: list[tuple[Path, int]] = []
    for k, label in enumerate(labels):
        root = data_dir / label
        if not root.is_dir():
            continue
        items += [(p, k) for p in images_under(root)[:limit]]
    if not items:
        raise ValueError(f"{data_dir}: no images in class sub-folders named like the labels ({', '.join(labels)})")
    return items


def match_key(path: Path | str) -> str:
    """The last three path components ('Testing/glioma/x.jpg'), how de-duplication lists name images."""
    return "/".join(Path(path).parts[-3:])


def _keras_predictor(model_path: Path, threads: int | None) -> Predictor:
    from . import normalisation
    from .keras_io import load_model

    if threads:
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:
            warnings.warn("TensorFlow already started in this process; --threads is ignored for the Keras model",
                          stacklevel=3)
    try:
        model, carried = load_model(model_path)
    except Exception as exc:  # Keras raises many types on a corrupt or foreign file; name it in one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(first if first.startswith(str(model_path)) else
                         f"{model_path}: cannot load the Keras model ({first})") from None
    if not carried:
        raise ValueError(f"{model_path}: no carried metadata (edge_mri.json); evaluate a model saved by edge-train, "
                         "or its converted .tflite")
    try:
        labels, size, channels = list(carried["labels"]), int(carried["input_size"]), int(carried["channels"])
        pipeline, preprocess = carried["pipeline"], carried["preprocess"]
    except KeyError as exc:
        raise ValueError(f"{model_path}: carried metadata lacks {exc}") from None
    norm = normalisation.parse(preprocess, channels)
    info = {"path": str(model_path), "format": "keras", "name": carried.get("name", model_path.stem),
            "labels": labels, "input_size": size, "channels": channels, "pipeline": pipeline,
            "normalisation": preprocess}

    def run(batch: list[np.ndarray]) -> np.ndarray:
        x = normalisation.apply(np.stack(batch).astype(np.float32), norm)
        probs = np.asarray(model.predict_on_batch(x), np.float64)
        if probs.shape != (len(batch), len(labels)):
            raise ValueError(f"{model_path}: output of shape {probs.shape[1:]} for {len(labels)} labels")
        if (probs < -1e-6).any() or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
            raise ValueError(f"{model_path}: outputs are not softmax probabilities (rows do not sum to 1)")
        return probs

    def predict(paths: Iterable[Path]) -> Iterator[Prediction]:
        pending: list[tuple[Path, np.ndarray]] = []
        for p in paths:
            try:
                pending.append((p, prepare(decode(p), size, channels, pipeline)))
            except InputError as exc:
                yield p, None, str(exc)
            if len(pending) == BATCH:
                yield from _flush(pending)
        if pending:
            yield from _flush(pending)

    def _flush(pending: list[tuple[Path, np.ndarray]]) -> Iterator[Prediction]:
        probs = run([x for _, x in pending])
        for (p, _), row in zip(pending, probs):
            yield p, row, None
        pending.clear()

    return labels, info, predict


def _tflite_predictor(model_path: Path, threads: int | None) -> Predictor:
    from edge import Classifier

    clf = Classifier(model=model_path, threads=threads)
    labels = list(clf.labels)
    spec = clf.spec
    info = {"path": str(model_path), "format": "tflite", "name": spec.name, "labels": labels,
            "input_size": spec.input_size, "channels": spec.channels, "pipeline": spec.pipeline,
            "normalisation": (spec.metadata.get("normalisation") or {}).get("name"),
            "backend": f"{clf.backend.name} {clf.backend.version}", "threads": threads}

    def predict(paths: Iterable[Path]) -> Iterator[Prediction]:
        for p in paths:
            try:
                result = clf.classify(p)
            except InputError as exc:
                yield p, None, str(exc)
                continue
            yield p, np.array([result.probabilities[label] for label in labels], np.float64), None

    return labels, info, predict


def load_dedup(path: Path) -> dict[str, Any]:
    """Read an `edge-dedup` report; only ``dedup_test`` (and the threshold, for the record) is used."""
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the de-duplication report ({exc})") from None
    if not isinstance(report, dict) or not isinstance(report.get("dedup_test"), list):
        raise ValueError(f"{path}: not an edge-dedup report (no 'dedup_test' list)")
    return report


def load_predictor(model_path: str | Path, threads: int | None = None) -> Predictor:
    """(labels, model info, predict) for a .tflite (device path) or Keras model, loaded once so that several
    evaluations of one model (test split and external sets) share it."""
    model_path = Path(model_path)
    if model_path.suffix.lower() == ".tflite":
        return _tflite_predictor(model_path, threads)
    if model_path.suffix.lower() in KERAS_SUFFIXES or model_path.is_dir():
        return _keras_predictor(model_path, threads)
    raise ValueError(f"{model_path}: expected a .tflite, .keras or .h5 model")


def evaluate(model_path: str | Path, data_dir: str | Path, dedup: str | Path | None = None,
             limit: int | None = None, threads: int | None = None,
             progress: Progress | None = None, predictor: Predictor | None = None) -> dict[str, Any]:
    """Predict every image of ``data_dir`` and return metrics for all of them and for the de-duplicated subset.

    ``dedup`` is an `edge-dedup` report; its ``dedup_test`` paths are matched on their last three
    components ('Testing/glioma/x.jpg'). ``limit`` caps the images per class (quick checks), ``threads``
    the interpreter threads (TFLite) or TensorFlow's pool (Keras). Unreadable images are listed in
    ``unreadable`` and left out of the metrics; ``predictions`` lists every evaluated image (true and
    predicted label, probabilities in label order) for error analysis. ``progress`` wraps the list of
    images (a progress bar). ``predictor`` is one made by :func:`load_predictor` for ``model_path``.
    """
    model_path, data_dir = Path(model_path), Path(data_dir)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    report = load_dedup(Path(dedup)) if dedup is not None else None
    labels, info, predict = predictor or load_predictor(model_path, threads)
    items = list_labelled(data_dir, labels, limit)
    truth = {p: k for p, k in items}
    paths = [p for p, _ in items]
    keep: set[str] = set()
    if report is not None:
        keep = {match_key(p) for p in report["dedup_test"]}
        found = sum(match_key(p) in keep for p in paths)
        if found == 0:
            raise ValueError(f"{dedup}: none of its {len(keep)} de-duplicated paths is in {data_dir} (paths are "
                             "matched on their last three components, e.g. Testing/glioma/x.jpg)")

    start = time.perf_counter()
    rows, unreadable = [], []
    for p, probs, error in predict(progress(paths) if progress else paths):
        if probs is None:
            unreadable.append({"path": str(p), "error": error})
        else:
            rows.append((p, probs))
    seconds = time.perf_counter() - start

    y = np.array([truth[p] for p, _ in rows], np.int64)
    probs = np.stack([pr for _, pr in rows]) if rows else np.zeros((0, len(labels)))
    result: dict[str, Any] = {
        "schema": 1,
        "model": info,
        "data_dir": str(data_dir),
        "limit": limit,
        "images": {"found": len(items), "evaluated": len(rows), "unreadable": len(unreadable),
                   "per_class": {label: int((y == k).sum()) for k, label in enumerate(labels)}},
        "seconds": round(seconds, 3),
        "ms_per_image": round(1000.0 * seconds / max(len(items), 1), 3),
        "subsets": {"all": metrics.summary(y, probs, labels)},
        "unreadable": unreadable,
        "predictions": [{"path": str(p), "true": labels[truth[p]], "predicted": labels[int(pr.argmax())],
                         "probabilities": [round(float(v), 6) for v in pr]} for p, pr in rows],
    }
    if report is not None:
        mask = np.array([match_key(p) in keep for p, _ in rows], bool)
        result["dedup"] = {"file": str(dedup), "threshold": report.get("threshold"), "listed": len(keep),
                           "found": found}
        result["subsets"]["dedup"] = metrics.summary(y[mask], probs[mask], labels)
    return result


def write_outputs(result: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write metrics.json and, per subset, confusion_<subset>.json and .png into ``out_dir``."""
    from . import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "metrics.json"]
    written[0].write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    name = result["model"]["name"]
    for subset, m in result["subsets"].items():
        doc = {"model": name, "subset": subset, "n": m["n"], "labels": m["labels"], "confusion": m["confusion"],
               "note": "rows: true class, columns: predicted class"}
        path = out / f"confusion_{subset}.json"
        path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        written.append(path)
        written.append(plots.confusion_matrix(np.array(m["confusion"]), m["labels"], out / f"confusion_{subset}.png",
                                              f"{name}: {SUBSETS[subset]}"))
    return written
