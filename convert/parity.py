"""Parity report: does the converted model still say what the Keras model says, and point where it points?

For each converted variant (int8, and fp32 when written) and each held-out image it compares the TFLite
model, run by the same LiteRT interpreter the device uses, with the float Keras model and its
GradientTape Grad-CAM (`convert.reference_gradcam`): top-1 agreement, accuracy of both when the folder's
classes are the model's labels, probability differences, and heatmap fidelity (Pearson correlation and
the overlap of the hottest 10% of pixels). The numbers land in ``parity.json`` and ``parity.txt``; a
``heatmaps.png`` shows a few images with both heatmaps side by side.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from convert import calibration, normalisation, reference_gradcam
from convert.converter import list_ops, progress_bar
from convert.gradcam_head import HEATMAP, PROBABILITIES

#: Fraction of the hottest pixels whose overlap (IoU) the report measures.
TOP_FRACTION = 0.10
#: Disagreeing files listed by name in the report.
MAX_LISTED = 20


def make_interpreter(tflite_model: bytes) -> Any:
    """A LiteRT interpreter (TensorFlow's as a fallback) for model bytes."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        from tensorflow.lite import Interpreter  # type: ignore[no-redef]
    return Interpreter(model_content=tflite_model)


def tflite_runner(tflite_model: bytes) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``uint8 [S, S, C] -> (probabilities [C], heatmap [S, S])`` through the serving signature."""
    interpreter = make_interpreter(tflite_model)
    runner = interpreter.get_signature_runner("serving_default")
    (input_name,) = interpreter.get_signature_list()["serving_default"]["inputs"]

    def run(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = runner(**{input_name: np.asarray(image, np.uint8)[None]})
        return np.asarray(out[PROBABILITIES][0]), np.asarray(out[HEATMAP][0])

    return run


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Correlation of two heatmaps; NaN when either is constant (the correlation is undefined)."""
    x, y = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom > 0 else float("nan")


def top_iou(a: np.ndarray, b: np.ndarray, fraction: float = TOP_FRACTION) -> float:
    """IoU of the pixels at or above each heatmap's (1 - fraction) quantile: do both point at the same spot?"""
    ma = a >= np.quantile(a, 1 - fraction)
    mb = b >= np.quantile(b, 1 - fraction)
    union = np.logical_or(ma, mb).sum()
    return float(np.logical_and(ma, mb).sum() / union) if union else 1.0


def _stats(values: Sequence[float]) -> dict[str, float | int | None]:
    v = np.asarray([x for x in values if np.isfinite(x)], np.float64)
    if v.size == 0:
        return {"median": None, "mean": None, "min": None, "n": 0}
    return {"median": round(float(np.median(v)), 4), "mean": round(float(v.mean()), 4),
            "min": round(float(v.min()), 4), "n": int(v.size)}


def compare(reference: list[reference_gradcam.GradCam], run: Callable, images: calibration.ImageSet,
            labels: Sequence[str], tick: Callable[[int], None]) -> dict[str, Any]:
    """The metrics of one TFLite variant against the Keras reference results.

    Heatmap fidelity is also given over the images where both predict the same class: where they do not,
    each heatmap explains a different class, so the difference measures the flip, not the head.
    """
    labelled = bool(images.classes) and all(c in labels for c in images.classes)
    agree, correct_k, correct_t, mean_diff, max_diff, rs, ious, disagreements = [], [], [], [], [], [], [], []
    for i, ref in enumerate(reference):
        probs, heat = run(images.images[i])
        predicted = int(np.argmax(probs))
        agree.append(predicted == ref.predicted)
        if predicted != ref.predicted and len(disagreements) < MAX_LISTED:
            disagreements.append(f"{images.paths[i].name}: keras {labels[ref.predicted]}, tflite {labels[predicted]}")
        diff = np.abs(probs - ref.probabilities)
        mean_diff.append(float(diff.mean()))
        max_diff.append(float(diff.max()))
        rs.append(pearson(heat, ref.heatmap))
        ious.append(top_iou(heat, ref.heatmap))
        if labelled:
            truth = labels.index(images.classes[i])
            correct_k.append(ref.predicted == truth)
            correct_t.append(predicted == truth)
        tick(1)
    return {
        "images": len(reference),
        "top1_agreement": round(float(np.mean(agree)), 4) if agree else None,
        "accuracy_keras": round(float(np.mean(correct_k)), 4) if correct_k else None,
        "accuracy_tflite": round(float(np.mean(correct_t)), 4) if correct_t else None,
        "probability_abs_diff": {"mean": round(float(np.mean(mean_diff)), 5) if mean_diff else None,
                                 "max": round(float(np.max(max_diff)), 5) if max_diff else None},
        "heatmap_pearson": _stats(rs),
        "heatmap_pearson_when_agreeing": _stats([r for r, a in zip(rs, agree) if a]),
        "heatmap_top10_iou": _stats(ious),
        "disagreements": disagreements,
    }


def _text(report: dict[str, Any]) -> str:
    lines = [f"Parity report: {report['model']} on {report['images']} images from {report['heldout']}"]
    if report.get("note"):
        lines.append(f"note: {report['note']}")
    for name, v in report["variants"].items():
        r, ra, iou = v["heatmap_pearson"], v["heatmap_pearson_when_agreeing"], v["heatmap_top10_iou"]
        lines += [
            "",
            f"[{name}] {v['size_bytes']:,} bytes",
            f"  top-1 agreement with Keras fp32: {v['top1_agreement']:.2%}" if v["top1_agreement"] is not None
            else "  top-1 agreement: n/a",
            f"  accuracy: keras {v['accuracy_keras']:.2%}, tflite {v['accuracy_tflite']:.2%}"
            if v["accuracy_keras"] is not None else "  accuracy: n/a (folder classes are not the model's labels)",
            f"  |probability difference|: mean {v['probability_abs_diff']['mean']}, "
            f"max {v['probability_abs_diff']['max']}",
            f"  heatmap Pearson r vs GradientTape: median {r['median']}, mean {r['mean']}, min {r['min']} "
            f"(n={r['n']}); where the classes agree: median {ra['median']}, min {ra['min']}",
            f"  heatmap top-10% IoU: median {iou['median']}, mean {iou['mean']}, min {iou['min']}",
            f"  ops: {', '.join(f'{k} x{n}' for k, n in v['ops'].items())}",
            f"  float ops: {', '.join(f'{k} x{n}' for k, n in v['float_ops'].items()) or 'none'}",
        ]
        lines += [f"  disagrees: {d}" for d in v["disagreements"]]
    return "\n".join(lines) + "\n"


def _grid(path: Path, images: calibration.ImageSet, reference: list, run: Callable, labels: Sequence[str],
          count: int = 6) -> Path:
    """PNG: for a few images, the input (with both predictions), the TFLite heatmap and the GradientTape one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(count, len(reference))
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.6 * n), squeeze=False)
    for i in range(n):
        image = images.images[i][..., 0] if images.images.shape[-1] == 1 else images.images[i]
        probabilities, heat = run(images.images[i])
        panels = ((f"{images.paths[i].name}\nkeras {labels[reference[i].predicted]}, "
                   f"tflite {labels[int(np.argmax(probabilities))]}", None),
                  ("TFLite head", heat), ("GradientTape", reference[i].heatmap))
        for ax, (title, picture) in zip(axes[i], panels):
            ax.imshow(image, cmap="gray")
            if picture is not None:
                ax.imshow(picture, cmap="jet", alpha=0.45, vmin=0, vmax=1)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def run_report(model: Any, variants: dict[str, bytes], images: calibration.ImageSet, *, labels: Sequence[str],
               norm: normalisation.Normalisation, target_layer: str, report_dir: Path, heldout_source: str,
               fine_layer: str | None = None, name: str | None = None, progress: bool = False,
               fallback: calibration.ImageSet | None = None) -> tuple[dict[str, Any], list[Path]]:
    """Compare every variant with the Keras model on ``images``; write parity.json/.txt and heatmaps.png.

    ``fallback`` (the calibration set) is used, and the report says so, when no held-out image is left.
    """
    note = None
    if not images.paths and fallback is not None:
        images, note = fallback, "no held-out images were left, so these are the calibration images"
    if not images.paths:
        raise ValueError(f"{heldout_source}: no readable held-out images for the parity report")
    explain = reference_gradcam.make_reference(model, target_layer, norm, fine_layer)
    with progress_bar(progress, len(images.paths) * (1 + len(variants)), "parity report") as bar:
        reference = []
        for image in images.images:
            reference.append(explain(image))
            bar.update(1)
        report: dict[str, Any] = {"model": name or model.name, "images": len(images.paths),
                                  "heldout": heldout_source, "skipped": len(images.skipped),
                                  "per_class": images.per_class, "note": note, "variants": {}}
        runners = {}
        for name, blob in variants.items():
            runners[name] = tflite_runner(blob)
            metrics = compare(reference, runners[name], images, labels, bar.update)
            ops, float_ops, _ = list_ops(blob)
            report["variants"][name] = dict(metrics, ops=ops, float_ops=float_ops, size_bytes=len(blob))
    report_dir.mkdir(parents=True, exist_ok=True)
    files = [report_dir / "parity.json", report_dir / "parity.txt"]
    files[0].write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    files[1].write_text(_text(report), encoding="utf-8")
    first = next(iter(variants))
    files.append(_grid(report_dir / "heatmaps.png", images, reference, runners[first], labels))
    return report, files
