"""Where a Keras model's int8 answers come from: weight rounding alone, and activation rounding alone.

    python docs/int8_error_sources.py runs/xception-frozen.keras --preprocess xception \\
        --calibration ../shared/data/brain-tumor-mri/Training --test ../shared/data/brain-tumor-mri/Testing

The figure README's issue-16 section quotes. `edge-convert`'s per-layer report (the quantization debugger)
ranks ops by their own error; it cannot say whether a model loses its answers to rounded *weights* or to
rounded *activations*, and the remedies differ (better weight rounding, bias correction: weights;
equalisation, clipping, more bits or float ops: activations). Here both are simulated in Keras, each alone,
the other kept float:

- weights: every kernel rounded as TFLite's int8 scheme does (symmetric, per output channel; per channel for
  depthwise kernels), after the converter's own equalisation (`convert.equalise`), by layer kind and all
  together;
- activations: every tensor TFLite stores as int8 (the outputs of a conv with its batch norm and ReLU folded
  in, of an add, a max-pool, and the input) rounded to 256 levels over its range on the calibration images
  (min/max, as the converter calibrates), weights float. The depthwise half of a separable convolution is
  inside one Keras layer and is not rounded here, so this is a lower bound on the activations' share.

Each is scored as top-1 agreement with the float model on the converter's check images (held-out calibration-
folder images, each with a seeded scanner-style change: `convert.agreement`) and on a whole test folder.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from convert import agreement, augment, calibration, equalise, normalisation, repair
from convert.converter import EQUALISE_IMAGES
from convert.keras_io import load_model

KINDS = ("depthwise", "pointwise", "conv", "dense")


def layers(model: keras.Model):
    """Every layer, nested models' included."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from layers(layer)
        else:
            yield layer


def round_weights(w: np.ndarray, channel_axis: int) -> np.ndarray:
    """Symmetric int8 rounding with one scale per slice along ``channel_axis`` (max |w| -> 127)."""
    m = np.moveaxis(w, channel_axis, -1)
    scale = np.abs(m).reshape(-1, m.shape[-1]).max(0) / 127.0
    scale[scale == 0] = 1.0
    return np.moveaxis(np.round(m / scale) * scale, -1, channel_axis).astype(np.float32)


def with_rounded_weights(model: keras.Model, kinds: tuple[str, ...]) -> None:
    """Round the kernels of the layer ``kinds`` in place."""
    for layer in layers(model):
        if isinstance(layer, keras.layers.SeparableConv2D):
            if "depthwise" in kinds:
                layer.depthwise_kernel.assign(round_weights(layer.depthwise_kernel.numpy(), 2))
            if "pointwise" in kinds:
                layer.pointwise_kernel.assign(round_weights(layer.pointwise_kernel.numpy(), 3))
        elif isinstance(layer, keras.layers.DepthwiseConv2D) and "depthwise" in kinds:
            layer.kernel.assign(round_weights(layer.kernel.numpy(), 2))
        elif isinstance(layer, keras.layers.Conv2D) and "conv" in kinds:
            layer.kernel.assign(round_weights(layer.kernel.numpy(), 3))
        elif isinstance(layer, keras.layers.Dense) and "dense" in kinds:
            layer.kernel.assign(round_weights(layer.kernel.numpy(), 1))


def _stored_as_int8(layer: keras.layers.Layer) -> bool:
    """Whether TFLite keeps this layer's output as a tensor (a conv or batch norm feeding a batch norm or a
    ReLU is folded into the op that follows)."""
    folded_into = (keras.layers.BatchNormalization, keras.layers.Activation, keras.layers.ReLU)
    if isinstance(layer, (keras.layers.Conv2D, keras.layers.BatchNormalization)):
        return not any(isinstance(n.operation, folded_into) for n in layer._outbound_nodes)
    return isinstance(layer, (keras.layers.Activation, keras.layers.ReLU, keras.layers.Add,
                              keras.layers.MaxPooling2D))


