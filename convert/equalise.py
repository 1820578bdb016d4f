"""Cross-layer equalisation of depthwise-separable convolutions before int8 quantization.

Why: a Keras ``SeparableConv2D`` is a depthwise convolution followed by a 1x1 pointwise convolution with
nothing in between, so each intermediate channel's scale can move freely between the two kernels, and
training leaves it wherever it landed. After conversion the intermediate tensor is quantized with one
scale for all channels and the pointwise kernel with one scale per *output* channel, so a channel whose
activations are 100x smaller than its neighbours' is rounded away on both counts: a known way for
Xception-style networks to lose accuracy in post-training int8 (how much it matters depends on how uneven
a trained model's channels are; see README, Status, for what it did to ours).

The fix (Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias Correction",
ICCV 2019; the same balance SmoothQuant strikes with alpha = 0.5) rescales intermediate channel c:
depthwise kernel / s_c, pointwise kernel input row * s_c. In float the layer computes exactly the same
function (up to rounding), so accuracy and Grad-CAM are untouched; we pick
s_c = sqrt(a_c / w_c), with a_c the channel's largest activation on the calibration images and w_c its
largest pointwise weight, which leaves both at sqrt(a_c * w_c) and so narrows the spread that per-tensor
activation and per-output-channel weight quantization see.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

#: Batch size of the activation probe (images at once through the model).
PROBE_BATCH = 16
#: Channels whose activation or weight range is below this are left unscaled (dead channels).
EPSILON = 1e-8


@dataclass(frozen=True)
class Equalised:
    """What `equalise` did: the layers it rescaled and how uneven their intermediate channels were."""

    layers: tuple[str, ...]
    #: Per layer, max/median of the intermediate channels' activation ranges before and after.
    spread_before: tuple[float, ...]
    spread_after: tuple[float, ...]

    def to_json(self) -> dict[str, Any]:
        median = lambda v: float(np.median(v)) if v else None
        return {"method": "cross-layer equalisation (depthwise/pointwise, sqrt balance)",
                "layers": len(self.layers), "median_spread_before": median(self.spread_before),
                "median_spread_after": median(self.spread_after)}


def separable_layers(model: Any) -> list[Any]:
    """Every ``SeparableConv2D`` in ``model``, nested models included, in graph order."""
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found.extend(separable_layers(layer))
        elif isinstance(layer, keras.layers.SeparableConv2D):
            found.append(layer)
    return found


def _probe(container: Any) -> tuple[Any, list[Any]] | None:
    """A model from ``container``'s input to the inputs of its separable layers and nested models, with
    those layers in the same order; None when it has neither.

    The container's own nodes are used (not ``layer.input``), because a nested model's first node is the
    one of its own graph, not its call in the parent.
    """
    graph = getattr(container, "_functional", container)  # a Sequential keeps its graph in a Functional
    nodes = [node for depth in sorted(graph._nodes_by_depth, reverse=True)
             for node in graph._nodes_by_depth[depth]
             if isinstance(node.operation, (keras.layers.SeparableConv2D, keras.Model))]
    if not nodes:
        return None
    for node in nodes:
        if len(node.input_tensors) != 1:
            raise ValueError(f"{node.operation.name} takes {len(node.input_tensors)} inputs; cannot probe it")
    if len(graph.inputs) != 1:
        raise ValueError(f"{container.name} takes {len(graph.inputs)} inputs; cannot probe it")
    return keras.Model(graph.inputs[0], [node.input_tensors[0] for node in nodes]), [n.operation for n in nodes]


def _probe_inputs(container: Any, x: np.ndarray, out: dict[str, np.ndarray], probes: dict[int, Any]) -> None:
    """Fill ``out[layer.name]`` with the input each separable layer of ``container`` sees for batch ``x``.

    A nested model is a node of its parent's graph, so its input is probed in the parent first and then
    fed to a probe of its own graph. ``probes`` keeps each container's probe across batches.
    """
    if id(container) not in probes:
        probes[id(container)] = _probe(container)
    if probes[id(container)] is None:
        return
    probe, layers = probes[id(container)]
    values = probe(x, training=False)
    if len(layers) == 1:
        values = [values]
    for layer, value in zip(layers, values):
        if isinstance(layer, keras.Model):
            _probe_inputs(layer, np.asarray(value), out, probes)
        else:
            out[layer.name] = np.asarray(value)


def _depthwise(layer: Any, x: np.ndarray) -> tf.Tensor:
    """The layer's intermediate (depthwise) output, channel index ``in * multiplier + m`` as TFLite lays it out."""
    strides = (1, *layer.strides, 1)
    return tf.nn.depthwise_conv2d(x, layer.depthwise_kernel, strides=strides, padding=layer.padding.upper(),
                                  dilations=layer.dilation_rate)


def activation_ranges(model: Any, images: np.ndarray) -> dict[str, np.ndarray]:
    """Per separable layer, the largest |activation| of each intermediate channel over ``images``
    (model inputs, already normalised)."""
    layers = separable_layers(model)
    for layer in layers:
        if layer.data_format != "channels_last":
            raise ValueError(f"{layer.name}: only channels_last separable convolutions can be equalised")
    ranges: dict[str, np.ndarray] = {}
    probes: dict[int, Any] = {}
    for start in range(0, len(images), PROBE_BATCH):
        inputs: dict[str, np.ndarray] = {}
        _probe_inputs(model, np.asarray(images[start:start + PROBE_BATCH], np.float32), inputs, probes)
        for layer in layers:
            peak = tf.reduce_max(tf.abs(_depthwise(layer, inputs[layer.name])), axis=(0, 1, 2)).numpy()
            ranges[layer.name] = np.maximum(ranges.get(layer.name, peak), peak)
    return ranges


def scales(activation_range: np.ndarray, pointwise: np.ndarray) -> np.ndarray:
    """s_c = sqrt(a_c / w_c), 1 where either range is (near) zero so dead channels stay as they are."""
    weight_range = np.abs(pointwise).reshape(-1, pointwise.shape[-1]).max(axis=1)
    usable = (activation_range > EPSILON) & (weight_range > EPSILON)
    s = np.ones_like(activation_range, dtype=np.float64)
    s[usable] = np.sqrt(activation_range[usable] / weight_range[usable])
    return s


def _spread(values: np.ndarray) -> float:
    live = values[values > EPSILON]
    return float(live.max() / np.median(live)) if live.size else 1.0


def equalise(model: Any, images: np.ndarray) -> Equalised:
    """Rescale every separable layer of ``model`` in place (float-equivalent) using ``images``
    (normalised model inputs, a few dozen are enough: only per-channel maxima are needed)."""
    layers = separable_layers(model)
    if not layers:
        return Equalised((), (), ())
    ranges = activation_ranges(model, images)
    before, after = [], []
    for layer in layers:
        depthwise = np.asarray(layer.depthwise_kernel.numpy(), np.float64)
        pointwise = np.asarray(layer.pointwise_kernel.numpy(), np.float64)
        s = scales(ranges[layer.name], pointwise)
        kh, kw, channels_in, multiplier = depthwise.shape
        layer.depthwise_kernel.assign((depthwise / s.reshape(channels_in, multiplier)).astype(np.float32))
        layer.pointwise_kernel.assign((pointwise * s[None, None, :, None]).astype(np.float32))
        before.append(_spread(ranges[layer.name]))
        after.append(_spread(ranges[layer.name] / s))
    return Equalised(tuple(l.name for l in layers), tuple(before), tuple(after))


def clone(model: Any) -> Any:
    """A copy of ``model`` with its own weights, so equalising never changes the caller's object."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy
