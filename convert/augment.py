"""Training-time augmentation that mimics what changes between scanners and sites.

Geometry (rotation +-15 deg, shifts, zoom, horizontal flip) covers patient positioning; brightness,
contrast, gamma, blur and noise cover scanner gain, sequence and reconstruction differences. These
generalise to unseen hospitals, unlike tricks that only lift the in-distribution score.
"""
from __future__ import annotations

import tensorflow as tf


def build(seed: int) -> tf.keras.Sequential:
    """Random geometric transforms as Keras layers (active only when called with training=True)."""
    import keras

    return keras.Sequential(
        [
            keras.layers.RandomRotation(15 / 360, fill_mode="constant", seed=seed),
            keras.layers.RandomTranslation(0.08, 0.08, fill_mode="constant", seed=seed + 1),
            keras.layers.RandomZoom((-0.12, 0.12), fill_mode="constant", seed=seed + 2),
            keras.layers.RandomFlip("horizontal", seed=seed + 3),
        ],
        name="augment",
    )


def intensity(x: tf.Tensor) -> tf.Tensor:
    """Per-image brightness, contrast, gamma, mild blur and Gaussian noise on 0..255 float pixels."""
    b = tf.shape(x)[0]
    u = lambda lo, hi: tf.random.uniform([b, 1, 1, 1], lo, hi)  # noqa: E731
    y = x / 255.0
    y = tf.pow(tf.clip_by_value(y, 0.0, 1.0), tf.exp(u(-0.35, 0.35)))
    mean = tf.reduce_mean(y, axis=[1, 2, 3], keepdims=True)
    y = (y - mean) * u(0.75, 1.3) + mean + u(-0.08, 0.08)
    blur = tf.nn.avg_pool2d(y, 3, 1, "SAME")
    y = tf.where(u(0, 1) < 0.2, blur, y)
    y = y + tf.random.normal(tf.shape(y)) * u(0.0, 0.03)
    return tf.clip_by_value(y, 0.0, 1.0) * 255.0
