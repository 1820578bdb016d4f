"""Convert a Keras classifier into the runtime's model file: int8 TFLite, Grad-CAM head, embedded metadata.

The steps, each a function here: resolve what the model needs (labels, size, channels, pipeline,
normalisation) from flags, carried metadata and the model itself; build the serving graph
(`convert.gradcam_head`); calibrate on class-balanced prepared images (`convert.calibration`); quantize
with per-channel int8 weights and int8 activations, keeping only the final Grad-CAM combination
(a few thousand operations) in float; refuse any non-builtin op; embed the metadata; optionally write
a float32 twin and a parity report (`convert.parity`).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import re
import importlib.metadata
import sys
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from convert import calibration, equalise as equalisation, gradcam_head, keras_io, normalisation, repair
from convert.metadata import embed_metadata
from edge.model_file import SCHEMA_VERSION, read_spec
from edge.preprocess import PIPELINES

TOOL = "edge-convert"
#: Held-out images the parity report draws at most.
HELDOUT_IMAGES = 200
#: Calibration images whose per-channel activation maxima drive cross-layer equalisation.
EQUALISE_IMAGES = 64
#: Ops whose float outputs are expected in the int8 model: the uint8 -> float cast of the input, the
#: dequantization of the outputs, and the Grad-CAM combination (`gradcam_head.FLOAT_SCOPE`).
EXPECTED_FLOAT_OPS = ("CAST", "DEQUANTIZE", "MEAN", "BATCH_MATMUL", "RELU", "RESHAPE", "RESIZE_BILINEAR",
                      "REDUCE_MAX", "SELECT_V2", "DIV")


@dataclass(frozen=True)
class Settings:
    """Everything about the model's input and output that is not in its weights."""

    name: str
    labels: tuple[str, ...]
    input_size: int
    channels: int
    pipeline: str
    preprocess: str
    norm: normalisation.Normalisation


@dataclass
class ConversionResult:
    """What a conversion wrote and measured; ``report`` is the parity report when one was asked for."""

    out: Path
    metadata: dict[str, Any]
    ops: dict[str, int]
    float_ops: dict[str, int]
    calibration: dict[str, Any]
    settings: Settings
    fp32_out: Path | None = None
    target_layer: str | None = None
    feature_shape: tuple[int, int, int] | None = None
    #: The earlier layer fused into the heatmap (LayerCAM), or None for Grad-CAM at the target alone.
    fine_layer: str | None = None
    report: dict[str, Any] | None = None
    report_files: list[Path] = field(default_factory=list)
    #: The held-out agreement check and what the repair did (`convert.agreement`); None when not checked.
    repair: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"out": str(self.out), "fp32_out": str(self.fp32_out) if self.fp32_out else None,
                "name": self.settings.name, "labels": list(self.settings.labels),
                "input_size": self.settings.input_size, "channels": self.settings.channels,
                "pipeline": self.settings.pipeline, "preprocess": self.settings.preprocess,
                "target_layer": self.target_layer, "fine_layer": self.fine_layer,
                "feature_shape": list(self.feature_shape) if self.feature_shape else None,
                "size_bytes": self.out.stat().st_size, "ops": self.ops, "float_ops": self.float_ops,
                "calibration": self.calibration, "weights": self.metadata.get("weights"), "report": self.report,
                "report_files": [str(p) for p in self.report_files], "repair": self.repair}


def package_version() -> str:
    try:
        return importlib.metadata.version("edge-mri")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def source_info(path: Path | None) -> dict[str, Any]:
    """File name, sha256 and format of the model that was converted (a SavedModel folder hashed whole)."""
    if path is None:
        return {"file": None, "sha256": None, "format": "keras-object"}
    digest = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(f.relative_to(path)).encode())
            digest.update(f.read_bytes())
        fmt = "savedmodel"
    else:
        digest.update(path.read_bytes())
        fmt = {".keras": "keras", ".h5": "h5", ".hdf5": "h5"}.get(path.suffix.lower(), path.suffix.lstrip("."))
    return {"file": path.name, "sha256": digest.hexdigest(), "format": fmt}


