"""The Keras fp32 + GradientTape Grad-CAM loop that the edge runtime replaces, timed per stage like edge.

It answers "how much faster is the int8 TFLite file with the in-graph heatmap than doing it the usual way
on this device?". It runs only inside a `benchmarks.worker` child (TensorFlow never enters the harness or
the edge measurements) and deliberately does not import `convert/`: benchmarks measure what a user would
run, reading the `.keras` file's carried ``edge_mri.json`` zip entry directly.

"The usual way" has two honest answers, so there are two styles (see :data:`STYLES`):

- ``compiled`` is the *fastest* Keras way: one forward pass under a tape inside a compiled
  ``tf.function`` gives both the probabilities and the Grad-CAM gradients (tracing is paid once, in the
  first-inference time). A ratio against it is the least the edge runtime can claim.
- ``predict`` is how the published studies, the keras.io Grad-CAM example and most users run it:
  ``model.predict`` for the classification, then an eager tape over a second model that returns the
  feature map and the pre-softmax scores. Its ratio is the one to quote against those studies.

Both time the classification and the heatmap together as ``invoke``, so stages compare across styles and
with edge. Scans are decoded and prepared with the same `edge` functions as the device.
"""
from __future__ import annotations

import hashlib
import json
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.decode import decode
from edge.preprocess import prepare

CARRIED_ENTRY = "edge_mri.json"  # written by convert.keras_io.save_model; read here without importing convert
#: Carried ``preprocess`` name -> (offset, scale): the model sees ``x * scale + offset`` for 0..255 pixels.
NORMALISATIONS = {"tf": (-1.0, 1 / 127.5), "xception": (-1.0, 1 / 127.5), "0-1": (0.0, 1 / 255.0),
                  "none": (0.0, 1.0)}
#: Reference styles: the fastest Keras way, and the way the published studies (and most users) run it.
STYLES = ("compiled", "predict")


@dataclass
class KerasResult:
    """Mirrors the fields of `edge.Result` that the benchmark reads."""

    label: str
    probabilities: dict[str, float]
    heatmap: np.ndarray
    timings: dict[str, float]
    model: str
    model_sha256: str
    backend: str
    backend_version: str


def read_carried(path: Path) -> dict[str, Any]:
    """The ``edge_mri.json`` entry of a `.keras` zip (labels, input size, channels, pipeline, preprocess)."""
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a .keras zip; the Keras reference needs a model saved by edge-train")
    with zipfile.ZipFile(path) as zf:
        if CARRIED_ENTRY not in zf.namelist():
            raise ValueError(f"{path}: carries no {CARRIED_ENTRY} (labels, size, preprocessing); "
                             "save it with edge-train")
        return json.loads(zf.read(CARRIED_ENTRY).decode("utf-8"))


def _split_points(model: Any) -> tuple[Any, Any, Any]:
    """(feature tensor, pre-softmax tensor or None, final layer) in the model's own graph.

    The feature map is the output of the last top-level layer with a 4-D output; a nested base model
    (Xception) is such a layer, and its output in the *outer* graph is taken from its call node because
    ``base.output`` belongs to the base's inner graph.
    """
    import keras

    target = None
    for layer in reversed(model.layers):
        out = layer._inbound_nodes[-1].output_tensors[0] if isinstance(layer, keras.Model) else layer.output
        if len(out.shape) == 4:
            target = out
            break
    if target is None:
        raise ValueError("the model has no 4-D feature map to explain")
    last = model.layers[-1]
    activation = getattr(getattr(last, "activation", None), "__name__", "")
    if activation == "softmax":
        return target, last.input, last
    return target, None, last


def _cam(feats: Any, grads: Any, size: int) -> Any:
    """Grad-CAM of one scan: channel weights are the spatially pooled gradients, then ReLU(weighted sum),
    resized to the input size (normalised by the caller, outside the timed inference)."""
    import tensorflow as tf

    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * feats, axis=-1))[0]
    return tf.image.resize(cam[..., None], (size, size), method="bilinear")[..., 0]


