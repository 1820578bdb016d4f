"""Validation probes of generalisation, made only from the held-out part of the training data.

Why: the held-out 10% of `Training/` is the same mix of sources and sequences as the rest, so it cannot
tell a model that finds tumours elsewhere from one that does not (on it every candidate of the
generalising recipe scores within a few images of the others), and external-dev may not choose models.
Two probes are built from held-out images only, with the run's own split (`edge-train`'s seed and
fraction, IXI split by subject):

- **held-out pastes found**: the held-out tumours pasted into the held-out healthy slices of every source
  (`convert.copy_paste`, seed 1000 as `edge-train`'s validation), share called any tumour: a tumour in a
  brain of another source;
- **under contrast curves**: each held-out class-folder image through one seeded random curve
  (`convert.augment.contrast_curves`), four-class accuracy, tumours found and healthy spared: the same
  anatomy with another sequence's tissue brightness. It favours, by construction, models trained with
  ``--contrast-curves``.

    python -m convert.validation_probes runs/a.keras runs/b.keras --data ../shared/data/brain-tumor-mri \\
        --masks ../shared/data/brain-tumor-mri-masks --extra-healthy ../shared/data/ixi-healthy/train --cache-dir cache
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

PROG = "validation_probes"
#: Seeds of the probes: pastes as `edge-train`'s validation pastes, curves fixed.
PASTE_SEED, CURVE_SEED = 1000, 7
HEALTHY = "notumor"


def probe_images(data: Path, masks: Path, extra_healthy: tuple[Path, ...], size: int, paste_fraction: float,
                 cache_dir: Path | None, val_fraction: float = 0.1, seed: int = 0) -> dict[str, Any]:
    """The held-out images of ``edge-train``'s split (``val_fraction``, ``seed``), their pastes and their
    curved copies."""
    import tensorflow as tf

    from convert import augment, training_sources

    labels, pools = held_out_pools(data, size, extra_healthy=extra_healthy, masks=masks, cache_dir=cache_dir,
                                   val_fraction=val_fraction, seed=seed)
    healthy = labels.index(HEALTHY)
    n_tumour = int(np.sum(pools.main.y != healthy))
    val = training_sources.compose(pools, np.random.default_rng(PASTE_SEED), None, int(round(paste_fraction * n_tumour)))
    pasted = val.has_mask & ~val.is_main
    rng = np.random.default_rng(CURVE_SEED)
    uniform = lambda shape, lo, hi: tf.constant(rng.uniform(lo, hi, shape).astype(np.float32))  # noqa: E731
    main = val.x[val.is_main].astype(np.float32)
    curved = np.asarray(augment.contrast_curves(tf.constant(main), uniform, 1.0))
    return {"labels": labels, "pastes": val.x[pasted], "main": main, "main_y": val.y[val.is_main],
            "curved": curved}


def probe(model_path: Path, model: Any, carried: dict[str, Any] | None, images: dict[str, Any]) -> dict[str, Any]:
    """The two probes' figures for one Keras model (loaded from ``model_path``) of the images' labels and size."""
    from convert.train import predict as probabilities

    if carried is None or carried.get("labels") != images["labels"]:
        raise ValueError(f"{model_path}: not an edge-train model with labels {', '.join(images['labels'])}")

    def predict(x: np.ndarray) -> np.ndarray:
        if not len(x):
            return np.zeros(0, np.int64)
        return probabilities(model, x, carried["preprocess"], batch_size=128).argmax(1)

    def rate(hits: np.ndarray) -> float | None:
        """A share, or None for none to count (a tiny split)."""
        return float(np.mean(hits)) if hits.size else None

    healthy = images["labels"].index(HEALTHY)
    y = images["main_y"]
    clean, curved, pasted = predict(images["main"]), predict(images["curved"]), predict(images["pastes"])
    return {"model": str(model_path), "held_out": int(y.size), "pastes": int(pasted.size),
            "accuracy": rate(clean == y), "pastes_found": rate(pasted != healthy),
            "curves_accuracy": rate(curved == y), "curves_tumour_found": rate(curved[y != healthy] != healthy),
            "curves_healthy_spared": rate(curved[y == healthy] == healthy)}


@click.command(PROG, cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("models", nargs=-1, required=True, type=NonEmptyPath(dir_okay=False, exists=True, path_type=Path))
@run_split_options
@click.option("--masks", required=True, type=NonEmptyPath(file_okay=False, exists=True, path_type=Path),
              help="The training data's lesion masks (edge-train's --masks).")
@click.option("--paste-fraction", type=click.FloatRange(0, 5), default=0.35, show_default=True,
              help="Pastes per held-out tumour slice.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON record per model instead of the table.")
def main(models: tuple[Path, ...], data: Path, masks: Path, extra_healthy: tuple[Path, ...], paste_fraction: float,
         val_fraction: float, seed: int, cache_dir: Path | None, as_json: bool) -> None:
    """Score MODELS (edge-train .keras files of one input size) on the held-out pastes and on the held-out
    images under seeded contrast curves: generalisation figures that need no external data.

    Exit codes: 0 scored; 1 a model is not an edge-train model of these labels or sizes differ; 2 usage error.
    """
    from convert.keras_io import load_model

    try:
        loaded = [load_model(m) for m in models]
        sizes = {(carried or {}).get("input_size") for _, carried in loaded}
        if len(sizes) != 1 or None in sizes:
            raise ValueError(f"{', '.join(map(str, models))}: not edge-train models of one input size")
        images = probe_images(data, masks, tuple(extra_healthy), sizes.pop(), paste_fraction, cache_dir,
                              val_fraction, seed)
        rows = [probe(m, model, carried, images) for m, (model, carried) in zip(models, loaded)]
    except ValueError as exc:
        error(PROG, str(exc))
        sys.exit(1)
    pct = lambda v: "n/a" if v is None else f"{v:.1%}"  # noqa: E731
    for r in rows:
        if as_json:
            click.echo(json.dumps(r))
        else:
            click.echo(f"{r['model']}: held-out accuracy {pct(r['accuracy'])} ({r['held_out']}), pastes found "
                       f"{pct(r['pastes_found'])} ({r['pastes']}), under curves: accuracy "
                       f"{pct(r['curves_accuracy'])}, tumours found {pct(r['curves_tumour_found'])}, "
                       f"healthy spared {pct(r['curves_healthy_spared'])}")


if __name__ == "__main__":
    main()
