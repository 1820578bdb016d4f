"""Grad-CAM (or LayerCAM) with ``tf.GradientTape`` on the float Keras model: the yardstick for the in-graph head.

It shares only the *split* (where the feature map is) and the final post-processing
(:func:`convert.gradcam_head.class_activation_map`, or `layer_cam` with a fine layer) with the converter; the gradient itself comes from
automatic differentiation through the real Keras layers, so a wrong closed-form derivative in the head
shows up as a low correlation in tests and in the parity report.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, NamedTuple

import keras
import numpy as np
import tensorflow as tf

from convert import gradcam_head, normalisation


class GradCam(NamedTuple):
    """One explained prediction: heatmap [S, S] in [0, 1], probabilities [C], predicted class index."""

    heatmap: np.ndarray
    probabilities: np.ndarray
    predicted: int


def _logits(split: gradcam_head.Split, features: tf.Tensor) -> tf.Tensor:
    """Run the head's Keras layers up to the class scores, bypassing a Dense layer's built-in softmax."""
    x = features
    last = len(split.logit_layers) - 1
    for i, layer in enumerate(split.logit_layers):
        if i == last and split.softmax_in_last:
            x = keras.ops.matmul(x, layer.kernel)
            if layer.use_bias:
                x = x + layer.bias
        else:
            x = layer(x, training=False)
    return x


def make_reference(model: Any, target_layer: str | None = None,
                   preprocess: str | normalisation.Normalisation = "none",
                   fine_layer: str | None = None) -> Callable[[np.ndarray], GradCam]:
    """Build (once) a function ``uint8 image [S,S,C] or [1,S,S,C] -> GradCam`` for ``model``.

    ``preprocess`` is the normalisation the model was trained with (a name for
    :func:`convert.normalisation.parse` or a parsed one); the image is raw prepared pixels, exactly what the
    TFLite model receives. With ``fine_layer`` the map is LayerCAM of that layer and the target, both
    gradients taken by the tape through the real Keras layers between them.
    """
    split = gradcam_head.split_model(model, target_layer)
    channels = int(model.inputs[0].shape[-1])
    norm = preprocess if isinstance(preprocess, normalisation.Normalisation) else normalisation.parse(
        preprocess, channels)
    if fine_layer:
        early_model = gradcam_head.fine_stage(model, fine_layer)
        target = model.get_layer(split.target_layer).output
        between = keras.Model(model.get_layer(fine_layer).output, target)

    def score_of(logits: tf.Tensor) -> tf.Tensor:
        return tf.reduce_sum(logits * tf.one_hot(tf.argmax(logits, axis=-1), tf.shape(logits)[-1]))

    @tf.function(reduce_retracing=True, autograph=False)
    def run(image: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x = normalisation.apply(tf.cast(image, tf.float32), norm)
        size = int(image.shape[1])
        if fine_layer:
            early = early_model(x, training=False)
            with tf.GradientTape() as tape:
                tape.watch(early)
                features = between(early, training=False)
                score = score_of(_logits(split, features))
            grads = tape.gradient(score, [early, features])
            heatmap = gradcam_head.layer_cam([early, features], grads, size)
        else:
            features = split.features(x)
            with tf.GradientTape() as tape:
                tape.watch(features)
                score = score_of(_logits(split, features))
            heatmap = gradcam_head.class_activation_map(features, tape.gradient(score, features), size)
        outputs = model(x, training=False)
        probabilities = tf.nn.softmax(outputs, axis=-1) if split.outputs_logits else outputs
        return probabilities, heatmap

    def explain(image: np.ndarray) -> GradCam:
        batch = np.asarray(image, np.uint8)
        if batch.ndim == 3:
            batch = batch[None]
        if batch.ndim != 4 or batch.shape[0] != 1:
            raise ValueError(f"expected one uint8 image [S, S, C] or [1, S, S, C], got shape {np.shape(image)}")
        probabilities, heatmap = run(tf.constant(batch))
        p = probabilities.numpy()[0]
        return GradCam(heatmap.numpy()[0], p, int(np.argmax(p)))

    return explain


_CACHE: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def gradcam(model: Any, image_uint8: np.ndarray, target_layer: str | None = None,
            preprocess: str | normalisation.Normalisation = "none", fine_layer: str | None = None) -> GradCam:
    """Grad-CAM of the predicted class for one prepared uint8 image (reference implementation).

    Repeated calls with the same model, target and normalisation reuse the traced function, so looping
    over a folder costs one trace.
    """
    per_model = _CACHE.setdefault(model, {})
    key = (target_layer, preprocess, fine_layer)
    if key not in per_model:
        per_model[key] = make_reference(model, target_layer, preprocess, fine_layer)
    return per_model[key](image_uint8)