def _carried_norm(value: Any) -> str | None:
    """A normalisation spec string from carried metadata (a name, or a dict with name/mean/std)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        if value.get("name") in normalisation.NAMES:
            return value["name"]
        if "mean" in value and "std" in value:
            return "mean={};std={}".format(",".join(map(str, value["mean"])), ",".join(map(str, value["std"])))
    raise ValueError(f"carried normalisation {value!r} is neither a name nor mean/std")


def resolve_settings(model: Any, carried: dict[str, Any] | None, *, source: Path | None,
                     calibration_dir: Path, labels: Sequence[str] | None, preprocess: str | None,
                     input_size: int | None, pipeline: str | None, name: str | None) -> Settings:
    """Flags first, then the metadata our trained models carry, then what the model itself says."""
    carried = carried or {}
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4:
        raise ValueError(f"model input has shape {shape}; an image input (batch, height, width, channels) is needed")
    _, height, width, channels = shape
    if channels not in (1, 3):
        raise ValueError(f"model input has {channels} channels; only 1 (grayscale) or 3 (RGB) are supported")
    size = input_size or carried.get("input_size")
    if height is not None or width is not None:
        if height != width:
            raise ValueError(f"model input is {height}x{width}; the runtime feeds square images")
        if input_size is not None and input_size != height:
            raise ValueError(f"--input-size {input_size} differs from the model's fixed input size {height}")
        size = height
    if size is None:
        raise ValueError("the model accepts any input size; pass --input-size")
    num_classes = int(model.outputs[0].shape[-1])
    resolved_labels = _resolve_labels(labels, carried.get("labels"), calibration_dir, num_classes)
    spec = preprocess or _carried_norm(carried.get("preprocess"))
    if spec is None:
        raise ValueError("this model carries no normalisation; pass --preprocess (xception/tf, 0-1, caffe, torch, "
                         "none or mean=..;std=..) as it was trained")
    norm = normalisation.parse(spec, int(channels))
    chosen_pipeline = pipeline or carried.get("pipeline") or "resize"
    if chosen_pipeline not in PIPELINES:
        raise ValueError(f"unknown preprocessing pipeline {chosen_pipeline!r}; known: {', '.join(PIPELINES)}")
    model_name = name or carried.get("name") or (source.stem if source else model.name)
    return Settings(name=str(model_name), labels=resolved_labels, input_size=int(size), channels=int(channels),
                    pipeline=chosen_pipeline, preprocess=spec, norm=norm)


def _resolve_labels(given: Sequence[str] | None, carried: Sequence[str] | None, calibration_dir: Path,
                    num_classes: int) -> tuple[str, ...]:
    """Labels from the flag, the carried metadata, or the calibration folder's class subfolders
    (alphabetical, as Keras' image_dataset_from_directory numbers them), else class_0..class_N-1."""
    if given is not None:
        labels = tuple(given)
        if len(labels) != num_classes:
            raise ValueError(f"--labels names {len(labels)} classes but the model outputs {num_classes}")
        return labels
    if carried:
        if len(carried) != num_classes:
            raise ValueError(f"the model carries {len(carried)} labels but outputs {num_classes} classes")
        return tuple(str(x) for x in carried)
    folders = [g for g in calibration.list_images(calibration_dir) if g != calibration.UNLABELLED]
    if len(folders) == num_classes:
        return tuple(folders)
    return tuple(f"class_{i}" for i in range(num_classes))


def list_ops(tflite_model: bytes) -> tuple[dict[str, int], dict[str, int], list[str]]:
    """(op counts, counts of ops computing in float, custom op names) of a .tflite flatbuffer."""
    from tensorflow.lite.python import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    model = schema.Model.GetRootAsModel(tflite_model, 0)
    codes = []
    custom = []
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        if builtin == schema.BuiltinOperator.CUSTOM:
            label = (code.CustomCode() or b"?").decode("utf-8", "replace")
            custom.append(label)
            codes.append(f"CUSTOM:{label}")
        else:
            codes.append(names.get(builtin, f"BUILTIN_{builtin}"))
    ops: Counter[str] = Counter()
    float_ops: Counter[str] = Counter()
    for s in range(model.SubgraphsLength()):
        graph = model.Subgraphs(s)
        for o in range(graph.OperatorsLength()):
            op = graph.Operators(o)
            opname = codes[op.OpcodeIndex()]
            ops[opname] += 1
            outs = [graph.Tensors(op.Outputs(j)).Type() for j in range(op.OutputsLength()) if op.Outputs(j) >= 0]
            if schema.TensorType.FLOAT32 in outs:
                float_ops[opname] += 1
    return dict(sorted(ops.items())), dict(sorted(float_ops.items())), sorted(set(custom))


def check_builtin(tflite_model: bytes) -> tuple[dict[str, int], dict[str, int]]:
    """The op lists; raises ValueError when any op is custom or Flex (the device has only builtins)."""
    ops, float_ops, custom = list_ops(tflite_model)
    if custom:
        raise ValueError(f"the converted model needs non-builtin ops ({', '.join(custom)}); "
                         f"the device runtime has only TFLite builtins")
    return ops, float_ops


def export_saved_model(module: tf.Module, model: Any, directory: Path) -> Path:
    """Write ``module.serve`` as the ``serving_default`` signature of a SavedModel.

    Keras's ExportArchive (rather than ``tf.saved_model.save``) is what lets the TFLite converter freeze
    Keras 3 variables into constants; with a plain save they stay resource variables and calibration fails.
    """
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", module.serve)
    archive.write_out(str(directory), verbose=False)
    return directory


def _converter(saved_model: Path) -> tf.lite.TFLiteConverter:
    return tf.lite.TFLiteConverter.from_saved_model(str(saved_model), signature_keys=["serving_default"])


def to_float32(saved_model: Path) -> bytes:
    """Float32 TFLite of the same graph (builtin ops only)."""
    converter = _converter(saved_model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    return converter.convert()


def _op_names(calibrated: bytes) -> list[tuple[list[str], list[str]]]:
    """(output tensor names, input tensor names) of every op; the names carry Keras layer name scopes."""
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.Model.GetRootAsModel(calibrated, 0)
    found = []
    for s in range(model.SubgraphsLength()):
        graph = model.Subgraphs(s)
        name = lambda i: graph.Tensors(i).Name().decode("utf-8", "replace")
        for o in range(graph.OperatorsLength()):
            op = graph.Operators(o)
            found.append(([name(op.Outputs(j)) for j in range(op.OutputsLength()) if op.Outputs(j) >= 0],
                          [name(op.Inputs(j)) for j in range(op.InputsLength()) if op.Inputs(j) >= 0]))
    return found


def float_nodes(calibrated: bytes, float_layers: Sequence[str] = ()) -> list[str]:
    """Output tensor names of the ops to keep in float: the Grad-CAM combination, and the ops of the Keras
    layers named in ``float_layers``.

    An op is in `gradcam_head.FLOAT_SCOPE` when an output or input name carries the scope (the last op's
    output is renamed to the signature's ``heatmap``, so only its inputs tell). A Keras layer's ops carry
    its name as a path component, possibly with a ``_N`` suffix (``.../block14_sepconv2_1/...``). A layer
    name that matches no op is an error, so a typo cannot silently leave everything int8.
    """
    ops = _op_names(calibrated)
    nodes = [n for outs, ins in ops if any(gradcam_head.FLOAT_SCOPE in x for x in outs + ins) for n in outs]
    for layer in float_layers:
        pattern = re.compile(rf"(^|[/;]){re.escape(layer)}(_\d+)?(/|;|$)")
        matched = [n for outs, _ in ops for n in outs if pattern.search(n)]
        if not matched:
            raise ValueError(f"float layer {layer!r} matches no op of the converted graph")
        nodes.extend(matched)
    return sorted(set(nodes))


def to_int8(saved_model: Path, images: np.ndarray, float_ops: Sequence[str] = (),
            float_layers: Sequence[str] = ()) -> bytes:
    """Full-integer TFLite: int8 activations, per-channel int8 weights, uint8 input, float32 outputs.

    Calibration runs first on its own (`calibrate`), then TensorFlow's MLIR quantizer is applied with a
    denylist (`quantize`). That is the documented selective-quantization route (it is what
    ``tf.lite.experimental.QuantizationDebugger`` does): the Grad-CAM combination stays float, and so do
    the op types named in ``float_ops`` (e.g. ``["DEPTHWISE_CONV_2D"]``) and the ops of the Keras layers
    named in ``float_layers`` (e.g. ``["block14_sepconv2"]``), all with builtin float kernels.
    """
    return quantize(calibrate(saved_model, images), float_ops, float_layers)


def calibrate(saved_model: Path, images: np.ndarray) -> bytes:
    """The float model with every tensor's calibrated range recorded, not yet quantized.

    Kept apart from `quantize` because quantizing again with another denylist (the repair loop,
    `convert.repair`) needs no new calibration: the ranges do not depend on what stays float.
    """
    if len(images) == 0:
        raise ValueError("no calibration images")
    converter = _converter(saved_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    batch = np.asarray(images, np.uint8)
    converter.representative_dataset = lambda: ({gradcam_head.INPUT_NAME: img[None]} for img in batch)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.float32
    converter._experimental_calibrate_only = True
    with warnings.catch_warnings():  # the calibrator uses tf.lite.Interpreter internally and says so
        warnings.filterwarnings("ignore", message=r"(?s).*tf\.lite\.Interpreter is deprecated")
        return converter.convert()


def quantize(calibrated: bytes, float_ops: Sequence[str] = (), float_layers: Sequence[str] = (),
             nodes: Sequence[str] = ()) -> bytes:
    """Quantize a calibrated model, keeping in float the Grad-CAM combination, the op types ``float_ops``,
    the ops of the Keras layers ``float_layers`` and the ops whose output tensors are named in ``nodes``."""
    from tensorflow.lite.python.convert import mlir_quantize

    denylisted = sorted(set(float_nodes(calibrated, float_layers)) | set(nodes))
    return mlir_quantize(calibrated, disable_per_channel=False, fully_quantize=False,
                         input_data_type=tf.uint8, output_data_type=tf.float32,
                         denylisted_ops=list(float_ops), denylisted_nodes=denylisted)


def build_metadata(settings: Settings, *, split: gradcam_head.Split | None, source: dict[str, Any],
                   quantization: str, calibration_summary: dict[str, Any],
                   extra_settings: dict[str, Any], fine: tuple[str, list[int]] | None = None) -> dict[str, Any]:
    """The JSON documented in docs/ARCHITECTURE.md ("Model file contract")."""
    s, c = settings.input_size, len(settings.labels)
    outputs: dict[str, Any] = {gradcam_head.PROBABILITIES: {"name": gradcam_head.PROBABILITIES, "shape": [1, c]}}
    if split is not None:
        outputs[gradcam_head.HEATMAP] = {"name": gradcam_head.HEATMAP, "shape": [1, s, s], "class": "predicted",
                                         "range": [0, 1]}
        outputs[gradcam_head.FEATURES] = {"name": gradcam_head.FEATURES, "shape": [1, split.feature_shape[2]],
                                          "layer": f"{split.target_layer} (spatial mean)"}
    return {
        "schema": SCHEMA_VERSION,
        "name": settings.name,
        "labels": list(settings.labels),
        "input": {"size": s, "channels": settings.channels,
                  "colour": "grayscale" if settings.channels == 1 else "rgb",
                  "pipeline": settings.pipeline, "dtype": "uint8"},
        "normalisation": settings.norm.to_json(),
        "outputs": outputs,
        "gradcam": None if split is None else _gradcam_metadata(split, fine),
        "source": source,
        "converter": {"tool": TOOL, "version": package_version(), "tensorflow": tf.__version__,
                      "keras": keras.__version__, "quantization": quantization,
                      "calibration": {k: calibration_summary[k] for k in ("images", "skipped", "per_class")},
                      "settings": extra_settings},
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _gradcam_metadata(split: gradcam_head.Split, fine: tuple[str, list[int]] | None) -> dict[str, Any]:
    """The heatmap's method, layers and grid: Grad-CAM at the target, or LayerCAM of (fine, target)."""
    meta: dict[str, Any] = {"target_layer": split.target_layer, "feature_shape": list(split.feature_shape),
                            "score": "logit"}
    if fine is None:
        return {**meta, "method": "gradcam", "layers": [split.target_layer], "grid": list(split.feature_shape[:2])}
    layer, shape = fine
    return {**meta, "method": "layercam", "layers": [layer, split.target_layer], "grid": list(shape[:2]),
            "fine_layer": layer, "fine_shape": list(shape)}


def progress_bar(enabled: bool, length: int, label: str) -> Any:
    """A click progress bar on stderr, or a stand-in whose ``update`` does nothing."""
    import click

    if enabled:
        return click.progressbar(length=length, label=label, file=sys.stderr)
    return contextlib.nullcontext(SimpleNamespace(update=lambda _n: None))


def _parity_report(model: Any, result: ConversionResult, calib: calibration.ImageSet, *,
                   heldout: calibration.ImageSet, heldout_root: Path, report_dir: Path, progress: bool,
                   say: Callable[[str], None]) -> tuple[dict[str, Any], list[Path]]:
    """The first `HELDOUT_IMAGES` held-out images (by default the calibration folder's unused ones) through
    `convert.parity`."""
    from convert import agreement, parity

    settings = result.settings
    heldout = agreement.first(heldout, HELDOUT_IMAGES)
    variants = {"int8": result.out.read_bytes()}
    if result.fp32_out is not None:
        variants["fp32"] = result.fp32_out.read_bytes()
    say(f"parity report on {len(heldout.paths)} held-out images")
    return parity.run_report(model, variants, heldout, labels=settings.labels, norm=settings.norm,
                             target_layer=result.target_layer, fine_layer=result.fine_layer,
                             report_dir=report_dir,
                             heldout_source=str(heldout_root), name=settings.name, progress=progress,
                             fallback=calib if not heldout.paths else None)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def convert_model(model: Any, *, calibration_dir: str | Path, out: str | Path,
                  labels: Sequence[str] | None = None, preprocess: str | None = None,
                  input_size: int | None = None, target_layer: str | None = None, num_calibration: int = 200,
                  also_fp32: bool = False, report_dir: str | Path | None = None,
                  heldout_dir: str | Path | None = None, name: str | None = None, gradcam: bool = True,
                  pipeline: str | None = None, seed: int = 0, float_ops: Sequence[str] = (),
                  float_layers: Sequence[str] = (), equalise: bool = True, agreement: float = repair.TARGET,
                  size_budget: float = repair.SIZE_BUDGET, latency_budget: float = repair.LATENCY_BUDGET,
                  progress: bool = False, gate_data: Sequence[str | Path] = (),
                  fine_layer: str | None = None, log: Callable[[str], None] | None = None) -> ConversionResult:
    """Convert ``model`` (a path to .keras/.h5/SavedModel, or a Keras model) to ``out`` (.tflite).

    ``gradcam=False`` builds the same input pipeline without the Grad-CAM head (only ``probabilities``,
    metadata without ``heatmap`` or ``gradcam``); it exists to measure what the head costs. ``fine_layer``
    (an earlier top-level layer, e.g. ``b2_out``) makes the heatmap a LayerCAM fusion of that layer's
    map with the target's (`convert.gradcam_head.fine_heatmap`): a finer grid that marks where in the
    image the evidence is.

    When int8 costs a model too much agreement (the parity report says), the knobs are: a larger
    ``num_calibration``, another ``seed`` (a different, still deterministic, balanced selection), a
    calibration folder of hand-picked images, and keeping sensitive parts float with builtin kernels:
    ``float_ops`` (TFLite op types such as ``"DEPTHWISE_CONV_2D"``) or ``float_layers`` (Keras layer
    names). Before any of that, ``equalise`` (on by default) rescales the channels between the two halves
    of every depthwise-separable convolution (`convert.equalise`): the float function is unchanged, and
    int8 rounds less where channel ranges differ widely; it does nothing to a model without
    ``SeparableConv2D`` layers. The choices
    are recorded in the metadata's converter settings.

    The input gate (`edge.gate`) is calibrated on the calibration folder and the ``gate_data`` folders
    (e.g. a second source's healthy scans) by `convert.gate_calibration` and embedded; with too few scans
    the model is written without a gate, and ``log`` says so.

    Then the int8 file is checked against the Keras model on held-out images (`convert.agreement`):
    below ``agreement`` top-1 agreement, the fewest ops the quantization debugger ranks worst are kept in
    float (`convert.repair`), within ``size_budget`` and ``latency_budget`` (ratios over the all-int8
    file); at or above it nothing changes. ``agreement=0`` skips the check. With ``report_dir`` the
    per-layer error report (`convert.quant_debug`) is written beside the parity report.

    Raises ValueError (bad settings, an unsupported head, a non-builtin op) or OSError (a model, folder or
    image set that is missing or unreadable; FileNotFoundError when missing).
    """
    if report_dir is not None and not gradcam:
        raise ValueError("a parity report needs the Grad-CAM head (gradcam=True)")
    say = log or (lambda _msg: None)
    source_path: Path | None = None
    carried = None
    if isinstance(model, (str, Path)):
        source_path = Path(model)
        say(f"loading {source_path}")
        try:
            model, carried = keras_io.load_model(source_path)
        except FileNotFoundError:
            raise
        except Exception as exc:  # Keras raises many types for a corrupt or foreign file
            raise OSError(f"{source_path}: cannot load the model ({_first_line(exc)})") from exc
    calibration_dir = Path(calibration_dir)
    out = Path(out)
    settings = resolve_settings(model, carried, source=source_path, calibration_dir=calibration_dir,
                                labels=labels, preprocess=preprocess, input_size=input_size,
                                pipeline=pipeline, name=name)
    with progress_bar(progress, num_calibration, "calibration images") as bar:
        calib = calibration.load_calibration(calibration_dir, size=settings.input_size,
                                             channels=settings.channels, pipeline=settings.pipeline,
                                             count=num_calibration, seed=seed, progress=bar.update)
    for path, why in calib.skipped:
        say(f"skipped unreadable calibration image {path}: {why}")
    equalised = None
    if equalise and equalisation.separable_layers(model):
        if source_path is None:  # never rescale the caller's own object
            model = equalisation.clone(model)
        probe = normalisation.apply(calib.images[:EQUALISE_IMAGES].astype(np.float32), settings.norm)
        equalised = equalisation.equalise(model, probe)
    module, split = gradcam_head.build_module(model, norm=settings.norm, input_size=settings.input_size,
                                              channels=settings.channels, target_layer=target_layer,
                                              gradcam=gradcam, fine_layer=fine_layer)
    fine = None
    if split is not None:
        say(f"Grad-CAM target layer {split.target_layer!r}, feature map {split.feature_shape}")
        if fine_layer:
            fine = (fine_layer, [int(d) for d in model.get_layer(fine_layer).output.shape[1:]])
            say(f"LayerCAM fused with layer {fine_layer!r}, feature map {tuple(fine[1])}")
    summary = calib.summary()
    extra = {"preprocess": settings.preprocess, "target_layer": target_layer, "num_calibration": num_calibration,
             "seed": seed, "per_channel": True, "float_ops": list(float_ops),
             "float_layers": list(float_layers), "gradcam": gradcam, "fine_layer": fine_layer,
             "equalised": equalised.to_json() if equalised else None}
    source = source_info(source_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edge-convert-") as tmp:
        saved = export_saved_model(module, model, Path(tmp) / "saved_model")
        say(f"quantizing to int8 with {summary['images']} calibration images")
        calibrated = calibrate(saved, calib.images)
        int8 = quantize(calibrated, float_ops, float_layers)
        fp32 = to_float32(saved) if also_fp32 else None
    heldout, checked = _check_agreement(model, calibrated, int8, calib, settings, calibration_dir=calibration_dir,
                                        heldout_dir=heldout_dir, report_dir=report_dir, seed=seed,
                                        float_ops=float_ops, float_layers=float_layers, target=agreement,
                                        size_budget=size_budget, latency_budget=latency_budget,
                                        progress=progress, say=say)
    int8 = checked.model
    extra["repair"] = checked.to_json()
    ops, float_counts = check_builtin(int8)
    expected = set(EXPECTED_FLOAT_OPS) | set(float_ops)
    unexpected = [] if float_layers or checked.outcome and checked.outcome.kept else sorted(
        set(float_counts) - expected)
    if unexpected:
        say(f"note: these ops run in float in the int8 model: {', '.join(unexpected)}")
    metadata = build_metadata(settings, split=split, source=source, quantization="int8",
                              calibration_summary=summary, extra_settings=extra, fine=fine)
    int8_file = embed_metadata(int8, metadata)
    metadata = read_spec(int8_file).metadata  # what the file carries, the weights checksum included
    out.write_bytes(int8_file)
    fp32_out = None
    if fp32 is not None:
        check_builtin(fp32)
        fp32_out = out.with_name(out.stem + "_fp32.tflite")
        fp32_meta = dict(metadata, converter=dict(metadata["converter"], quantization="float32"))
        fp32_out.write_bytes(embed_metadata(fp32, fp32_meta))
    if split is not None:
        from convert.gate_retrofit import add_gate

        if add_gate(out, [calibration_dir, *map(Path, gate_data)], say=say) is not None:
            metadata = read_spec(out.read_bytes()).metadata
    result = ConversionResult(out=out, metadata=metadata, ops=ops, float_ops=float_counts, calibration=summary,
                              settings=settings, fp32_out=fp32_out,
                              target_layer=split.target_layer if split else None,
                              feature_shape=split.feature_shape if split else None,
                              fine_layer=fine[0] if fine else None, repair=checked.to_json())
    if report_dir is not None:
        result.report, result.report_files = _parity_report(
            model, result, calib, heldout=heldout, heldout_root=Path(heldout_dir or calibration_dir),
            report_dir=Path(report_dir), progress=progress, say=say)
        result.report_files += checked.report_files
    return result


def _check_agreement(model: Any, calibrated: bytes, int8: bytes, calib: calibration.ImageSet, settings: Settings, *,
                     calibration_dir: Path, heldout_dir: str | Path | None, report_dir: str | Path | None, seed: int,
                     float_ops: Sequence[str], float_layers: Sequence[str], target: float, size_budget: float,
                     latency_budget: float, progress: bool,
                     say: Callable[[str], None]) -> tuple[calibration.ImageSet, Any]:
    """(held-out images, `convert.agreement.Checked`): the agreement check and repair on the held-out set."""
    from convert import agreement as check

    count = max(repair.CHECK_IMAGES if target > 0 else 0, HELDOUT_IMAGES if report_dir is not None else 0)
    with progress_bar(progress and count > 0, count, "held-out images") as bar:
        heldout, source = check.heldout_images(calib, calibration_dir=calibration_dir, heldout_dir=heldout_dir,
                                               size=settings.input_size, channels=settings.channels,
                                               pipeline=settings.pipeline, count=count, seed=seed,
                                               progress=bar.update)
    if target <= 0:
        return heldout, check.Checked(int8, None)
    return heldout, check.check_and_repair(
        model, calibrated, int8, heldout=heldout, heldout_source=source, calib=calib, norm=settings.norm,
        quantize=lambda nodes: quantize(calibrated, float_ops, float_layers, nodes),
        kept_float=float_nodes(calibrated, float_layers), float_ops=float_ops, target=target,
        size_budget=size_budget, latency_budget=latency_budget,
        report_dir=Path(report_dir) if report_dir is not None else None, name=settings.name, seed=seed, say=say)
