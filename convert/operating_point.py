"""Where a fine-tuned model says "no tumour": a notumor logit offset fixed on held-out training data.

Why: the generalising fine-tune (other sources, tumour pastes, contrast curves) moves the border between
"notumor" and the tumour classes. At the shipped model's false-alarm rate it finds more tumours on every
external set, but at its own border it also calls more healthy slices a tumour, in the test split as in the
clinic. Where the border sits is a choice of operating point, not of weights, and it is made as clinical
tests make it: on held-out data, for a stated specificity. The rule here: the lowest offset added to the
"notumor" logit at which the model raises no more false alarms on the run's held-out healthy slices (the
class folders' held-out "notumor" images and the held-out subjects of each extra healthy source,
`edge-train`'s own split) than a budget: either what a reference model, the one it is to replace, raises on
the same slices, or a stated false-alarm rate (``--false-alarm-rate``: for a model whose predecessor's rate
is no standard to keep, e.g. one that called 6% of them a tumour). Only held-out training data decides;
external scans never do.

The offset is added to the bias of the final Dense layer, so the result is the same network (no new op,
no latency), and the heatmap, the gradient of the predicted class's logit, is unchanged wherever the
label is.

    python -m convert.operating_point runs/wise50c2.keras --reference runs/shipped-recovered.keras \\
        --data ../shared/data/brain-tumor-mri --extra-healthy ../shared/data/ixi-healthy/train \\
        --cache-dir cache --out runs/wise50c2-op.keras
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
import numpy as np

from convert.run_split import held_out_pools, run_split_options
from edge.cli_common import NonEmptyPath, OneLineCommand, error

PROG = "operating_point"
HEALTHY = "notumor"
#: Offsets are searched on this grid (logit units), from -``MAX_OFFSET`` to ``MAX_OFFSET``.
STEP, MAX_OFFSET = 0.05, 5.0


def false_alarms(log_probs: np.ndarray, healthy: int, offset: float) -> int:
    """Healthy slices (rows of ``log_probs``) called a tumour once ``offset`` is added to column ``healthy``."""
    shifted = np.array(log_probs, np.float64)
    shifted[:, healthy] += offset
    return int(np.sum(shifted.argmax(1) != healthy))


def choose_offset(log_probs: np.ndarray, healthy: int, budget: int) -> float:
    """The lowest offset on the ``STEP`` grid (within +-``MAX_OFFSET``) at which the healthy slices' false
    alarms are at most ``budget``: false alarms only fall as the offset rises, so this is the most tumours
    found at that false-alarm count; negative when the model has budget to spare. Raises ValueError when
    even ``MAX_OFFSET`` does not meet the budget."""
    for offset in np.round(np.arange(-MAX_OFFSET, MAX_OFFSET + STEP / 2, STEP), 6):
        if false_alarms(log_probs, healthy, float(offset)) <= budget:
            return float(offset) + 0.0  # no -0.0
    raise ValueError(f"no notumor offset up to {MAX_OFFSET:g} brings the false alarms down to {budget}")


def shift_bias(model: Any, healthy: int, offset: float) -> None:
    """Add ``offset`` to class ``healthy``'s bias in the model's last layer (a Dense with a bias)."""
    import keras

    last = model.layers[-1]
    if not isinstance(last, keras.layers.Dense) or not last.use_bias:
        raise ValueError(f"the model's last layer {last.name!r} is not a Dense layer with a bias")
    kernel, bias = last.get_weights()
    bias = np.array(bias, copy=True)
    bias[healthy] += offset
    last.set_weights([kernel, bias])


def held_out(data: Path, extra_healthy: tuple[Path, ...], size: int, cache_dir: Path | None,
             val_fraction: float, seed: int) -> dict[str, Any]:
    """``edge-train``'s held-out images: the class folders' (x, y) and every extra source's held-out slices."""
    labels, pools = held_out_pools(data, size, extra_healthy=extra_healthy, cache_dir=cache_dir,
                                   val_fraction=val_fraction, seed=seed)
    val = pools.main
    extra = val.x[:0] if pools.healthy is None else pools.healthy.x
    return {"labels": labels, "x": val.x, "y": val.y, "extra": extra}


def log_probs(model: Any, carried: dict[str, Any], x: np.ndarray) -> np.ndarray:
    """Log of the model's class probabilities (logits up to a per-image constant) on prepared uint8 inputs."""
    from convert.train import predict

    if not len(x):
        return np.zeros((0, len(carried["labels"])))
    p = predict(model, x, carried["preprocess"], batch_size=128).astype(np.float64)
    return np.log(np.clip(p, 1e-12, 1.0))


def rate_budget(rate: float, n: int) -> int:
    """False alarms allowed among ``n`` healthy slices at a stated rate: the most whose share is <= ``rate``."""
    return int(np.floor(rate * n + 1e-9))


