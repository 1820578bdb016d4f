"""Weight-space interpolation of a fine-tuned model with the model it started from (WiSE-FT).

Why: fine-tuning the shipped custom-cnn with other sources, tumour pastes and the mask-guided loss finds
far more tumours on scans from elsewhere but costs about a point of in-distribution accuracy. Wortsman et
al. (CVPR 2022, "Robust fine-tuning of zero-shot models") showed that the straight line between a
model and its fine-tuned descendant, ``(1 - alpha) * start + alpha * tuned`` taken weight by weight, keeps
most of both: the start's accuracy where it was good and the fine-tune's robustness. It costs nothing at
run time (the result is the same network, converted as any other) and one float to choose, which is
chosen on the training data's validation split, never on external scans.

Valid only for two models of one architecture where one was fine-tuned from the other (a shared start
keeps them in one loss basin); the check here is that every weight tensor matches in name and shape,
and that both carry the same labels and input size. Batch norms frozen during the fine-tune
(``--freeze-batchnorm``) interpolate exactly; moving statistics are averaged like any other weight.

    python -m convert.weight_average runs/custom-cnn-recovered.keras runs/ft16.keras --alpha 0.5 \\
        --out runs/ft16-wise50.keras
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
import numpy as np

from edge.cli_common import NonEmptyPath, OneLineCommand, error

PROG = "weight_average"
#: Carried metadata that must agree for the two models to be one network.
_SAME = ("labels", "input_size", "channels", "pipeline", "preprocess")


def interpolate(start: list[np.ndarray], tuned: list[np.ndarray], alpha: float) -> list[np.ndarray]:
    """``(1 - alpha) * start + alpha * tuned`` tensor by tensor (0 = start, 1 = tuned), dtypes kept.

    Raises ValueError when the lists do not pair up tensor for tensor.
    """
    if len(start) != len(tuned):
        raise ValueError(f"the models have {len(start)} and {len(tuned)} weight tensors")
    out = []
    for i, (a, b) in enumerate(zip(start, tuned)):
        if a.shape != b.shape:
            raise ValueError(f"weight tensor {i} has shape {a.shape} in one model and {b.shape} in the other")
        mixed = (1.0 - alpha) * a.astype(np.float64) + alpha * b.astype(np.float64)
        out.append(mixed.astype(b.dtype))
    return out


def blend(start_path: Path, tuned_path: Path, alpha: float) -> tuple[Any, dict[str, Any]]:
    """(model, carried metadata) of the interpolation; the tuned model's architecture and metadata, plus a
    ``weight_average`` record of the two files and alpha."""
    from convert.keras_io import load_model

    start, start_meta = load_model(start_path)
    tuned, tuned_meta = load_model(tuned_path)
    if start_meta is None or tuned_meta is None:
        raise ValueError(f"{start_path if start_meta is None else tuned_path}: not an edge-train or from_tflite "
                         ".keras model (no carried labels and preprocessing)")
    for key in _SAME:
        if start_meta.get(key) != tuned_meta.get(key):
            raise ValueError(f"the models differ in {key}: {start_meta.get(key)!r} vs {tuned_meta.get(key)!r}")
    names_a = [w.path for w in start.weights]
    names_b = [w.path for w in tuned.weights]
    if names_a != names_b:
        raise ValueError("the models are not one architecture (their weights are named differently)")
    tuned.set_weights(interpolate(start.get_weights(), tuned.get_weights(), alpha))
    carried = dict(tuned_meta)
    carried["weight_average"] = {"start": start_path.name, "tuned": tuned_path.name, "alpha": alpha}
    return tuned, carried


@click.command(PROG, cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("start", type=NonEmptyPath(dir_okay=False, exists=True, path_type=Path))
@click.argument("tuned", type=NonEmptyPath(dir_okay=False, exists=True, path_type=Path))
@click.option("--alpha", required=True, type=click.FloatRange(0, 1),
              help="Share of the fine-tuned weights: 0 gives START, 1 gives TUNED.")
@click.option("--out", required=True, type=NonEmptyPath(dir_okay=False, path_type=Path),
              help="Where to write the interpolated model (.keras, with TUNED's labels and preprocessing).")
def main(start: Path, tuned: Path, alpha: float, out: Path) -> None:
    """Write (1 - ALPHA) x START + ALPHA x TUNED, weight by weight: TUNED must be fine-tuned from START
    (edge-train --init START). Convert the result with edge-convert like any edge-train model.

    Exit codes: 0 written; 1 the two models are not one network, or OUT is not a .keras path; 2 usage error.
    """
    from convert.keras_io import save_model

    try:
        model, carried = blend(start, tuned, alpha)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_model(model, out, carried)
    except ValueError as exc:
        error(PROG, str(exc))
        sys.exit(1)
    click.echo(f"wrote {out}: {alpha:g} x {tuned.name} + {1 - alpha:g} x {start.name}")


if __name__ == "__main__":
    main()
