"""The input gate: before a verdict is shown, is this scan a brain-MRI slice like the model's training data?

A classifier answers everything with one of its labels, and it answers a blank export, a photo of the
wrong screen or a CT as confidently as a scan (an all-black PNG got "notumor 99.6%"). Two checks stop
that, both on the device and both cheap:

- :func:`check_header` refuses a DICOM file whose header says it is not a brain MRI: another modality
  (CT, ultrasound, nuclear medicine, a segmentation) or another body part (abdomen, knee). The scanner
  wrote that, so it is surer than any look at the pixels, and it costs nothing.
- :func:`check_image` refuses inputs that cannot be a brain slice, from a reduced copy of the decoded
  image: one flat value, almost no contrast, far too elongated, colour, no head. Each refusal is a short
  stable code (:data:`REASONS`) with a plain sentence.
- :class:`OodGate` scores the network's own features (a third signature output of the same invoke,
  ``features``: the feature map the model file names, averaged over its positions) by their Mahalanobis
  distance to the nearest training reference (each class, and each extra healthy source), in a principal
  subspace plus the residual off it; a score above the model's calibrated threshold means "not like the
  scans it was trained on", and the scan is referred. The parameters, the threshold and the rates it was
  measured at travel in the model file's metadata (``gate``), written by `convert.gate_calibration`.

A refused or referred scan gets no verdict (docs/RECORDS.md); the network still runs, so its score is
reported either way.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ModelError
from .preprocess import head_extent, to_gray_float

OK, REFER, REFUSED = "ok", "refer", "refused"
OUT_OF_DISTRIBUTION = "out_of_distribution"
#: reason code -> (status, the sentence the text output, the overlay and the record's ``message`` say).
REASONS: dict[str, tuple[str, str]] = {
    OUT_OF_DISTRIBUTION: (REFER, "Not like the brain MRI this model was trained on: referred, no verdict"),
    "flat": (REFUSED, "The image is blank (one flat value): refused, no verdict"),
    "low_contrast": (REFUSED, "The image has almost no contrast: refused, no verdict"),
    "aspect_ratio": (REFUSED, "The image is far too elongated for a brain slice: refused, no verdict"),
    "colour": (REFUSED, "The image is in colour; MRI is grayscale: refused, no verdict"),
    "no_head": (REFUSED, "No head found in the image: refused, no verdict"),
    "other_modality": (REFUSED, "The DICOM header says this is not an MR image (e.g. CT or ultrasound): "
                                "refused, no verdict"),
    "other_body_part": (REFUSED, "The DICOM header names a body part other than the head: refused, no verdict"),
}

#: DICOM Modality values a brain MRI slice may carry: MR itself, and OT (other), which secondary captures
#: and many exports of MR images use. Any other modality named in a header is refused.
MR_MODALITIES = frozenset({"MR", "OT"})
#: Body Part Examined values (DICOM PS3.16 CID 4031 terms, spaces and underscores removed) that cannot be a
#: brain slice. A list of what is refused rather than of what is accepted: headers of head scans carry
#: "HEAD", "BRAIN", local-language words and protocol names, and an unknown value must not refuse a scan.
NOT_HEAD = frozenset({
    "ABDOMEN", "ABDOMENPELVIS", "ANKLE", "ARM", "BREAST", "CHEST", "CHESTABDOMEN", "CHESTABDPELVIS", "CLAVICLE",
    "COCCYX", "CSPINE", "ELBOW", "EXTREMITY", "FEMUR", "FINGER", "FOOT", "FOREARM", "HAND", "HEART", "HIP",
    "HUMERUS", "KIDNEY", "KNEE", "LEG", "LIVER", "LSPINE", "LUNG", "PANCREAS", "PELVIS", "PROSTATE", "SACRUM",
    "SHOULDER", "SPINE", "SSPINE", "TSPINE", "THIGH", "THORAX", "TLSPINE", "UTERUS", "WRIST",
})

#: The checks look at a copy strided down to about this many pixels on the longer side: enough for
#: percentiles and a head outline, and the same cost for a 64 px scan and a 7000 px photo.
STATS_SIDE = 128
#: Longer side over shorter side. Training and external scans measured at most 1.5 (IXI 1.33); a photo of
#: a film is at most 16:9 (1.78). A strip, a banner or a long screenshot is not a slice.
MAX_ASPECT = 3.0
#: Integer images: fewer grey levels than this between the 0.5th and 99.5th percentiles is no contrast
#: (training scans span at least 100 levels, external ones 41). Float images: the same span relative to
#: the values' magnitude, below :data:`MIN_RELATIVE_SPAN`.
MIN_LEVELS = 16
MIN_RELATIVE_SPAN = 0.05
#: Chroma spread (standard deviation of the red-green and yellow-blue opponents, over the luminance span).
#: Colour-saved MRI measured at most 0.09 (JPEG chroma noise, a coloured annotation); photos 0.25-0.65.
MAX_COLOUR = 0.15


def message(reason: str | None) -> str | None:
    """The plain sentence for a reason code (None for None)."""
    return None if reason is None else REASONS[reason][1]


def status_of(reason: str | None) -> str:
    """The record status a reason gives: ``ok`` for None, else ``refer`` or ``refused``."""
    return OK if reason is None else REASONS[reason][0]


def check_header(modality: str | None, body_part: str | None) -> str | None:
    """A refusal code from a DICOM header's Modality and Body Part Examined (upper case, as
    `edge.decode.Frame` carries them), or None; absent values refuse nothing."""
    if modality is not None and modality not in MR_MODALITIES:
        return "other_modality"
    if body_part is not None and body_part.replace(" ", "").replace("_", "") in NOT_HEAD:
        return "other_body_part"
    return None


def check_image(image: np.ndarray) -> str | None:
    """A refusal code for an input that cannot be a brain-MRI slice, or None. Rules first that need the
    least: shape, then values, then colour, then the head."""
    a = np.asarray(image)
    h, w = a.shape[:2]
    if max(h, w) > MAX_ASPECT * min(h, w):
        return "aspect_ratio"
    step = max(1, -(-max(h, w) // STATS_SIDE))
    small = a[::step, ::step]
    gray = to_gray_float(small)
    lo, ref, hi = (float(v) for v in np.percentile(gray, (0.5, 99, 99.5)))
    span = hi - lo
    if span <= 0:
        return "flat"
    if (span < MIN_LEVELS) if a.dtype.kind in "ui" else (span < MIN_RELATIVE_SPAN * max(abs(lo), abs(hi))):
        return "low_contrast"
    if small.ndim == 3 and small.shape[2] >= 3 and _colourfulness(small) > MAX_COLOUR * span:
        return "colour"
    if head_extent(gray, ref) is None:  # the test the crop uses, without its whole-image fallback
        return "no_head"
    return None


def _colourfulness(rgb: np.ndarray) -> float:
    """Spread of the opponent colour channels (Hasler and Suesstrunk 2003, without the mean term, so a
    uniform colour cast, as in a photo of a film on a light box, does not count)."""
    c = rgb[..., :3].astype(np.float32)
    rg = c[..., 0] - c[..., 1]
    yb = 0.5 * (c[..., 0] + c[..., 1]) - c[..., 2]
    return float(np.hypot(rg.std(), yb.std()))


def encode_array(a: np.ndarray) -> dict[str, Any]:
    """An array as JSON for the metadata: little-endian float32, base64 (a quarter of the size of decimals)."""
    a = np.ascontiguousarray(a, dtype="<f4")
    return {"dtype": "float32", "shape": list(a.shape), "base64": base64.b64encode(a.tobytes()).decode("ascii")}


def decode_array(entry: Any, name: str) -> np.ndarray:
    """The inverse of :func:`encode_array`; a malformed entry is a :class:`ModelError` naming it."""
    try:
        shape = tuple(int(d) for d in entry["shape"])
        if entry["dtype"] != "float32":
            raise ValueError(f"dtype {entry['dtype']!r}")
        a = np.frombuffer(base64.b64decode(entry["base64"], validate=True), dtype="<f4").reshape(shape)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"the gate's {name!r} is malformed ({exc})") from None
    if not np.isfinite(a).all():
        raise ModelError(f"the gate's {name!r} holds non-finite values")
    return a.astype(np.float32)


@dataclass(frozen=True)
class OodGate:
    """Mahalanobis distance of a feature vector to its nearest reference mean, with a covariance shared by
    all references (Lee et al. 2018) kept as its ``k`` leading principal directions plus one variance for
    everything off them, so that a 2048-wide feature needs a D x k matrix, not D x D, and directions the
    training data never varied in still count.

    ``means`` [M, D], ``basis`` [D, k] (orthonormal columns), ``variances`` [k], ``residual_variance`` and
    ``threshold`` (a squared distance) come from `convert.gate_calibration`. :meth:`score` is the distance
    over the threshold's: above 1 means refer.
    """

    means: np.ndarray
    basis: np.ndarray
    variances: np.ndarray
    residual_variance: float
    threshold: float

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> "OodGate | None":
        """The gate a model's metadata carries, or None when it has none (converted before the gate)."""
        gate = metadata.get("gate")
        if gate is None:
            return None
        if not isinstance(gate, dict) or gate.get("method") != "mahalanobis-pca":
            raise ModelError("the model's gate metadata is malformed or of an unknown method")
        means, basis, variances = (decode_array(gate.get(key), key) for key in ("means", "basis", "variances"))
        try:
            residual, threshold = float(gate["residual_variance"]), float(gate["threshold"])
        except (KeyError, TypeError, ValueError):
            raise ModelError("the model's gate lacks its residual variance or threshold") from None
        if (means.ndim != 2 or basis.ndim != 2 or basis.shape[0] != means.shape[1]
                or variances.shape != (basis.shape[1],) or not (variances > 0).all()
                or residual <= 0 or threshold <= 0):
            raise ModelError("the model's gate parameters disagree in shape or are not positive")
        return cls(means, basis, variances, residual, threshold)

    @property
    def width(self) -> int:
        """The feature width D the gate expects."""
        return int(self.means.shape[1])

    def squared_distances(self, features: np.ndarray) -> np.ndarray:
        """Squared distance of each row of ``features`` [N, D] to its nearest reference: [N]."""
        f = np.asarray(features, np.float32).reshape(-1, self.width)
        d = f[:, None, :] - self.means[None]  # [N, M, D]: every row against every reference at once
        p = d @ self.basis
        inside = (p * p / self.variances).sum(axis=2)
        off = np.maximum((d * d).sum(axis=2) - (p * p).sum(axis=2), 0.0) / self.residual_variance
        return (inside + off).min(axis=1)

    def score(self, features: np.ndarray) -> float:
        """The scan's distance from the training data over the threshold distance: > 1 is referred."""
        return float(np.sqrt(self.squared_distances(features)[0] / self.threshold))