def with_rounded_activations(model: keras.Model, x: np.ndarray) -> keras.Model:
    """A copy of ``model`` (an input, one nested base model, then head layers) whose base rounds every int8
    tensor to 256 levels over its range on ``x`` (normalised inputs)."""
    base = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    chosen = [layer for layer in base.layers if _stored_as_int8(layer)]
    probe = keras.Model(base.inputs, [layer.output for layer in chosen])
    lo, hi = np.zeros(len(chosen)), np.zeros(len(chosen))
    for start in range(0, len(x), 8):
        for k, v in enumerate(probe(x[start:start + 8], training=False)):
            lo[k], hi[k] = min(lo[k], float(np.min(v))), max(hi[k], float(np.max(v)))
    ranges = {layer.name: (a, b) for layer, a, b in zip(chosen, lo, hi)}

    def rounded(t, a: float, b: float):
        return keras.layers.Lambda(lambda v: tf.quantization.fake_quant_with_min_max_vars(v, a, b, num_bits=8))(t)

    def call(layer, *args, **kwargs):
        out = layer(*args, **kwargs)
        return rounded(out, *ranges[layer.name]) if layer.name in ranges else out

    copy = keras.models.clone_model(base, call_function=call)
    copy.set_weights(base.get_weights())
    inputs = keras.Input(model.input_shape[1:])
    h = copy(rounded(inputs, float(x.min()), float(x.max())), training=False)
    for layer in model.layers[model.layers.index(base) + 1:]:
        h = layer(h)
    return keras.Model(inputs, h)


def scored(model: keras.Model, images: np.ndarray, reference: np.ndarray, norm) -> str:
    """Top-1 agreement of ``model`` with the float model's ``reference`` probabilities, and the mean change."""
    p = repair.keras_probabilities(model, images, norm)
    same = p.argmax(1) == reference.argmax(1)
    return f"{same.mean():.2%} ({int((~same).sum())} of {same.size} differ, mean |dp| {np.abs(p - reference).mean():.4f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--preprocess", required=True, help="Normalisation spec, as edge-convert's --preprocess.")
    parser.add_argument("--calibration", type=Path, required=True)
    parser.add_argument("--test", type=Path, required=True)
    parser.add_argument("--size", type=int, default=150)
    parser.add_argument("--pipeline", default="resize")
    args = parser.parse_args()
    model, _ = load_model(args.model)
    channels = int(model.input_shape[-1])
    norm = normalisation.parse(args.preprocess, channels)
    load = dict(size=args.size, channels=channels, pipeline=args.pipeline)
    calib = calibration.load_calibration(args.calibration, count=200, seed=0, **load)
    held, _ = agreement.heldout_images(calib, calibration_dir=args.calibration, heldout_dir=None,
                                       count=repair.CHECK_IMAGES, seed=0, **load)
    sets = {"check images (held-out variants)": augment.scanner_variants(held.images, 0),
            "test folder": calibration.load_images(args.test, count=10**6, seed=0, **load).images}
    reference = {name: repair.keras_probabilities(model, images, norm) for name, images in sets.items()}
    x = normalisation.apply(calib.images.astype(np.float32), norm)
    equalised = equalise.clone(model)
    equalise.equalise(equalised, x[:EQUALISE_IMAGES])
    for label, kinds in [(f"weights: {k}", (k,)) for k in KINDS] + [("weights: all", KINDS)]:
        rounded = equalise.clone(equalised)
        with_rounded_weights(rounded, kinds)
        print(label, "; ".join(f"{n} {scored(rounded, i, reference[n], norm)}" for n, i in sets.items()))
    rounded = with_rounded_activations(model, x)
    print("activations: all int8 tensors", "; ".join(f"{n} {scored(rounded, i, reference[n], norm)}"
                                                     for n, i in sets.items()))


if __name__ == "__main__":
    main()
