"""Training-time augmentation that mimics what changes between scanners and sites.

Geometry (rotation +-15 deg, shifts, zoom, horizontal flip) covers patient positioning; brightness,
contrast, gamma, blur and noise cover scanner gain, sequence and reconstruction differences. These
generalise to unseen hospitals, unlike tricks that only lift the in-distribution score.

Everything is written with ``keras.ops`` so the same arithmetic serves a tf.data input pipeline (the
CPU recipes) and layers inside a model on any Keras backend (JAX on a GPU machine, where augmenting in
the model keeps the accelerator fed).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
from keras import ops


def build(seed: int) -> keras.Sequential:
    """Random geometric transforms as Keras layers (active only when called with training=True)."""
    layers = [
        keras.layers.RandomRotation(15 / 360, fill_mode="constant", seed=seed),
        keras.layers.RandomTranslation(0.08, 0.08, fill_mode="constant", seed=seed + 1),
        keras.layers.RandomZoom((-0.12, 0.12), fill_mode="constant", seed=seed + 2),
        keras.layers.RandomFlip("horizontal", seed=seed + 3),
    ]
    if keras.backend.backend() == "jax":
        # Keras marks the affine layers not XLA-safe for TensorFlow's sake (its projective-transform op
        # has no XLA kernel); JAX's affine transform compiles, and an uncompiled JAX model runs op by op.
        for layer in layers:
            layer.supports_jit = True
    return keras.Sequential(layers, name="augment")


def intensity(x: Any, uniform: Callable[..., Any], normal: Callable[..., Any]) -> Any:
    """Per-image brightness, contrast, gamma, mild blur and Gaussian noise on 0..255 float pixels.

    ``uniform(shape, low, high)`` and ``normal(shape)`` supply the random numbers: TensorFlow's random
    ops inside tf.data, ``keras.random`` with a seed generator inside a model.
    """
    b = ops.shape(x)[0]
    u = lambda lo, hi: uniform((b, 1, 1, 1), lo, hi)  # noqa: E731
    y = ops.power(ops.clip(x / 255.0, 0.0, 1.0), ops.exp(u(-0.35, 0.35)))
    mean = ops.mean(y, axis=(1, 2, 3), keepdims=True)
    y = (y - mean) * u(0.75, 1.3) + mean + u(-0.08, 0.08)
    blur = ops.average_pool(y, 3, 1, "same")
    y = ops.where(u(0.0, 1.0) < 0.2, blur, y)
    y = y + normal(ops.shape(y)) * u(0.0, 0.03)
    return ops.clip(y, 0.0, 1.0) * 255.0


def site_style(x: Any, uniform: Callable[..., Any], normal: Callable[..., Any]) -> Any:
    """What differs between scanners beyond gain and contrast, on 0..255 float pixels [B, S, S, C].

    A smooth multiplicative bias field (coil sensitivity; up to about +-30% across the head) on every
    image, and on a random third of them a loss of resolution (thick slices, low-field scanners, a film
    photographed by a phone): the image averaged 2x2, scaled back up, and blended with the original by a
    random weight, which spans resolutions between full and half with static shapes (tf.data and XLA
    need those).
    """
    b, s = ops.shape(x)[0], ops.shape(x)[1]
    coarse = normal((b, 4, 4, 1)) * uniform((b, 1, 1, 1), 0.0, 0.3)
    field = ops.exp(ops.image.resize(coarse, (s, s), interpolation="bilinear"))
    y = ops.clip(x * field, 0.0, 255.0)
    low = ops.image.resize(ops.average_pool(y, 2, 2, "valid"), (s, s), interpolation="bilinear")
    t = uniform((b, 1, 1, 1), 0.4, 1.0)
    return ops.where(uniform((b, 1, 1, 1), 0.0, 1.0) < 0.33, t * low + (1.0 - t) * y, y)


def edge_enhancement(x: Any, uniform: Callable[..., Any], normal: Callable[..., Any]) -> Any:
    """The sharpening filter of many scanners' reconstructions and PACS exports, on 0..255 float pixels.

    On half the images an unsharp mask, ``x + a (x - blur(x))`` with ``a`` in 0.5..2: edges gain an overshoot
    and the noise already in the image is amplified into grain, as on an edge-enhanced export. ``normal`` is
    unused; the signature is every pixel transform's.
    """
    b = ops.shape(x)[0]
    amount = uniform((b, 1, 1, 1), 0.5, 2.0) * ops.cast(uniform((b, 1, 1, 1), 0.0, 1.0) < 0.5, "float32")
    return ops.clip(x + amount * (x - ops.average_pool(x, 3, 1, "same")), 0.0, 255.0)


#: Knots of :func:`contrast_curves` over 0..1: five segments, enough to reorder a handful of tissue classes.
CURVE_KNOTS = 6


def contrast_curves(x: Any, uniform: Callable[..., Any], share: float) -> Any:
    """On a random ``share`` of the images, every intensity mapped through its own random curve, 0..255 floats.

    Why: the training tumours are mostly T1 (often post-contrast) slices, while a clinic also scans T2 and
    FLAIR, where tissues keep their shapes but swap brightness (fluid dark on T1 and FLAIR, bright on T2;
    oedema bright on FLAIR). A gain or gamma change cannot reorder tissues; a random piecewise-linear curve
    with random, unordered values at :data:`CURVE_KNOTS` knots can, so the network has to find a lesion by its
    shape and its contrast with the tissue around it rather than by one sequence's grey levels (the idea of
    the contrast randomisation in SynthSeg, Billot et al. 2023). The curve keeps 0 at 0, so the background
    stays black, and its highest knot is 255, as the contrast stretch of the preprocessing would leave it. Written as
    a sum of hat functions (elementwise ops, static shapes) so it runs in tf.data and in a model alike.
    """
    b = ops.shape(x)[0]
    k = CURVE_KNOTS - 1
    values = ops.concatenate([ops.zeros((b, 1)), uniform((b, k), 0.0, 1.0)], axis=1)
    values = values / ops.maximum(ops.max(values, axis=1, keepdims=True), 1e-3)
    v = ops.clip(x / 255.0, 0.0, 1.0) * k
    y = ops.zeros_like(x)
    for j in range(1, CURVE_KNOTS):
        y = y + ops.reshape(values[:, j], (b, 1, 1, 1)) * ops.maximum(0.0, 1.0 - ops.abs(v - j))
    return ops.where(uniform((b, 1, 1, 1), 0.0, 1.0) < share, y * 255.0, x)


class _RandomPixels(keras.layers.Layer):
    """A pixel-level random transform as a layer: random per image in training, the identity at inference."""

    transform: Callable[..., Any]

    def __init__(self, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seed = seed
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, x: Any, training: bool = False) -> Any:
        if not training:
            return x
        return self.apply_random(x, lambda s, lo, hi: keras.random.uniform(s, lo, hi, seed=self.generator),
                                 lambda s: keras.random.normal(s, seed=self.generator))

    def apply_random(self, x: Any, uniform: Callable[..., Any], normal: Callable[..., Any]) -> Any:
        """The transform with this layer's random numbers (a subclass with parameters overrides this)."""
        return type(self).transform(x, uniform, normal)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "seed": self.seed}


