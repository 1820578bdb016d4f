"""In-graph Grad-CAM: split a Keras classifier at its last feature map and derive the backward pass in closed form.

A TFLite model cannot run ``tf.GradientTape``, and the ops a tape would emit are not all TFLite builtins.
But the layers after a classifier's last feature map (pooling, dense, batch-norm, activations, dropout) are
simple enough that their gradient has a closed form, which is plain forward ops (matmul with W^T, masks,
reshape, broadcast) that quantize to int8 like the rest of the network. So the graph built here:

1. splits the model at the target layer: the *feature part* is Keras sub-models up to the target (any
   DAG, nested base models included); the *head* is the linear chain of layers after it;
2. replays the head forward on the feature map A, keeping the intermediates the backward pass needs;
3. back-propagates the one-hot of the predicted class's logit (the pre-softmax score, as in the Grad-CAM
   paper) through the head to dY/dA, averages it spatially into channel weights alpha_k, and forms
   ReLU(sum_k alpha_k A_k), upsampled bilinearly to the input size and divided by its maximum. This last
   combination is tagged (:data:`FLOAT_SCOPE`) so the converter can keep it in float.

:func:`build_module` wraps that in a ``tf.Module`` whose ``serve`` function takes raw uint8 pixels (the
normalisation is folded in) and returns the signature outputs the model-file contract names.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf

from convert import normalisation

PROBABILITIES = "probabilities"
HEATMAP = "heatmap"
#: The Grad-CAM feature map averaged over its positions (for GAP heads, the logit layer's input): what the
#: device's input gate scores (`edge.gate`).
FEATURES = "features"
INPUT_NAME = "image"
#: Name scope of the Grad-CAM combination (weighted channel sum, ReLU, upsampling, division by the peak).
#: The converter keeps these ops in float: they cost about h*w*k + S*S operations, while in int8 a
#: per-image peak has no good fixed scale, 8-bit levels leave plateaus in the upsampled map, and DIV
#: aborts on a divisor that rounds to zero. Everything before them (backbone, head, gradient) is int8.
FLOAT_SCOPE = "gradcam_combine"

#: Layers that are the identity at inference time, so their gradient is the identity too.
IDENTITY_LAYERS = (
    keras.layers.Dropout, keras.layers.SpatialDropout1D, keras.layers.SpatialDropout2D,
    keras.layers.SpatialDropout3D, keras.layers.GaussianNoise, keras.layers.GaussianDropout,
    keras.layers.AlphaDropout, keras.layers.ActivityRegularization,
)
#: Activations whose derivative the head knows, by Keras name.
ACTIVATIONS = ("linear", "relu", "relu6", "leaky_relu", "elu", "sigmoid", "tanh", "silu")


@dataclass(frozen=True)
class Split:
    """A classifier cut at its Grad-CAM target layer.

    ``stages`` are Keras models applied one after the other to the normalised input (the outer layers
    before a nested base, then the base up to the target); ``head`` is every layer after the target in
    forward order, nested linear models expanded. ``logit_layers`` is the prefix of ``head`` that ends in
    the layer producing the class scores; when that layer is a Dense with a built-in softmax,
    ``softmax_in_last`` says its activation must be skipped to get logits. ``outputs_logits`` is True when
    the Keras model itself returns logits (no softmax anywhere at the end).
    """

    target_layer: str
    stages: tuple[Any, ...]
    head: tuple[Any, ...]
    logit_layers: tuple[Any, ...]
    softmax_in_last: bool
    outputs_logits: bool
    feature_shape: tuple[int, int, int]

    def features(self, x: tf.Tensor) -> tf.Tensor:
        """Run the feature part on an already-normalised float batch."""
        for stage in self.stages:
            x = stage(x, training=False)
        return x


def _rank(tensor: Any) -> int:
    return len(tensor.shape)


def _describe(layer: Any) -> str:
    return f"{layer.name!r} ({type(layer).__name__})"


def _find_layer(model: Any, name: str) -> Any | None:
    """The layer called ``name`` in ``model`` or any model nested in it (depth first)."""
    for layer in model.layers:
        if layer.name == name:
            return layer
        if isinstance(layer, keras.Model):
            found = _find_layer(layer, name)
            if found is not None:
                return found
    return None


def _is_default_target(op: Any, tensor: Any) -> bool:
    """The last 4-D feature map: any rank-4 output that is not an input or a 1x1 pooled vector."""
    if isinstance(op, (keras.layers.InputLayer, keras.Model)) or _rank(tensor) != 4:
        return False
    return not isinstance(op, (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D))


def _inputs_of(op: Any, node_index: int) -> list[Any]:
    return list(op._inbound_nodes[node_index].input_tensors)


def _walk_back(container: Any, tensor: Any, target: str | None) -> tuple[list[Any], list[tuple[Any, Any]] | None]:
    """Walk from ``tensor`` towards ``container``'s input, collecting the head in reverse order.

    Returns ``(head_reversed, stages)``; ``stages`` is None when the walk reached the container's input
    without meeting the target, else a list of ``(container, tensor)`` pairs, innermost first, whose
    sub-models compute the feature map. Nested models are searched first and, when the target is not
    inside, taken whole as part of the head (they must then be a single chain too).
    """
    head: list[Any] = []
    while True:
        op, node_index, _ = tensor._keras_history
        if isinstance(op, keras.layers.InputLayer):
            return head, None
        if (op.name == target) if target is not None else _is_default_target(op, tensor):
            return head, [(container, tensor)]
        inputs = _inputs_of(op, node_index)
        if isinstance(op, keras.Model):
            if len(op.outputs) != 1:
                raise ValueError(f"nested model {_describe(op)} has {len(op.outputs)} outputs; Grad-CAM needs one")
            inner_head, inner_stages = _walk_back(op, op.outputs[0], target)
            head.extend(inner_head)
            if inner_stages is not None:
                if len(inputs) != 1:
                    raise ValueError(f"nested model {_describe(op)} takes {len(inputs)} inputs; Grad-CAM needs one")
                return head, inner_stages + [(container, inputs[0])]
        else:
            head.append(op)
        if len(inputs) != 1:
            what = f"the target {target!r}" if target else "the last feature map"
            raise ValueError(f"layer {_describe(op)} has {len(inputs)} inputs: the layers between {what} and "
                             f"the output must form a single chain (choose a later --target-layer)")
        tensor = inputs[0]


def _stage(container: Any, tensor: Any) -> Any | None:
    """A sub-model from ``container``'s input to ``tensor`` (None when ``tensor`` is that input)."""
    if any(tensor is t for t in container.inputs):
        return None
    return keras.Model(container.inputs, tensor, name=f"{container.name}_to_{tensor._keras_history[0].name}")


