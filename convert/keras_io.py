"""Load Keras models as users have them, and save ours with the metadata they carry.

Models made by `edge-train` are `.keras` zips with one extra entry, ``edge_mri.json`` (labels, input
size, channels, preprocessing pipeline and normalisation). Keras ignores the entry; `edge-convert` and
`edge-evaluate` read it so that our models need no flags.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

CARRIED_ENTRY = "edge_mri.json"


def load_model(path: str | Path) -> tuple[Any, dict[str, Any] | None]:
    """Load a `.keras`, legacy `.h5` or SavedModel directory; return (model, carried metadata or None).

    A SavedModel directory that Keras 3 cannot load as a Keras model is wrapped in a
    ``keras.layers.TFSMLayer`` only for inference; Grad-CAM needs layers, so the converter rejects it
    with a message when the layers cannot be found.
    """
    import keras

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such model file or directory")
    if p.is_dir():
        try:
            import tf_keras  # type: ignore[import-not-found]

            return tf_keras.models.load_model(str(p), compile=False), None
        except ImportError:
            pass
        model = keras.models.load_model(str(p), compile=False) if (p / "keras_metadata.pb").exists() else None
        if model is None:
            raise ValueError(f"{p}: a SavedModel directory without Keras layers; save it as .keras or .h5")
        return model, None
    model = keras.models.load_model(str(p), compile=False)
    carried = None
    if zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as zf:
            if CARRIED_ENTRY in zf.namelist():
                carried = json.loads(zf.read(CARRIED_ENTRY).decode("utf-8"))
    return model, carried


def save_model(model: Any, path: str | Path, carried: dict[str, Any]) -> Path:
    """Save ``model`` as .keras and add ``carried`` as the ``edge_mri.json`` zip entry."""
    p = Path(path)
    if p.suffix != ".keras":
        raise ValueError(f"{p}: our trained models are saved as .keras")
    model.save(str(p))
    with zipfile.ZipFile(p, "a") as zf:
        zf.writestr(CARRIED_ENTRY, json.dumps(carried, indent=1, sort_keys=True))
    return p