class KerasGradCam:
    """Keras fp32 classification plus tape Grad-CAM of the predicted class's logit, per scan, in one style."""

    def __init__(self, path: str | Path, threads: int | None = None, style: str = "compiled"):
        import tensorflow as tf

        if style not in STYLES:
            raise ValueError(f"Keras reference style {style!r} is not one of {', '.join(STYLES)}")
        if threads:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(threads)
                tf.config.threading.set_inter_op_parallelism_threads(threads)
            except RuntimeError:  # TensorFlow already ran in this process (not in a worker): keep its pools
                pass
        import keras

        self.path = Path(path)
        carried = read_carried(self.path)
        self.labels = [str(x) for x in carried["labels"]]
        self.size, self.channels = int(carried["input_size"]), int(carried["channels"])
        self.pipeline = str(carried.get("pipeline", "mri-crop-v1"))
        norm = str(carried.get("preprocess", "none")).lower()
        if norm not in NORMALISATIONS:
            raise ValueError(f"{self.path}: preprocess {norm!r} is not one of {', '.join(NORMALISATIONS)}")
        self.offset, self.scale = NORMALISATIONS[norm]
        self.model_name = f"{carried.get('name', self.path.stem)} (keras, {style})"
        self.model_sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()
        self.backend, self.backend_version = "keras", f"{keras.__version__} (tensorflow {tf.__version__})"
        self.model = keras.models.load_model(str(self.path), compile=False)
        features, pre_softmax, last = _split_points(self.model)
        head_in = pre_softmax if pre_softmax is not None else self.model.output
        self.grad_model = keras.Model(self.model.input, [features, head_in])
        self._kernel = last.kernel if pre_softmax is not None and hasattr(last, "kernel") else None
        self._bias = last.bias if self._kernel is not None and getattr(last, "use_bias", False) else None
        self._softmax = pre_softmax is not None
        self._infer = self._compiled_step() if style == "compiled" else self._predict_then_tape

    def _logits(self, head: Any) -> Any:
        """Pre-softmax scores from the grad model's second output (a Dense input needs its kernel applied)."""
        import tensorflow as tf

        if self._kernel is None:
            return head
        return tf.matmul(head, self._kernel) + (0.0 if self._bias is None else self._bias)

    def _compiled_step(self) -> Any:
        """``compiled`` style: forward + tape + CAM in one traced graph; probabilities come from the same pass."""
        import tensorflow as tf

        @tf.function(reduce_retracing=True)
        def step(x):
            with tf.GradientTape() as tape:
                feats, head = self.grad_model(x, training=False)
                logits = self._logits(head)
                probs = tf.nn.softmax(logits) if self._softmax else logits
                score = tf.gather(logits[0], tf.argmax(probs[0]))
            grads = tape.gradient(score, feats)
            return probs[0], _cam(feats, grads, self.size)

        def infer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            probs, cam = step(x)
            return probs.numpy(), cam.numpy()

        return infer

    def _predict_then_tape(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``predict`` style, as in the keras.io example and the studies: classify with ``model.predict``,
        then an eager tape over the grad model for the predicted class's pre-softmax score."""
        import tensorflow as tf

        probs = self.model.predict(x, verbose=0)[0]
        top = int(np.argmax(probs))
        with tf.GradientTape() as tape:
            feats, head = self.grad_model(x)
            score = self._logits(head)[:, top]
        grads = tape.gradient(score, feats)
        return probs, _cam(feats, grads, self.size).numpy()

    def classify(self, source: str | Path) -> KerasResult:
        """Decode, prepare, classify + tape Grad-CAM (``invoke``), normalise the heatmap; stage timings in ms."""
        t0 = time.perf_counter()
        image = decode(source)
        t1 = time.perf_counter()
        x = prepare(image, self.size, self.channels, self.pipeline).astype(np.float32)
        x = (x * self.scale + self.offset)[None]
        t2 = time.perf_counter()
        probs, cam = self._infer(x)
        t3 = time.perf_counter()
        peak = float(cam.max())
        heatmap = cam / peak if peak > 0 else np.zeros_like(cam)
        top = int(np.argmax(probs))
        result_probs = {label: float(p) for label, p in zip(self.labels, probs)}
        t4 = time.perf_counter()
        ms = lambda a, b: (b - a) * 1000.0  # noqa: E731
        timings = {"decode": ms(t0, t1), "preprocess": ms(t1, t2), "invoke": ms(t2, t3),
                   "postprocess": ms(t3, t4), "total": ms(t0, t4)}
        return KerasResult(self.labels[top], result_probs, heatmap, timings, self.model_name,
                           self.model_sha256, self.backend, self.backend_version)
