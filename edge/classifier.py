"""Classify a scan with one interpreter invoke that yields both the class probabilities and the Grad-CAM heatmap.

The model file carries everything needed to use it (labels, input size, preprocessing pipeline, output
names), so a :class:`Classifier` needs only a model name or path. Outputs are found by their signature names
(``probabilities``, ``heatmap``, ``features``), never by position, because converters reorder outputs freely.
The same invoke feeds the input gate (`edge.gate`): a scan that cannot be a brain-MRI slice is refused, one
unlike the training data is referred, and neither result is a verdict (``Result.status``).

A :class:`Classifier` holds one interpreter and is not thread-safe; use one per thread.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Any

import numpy as np

from .backend import load_interpreter
from .decode import Frame, Source, describe, iter_decoded
from .errors import InputError, ModelError
from .gate import OUT_OF_DISTRIBUTION, OK, OodGate, check_header, check_image, message, status_of
from .model_file import ModelSpec, read_spec
from .preprocess import PIPELINES, Geometry, heatmap_to_image, prepare_with_geometry
from .registry import resolve

SIGNATURE = "serving_default"
TIMING_KEYS = ("decode", "preprocess", "invoke", "postprocess", "total")


@dataclass(frozen=True)
class Result:
    """One classified scan (or one DICOM frame).

    ``status`` is ``"ok"`` when ``label`` is a verdict; ``"refused"`` (the input cannot be a brain-MRI slice)
    or ``"refer"`` (unlike the scans the model was trained on) when it is not, with ``reason`` a code of
    :data:`edge.gate.REASONS` and :attr:`message` its sentence. ``label``, ``confidence``, ``probabilities``
    and ``heatmap`` are then the network's raw output, kept for audit and research, never to be shown as a
    finding. ``ood_score`` is the gate's distance over its threshold (above 1: referred), None for a model
    without a gate. ``features`` are what the score was computed from: the feature map the model's gate
    names (custom-cnn ``b2_out``, xception ``add_3``), averaged over its positions.

    ``heatmap`` is the model's Grad-CAM of the predicted class in model space (float32 [S, S], 0..1), or
    None for a model without a heatmap output; :meth:`heatmap_on_image` maps it onto ``image``, the decoded
    scan. ``timings`` are milliseconds; each frame of a multi-frame file has its own decode time (the first
    frame's includes reading the file).
    """

    label: str
    confidence: float
    probabilities: dict[str, float]
    timings: dict[str, float]
    model: str
    model_sha256: str
    backend: str
    backend_version: str
    source: str
    frame: str = ""
    heatmap: np.ndarray | None = field(default=None, repr=False, compare=False)
    image: np.ndarray | None = field(default=None, repr=False, compare=False)
    geometry: Geometry | None = field(default=None, repr=False, compare=False)
    features: np.ndarray | None = field(default=None, repr=False, compare=False)
    status: str = OK
    reason: str | None = None
    ood_score: float | None = None

    @property
    def message(self) -> str | None:
        """The plain sentence for :attr:`reason` ("...: referred, no verdict"), None for a verdict."""
        return message(self.reason)

    def top_k(self, k: int = 3) -> list[tuple[str, float]]:
        """The ``k`` most probable labels, best first (ties keep label order)."""
        ranked = sorted(self.probabilities.items(), key=lambda item: -item[1])
        return ranked[:max(0, k)]

    def heatmap_on_image(self) -> np.ndarray | None:
        """The heatmap on the decoded image's pixel grid (float32 [H, W]), 0 where the model saw nothing."""
        if self.heatmap is None or self.geometry is None:
            return None
        return heatmap_to_image(self.heatmap, self.geometry)

    def to_dict(self, top_k: int = 3) -> dict[str, Any]:
        """A JSON-ready summary (no arrays): what a log line or an API response needs. Without a verdict
        (status refer or refused) there is no label, confidence, probability or heatmap in it."""
        out: dict[str, Any] = {"source": self.source}
        if self.frame:
            out["frame"] = self.frame
        verdict = self.status == OK
        out.update({
            "label": self.label if verdict else None,
            "confidence": round(self.confidence, 6) if verdict else None,
            "top_k": [{"label": label, "probability": round(p, 6)} for label, p in self.top_k(top_k)] if verdict else [],
            "probabilities": {label: round(p, 6) for label, p in self.probabilities.items()} if verdict else None,
            "ood_score": None if self.ood_score is None else round(self.ood_score, 4),
            "reason": self.reason,
            "message": self.message,
            "timings_ms": {key: round(value, 3) for key, value in self.timings.items()},
            "model": {"name": self.model, "sha256": self.model_sha256},
            "backend": {"name": self.backend, "version": self.backend_version},
            "has_heatmap": verdict and self.heatmap is not None,
        })
        return out

    def to_json(self, top_k: int = 3) -> str:
        """:meth:`to_dict` as one line of JSON."""
        return json.dumps(self.to_dict(top_k), ensure_ascii=False)


class Classifier:
    """A loaded model ready to classify scans: ``Classifier().classify("scan.png").label``.

    ``model`` is a bundled model name or a path to a .tflite file (None: the default bundled model),
    ``threads`` the interpreter's thread count (None: the backend's default), ``backend`` forces
    ``litert``, ``tflite_runtime`` or ``tensorflow`` (None: the first installed).
    """

    def __init__(self, model: str | Path | None = None, threads: int | None = None, backend: str | None = None):
        self.path = resolve(model)
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise ModelError(f"{self.path}: cannot read the model ({exc.strerror or exc})") from None
        try:
            self.spec: ModelSpec = read_spec(data, self.path)
            _check_spec(self.spec)
            self._interpreter, self.backend = load_interpreter(data, threads, backend)
            self._bind()
            self.gate = OodGate.from_metadata(self.spec.metadata) if "features" in self._outputs else None
            if self.gate is not None and self.gate.width != self._features_width:
                raise ModelError(f"the gate expects {self.gate.width} features, the model outputs "
                                 f"{self._features_width}")
        except ModelError as exc:
            raise ModelError(f"{self.path}: {exc}") from None
        self.threads = threads
        self._failed: ModelError | None = None

    @property
    def labels(self) -> tuple[str, ...]:
        return self.spec.labels

    @property
    def has_heatmap(self) -> bool:
        return self._heatmap is not None

    def classify(self, x: Source, *, frame: int = 0, window: tuple[float, float] | None = None) -> Result:
        """Classify one scan: a path, encoded bytes, a PIL image or a numpy array (DICOM: frame ``frame``)."""
        return self.classify_frames(x, frame=frame, window=window)[0]

    def classify_frames(self, x: Source, *, frame: int | None = None,
                        window: tuple[float, float] | None = None) -> list[Result]:
        """Classify every frame of a multi-frame DICOM (``frame=None``) or one; other inputs give one result."""
        return list(self.classify_each(x, frame=frame, window=window))

    def classify_each(self, x: Source, *, frame: int | None = None,
                      window: tuple[float, float] | None = None) -> Iterator[Result]:
        """`classify_frames` one frame at a time: each result is yielded before the next frame is decoded, so
        a caller that lets each go holds one frame, however many the file has. A bad frame raises when it is
        reached, after the good ones before it."""
        source = describe(x)
        frames = iter_decoded(x, frame=frame, window=window)
        while True:
            start = perf_counter()
            try:
                decoded = next(frames)
            except StopIteration:
                return
            yield self._classify_image(decoded, source, (perf_counter() - start) * 1000.0)

    def classify_input(self, pixels: np.ndarray) -> Result:
        """Classify an already-prepared model input, uint8 [S, S, C] as :func:`edge.preprocess.prepare` returns it.

        For callers that alter what the model sees (deletion/insertion tests of the heatmap, occlusion)
        and so must skip decoding and preprocessing. The result carries no image or geometry, and only the
        feature score of the gate applies (the image checks need the decoded scan).
        """
        pixels = np.asarray(pixels)
        expected = (self.spec.input_size, self.spec.input_size, self.spec.channels)
        if pixels.dtype != np.uint8 or pixels.shape != expected:
            raise InputError(f"a prepared model input must be uint8 {list(expected)}, got "
                             f"{pixels.dtype.name} {list(pixels.shape)}")
        return self._run(pixels, perf_counter(), 0.0, "<model input>", "", None, None, None)

    def _classify_image(self, decoded: Frame, source: str, decode_ms: float) -> Result:
        t0 = perf_counter()
        spec = self.spec
        image = decoded.image
        refusal = check_header(decoded.modality, decoded.body_part) or check_image(image)
        pixels, geometry = prepare_with_geometry(image, spec.input_size, spec.channels, spec.pipeline)
        return self._run(pixels, t0, decode_ms, source, decoded.suffix, image, geometry, refusal)

    def _run(self, pixels: np.ndarray, t0: float, decode_ms: float, source: str, suffix: str,
             image: np.ndarray | None, geometry: Geometry | None, refusal: str | None) -> Result:
        """Invoke once and decide the status: a refusal of the image checks first, then the feature score."""
        tensor = self._quantize(pixels[None])
        t1 = perf_counter()
        raw = self._invoke(tensor)
        t2 = perf_counter()
        probs = _dequantize(raw["probabilities"], self._outputs["probabilities"]).reshape(-1).astype(np.float64)
        heatmap = None
        if "heatmap" in raw:
            heatmap = _dequantize(raw["heatmap"], self._outputs["heatmap"]).reshape(self._heatmap_shape)
            heatmap = heatmap.astype(np.float32, copy=False)
        features = ood_score = None
        if "features" in raw:
            features = _features(raw["features"], self._outputs["features"])
            if self.gate is not None:
                ood_score = self.gate.score(features)
        reason = refusal or (OUT_OF_DISTRIBUTION if ood_score is not None and ood_score > 1.0 else None)
        best = int(np.argmax(probs))
        t3 = perf_counter()
        timings = {
            "decode": decode_ms,
            "preprocess": (t1 - t0) * 1000.0,
            "invoke": (t2 - t1) * 1000.0,
            "postprocess": (t3 - t2) * 1000.0,
            "total": decode_ms + (t3 - t0) * 1000.0,
        }
        return Result(
            label=self.spec.labels[best],
            confidence=float(probs[best]),
            probabilities={label: float(p) for label, p in zip(self.spec.labels, probs)},
            timings=timings,
            model=self.spec.name,
            model_sha256=self.spec.sha256,
            backend=self.backend.name,
            backend_version=self.backend.version,
            source=source,
            frame=suffix,
            heatmap=heatmap,
            image=image,
            geometry=geometry,
            features=features,
            status=status_of(reason),
            reason=reason,
            ood_score=ood_score,
        )

    def _bind(self) -> None:
        """Find the input and the outputs by signature name, and check them against the metadata."""
        interp = self._interpreter
        signatures = interp.get_signature_list()
        if SIGNATURE in signatures:
            key = SIGNATURE
        elif len(signatures) == 1:
            key = next(iter(signatures))
        else:
            raise ModelError(f"no {SIGNATURE!r} signature (found: {', '.join(signatures) or 'none'})")
        runner = interp.get_signature_runner(key)
        inputs, outputs = runner.get_input_details(), runner.get_output_details()
        if len(inputs) != 1:
            raise ModelError(f"expected one input, the signature has {len(inputs)}")
        self._input_name, self._input = next(iter(inputs.items()))
        size, channels = self.spec.input_size, self.spec.channels
        if list(self._input["shape"]) != [1, size, size, channels]:
            raise ModelError(f"input shape {list(self._input['shape'])} disagrees with the metadata "
                             f"({size}x{size}x{channels})")
        if self._input["dtype"] not in (np.uint8, np.int8, np.float32):
            raise ModelError(f"unsupported input type {np.dtype(self._input['dtype']).name}")
        names = self.spec.output_names
        self._outputs: dict[str, dict[str, Any]] = {}
        prob_name = names.get("probabilities", "probabilities")
        if prob_name not in outputs:
            raise ModelError(f"no {prob_name!r} output (found: {', '.join(outputs)})")
        self._outputs["probabilities"] = outputs[prob_name]
        if int(np.prod(outputs[prob_name]["shape"])) != len(self.spec.labels):
            raise ModelError(f"{prob_name!r} has shape {list(outputs[prob_name]['shape'])} "
                             f"but the metadata lists {len(self.spec.labels)} labels")
        feat_name = names.get("features", "features")
        if feat_name in outputs:
            self._outputs["features"] = outputs[feat_name]
            shape = [int(d) for d in outputs[feat_name]["shape"]]
            if len(shape) not in (2, 4) or shape[0] != 1:
                raise ModelError(f"{feat_name!r} has shape {shape}, expected [1, D] or a [1, h, w, D] map")
            self._features_width = shape[-1]
        heat_name = names.get("heatmap", "heatmap")
        self._heatmap = outputs.get(heat_name)
        if self._heatmap is not None:
            self._outputs["heatmap"] = self._heatmap
            self._heatmap_shape = (size, size)
            if int(np.prod(self._heatmap["shape"])) != size * size:
                raise ModelError(f"{heat_name!r} has shape {list(self._heatmap['shape'])}, "
                                 f"expected [1, {size}, {size}]")
        # A single-signature model runs on the primary subgraph: drive it by tensor index (no per-call
        # dict building or re-allocation). Otherwise the signature runner knows which subgraph to run.
        primary = {(d["index"], d["name"]) for d in interp.get_input_details() + interp.get_output_details()}
        wanted = [self._input] + list(self._outputs.values())
        self._runner = None if all((d["index"], d["name"]) in primary for d in wanted) else runner

    def _invoke(self, tensor: np.ndarray) -> dict[str, np.ndarray]:
        """Run the model once. A model that loads but cannot run is a :class:`ModelError`, not the scan's
        fault; it is raised again without another invoke, because the interpreter's error reporter keeps
        every earlier message and each new one would repeat them all."""
        if self._failed is not None:
            raise self._failed
        try:
            return self._invoke_raw(tensor)
        except (RuntimeError, ValueError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            self._failed = ModelError(f"{self.path}: the model loads but fails to run ({reason})")
            raise self._failed from None

    def _invoke_raw(self, tensor: np.ndarray) -> dict[str, np.ndarray]:
        if self._runner is not None:
            raw = self._runner(**{self._input_name: tensor})
            names = self.spec.output_names
            return {role: raw[names.get(role, role)] for role in self._outputs}
        interp = self._interpreter
        interp.set_tensor(self._input["index"], tensor)
        interp.invoke()
        return {role: interp.get_tensor(details["index"]) for role, details in self._outputs.items()}

    def _quantize(self, pixels: np.ndarray) -> np.ndarray:
        """Prepared uint8 pixels -> the input tensor's type, using its quantization when it has one."""
        dtype = self._input["dtype"]
        if dtype == np.float32:
            return pixels.astype(np.float32)
        scale, zero_point = self._input["quantization"]
        if scale == 0:  # an integer input without quantization takes raw pixels (int8: shifted to centre)
            return pixels if dtype == np.uint8 else (pixels.astype(np.int16) - 128).astype(np.int8)
        if dtype == np.uint8 and scale == 1.0 and zero_point == 0:
            return pixels
        info = np.iinfo(dtype)
        q = np.round(pixels.astype(np.float32) / np.float32(scale)) + zero_point
        return np.clip(q, info.min, info.max).astype(dtype)


def _features(value: np.ndarray, details: dict[str, Any]) -> np.ndarray:
    """The features output as one float32 vector [D]: a [1, h, w, D] feature map is averaged over its positions
    (a GAP) before it is dequantized, which is affine and so commutes with the mean (one multiply per channel,
    not one per value)."""
    pooled = value.mean(axis=(1, 2), dtype=np.float32) if value.ndim == 4 else value.astype(np.float32)
    scale, zero_point = details["quantization"]
    if np.issubdtype(value.dtype, np.integer) and scale:
        pooled = (pooled - zero_point) * np.float32(scale)
    return pooled.reshape(-1)


def _dequantize(value: np.ndarray, details: dict[str, Any]) -> np.ndarray:
    scale, zero_point = details["quantization"]
    if np.issubdtype(value.dtype, np.integer) and scale:
        return (value.astype(np.float32) - zero_point) * np.float32(scale)
    return value.astype(np.float32, copy=False)


def _check_spec(spec: ModelSpec) -> None:
    if spec.pipeline not in PIPELINES:
        known = ", ".join(PIPELINES)
        raise ModelError(f"unknown preprocessing pipeline {spec.pipeline!r} (this runtime knows {known})")
    if spec.channels not in (1, 3):
        raise ModelError(f"input channels must be 1 or 3, the metadata says {spec.channels}")
    if spec.input_size < 1 or not spec.labels:
        raise ModelError("metadata lacks an input size or labels")