class Intensity(_RandomPixels):
    """:func:`intensity` as a layer."""

    transform = staticmethod(intensity)


class SiteStyle(_RandomPixels):
    """:func:`site_style` as a layer."""

    transform = staticmethod(site_style)


class ContrastCurves(_RandomPixels):
    """:func:`contrast_curves` as a layer: a random curve on ``share`` of the images in training, else the identity."""

    def __init__(self, share: float, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(seed, **kwargs)
        self.share = float(share)

    def apply_random(self, x: Any, uniform: Callable[..., Any], normal: Callable[..., Any]) -> Any:
        return contrast_curves(x, uniform, self.share)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "share": self.share}


#: Images per batch through `scanner_variants` (bounds its float32 working copy).
VARIANT_BATCH = 64


PixelTransform = Callable[[Any, Callable[..., Any], Callable[..., Any]], Any]
#: The pixel changes of an export from another site (`convert.gate_calibration`'s variants).
EXPORT_STYLE: tuple[PixelTransform, ...] = (intensity, edge_enhancement)


def scanner_variants(images: Any, seed: int, transforms: tuple[PixelTransform, ...] = (intensity,)) -> Any:
    """One seeded copy of each uint8 image [N, S, S, C] with random ``transforms`` applied in turn, as uint8.

    Why: the conversion check (`convert.agreement`) needs images whose answers the model was not fitted to.
    Held-out images from a training folder are, for most published models, images the head was trained on,
    and int8 changes far fewer of their answers than of new scans' (issue 16's frozen-base Xception: 1.3% of
    held-out `Training/` answers, 3.4% on the test split). The same images with a scanner-style change of gain,
    contrast, gamma, blur and noise lose about as many as the test split (3.3%), with no new data. The input
    gate's calibration (`convert.gate_calibration.export_variant`) applies :data:`EXPORT_STYLE` instead.
    """
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    uniform = lambda shape, lo, hi: tf.constant(rng.uniform(lo, hi, shape).astype(np.float32))  # noqa: E731
    normal = lambda shape: tf.constant(rng.standard_normal(shape).astype(np.float32))  # noqa: E731
    out = np.empty_like(np.asarray(images, np.uint8))
    for start in range(0, len(out), VARIANT_BATCH):
        batch = np.asarray(images[start:start + VARIANT_BATCH], np.float32)
        for transform in transforms:
            batch = transform(batch, uniform, normal)
        changed = np.asarray(batch)
        out[start:start + VARIANT_BATCH] = np.clip(np.round(changed), 0, 255).astype(np.uint8)
    return out
