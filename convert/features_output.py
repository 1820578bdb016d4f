"""Expose a converted model's penultimate features as a third signature output, without touching its weights.

The input gate (`edge.gate`) scores how far a scan's features lie from the training data's. By default the
features are the vector the classifier's last Dense layer reads: for our GAP heads, the global average of the
Grad-CAM feature map. ``layer`` picks an earlier layer's output instead, a feature map the runtime averages
over its positions (a mid-network map can tell MRI from other images better than the penultimate one, which
learned only to tell the four classes apart). Either tensor is already computed by every invoke; making it
a subgraph and signature output only stops the interpreter from reusing its memory, so probabilities and
heatmap stay bit-identical (`edge-gate calibrate` checks that on real scans before it writes a file).

Models converted by `edge-convert` since the gate existed already have the output (`convert.gradcam_head`
returns it); this module is for files whose Keras source is gone, such as the bundled models.
"""
from __future__ import annotations

import re
from typing import Any

from convert.flatbuffer import dump, load

FEATURES = "features"


def _schema() -> Any:
    from tensorflow.lite.python import schema_py_generated as schema

    return schema


def _op_name(model: Any, op: Any) -> str:
    schema = _schema()
    code = model.operatorCodes[op.opcodeIndex]
    builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
    return {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}.get(builtin, "?")


def _signature(model: Any) -> Any:
    if len(model.subgraphs) != 1 or len(model.signatureDefs or []) != 1:
        raise ValueError("expected one subgraph with one signature (a file written by edge-convert)")
    return model.signatureDefs[0]


def _name(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def signature_outputs(model: Any) -> dict[str, int]:
    """Signature output name -> tensor index."""
    return {_name(t.name): int(t.tensorIndex) for t in _signature(model).outputs}


def find_features(model: Any, probabilities: str = "probabilities") -> int:
    """Index of the tensor the logit layer reads: the input of the FULLY_CONNECTED op whose output reaches
    the ``probabilities`` output through SOFTMAX (and QUANTIZE/DEQUANTIZE/RESHAPE). Raises ValueError when
    the graph does not end that way, rather than guess."""
    graph = model.subgraphs[0]
    producer = {int(out): op for op in graph.operators for out in op.outputs}
    tensor = signature_outputs(model).get(probabilities)
    if tensor is None:
        raise ValueError(f"no {probabilities!r} signature output")
    seen_softmax = False
    for _ in range(8):
        op = producer.get(tensor)
        if op is None:
            break
        kind = _op_name(model, op)
        if kind == "FULLY_CONNECTED" and seen_softmax:
            features = int(op.inputs[0])
            shape = list(graph.tensors[features].shape)
            if len(shape) != 2 or shape[0] != 1:
                raise ValueError(f"the logit layer reads a tensor of shape {shape}, not [1, D] features")
            return features
        if kind == "SOFTMAX":
            seen_softmax = True
        elif kind not in ("DEQUANTIZE", "QUANTIZE", "RESHAPE"):
            break
        tensor = int(op.inputs[0])
    raise ValueError("cannot find the logit layer (FULLY_CONNECTED -> SOFTMAX -> probabilities) in the graph")


def find_layer(model: Any, layer: str) -> int:
    """Index of the last tensor written by the ops of Keras layer ``layer`` (op output names carry the layer
    name as a path component, possibly with a ``_N`` suffix: ``.../b2_out_1/Relu;...``). Must be a 4-D map.

    The name must be followed by ``/`` (an op inside the layer): an op of the same name inside another layer,
    such as ``.../block14_sepconv2_bn_1/batchnorm/add_1`` for Xception's layer ``add_1``, is not the layer."""
    graph = model.subgraphs[0]
    pattern = re.compile(rf"(^|[/;]){re.escape(layer)}(_\d+)?/")
    found = [int(out) for op in graph.operators for out in op.outputs
             if out >= 0 and pattern.search(_name(graph.tensors[out].name))]
    if not found:
        raise ValueError(f"layer {layer!r} matches no tensor of the graph")
    shape = [int(d) for d in graph.tensors[found[-1]].shape]
    if len(shape) != 4 or shape[0] != 1:
        raise ValueError(f"layer {layer!r} outputs shape {shape}, not a [1, h, w, c] feature map")
    return found[-1]


def add_features_output(tflite_model: bytes, layer: str | None = None) -> tuple[bytes, dict[str, Any]]:
    """The model with signature output ``features`` (the logit layer's input, or ``layer``'s feature map), and
    that output's metadata entry (``{"name", "shape", "layer"}``). An existing ``features`` output is kept,
    unless ``layer`` names another tensor, which then replaces it."""
    model = load(tflite_model)
    outputs = signature_outputs(model)
    graph = model.subgraphs[0]
    index = find_layer(model, layer) if layer is not None else outputs.get(FEATURES, None)
    if index is None:
        index = find_features(model)
    if outputs.get(FEATURES) != index:
        signature = _signature(model)
        old = outputs.get(FEATURES)
        if old is not None:
            signature.outputs = [t for t in signature.outputs if _name(t.name) != FEATURES]
            if old not in {v for k, v in outputs.items() if k != FEATURES}:
                graph.outputs = [int(t) for t in graph.outputs if int(t) != old]
        graph.outputs = list(graph.outputs) + [index]
        entry = _schema().TensorMapT()
        entry.name = FEATURES
        entry.tensorIndex = index
        signature.outputs.append(entry)
        tflite_model = dump(model)
    shape = [int(d) for d in graph.tensors[index].shape]
    described = f"{layer} (spatial mean)" if layer else "input of the logit layer (GAP)"
    return tflite_model, {"name": FEATURES, "shape": shape, "layer": described}
