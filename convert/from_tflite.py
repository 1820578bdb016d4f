"""Recover a Keras model (custom-cnn or xception) from its converted int8 .tflite file, for re-conversion and
fine-tuning.

Why: trained checkpoints stay out of git, and the Keras file behind the bundled custom-cnn did not survive
the session that trained it. Its int8 file holds everything the network computes: each convolution's
kernel with the batch norm folded in (int8, one scale per output channel), its int32 bias, the dense
layer, and the input normalisation folded into the first convolution. Rebuilding the architecture
(`convert.architectures.custom_cnn`, sized from the file's tensors) with those values dequantized, and each
batch norm as the identity plus the folded bias, gives a float model that computes the int8 model's
function up to activation rounding, and whose weights int8 re-quantizes to the same integers (each
kernel's largest value is exactly 127 steps of its scale). So the heatmap head can be rebuilt
(`edge-convert --fine-layer`) without retraining.

The batch norms are identities with unit moving variance: right for inference and conversion, but
*training* such a model with batch statistics would renormalise every layer; fine-tune with the batch
norms frozen.

Xception's file is read the same way: each separable convolution is a DEPTHWISE_CONV_2D and a 1x1 CONV_2D
(its batch norm folded into the latter; the converter's channel equalisation between the two is
float-equivalent and stays in the recovered kernels), the four residual 1x1 convolutions are told apart by
their widths, and the input normalisation ``(x - mean) / std`` is folded into the first (unpadded)
convolution's kernel and bias, which are unfolded here. Layers are matched by the Keras names the
converter leaves in the tensor names.

    python -m convert.from_tflite edge/models/custom-cnn.tflite --out runs/custom-cnn-recovered.keras
    python -m convert.from_tflite edge/models/xception.tflite --out runs/xception-recovered.keras
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import click
import numpy as np

from edge.cli_common import NonEmptyPath, OneLineCommand, error

PROG = "from_tflite"


def _dequantized(interpreter: Any, details: dict[int, dict[str, Any]], index: int) -> np.ndarray:
    """A constant tensor of the file as float64, per-tensor or per-channel scales applied."""
    value = interpreter.get_tensor(index).astype(np.float64)
    q = details[index]["quantization_parameters"]
    scales, zeros = np.asarray(q["scales"], np.float64), np.asarray(q["zero_points"], np.float64)
    if scales.size == 0:
        return value
    shape = [1] * value.ndim
    shape[q["quantized_dimension"]] = -1
    return (value - zeros.reshape(shape)) * scales.reshape(shape) if scales.size > 1 else (value - zeros[0]) * scales[0]


def _batchnorm_name(conv: str) -> str:
    """The batch norm after a custom-cnn convolution: stem_conv -> stem_bn, bI_convJ -> bI_bnJ,
    bI_short -> bI_short_bn (`convert.architectures.custom_cnn`'s names)."""
    if conv == "stem_conv":
        return "stem_bn"
    return conv + "_bn" if conv.endswith("_short") else conv.replace("conv", "bn")


def _identity_batchnorm(bn: Any, bias: np.ndarray) -> None:
    """A batch norm that adds ``bias`` and does nothing else (its scale is folded into the kernel before it)."""
    ones = np.ones_like(bias, np.float32)
    bn.set_weights([ones, bias.astype(np.float32), np.zeros_like(ones), ones - np.float32(bn.epsilon)])


def recover(model_path: str | Path) -> tuple[Any, dict[str, Any]]:
    """(Keras model, carried metadata for `convert.keras_io.save_model`) of a custom-cnn or xception .tflite
    file.

    Raises ValueError when the file is not such a conversion (other ops, shapes or normalisation).
    """
    from convert.parity import make_interpreter
    from edge.model_file import read_spec

    path = Path(model_path)
    blob = path.read_bytes()
    spec = read_spec(blob, path)
    meta = spec.metadata
    norm = meta.get("normalisation", {})
    name = meta.get("name")
    if name not in ("custom-cnn", "xception") or len(set(norm.get("std", []))) != 1 \
            or len(set(norm.get("mean", []))) != 1:
        raise ValueError(f"{path}: not a custom-cnn or xception conversion (name {name!r})")
    interpreter = make_interpreter(blob)
    interpreter.allocate_tensors()
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()
    build = _custom_cnn if name == "custom-cnn" else _xception
    model = build(path, spec, norm, interpreter, details, ops)
    fc = [op for op in ops if op["op_name"] == "FULLY_CONNECTED"][0]
    model.get_layer("predictions").set_weights(
        [_dequantized(interpreter, details, fc["inputs"][1]).T.astype(np.float32),
         _dequantized(interpreter, details, fc["inputs"][2]).astype(np.float32)])
    carried = {"name": name, "labels": list(spec.labels), "input_size": spec.input_size,
               "channels": spec.channels, "pipeline": spec.pipeline, "preprocess": norm["name"],
               "recovered_from": {"file": path.name, "sha256": spec.sha256,
                                  "weights_sha256": meta.get("weights", {}).get("sha256"),
                                  "source": meta.get("source")}}
    return model, carried


def _custom_cnn(path: Path, spec: Any, norm: dict, interpreter: Any, details: dict, ops: list) -> Any:
    """The custom CNN, sized from the file: convolutions in graph order, the SUB of the mean kept in the
    graph (its first convolution is padded), 1/std folded into the first kernel."""
    import keras

    from convert.architectures import custom_cnn

    convs = [op for op in ops if op["op_name"] == "CONV_2D"]
    dense = [op for op in ops if op["op_name"] == "FULLY_CONNECTED"]
    pools = sum(op["op_name"] == "MAX_POOL_2D" for op in ops)
    if len(convs) < 4 or not dense or pools not in (2, 3):
        raise ValueError(f"{path}: {len(convs)} convolutions, {pools} max-pools: not a custom-cnn graph")
    kernels = [_dequantized(interpreter, details, op["inputs"][1]).transpose(1, 2, 3, 0) for op in convs]
    biases = [_dequantized(interpreter, details, op["inputs"][2]) for op in convs]
    kernels[0] = kernels[0] * norm["std"][0]  # the converter folded 1/std into the first convolution
    model = custom_cnn(spec.input_size, spec.channels, len(spec.labels), width=2 * kernels[0].shape[-1],
                       stride=16 if pools == 3 else 8, last_width=kernels[-1].shape[-1])
    layers = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    if len(layers) != len(kernels):
        raise ValueError(f"{path}: {len(kernels)} convolutions, the architecture has {len(layers)}")
    for layer, kernel, bias in zip(layers, kernels, biases):
        if tuple(layer.kernel.shape) != kernel.shape:
            raise ValueError(f"{path}: kernel {kernel.shape} where {layer.name} has {tuple(layer.kernel.shape)}")
        layer.kernel.assign(kernel.astype(np.float32))
        _identity_batchnorm(model.get_layer(_batchnorm_name(layer.name)), bias)
    return model


def _consumer(layer: Any) -> Any:
    """The layer that takes ``layer``'s output (a convolution's batch norm)."""
    return layer._outbound_nodes[0].operation


def _xception(path: Path, spec: Any, norm: dict, interpreter: Any, details: dict, ops: list) -> Any:
    """Xception at the file's input size: kernels matched to Keras layers by the names in the tensor names
    (separable and block-1 convolutions) or by width (the residual convolutions); the input normalisation
    unfolded from the first convolution."""
    import keras

    from convert.architectures import xception

    model, base = xception(spec.input_size, len(spec.labels), None)
    by_name = {layer.name: layer for layer in base.layers}
    residual = {layer.kernel.shape[-1]: layer for layer in base.layers
                if type(layer) is keras.layers.Conv2D and layer.kernel.shape[:2] == (1, 1)}
    done, pending_dw = set(), None
    for op in ops:
        if op["op_name"] not in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            continue
        weight = op["inputs"][1]
        wname = details[weight]["name"]
        kernel = _dequantized(interpreter, details, weight)
        bias = _dequantized(interpreter, details, op["inputs"][2]) if op["inputs"][2] >= 0 else 0.0
        found = re.search(r"(block\d+_sepconv\d|block1_conv\d)_1/", wname)
        if op["op_name"] == "DEPTHWISE_CONV_2D":
            pending_dw = (kernel[0], bias)
            continue
        kernel = kernel.transpose(1, 2, 3, 0)
        if found and found.group(1).startswith("block1_conv"):
            layer = by_name[found.group(1)]
            if found.group(1) == "block1_conv1":  # (x - m) / s folded in: W' = W / s, b' = b - m * sum(W')
                bias = bias + norm["mean"][0] * kernel.sum(axis=(0, 1, 2))
                kernel = kernel * norm["std"][0]
            layer.kernel.assign(kernel.astype(np.float32))
        elif found and pending_dw is not None:
            layer = by_name[found.group(1)]
            depthwise, dw_bias = pending_dw
            layer.depthwise_kernel.assign(depthwise[..., None].astype(np.float32))
            layer.pointwise_kernel.assign(kernel.astype(np.float32))
            bias = bias + np.tensordot(np.broadcast_to(dw_bias, depthwise.shape[-1:]), kernel[0, 0], axes=1)
            pending_dw = None
        elif kernel.shape[:2] == (1, 1) and kernel.shape[-1] in residual:
            layer = residual[kernel.shape[-1]]
            layer.kernel.assign(kernel.astype(np.float32))
        else:
            continue  # the Grad-CAM head's and the gate's own ops
        _identity_batchnorm(_consumer(layer), np.asarray(bias, np.float64))
        done.add(layer.name)
    expected = {layer.name for layer in base.layers
                if isinstance(layer, (keras.layers.Conv2D, keras.layers.SeparableConv2D))}
    if done != expected:
        raise ValueError(f"{path}: {len(expected - done)} of the architecture's {len(expected)} convolutions "
                         f"not found in the file (e.g. {sorted(expected - done)[:3]})")
    return model


@click.command(PROG, cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=NonEmptyPath(dir_okay=False, exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the recovered model (.keras, with the labels and preprocessing it carries).")
def main(model: Path, out: Path) -> None:
    """Rebuild a custom-cnn or xception .keras from its int8 .tflite file (see the module docstring for what
    it keeps).

    Exit codes: 0 written; 1 not a custom-cnn or xception file, or OUT is not a .keras path; 2 usage error.
    """
    from convert.keras_io import save_model

    try:
        keras_model, carried = recover(model)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_model(keras_model, out, carried)
    except ValueError as exc:
        error(PROG, str(exc))
        sys.exit(1)
    click.echo(f"wrote {out}: {keras_model.count_params():,} parameters, labels {', '.join(carried['labels'])}")


if __name__ == "__main__":
    main()
