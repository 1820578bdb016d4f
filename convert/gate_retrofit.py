"""Give an existing model file its input gate: the features output, the calibrated gate, a weights checksum.

For model files whose Keras source is gone (the bundled ones): the flatbuffer is edited
(`convert.features_output`), never re-converted, so every weight stays as it was. The file is written only
after the new one has answered a sample of training scans with probabilities and heatmaps bit-identical
to the old one's.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from convert.features_output import FEATURES, add_features_output
from convert.gate_calibration import COMPONENTS, QUANTILE, Progress, calibrate, references
from convert.metadata import embed_metadata
from edge.model_file import read_spec, weights_digest

#: Training scans the before/after comparison runs on (spread over every reference).
CHECK_IMAGES = 64


def with_features(model: bytes, layer: str | None, gate: dict[str, Any] | None) -> bytes:
    """``model`` with the features output and ``gate`` (None: no gate) in its metadata, checksum renewed."""
    data, entry = add_features_output(model, layer)
    meta = {k: v for k, v in read_spec(model).metadata.items() if k not in ("weights", "gate")}
    meta["outputs"] = dict(meta["outputs"], **{FEATURES: entry})
    if gate is not None:
        meta["gate"] = gate
    return embed_metadata(data, meta)


def check_identical(before: Path, after: Path, images: Sequence[Path]) -> dict[str, Any]:
    """Classify ``images`` with both files; raise ValueError unless probabilities and heatmaps are equal bit
    for bit (the new output must change nothing the old file computed)."""
    from edge import Classifier

    old, new = Classifier(before, threads=1), Classifier(after, threads=1)
    for path in images:
        a, b = old.classify(path), new.classify(path)
        same_heat = (a.heatmap is None and b.heatmap is None) or np.array_equal(a.heatmap, b.heatmap)
        if a.probabilities != b.probabilities or not same_heat:
            raise ValueError(f"the edited model answers {path} differently; nothing was written")
    return {"images": len(images), "probabilities": "identical", "heatmap": "identical"}


def _sample(folders: Sequence[Path], dedup: Path | None) -> list[Path]:
    paths = [p for ref in references(folders, dedup) for p in ref.paths]
    step = max(1, len(paths) // CHECK_IMAGES)
    return paths[::step][:CHECK_IMAGES]


def retrofit(model: Path, folders: Sequence[Path], out: Path, *, layer: str | None = None,
             dedup: Path | None = None, components: int = COMPONENTS, quantile: float = QUANTILE,
             cache_dir: Path | None = None, threads: int | None = None,
             progress: Progress | None = None) -> dict[str, Any]:
    """Write ``model`` with a gate fitted on ``folders`` to ``out``; return what was written and measured."""
    original = Path(model).read_bytes()
    staged_bytes = with_features(original, layer, None)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edge-gate-", dir=out.parent) as tmp:
        staged = Path(tmp) / Path(model).name
        staged.write_bytes(staged_bytes)
        gate = calibrate(staged, folders, dedup=dedup, components=components, quantile=quantile,
                         cache_dir=cache_dir, progress=progress, threads=threads)
        final = with_features(original, layer, gate)
        staged.write_bytes(final)
        identical = check_identical(Path(model), staged, _sample(folders, dedup))
    spec = read_spec(final)
    if spec.metadata["weights"] != weights_digest(original):
        raise ValueError("the weight buffers changed in the edit; nothing was written")
    out.write_bytes(final)
    summary_gate = {k: v for k, v in gate.items() if k not in ("means", "basis", "variances")}
    return {"out": str(out), "size_bytes": len(final), "sha256": spec.sha256,
            "weights": spec.metadata["weights"], "features": spec.metadata["outputs"][FEATURES],
            "gate": summary_gate, "identical": identical}


def add_gate(path: Path, folders: Sequence[Path], *, say: Callable[[str], None],
             progress: Progress | None = None) -> dict[str, Any] | None:
    """Calibrate the gate of the converted file at ``path`` (it has its features output) and rewrite it with
    the gate; None, and a note through ``say``, when the folders cannot give one (too few scans, or data
    that is for validation only)."""
    try:
        gate = calibrate(path, folders, progress=progress)
    except ValueError as exc:
        say(f"note: no input gate written ({exc}); edge-gate calibrate can add one later")
        return None
    path.write_bytes(with_features(path.read_bytes(), None, gate))
    cal = gate["calibration"]
    say(f"input gate: {cal['components']} components, {100 * cal['held_out_referred']:.2f}% of held-out "
        f"scans referred")
    return gate