def _activation_name(layer: Any) -> str:
    fn = getattr(layer, "activation", None)
    name = getattr(fn, "__name__", None)
    if name is None:
        return "linear"
    try:
        known = keras.activations.get(name)
    except (ValueError, TypeError):
        known = None
    return name if known is fn else f"custom:{name}"


def _strip_softmax(head: list[Any], model_name: str) -> tuple[list[Any], bool, bool]:
    """(logit_layers, softmax_in_last, outputs_logits): where the class scores come from."""
    end = len(head)
    while end and isinstance(head[end - 1], IDENTITY_LAYERS):
        end -= 1
    if end == 0:
        raise ValueError(f"{model_name}: no layers between the target and the output to produce class scores")
    last = head[end - 1]
    if isinstance(last, keras.layers.Softmax) or (
            isinstance(last, keras.layers.Activation) and _activation_name(last) == "softmax"):
        return head[:end - 1], False, False
    act = _activation_name(last)
    if act == "softmax":
        return head[:end], True, False
    if act != "linear" or isinstance(last, (keras.layers.ReLU, keras.layers.LeakyReLU, keras.layers.ELU)):
        raise ValueError(f"the output layer {_describe(last)} applies {act if act != 'linear' else 'an activation'}; "
                         f"the model must end in logits or softmax")
    return head[:end], False, True


