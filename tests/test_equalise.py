"""Cross-layer equalisation: float-equivalent, evens the channels, and cuts the int8 error it targets.

The model is Xception in miniature: separable convolutions inside a nested base model and one in the outer
model, with BatchNorm/ReLU between them. Its channel scales are then moved between the depthwise and the
pointwise kernels at random (what training leaves behind, since nothing pins them): the float function does
not change, the int8 one suffers. Conversions are real, and run in the real LiteRT interpreter.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from convert import (calibration, converter, equalise, gradcam_head, normalisation, parity,  # noqa: E402
                     reference_gradcam)

L = keras.layers
SIZE = 32


def mini_xception(seed: int = 5):
    keras.utils.set_random_seed(seed)
    inner_in = keras.Input((SIZE, SIZE, 3))
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(inner_in)))
    x = L.SeparableConv2D(24, 3, padding="same", use_bias=False, name="sep_a")(x)
    x = L.ReLU()(L.BatchNormalization()(x))
    x = L.SeparableConv2D(32, 3, padding="same", use_bias=False, depth_multiplier=2, name="sep_b")(x)
    base = keras.Model(inner_in, L.ReLU()(L.BatchNormalization()(x)), name="base")
    inputs = keras.Input((SIZE, SIZE, 3))
    x = L.SeparableConv2D(32, 3, strides=2, padding="same", name="sep_c")(base(inputs))
    x = L.GlobalAveragePooling2D()(L.ReLU(name="feat")(x))
    model = keras.Model(inputs, L.Dense(4, activation="softmax")(x))
    rng = np.random.default_rng(seed)
    for layer in equalise.separable_layers(model):
        depthwise = layer.depthwise_kernel.numpy()
        r = np.exp(rng.normal(0.0, 2.0, depthwise.shape[2:])).astype(np.float32)
        layer.depthwise_kernel.assign(depthwise * r)
        layer.pointwise_kernel.assign(layer.pointwise_kernel.numpy() / r.reshape(1, 1, -1, 1))
    return model


def _inputs(convert_image_dir: Path, count: int) -> tuple[np.ndarray, np.ndarray]:
    images = calibration.load_images(convert_image_dir, size=SIZE, channels=3, pipeline="resize", count=count).images
    return images, normalisation.apply(images.astype(np.float32), normalisation.parse("tf", 3))


def test_finds_nested_and_outer_separable_layers():
    assert [layer.name for layer in equalise.separable_layers(mini_xception())] == ["sep_a", "sep_b", "sep_c"]


def test_same_float_function_and_even_channels(convert_image_dir: Path):
    model = mini_xception()
    _, x = _inputs(convert_image_dir, 20)
    before = model.predict(x, verbose=0)
    original = [w.copy() for w in model.get_weights()]
    copy = equalise.clone(model)
    result = equalise.equalise(copy, x)

    assert result.layers == ("sep_a", "sep_b", "sep_c")
    np.testing.assert_allclose(copy.predict(x, verbose=0), before, rtol=1e-4, atol=1e-6)
    for a, b in zip(model.get_weights(), original):  # the caller's model is untouched
        np.testing.assert_array_equal(a, b)
    measured = equalise.activation_ranges(copy, x)
    for name, spread_before, spread_after in zip(result.layers, result.spread_before, result.spread_after):
        assert spread_before > 10 * spread_after
        live = measured[name][measured[name] > equalise.EPSILON]
        assert live.max() / np.median(live) == pytest.approx(spread_after, rel=1e-3)


def test_sequential_models_too():
    keras.utils.set_random_seed(6)
    model = keras.Sequential([keras.Input((16, 16, 3)), L.SeparableConv2D(8, 3, name="s1"), L.ReLU(),
                              L.SeparableConv2D(4, 3, depth_multiplier=3, name="s2"), L.GlobalAveragePooling2D(),
                              L.Dense(2)])
    x = np.random.default_rng(6).uniform(-1, 1, (6, 16, 16, 3)).astype(np.float32)
    before = model.predict(x, verbose=0)
    copy = equalise.clone(model)
    assert equalise.equalise(copy, x).layers == ("s1", "s2")
    np.testing.assert_allclose(copy.predict(x, verbose=0), before, rtol=1e-4, atol=1e-6)


def test_dead_channels_keep_scale_one():
    pointwise = np.ones((1, 1, 3, 2))
    pointwise[:, :, 2, :] = 0.0
    s = equalise.scales(np.array([4.0, 0.0, 9.0]), pointwise)
    np.testing.assert_allclose(s, [2.0, 1.0, 1.0])


def _int8_heatmap_fidelity(model, images: np.ndarray, workdir: Path) -> float:
    """Median Pearson r between the int8 file's heatmaps and GradientTape Grad-CAM on the float model.

    The heatmap is the sensitive read-out here: the random head's probabilities sit near 1/4 whatever the
    features, while the Grad-CAM map is the feature map itself, weighted.
    """
    module, _ = gradcam_head.build_module(model, norm=normalisation.parse("tf", 3), input_size=SIZE, channels=3)
    run = parity.tflite_runner(converter.to_int8(converter.export_saved_model(module, model, workdir), images))
    reference = reference_gradcam.make_reference(model, preprocess="tf")
    return float(np.median([parity.pearson(run(image)[1], reference(image).heatmap) for image in images]))


def test_equalising_repairs_the_int8_model(convert_image_dir: Path, tmp_path: Path):
    model = mini_xception()
    images, x = _inputs(convert_image_dir, 12)
    plain = _int8_heatmap_fidelity(model, images, tmp_path / "plain")
    copy = equalise.clone(model)
    equalise.equalise(copy, x)
    equalised = _int8_heatmap_fidelity(copy, images, tmp_path / "equalised")
    assert plain < 0.5 and equalised > 0.95, (plain, equalised)


def test_converter_equalises_by_default_and_records_it(convert_image_dir: Path, tmp_path: Path):
    model = mini_xception()
    original = [w.copy() for w in model.get_weights()]
    result = converter.convert_model(model, calibration_dir=convert_image_dir, out=tmp_path / "m.tflite",
                                     preprocess="tf", num_calibration=8)
    recorded = result.metadata["converter"]["settings"]["equalised"]
    assert recorded["layers"] == 3 and recorded["median_spread_after"] < recorded["median_spread_before"]
    for a, b in zip(model.get_weights(), original):
        np.testing.assert_array_equal(a, b)
    off = converter.convert_model(model, calibration_dir=convert_image_dir, out=tmp_path / "off.tflite",
                                  preprocess="tf", num_calibration=8, equalise=False)
    assert off.metadata["converter"]["settings"]["equalised"] is None
