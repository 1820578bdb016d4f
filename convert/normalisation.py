"""Input normalisations a Keras model may have been trained with, by the names users know them by.

The converter folds the chosen one into the TFLite graph (so a device feeds raw uint8 pixels); training,
evaluation and the parity report apply the same function to Keras inputs, so every path agrees.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NAMES = ("xception", "tf", "0-1", "caffe", "torch", "none")


@dataclass(frozen=True)
class Normalisation:
    """``(x[..., order] - mean) / std`` on 0..255 pixels; ``bgr`` reverses RGB channels first (caffe)."""

    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    bgr: bool = False

    def to_json(self) -> dict:
        return {"name": self.name, "mean": list(self.mean), "std": list(self.std), "bgr": self.bgr,
                "folded": True}


def parse(spec: str, channels: int = 3) -> Normalisation:
    """Parse ``xception``/``tf`` ([-1,1]), ``0-1``, ``caffe``, ``torch``, ``none`` or ``mean=a,b,c;std=d,e,f``.

    Per-channel statistics given for 3 channels are averaged for a 1-channel (grayscale) model, which
    is what the same statistics mean for a gray image replicated to RGB.
    """
    s = spec.strip().lower()
    if s in ("xception", "tf"):
        norm = Normalisation(s, (127.5,), (127.5,))
    elif s == "0-1":
        norm = Normalisation(s, (0.0,), (255.0,))
    elif s == "none":
        norm = Normalisation(s, (0.0,), (1.0,))
    elif s == "caffe":
        norm = Normalisation(s, (103.939, 116.779, 123.68), (1.0, 1.0, 1.0), bgr=True)
    elif s == "torch":
        norm = Normalisation(s, (123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
    elif s.startswith("mean="):
        try:
            parts = dict(p.split("=", 1) for p in s.split(";"))
            mean = tuple(float(v) for v in parts["mean"].split(","))
            std = tuple(float(v) for v in parts["std"].split(","))
        except (KeyError, ValueError):
            raise ValueError(f"cannot parse normalisation {spec!r}; expected mean=a,b,c;std=d,e,f") from None
        if len(mean) != len(std) or any(v == 0 for v in std):
            raise ValueError(f"normalisation {spec!r}: mean and std need the same length and non-zero std")
        norm = Normalisation("mean-std", mean, std)
    else:
        raise ValueError(f"unknown normalisation {spec!r}; choose one of {', '.join(NAMES)} or mean=..;std=..")
    if channels == 1 and len(norm.mean) == 3:
        norm = Normalisation(norm.name, (float(np.mean(norm.mean)),), (float(np.mean(norm.std)),), False)
    return norm


def apply(x, norm: Normalisation):
    """Normalise 0..255 pixels (numpy array or tf tensor, channels last) the way the model expects."""
    if norm.bgr and x.shape[-1] == 3:
        x = x[..., ::-1]
    mean = np.asarray(norm.mean, np.float32)
    inv_std = np.asarray([1.0 / s for s in norm.std], np.float32)
    return (x - mean) * inv_std