def split_model(model: Any, target_layer: str | None = None) -> Split:
    """Cut ``model`` at ``target_layer`` (default: the last layer with a 4-D output before the head).

    Raises ValueError naming the layer when the target is missing or not a 4-D feature map, when the
    layers after it are not a single chain, or when one of them has no closed-form gradient here.
    """
    if not isinstance(model, keras.Model):
        raise ValueError(f"expected a Keras model, got {type(model).__name__}")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(f"model {model.name!r} has {len(model.inputs)} inputs and {len(model.outputs)} outputs; "
                         f"a classifier with one image input and one output is needed")
    if target_layer is not None:
        layer = _find_layer(model, target_layer)
        if layer is None:
            raise ValueError(f"no layer named {target_layer!r} in model {model.name!r} or its nested models")
        shape = tuple(layer.output.shape) if not isinstance(layer, keras.Model) else tuple(layer.outputs[0].shape)
        if len(shape) != 4:
            raise ValueError(f"target layer {_describe(layer)} outputs shape {shape}; Grad-CAM needs a 4-D "
                             f"feature map (batch, height, width, channels)")
    head_rev, stages = _walk_back(model, model.outputs[0], target_layer)
    if stages is None and target_layer is not None:
        raise ValueError(f"target layer {target_layer!r} is not on the path from the input to the output")
    if stages is None:
        raise ValueError(f"model {model.name!r} has no 4-D feature map before its head; "
                         f"is it an image classifier?")
    head = list(reversed(head_rev))
    for layer in head:
        _check_differentiable(layer)
    logit_layers, softmax_in_last, outputs_logits = _strip_softmax(head, model.name)
    for i, layer in enumerate(logit_layers):
        inner = isinstance(layer, keras.layers.Softmax) or _activation_name(layer) == "softmax"
        if inner and not (softmax_in_last and i == len(logit_layers) - 1):
            raise ValueError(f"head layer {_describe(layer)} applies a softmax before the output; "
                             f"only the final layer may")
    target_tensor = stages[0][1]
    models = [m for m in (_stage(c, t) for c, t in reversed(stages)) if m is not None]
    h, w, k = (int(d) if d is not None else -1 for d in target_tensor.shape[1:])
    return Split(target_layer=target_tensor._keras_history[0].name, stages=tuple(models), head=tuple(head),
                 logit_layers=tuple(logit_layers), softmax_in_last=softmax_in_last,
                 outputs_logits=outputs_logits, feature_shape=(h, w, k))


def _check_differentiable(layer: Any) -> None:
    """Fail early, naming the layer, when the closed-form backward pass cannot handle it."""
    supported = IDENTITY_LAYERS + (
        keras.layers.Dense, keras.layers.BatchNormalization, keras.layers.Activation, keras.layers.ReLU,
        keras.layers.LeakyReLU, keras.layers.Softmax, keras.layers.Flatten, keras.layers.Reshape,
        keras.layers.GlobalAveragePooling2D)
    if not isinstance(layer, supported) or isinstance(layer, keras.Model):
        raise ValueError(f"cannot differentiate head layer {_describe(layer)} in closed form; supported after "
                         f"the target: Dense, BatchNormalization, Activation/ReLU/LeakyReLU, Softmax, Dropout "
                         f"and noise layers, Flatten, Reshape, GlobalAveragePooling2D (choose another "
                         f"--target-layer or change the head)")
    act = _activation_name(layer)
    if hasattr(layer, "activation") and act not in ACTIVATIONS + ("softmax",):
        raise ValueError(f"cannot differentiate activation {act!r} of head layer {_describe(layer)}; "
                         f"supported: {', '.join(ACTIVATIONS)}")
    if isinstance(layer, keras.layers.GlobalAveragePooling2D) and layer.data_format != "channels_last":
        raise ValueError(f"head layer {_describe(layer)} uses {layer.data_format}; only channels_last is supported")
    if isinstance(layer, keras.layers.Flatten) and getattr(layer, "data_format", "channels_last") != "channels_last":
        raise ValueError(f"head layer {_describe(layer)} uses {layer.data_format}; only channels_last is supported")
    if isinstance(layer, keras.layers.BatchNormalization) and layer.axis not in (-1, len(layer.input.shape) - 1):
        raise ValueError(f"head layer {_describe(layer)} normalises axis {layer.axis}; only the last axis is supported")


