"""Mask-guided training: the class evidence (the heatmap the device shows) is asked to lie on the lesion.

For a GAP -> Dense classifier the Grad-CAM the converter builds in-graph equals the class activation map
CAM_c = sum_k w_kc A_k (up to a positive factor), so the map can be trained directly: besides the
cross-entropy, every sample that has a lesion mask pays the share of its true class's positive CAM energy
that falls outside the mask (1 - energy-based pointing game, Wang et al. 2020). A network trained this way
cannot win by looking at where a slice came from or at a fixed place in the head, which is both what the
heatmap issue asks for and a lever on generalisation (Ross et al. 2017, "right for the right reasons").
Healthy slices and tumours without a mask pay only the cross-entropy.

:class:`GuidedModel` wraps the real classifier (sharing its variables; it is never saved) and overrides
``train_step``/``test_step`` (TensorFlow backend, as the CPU recipe runs).
"""
from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

#: Labels smoothing of the cross-entropy, as in the plain recipe.
LABEL_SMOOTHING = 0.05


def outside_energy(cam: tf.Tensor, mask: tf.Tensor, eps: float = 1e-6) -> tf.Tensor:
    """Per sample, the share of ReLU(cam) outside ``mask`` (both [B, h, w]; mask in 0..1). 0 = all inside."""
    pos = tf.nn.relu(cam)
    total = tf.reduce_sum(pos, axis=(1, 2))
    inside = tf.reduce_sum(pos * mask, axis=(1, 2))
    return 1.0 - inside / (total + eps)


class GuidedModel(keras.Model):
    """``net`` trained on cross-entropy + ``mask_weight`` x outside-mask CAM energy at layer ``feature_layer``.

    Batches are ``(x, (onehot, mask_grid, has_mask, weight))``: ``mask_grid`` is the lesion's share of
    each feature-map cell [B, h, w], ``has_mask`` 1.0 where the sample has a mask, ``weight`` the class
    weight of the sample.
    """

    def __init__(self, net: Any, feature_layer: str, mask_weight: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.net = net
        self.mask_weight = float(mask_weight)
        self.feature_model = keras.Model(net.input, [net.get_layer(feature_layer).output, net.output])
        self.dense = net.get_layer("predictions")
        self.ce = keras.losses.CategoricalCrossentropy(label_smoothing=LABEL_SMOOTHING, reduction=None)
        self.trackers = {name: keras.metrics.Mean(name=name) for name in ("loss", "ce", "outside")}
        self.acc = keras.metrics.CategoricalAccuracy(name="accuracy")

    @property
    def metrics(self) -> list[Any]:
        return [*self.trackers.values(), self.acc]

    def call(self, x: Any, training: bool = False) -> Any:
        return self.net(x, training=training)

    def _objective(self, x: Any, target: tuple, training: bool) -> tuple[tf.Tensor, ...]:
        onehot, mask, has, weight = target
        feats, probs = self.feature_model(x, training=training)
        cam = tf.einsum("bhwk,kc,bc->bhw", feats, self.dense.kernel, onehot)
        ce = self.ce(onehot, probs) * weight
        outside = outside_energy(cam, mask) * has
        n_mask = tf.maximum(tf.reduce_sum(has), 1.0)
        ce_mean = tf.reduce_mean(ce)
        outside_mean = tf.reduce_sum(outside) / n_mask
        return ce_mean + self.mask_weight * outside_mean, ce_mean, outside_mean, probs

    def _record(self, loss: tf.Tensor, ce: tf.Tensor, outside: tf.Tensor, onehot: tf.Tensor,
                probs: tf.Tensor) -> dict[str, tf.Tensor]:
        for name, value in (("loss", loss), ("ce", ce), ("outside", outside)):
            self.trackers[name].update_state(value)
        self.acc.update_state(onehot, probs)
        return {m.name: m.result() for m in self.metrics}

    def train_step(self, data: Any) -> dict[str, tf.Tensor]:
        x, target = data
        with tf.GradientTape() as tape:
            loss, ce, outside, probs = self._objective(x, target, training=True)
        variables = self.net.trainable_variables
        self.optimizer.apply(tape.gradient(loss, variables), variables)
        return self._record(loss, ce, outside, target[0], probs)

    def test_step(self, data: Any) -> dict[str, tf.Tensor]:
        x, target = data
        loss, ce, outside, probs = self._objective(x, target, training=False)
        return self._record(loss, ce, outside, target[0], probs)
