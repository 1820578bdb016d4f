"""Closed-form backward pass through the convolutional layers between two feature maps of a Keras model.

Why: a finer heatmap needs the class score's gradient at an earlier, larger feature map (issue 12), and a
TFLite model cannot differentiate. Between two feature maps of a residual CNN there are only convolutions,
batch norms, ReLUs, residual sums and max-pools, and each has a backward pass made of forward builtin ops
that quantize to int8 like the rest of the graph:

- Conv2D, stride 1, odd kernel, ``same`` padding: a Conv2D with the kernel flipped in space and its input
  and output channels swapped (the transposed convolution of stride 1), after the activation's mask;
- BatchNormalization (inference): a per-channel factor; ReLU / Activation: a mask;
- Add: the gradient goes to every input (and sums where a tensor feeds several layers);
- MaxPooling2D with pool = strides and ``valid`` padding: the gradient, repeated over each window, where
  the input equals its window's maximum (a tie shares the gradient; TensorFlow gives it to one position).

`replay` runs the block forward from the earlier map with these layers (the values the model computes) and
returns the later map together with a function from its gradient to the earlier map's gradient.
"""
from __future__ import annotations

from typing import Any, Callable

import keras
import tensorflow as tf

from convert import gradcam_head as gh

Backward = Callable[[tf.Tensor], list[tf.Tensor]]

SUPPORTED = "Conv2D (stride 1, odd kernel, same padding), BatchNormalization, ReLU, Activation, Add, " \
            "MaxPooling2D (pool = strides, valid padding), Dropout and noise layers"


def nodes_between(model: Any, earlier: str, later: str) -> tuple[Any, Any, list[tuple[Any, list[Any], Any]]]:
    """(earlier tensor, later tensor, [(layer, input tensors, output tensor)] in forward order) of ``model``.

    Both layers must be layers of ``model`` itself (not of a nested model), and every path from the later
    map back to the model input must pass through the earlier one.
    """
    def output_of(name: str) -> Any:
        try:
            layer = model.get_layer(name)
        except ValueError:
            raise ValueError(f"no layer named {name!r} at the top level of model {model.name!r}") from None
        if len(tf.nest.flatten(layer.output)) != 1:
            raise ValueError(f"layer {gh._describe(layer)} has several outputs")
        return layer.output  # the output of its call in this model's graph

    start, end = output_of(earlier), output_of(later)
    order: list[tuple[Any, list[Any], Any]] = []
    seen: set[int] = set()

    def visit(tensor: Any) -> None:
        if tensor is start or id(tensor) in seen:
            return
        seen.add(id(tensor))
        op, node_index, _ = tensor._keras_history
        if isinstance(op, keras.layers.InputLayer):
            raise ValueError(f"layer {later!r} is reachable from the input without passing {earlier!r}")
        _check(op)
        inputs = gh._inputs_of(op, node_index)
        for t in inputs:
            visit(t)
        order.append((op, inputs, tensor))

    visit(end)
    if not order:
        raise ValueError(f"layer {later!r} does not come after {earlier!r}")
    return start, end, order


def _check(layer: Any) -> None:
    """Fail early, naming the layer, when the backward pass here cannot handle it."""
    ok = isinstance(layer, gh.IDENTITY_LAYERS + (keras.layers.BatchNormalization, keras.layers.ReLU,
                                                 keras.layers.Add))
    if isinstance(layer, keras.layers.Activation):
        ok = gh._activation_name(layer) in gh.ACTIVATIONS
    elif isinstance(layer, keras.layers.Conv2D) and type(layer) is keras.layers.Conv2D:
        kh, kw = layer.kernel_size
        ok = (tuple(layer.strides) == (1, 1) and tuple(layer.dilation_rate) == (1, 1) and layer.groups == 1
              and kh % 2 == 1 and kw % 2 == 1 and (layer.padding == "same" or (kh, kw) == (1, 1))
              and layer.data_format == "channels_last" and gh._activation_name(layer) in gh.ACTIVATIONS)
    elif isinstance(layer, keras.layers.MaxPooling2D):
        ok = (tuple(layer.pool_size) == tuple(layer.strides) and layer.padding == "valid"
              and layer.data_format == "channels_last")
    if not ok:
        raise ValueError(f"cannot differentiate layer {gh._describe(layer)} in closed form between the two "
                         f"heatmap layers; supported there: {SUPPORTED}")