Backward = Callable[[tf.Tensor], tf.Tensor]


def _activate(name: str, pre: tf.Tensor) -> tuple[tf.Tensor, Backward]:
    """Apply a Keras activation by name and return it with its derivative (as a gradient map)."""
    zero = tf.zeros_like(pre)
    if name == "linear":
        return pre, lambda g: g
    if name == "relu":
        return tf.nn.relu(pre), lambda g: tf.where(pre > 0, g, zero)
    if name == "relu6":
        return tf.nn.relu6(pre), lambda g: tf.where(tf.logical_and(pre > 0, pre < 6), g, zero)
    if name == "leaky_relu":
        slope = 0.2  # keras.activations.leaky_relu's default
        return tf.nn.leaky_relu(pre, slope), lambda g: tf.where(pre > 0, g, g * slope)
    if name == "elu":
        y = tf.nn.elu(pre)
        return y, lambda g: tf.where(pre > 0, g, g * (y + 1.0))
    if name == "sigmoid":
        y = tf.sigmoid(pre)
        return y, lambda g: g * y * (1.0 - y)
    if name == "tanh":
        y = tf.tanh(pre)
        return y, lambda g: g * (1.0 - y * y)
    if name == "silu":
        s = tf.sigmoid(pre)
        return pre * s, lambda g: g * (s + pre * s * (1.0 - s))
    raise ValueError(f"no derivative for activation {name!r}")


def _dense(x: tf.Tensor, layer: Any, activation: str,
           pooled: tuple[int, int, int] | None = None) -> tuple[tf.Tensor, Backward]:
    """Dense forward and backward; ``pooled=(h, w, k)`` when ``x`` is a flattened h x w x k feature map.

    Grad-CAM only needs the spatial mean of the feature-map gradient, and for Flatten -> Dense that mean
    is ``g @ mean_hw(W)^T``: one small matmul with a constant, where computing the full gradient first
    would, in int8, round every position's value before a mean that mostly cancels them out.
    """
    kernel = tf.convert_to_tensor(layer.kernel)
    if pooled is not None:
        h, w, k = pooled
        mean_kernel = tf.reduce_mean(tf.reshape(kernel, [h, w, k, -1]), axis=[0, 1])
        pre = tf.matmul(x, kernel)
        down: Backward = lambda g: tf.reshape(tf.matmul(g, mean_kernel, transpose_b=True), [-1, 1, 1, k])
    elif _rank(x) == 2:
        pre = tf.matmul(x, kernel)
        down = lambda g: tf.matmul(g, kernel, transpose_b=True)
    else:
        pre = tf.tensordot(x, kernel, axes=[[_rank(x) - 1], [0]])
        down = lambda g: tf.tensordot(g, tf.transpose(kernel), axes=[[_rank(g) - 1], [0]])
    if layer.use_bias:
        pre = pre + tf.convert_to_tensor(layer.bias)
    y, back = _activate(activation, pre)
    return y, lambda g: down(back(g))


def _relu_layer(x: tf.Tensor, layer: Any) -> tuple[tf.Tensor, Backward]:
    """keras.layers.ReLU: slope below the threshold, 1 up to max_value, 0 above it."""
    y = layer(x)
    threshold = float(layer.threshold or 0.0)
    slope = float(layer.negative_slope or 0.0)
    active = x > threshold
    if layer.max_value is not None:
        active = tf.logical_and(active, x < float(layer.max_value))
    if slope == 0.0:
        return y, lambda g: tf.where(active, g, tf.zeros_like(g))
    below = x <= threshold
    return y, lambda g: tf.where(active, g, tf.where(below, g * slope, tf.zeros_like(g)))