def fit(model: Any, carried: dict[str, Any], images: dict[str, Any], reference: Any = None,
        ref_carried: dict[str, Any] | None = None, rate: float | None = None) -> dict[str, Any]:
    """Choose the offset for ``model`` against ``reference``'s false alarms or, without one, at ``rate``;
    return the record (nothing is changed here)."""
    checked = (("model", carried),) + ((("reference", ref_carried),) if reference is not None else ())
    for name, meta in checked:
        if meta is None or meta.get("labels") != images["labels"]:
            raise ValueError(f"the {name} is not an edge-train model with labels {', '.join(images['labels'])}")
    healthy = images["labels"].index(HEALTHY)
    y = images["y"]
    healthy_x = np.concatenate([images["x"][y == healthy], images["extra"]])
    tumour_x = images["x"][y != healthy]
    if reference is not None:
        budget = false_alarms(log_probs(reference, ref_carried, healthy_x), healthy, 0.0)
    else:
        budget = rate_budget(float(rate), len(healthy_x))
    healthy_lp, tumour_lp = log_probs(model, carried, healthy_x), log_probs(model, carried, tumour_x)
    offset = choose_offset(healthy_lp, healthy, budget)

    def missed(lp: np.ndarray, b: float) -> int:
        """Tumour slices called healthy: the rows that are not 'false alarms' (not called a tumour)."""
        return len(lp) - false_alarms(lp, healthy, b)

    return {"offset": offset, "class": HEALTHY, "healthy_held_out": int(len(healthy_x)),
            "budget": budget, "false_alarms_before": false_alarms(healthy_lp, healthy, 0.0),
            "false_alarms_after": false_alarms(healthy_lp, healthy, offset), "tumours_held_out": int(len(tumour_x)),
            "tumours_called_healthy_before": missed(tumour_lp, 0.0),
            "tumours_called_healthy_after": missed(tumour_lp, offset)}


@click.command(PROG, cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_path", metavar="MODEL", type=NonEmptyPath(dir_okay=False, exists=True, path_type=Path))
@click.option("--reference", type=NonEmptyPath(dir_okay=False, exists=True, path_type=Path),
              help="The model MODEL is to replace: its false alarms on the held-out healthy slices are the budget.")
@click.option("--false-alarm-rate", "rate", type=click.FloatRange(0.0, 1.0),
              help="Instead of --reference: the budget as a share of the held-out healthy slices (0.0162: 8 of 495).")
@run_split_options
@click.option("--out", required=True, type=NonEmptyPath(dir_okay=False, path_type=Path),
              help="Where to write MODEL with the offset in its last bias (.keras).")
@click.option("--json", "as_json", is_flag=True, help="Print the record (offset and counts) as JSON instead of the line.")
def main(model_path: Path, reference: Path | None, rate: float | None, data: Path, extra_healthy: tuple[Path, ...],
         val_fraction: float, seed: int, cache_dir: Path | None, out: Path, as_json: bool) -> None:
    """Write MODEL with the lowest "notumor" logit offset at which it raises no more false alarms on the
    run's held-out healthy slices than --reference does (or than --false-alarm-rate allows); the offset and
    the counts go into the carried metadata (`operating_point`) and are printed. Convert OUT with
    edge-convert like any edge-train model.

    \b
    Example (the shipped custom-cnn's second round against the file it replaced):
      python -m convert.operating_point runs/custom-cnn-wise50c2.keras \\
          --reference runs/shipped-recovered.keras --data ../shared/data/brain-tumor-mri \\
          --extra-healthy ../shared/data/ixi-healthy/train --cache-dir cache --out runs/op.keras
      # the shipped xception's, at the default model's rate (8 of the 495 held-out healthy slices):
      python -m convert.operating_point runs/xception-wise50g2.keras --false-alarm-rate 0.0162 \\
          --data ../shared/data/brain-tumor-mri --extra-healthy ../shared/data/ixi-healthy/train \\
          --cache-dir cache --out runs/xception-op.keras

    Exit codes: 0 written; 1 a model is not an edge-train model of these labels, no offset meets the budget,
    or OUT is not a .keras path; 2 usage error (a DATA folder inside validation-only data among them, or
    not exactly one of --reference and --false-alarm-rate).
    """
    from convert.keras_io import load_model, save_model

    if (reference is None) == (rate is None):
        raise click.UsageError("give exactly one of --reference and --false-alarm-rate")
    try:
        model, carried = load_model(model_path)
        ref, ref_carried = load_model(reference) if reference is not None else (None, None)
        if carried is None:
            raise ValueError(f"{model_path}: not an edge-train model")
        if ref is not None and (ref_carried or {}).get("input_size") != carried.get("input_size"):
            raise ValueError(f"{model_path}, {reference}: not edge-train models of one input size")
        images = held_out(data, tuple(extra_healthy), carried["input_size"], cache_dir, val_fraction, seed)
        record = fit(model, carried, images, ref, ref_carried, rate)
        record = {**record, **({"reference": reference.name} if reference is not None else {"rate": rate})}
        shift_bias(model, images["labels"].index(HEALTHY), record["offset"])
        out.parent.mkdir(parents=True, exist_ok=True)
        save_model(model, out, {**carried, "operating_point": record})
    except ValueError as exc:
        error(PROG, str(exc))
        sys.exit(1)
    if as_json:
        click.echo(json.dumps({**record, "out": str(out)}))
        return
    source = f"reference {reference.name}" if reference is not None else f"rate {rate:g}"
    click.echo(f"wrote {out}: notumor offset {record['offset']:+.2f}; held-out healthy false alarms "
               f"{record['false_alarms_before']} -> {record['false_alarms_after']} of {record['healthy_held_out']} "
               f"(budget {record['budget']}, {source}); held-out tumours called healthy "
               f"{record['tumours_called_healthy_before']} -> {record['tumours_called_healthy_after']} of "
               f"{record['tumours_held_out']}")


if __name__ == "__main__":
    main()