def _conv(x: tf.Tensor, layer: Any) -> tuple[tf.Tensor, Backward]:
    kernel = tf.convert_to_tensor(layer.kernel)
    pre = tf.nn.conv2d(x, kernel, strides=1, padding=layer.padding.upper())
    if layer.use_bias:
        pre = pre + tf.convert_to_tensor(layer.bias)
    y, act_back = gh._activate(gh._activation_name(layer), pre)
    transposed = tf.transpose(tf.reverse(kernel, axis=[0, 1]), [0, 1, 3, 2])
    return y, lambda g: [tf.nn.conv2d(act_back(g), transposed, strides=1, padding=layer.padding.upper())]


def _repeat(x: tf.Tensor, ph: int, pw: int) -> tf.Tensor:
    """Each position of ``x`` [1, h, w, k] repeated over a ph x pw window: [1, h*ph, w*pw, k]."""
    _, h, w, k = (int(d) for d in x.shape)
    tiled = tf.tile(tf.reshape(x, [1, h, 1, w, 1, k]), [1, 1, ph, 1, pw, 1])
    return tf.reshape(tiled, [1, h * ph, w * pw, k])


def _maxpool(x: tf.Tensor, layer: Any) -> tuple[tf.Tensor, Backward]:
    y = layer(x)
    ph, pw = (int(p) for p in layer.pool_size)
    _, h, w, _ = (int(d) for d in x.shape)
    cropped = x if h % ph == 0 and w % pw == 0 else x[:, :(h // ph) * ph, :(w // pw) * pw, :]
    is_max = tf.equal(cropped, _repeat(y, ph, pw))

    def back(g: tf.Tensor) -> list[tf.Tensor]:
        spread = tf.where(is_max, _repeat(g, ph, pw), tf.zeros_like(cropped))
        if spread.shape[1] != h or spread.shape[2] != w:  # rows/columns a valid pool never reads
            spread = tf.pad(spread, [[0, 0], [0, h - spread.shape[1]], [0, w - spread.shape[2]], [0, 0]])
        return [spread]
    return y, back


def _step(layer: Any, inputs: list[tf.Tensor]) -> tuple[tf.Tensor, Backward]:
    """One layer forward at inference, with its map output-grad -> [grad of each input]. Batch norms,
    activations and identities are the head's own steps (`gradcam_head._step`)."""
    if isinstance(layer, keras.layers.Add):
        return tf.add_n(inputs), lambda g: [g] * len(inputs)
    x = inputs[0]
    if isinstance(layer, keras.layers.Conv2D):
        return _conv(x, layer)
    if isinstance(layer, keras.layers.MaxPooling2D):
        return _maxpool(x, layer)
    y, back = gh._step(x, layer)
    return y, lambda g: [back(g)]


def replay(model: Any, earlier: str, later: str, features: tf.Tensor) -> tuple[tf.Tensor, Callable[[tf.Tensor], tf.Tensor]]:
    """Run ``model`` from layer ``earlier``'s output (``features``) to layer ``later``'s; return that map and
    a function from d(score)/d(later map) (any shape that broadcasts to it) to d(score)/d(earlier map)."""
    start, end, order = nodes_between(model, earlier, later)
    values: dict[int, tf.Tensor] = {id(start): features}
    backs: list[tuple[list[Any], Any, Backward]] = []
    for layer, inputs, output in order:
        with tf.name_scope(layer.name):
            y, back = _step(layer, [values[id(t)] for t in inputs])
        values[id(output)] = y
        backs.append((inputs, output, back))
    later_map = values[id(end)]

    def backward(g: tf.Tensor) -> tf.Tensor:
        grads: dict[int, tf.Tensor] = {id(end): tf.broadcast_to(g, later_map.shape)}
        for inputs, output, back in reversed(backs):
            g_out = grads.pop(id(output), None)
            if g_out is None:  # a branch that does not reach the later map
                continue
            for t, g_in in zip(inputs, back(g_out)):
                grads[id(t)] = grads[id(t)] + g_in if id(t) in grads else g_in
        return grads[id(start)]
    return later_map, backward