def _batchnorm(x: tf.Tensor, layer: Any) -> tuple[tf.Tensor, Backward]:
    y = layer(x, training=False)
    factor = tf.math.rsqrt(tf.convert_to_tensor(layer.moving_variance) + layer.epsilon)
    if layer.scale:
        factor = factor * tf.convert_to_tensor(layer.gamma)
    return y, lambda g: g * factor


def _step(x: tf.Tensor, layer: Any, logits_only: bool = False,
          pooled: tuple[int, int, int] | None = None) -> tuple[tf.Tensor, Backward]:
    """Run one head layer forward at inference; return its output and a map output-grad -> input-grad."""
    if isinstance(layer, IDENTITY_LAYERS):
        return x, lambda g: g
    if isinstance(layer, keras.layers.Dense):
        return _dense(x, layer, "linear" if logits_only else _activation_name(layer), pooled)
    if isinstance(layer, keras.layers.BatchNormalization):
        return _batchnorm(x, layer)
    if isinstance(layer, keras.layers.Activation):
        return _activate(_activation_name(layer), x)
    if isinstance(layer, keras.layers.ReLU):
        return _relu_layer(x, layer)
    if isinstance(layer, keras.layers.LeakyReLU):
        slope = float(layer.negative_slope)
        return tf.nn.leaky_relu(x, slope), lambda g: tf.where(x > 0, g, g * slope)
    if isinstance(layer, (keras.layers.Flatten, keras.layers.Reshape)):
        in_shape = [-1] + [int(d) for d in x.shape[1:]]
        out_shape = [-1, int(np.prod(in_shape[1:]))] if isinstance(layer, keras.layers.Flatten) else (
            [-1] + [int(d) for d in layer.target_shape])
        return tf.reshape(x, out_shape), lambda g: tf.reshape(g, in_shape)
    if isinstance(layer, keras.layers.GlobalAveragePooling2D):
        h, w = int(x.shape[1]), int(x.shape[2])
        y = tf.reduce_mean(x, axis=[1, 2], keepdims=bool(layer.keepdims))
        # The gradient is the same at every position; keep it [1, 1, 1, k] and let broadcasting spread it.
        return y, lambda g: tf.reshape(g, [-1, 1, 1, int(x.shape[3])]) * (1.0 / (h * w))
    raise ValueError(f"cannot differentiate head layer {_describe(layer)}")


def _flatten_dense_index(layers: tuple[Any, ...]) -> int | None:
    """Index of the Dense that reads the flattened feature map directly (dropout aside), if any."""
    flattened = False
    for i, layer in enumerate(layers):
        if isinstance(layer, IDENTITY_LAYERS):
            continue
        if isinstance(layer, keras.layers.Flatten) and not flattened:
            flattened = True
            continue
        return i if flattened and isinstance(layer, keras.layers.Dense) else None
    return None


def head_forward(split: Split, features: tf.Tensor) -> tuple[tf.Tensor, list[Backward]]:
    """Replay the head up to the logits; return the logits and the backward maps in forward order.

    When a Dense reads the flattened feature map, its backward map already yields the spatially pooled
    gradient, and the maps of the layers before it are left out (they are reshapes and identities).
    """
    x = features
    backs = []
    last = len(split.logit_layers) - 1
    pooled_at = _flatten_dense_index(split.logit_layers)
    shape = tuple(int(d) for d in features.shape[1:])
    for i, layer in enumerate(split.logit_layers):
        pooled = shape if i == pooled_at else None
        with tf.name_scope(layer.name):  # so converted ops carry the layer's name (reports, float layers)
            x, back = _step(x, layer, logits_only=split.softmax_in_last and i == last, pooled=pooled)
        if pooled_at is None or i >= pooled_at:
            backs.append(back)
    return x, backs


def _peak_one(cam: tf.Tensor) -> tf.Tensor:
    """Divide a [1, ...] map by its maximum; an all-zero map stays zero exactly (not max(peak, eps))."""
    axes = list(range(1, len(cam.shape)))
    peak = tf.reduce_max(cam, axis=axes, keepdims=True)
    return cam / tf.where(peak > 0, peak, tf.ones_like(peak))


