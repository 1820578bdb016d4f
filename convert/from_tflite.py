"""Recover a Keras custom-cnn from a converted int8 .tflite file, for re-conversion and fine-tuning.

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

    python -m convert.from_tflite edge/models/custom-cnn.tflite --out runs/custom-cnn-recovered.keras
"""
from __future__ import annotations

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


def recover(model_path: str | Path) -> tuple[Any, dict[str, Any]]:
    """(Keras model, carried metadata for `convert.keras_io.save_model`) of a custom-cnn .tflite file.

    Raises ValueError when the file is not a custom-cnn conversion (other ops, shapes or normalisation).
    """
    import keras

    from convert.architectures import custom_cnn
    from convert.parity import make_interpreter
    from edge.model_file import read_spec

    path = Path(model_path)
    blob = path.read_bytes()
    spec = read_spec(blob, path)
    meta = spec.metadata
    norm = meta.get("normalisation", {})
    if meta.get("name") != "custom-cnn" or len(norm.get("std", [])) != 1:
        raise ValueError(f"{path}: not a grayscale custom-cnn conversion (name {meta.get('name')!r})")
    interpreter = make_interpreter(blob)
    interpreter.allocate_tensors()
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()
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
        bn = model.get_layer(_batchnorm_name(layer.name))
        ones = np.ones_like(bias, np.float32)
        bn.set_weights([ones, bias.astype(np.float32), np.zeros_like(ones), ones - np.float32(bn.epsilon)])
    fc = dense[0]
    model.get_layer("predictions").set_weights(
        [_dequantized(interpreter, details, fc["inputs"][1]).T.astype(np.float32),
         _dequantized(interpreter, details, fc["inputs"][2]).astype(np.float32)])
    carried = {"name": "custom-cnn", "labels": list(spec.labels), "input_size": spec.input_size,
               "channels": spec.channels, "pipeline": spec.pipeline, "preprocess": norm["name"],
               "recovered_from": {"file": path.name, "sha256": spec.sha256,
                                  "weights_sha256": meta.get("weights", {}).get("sha256"),
                                  "source": meta.get("source")}}
    return model, carried


@click.command(PROG, cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=NonEmptyPath(dir_okay=False, exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the recovered model (.keras, with the labels and preprocessing it carries).")
def main(model: Path, out: Path) -> None:
    """Rebuild a custom-cnn .keras from its int8 .tflite file (see the module docstring for what it keeps).

    Exit codes: 0 written; 1 not a custom-cnn file, or OUT is not a .keras path; 2 usage error.
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