def class_activation_map(features: tf.Tensor, grads: tf.Tensor, size: int) -> tf.Tensor:
    """Grad-CAM from a feature map and d(score)/d(features): [1, size, size] in [0, 1].

    Shared by the in-graph head and the GradientTape reference so both post-process identically:
    alpha_k = spatial mean of the gradient, ReLU of the weighted channel sum, bilinear upsampling (half-pixel
    centres), division by the maximum (an all-zero map stays zero).

    The channel sum is a matrix product, not a multiply-then-sum, so that whatever precision it runs in
    it accumulates once rather than rounding every product.
    """
    h, w, k = (int(d) for d in features.shape[1:])
    with tf.name_scope(FLOAT_SCOPE):
        if grads.shape[1] == 1 and grads.shape[2] == 1:
            alpha = grads
        else:
            alpha = tf.reduce_mean(grads, axis=[1, 2], keepdims=True)
        cam = tf.matmul(tf.reshape(features, [-1, h * w, k]), tf.reshape(alpha, [-1, k, 1]))
        cam = tf.reshape(tf.nn.relu(cam), [-1, h, w, 1])
        cam = tf.image.resize(cam, [size, size], method="bilinear")
        return _peak_one(tf.reshape(cam, [-1, size, size]))


def layer_cam(features: list[tf.Tensor], grads: list[tf.Tensor], size: int) -> tf.Tensor:
    """LayerCAM (Jiang et al. 2021) fused over several feature maps: [1, size, size] in [0, 1].

    Per map, ReLU of the channel sum of activation x positive gradient *at each position* (not a
    channel-wide mean as in Grad-CAM, so a finer map keeps where its evidence is), upsampled like
    Grad-CAM and scaled to peak 1; the maps are summed and scaled to peak 1 again, so a coarse map's
    class evidence and a fine map's detail weigh the same. Shared by the in-graph head and the reference.
    Runs in float (FLOAT_SCOPE) for the reasons Grad-CAM's combination does.
    """
    with tf.name_scope(FLOAT_SCOPE):
        total = None
        for a, g in zip(features, grads):
            cam = tf.nn.relu(tf.reduce_sum(a * tf.nn.relu(g), axis=-1, keepdims=True))
            cam = _peak_one(tf.image.resize(cam, [size, size], method="bilinear"))
            total = cam if total is None else total + cam
        return _peak_one(tf.reshape(total, [-1, size, size]))


def score_gradient(split: Split, features: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(logits, d(predicted class's logit)/d(features)) for a batch of one, with the closed-form backward pass.

    For a pooled head the gradient is [1, 1, 1, k] (the same at every position), else [1, h, w, k].
    """
    logits, backs = head_forward(split, features)
    num_classes = int(logits.shape[-1])
    # Not tf.one_hot, nor a comparison with tf.range: the int8 ONE_HOT kernel copies quantized on/off
    # values without rescaling them, and the converter rewrites the comparison into an int8
    # EMBEDDING_LOOKUP that LiteRT cannot run. Gathering a row of the identity matrix quantizes cleanly,
    # and arg-max breaks ties the way the device does.
    predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
    g = tf.gather(tf.eye(num_classes, dtype=tf.float32), predicted)
    for back in reversed(backs):
        g = back(g)
    return logits, g


def gradcam_graph(split: Split, features: tf.Tensor, size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """(probabilities, heatmap) for a batch of one, with the closed-form backward pass."""
    logits, g = score_gradient(split, features)
    return tf.nn.softmax(logits, axis=-1), class_activation_map(features, g, size)


def fine_stage(model: Any, fine_layer: str) -> Any:
    """A sub-model from the input to ``fine_layer``'s output (a top-level layer of ``model``)."""
    try:
        layer = model.get_layer(fine_layer)
    except ValueError:
        raise ValueError(f"no layer named {fine_layer!r} at the top level of model {model.name!r}") from None
    if len(layer.output.shape) != 4:
        raise ValueError(f"fine layer {_describe(layer)} outputs shape {tuple(layer.output.shape)}; a 4-D "
                         f"feature map is needed")
    return _stage(model, layer.output)


def fine_heatmap(model: Any, split: Split, stage: Any, fine_layer: str, x: tf.Tensor,
                 size: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(logits, target feature map, LayerCAM of the fine and target maps) for a normalised batch of one.

    The fine map comes from ``stage`` (`fine_stage`); the layers from it to the target are replayed with
    their closed-form backward pass (`convert.block_backward`), so the graph stays builtin ops.
    """
    from convert import block_backward  # it builds on this module's layer steps

    early = stage(x, training=False)
    fmap, back = block_backward.replay(model, fine_layer, split.target_layer, early)
    logits, g = score_gradient(split, fmap)
    return logits, fmap, layer_cam([early, fmap], [back(g), g], size)


def build_module(model: Any, *, norm: normalisation.Normalisation, input_size: int, channels: int,
                 target_layer: str | None = None, gradcam: bool = True,
                 fine_layer: str | None = None) -> tuple[tf.Module, Split | None]:
    """A ``tf.Module`` whose ``serve(image)`` maps uint8 ``[1, S, S, C]`` pixels to the contract's outputs.

    With ``gradcam=False`` the same input pipeline feeds the unmodified Keras model and only
    ``probabilities`` is returned: the baseline that measures what the Grad-CAM head costs. Otherwise
    ``features`` (the feature map's spatial mean, for the input gate) is returned too. ``fine_layer``
    (an earlier top-level layer) makes the heatmap a LayerCAM fusion of that layer's map and the
    target's (`fine_heatmap`) instead of Grad-CAM at the target.
    """
    split = split_model(model, target_layer) if gradcam else None
    if split is not None and -1 in split.feature_shape:  # a model that accepts any input size
        probe = split.features(tf.zeros([1, input_size, input_size, channels], tf.float32))
        split = dataclasses.replace(split, feature_shape=tuple(int(d) for d in probe.shape[1:]))
    stage = fine_stage(model, fine_layer) if split is not None and fine_layer else None
    if stage is not None:
        from convert import block_backward

        block_backward.nodes_between(model, fine_layer, split.target_layer)  # fail now, naming the layer
    outputs_logits = split.outputs_logits if split else not _ends_in_softmax(model)
    module = tf.Module()
    module.model = model
    if split is not None:
        module.stages = list(split.stages) + ([stage] if stage is not None else [])

    def serve(image: tf.Tensor) -> dict[str, tf.Tensor]:
        x = normalisation.apply(tf.cast(image, tf.float32), norm)
        if split is None:
            y = model(x, training=False)
            return {PROBABILITIES: tf.nn.softmax(y, axis=-1) if outputs_logits else y}
        if stage is None:
            fmap = split.features(x)
            probabilities, heatmap = gradcam_graph(split, fmap, input_size)
        else:
            logits, fmap, heatmap = fine_heatmap(model, split, stage, fine_layer, x, input_size)
            probabilities = tf.nn.softmax(logits, axis=-1)
        return {PROBABILITIES: probabilities, HEATMAP: heatmap, FEATURES: tf.reduce_mean(fmap, axis=[1, 2])}

    spec = tf.TensorSpec([1, input_size, input_size, channels], tf.uint8, name=INPUT_NAME)
    module.serve = tf.function(serve, input_signature=[spec], autograph=False)
    return module, split


def _ends_in_softmax(model: Any) -> bool:
    """Whether the model's output is already a softmax (looking through dropout and nested models)."""
    tensor = model.outputs[0]
    while True:
        op, node_index, _ = tensor._keras_history
        if isinstance(op, keras.Model):
            tensor = op.outputs[0]
        elif isinstance(op, IDENTITY_LAYERS):
            tensor = _inputs_of(op, node_index)[0]
        else:
            return isinstance(op, keras.layers.Softmax) or _activation_name(op) == "softmax"
