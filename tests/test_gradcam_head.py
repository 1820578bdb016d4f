"""The in-graph Grad-CAM head: closed-form backward pass == GradientTape, and it survives TFLite conversion.

Every check runs real conversions of tiny Keras models and the real LiteRT interpreter: the float32
file must reproduce the GradientTape Grad-CAM almost exactly (the closed form is exact maths), the int8
file must stay close, use only builtin ops, and never divide by zero.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from convert import calibration, converter, gradcam_head, normalisation, parity, reference_gradcam  # noqa: E402

L = keras.layers


def _randomise_batchnorm(model, seed: int) -> None:
    """Give every BatchNormalization non-trivial statistics, so a wrong BN derivative shows."""
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, L.BatchNormalization):
            n = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(0, 0.2, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.3, 2.0, n).astype("float32"))
            layer.gamma.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
            layer.beta.assign(rng.normal(0, 0.2, n).astype("float32"))


def nested_mobilenet():
    """(a) keras.applications MobileNetV2 nested as a layer + GAP + Dense(relu) + Dropout + Dense(softmax).

    64 px rather than the smallest allowed 32: at 32 px the last feature map is 1x1 and every heatmap is flat.
    """
    keras.utils.set_random_seed(1)
    base = keras.applications.MobileNetV2(input_shape=(64, 64, 3), alpha=0.35, include_top=False, weights=None)
    inputs = keras.Input((64, 64, 3))
    x = L.GlobalAveragePooling2D()(base(inputs))
    x = L.Dropout(0.3)(L.Dense(16, activation="relu")(x))
    model = keras.Model(inputs, L.Dense(4, activation="softmax")(x))
    _randomise_batchnorm(model, 1)
    return model, "tf"


def sequential_flatten():
    """(b) Sequential CNN with BatchNorm + Flatten + Dense(relu) + Dense logits."""
    keras.utils.set_random_seed(2)
    model = keras.Sequential([
        keras.Input((32, 32, 1)), L.Conv2D(8, 3, activation="relu"), L.BatchNormalization(), L.MaxPooling2D(),
        L.Conv2D(8, 3), L.ReLU(name="last_relu"), L.Flatten(), L.Dense(16, activation="relu"), L.Dense(3)])
    _randomise_batchnorm(model, 2)
    return model, "0-1"


def functional_bn_head():
    """(c) Functional, BatchNormalization in the head, LeakyReLU, separate Softmax layer; bias-free features
    so that a black image gives an all-zero feature map (the divide-by-zero case)."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((32, 32, 3))
    x = L.Activation("relu")(L.Conv2D(8, 3, padding="same", use_bias=False)(inputs))
    x = L.ReLU(name="feat")(L.Conv2D(12, 3, strides=2, use_bias=False, name="conv_b")(x))
    x = L.BatchNormalization()(L.GlobalAveragePooling2D()(x))
    x = L.Dropout(0.2)(L.LeakyReLU(0.1)(L.Dense(8)(x)))
    model = keras.Model(inputs, L.Softmax()(L.Dense(4)(x)))
    _randomise_batchnorm(model, 3)
    return model, "0-1"


BUILDERS = {"nested-mobilenetv2": nested_mobilenet, "sequential-flatten": sequential_flatten,
            "functional-bn-head": functional_bn_head}
EXPECTED = {  # target layer, head layer classes
    "nested-mobilenetv2": ("out_relu", ["GlobalAveragePooling2D", "Dense", "Dropout", "Dense"]),
    "sequential-flatten": ("last_relu", ["Flatten", "Dense", "Dense"]),
    "functional-bn-head": ("feat", ["GlobalAveragePooling2D", "BatchNormalization", "Dense", "LeakyReLU",
                                    "Dropout", "Dense", "Softmax"]),
}


def _images(directory: Path, model, count: int = 8) -> np.ndarray:
    size, channels = int(model.inputs[0].shape[1]), int(model.inputs[0].shape[-1])
    return calibration.load_images(directory, size=size, channels=channels, pipeline="resize", count=count).images


def _tflite(model, preprocess: str, workdir: Path, images: np.ndarray | None = None, gradcam: bool = True,
            fine_layer: str | None = None, **int8_options) -> bytes:
    """Real conversion of the serving graph: float32, or int8 when calibration images are given."""
    size, channels = int(model.inputs[0].shape[1]), int(model.inputs[0].shape[-1])
    module, _ = gradcam_head.build_module(model, norm=normalisation.parse(preprocess, channels), input_size=size,
                                         channels=channels, gradcam=gradcam, fine_layer=fine_layer)
    saved = converter.export_saved_model(module, model, workdir / "saved_model")
    return converter.to_float32(saved) if images is None else converter.to_int8(saved, images, **int8_options)


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_fp32_head_equals_gradient_tape(kind: str, convert_image_dir: Path, tmp_path: Path):
    model, preprocess = BUILDERS[kind]()
    split = gradcam_head.split_model(model)
    target, head = EXPECTED[kind]
    assert split.target_layer == target
    assert [type(layer).__name__ for layer in split.head] == head

    images = _images(convert_image_dir, model)
    run = parity.tflite_runner(_tflite(model, preprocess, tmp_path))
    reference = reference_gradcam.make_reference(model, preprocess=preprocess)
    structured = 0
    for image in images:
        probabilities, heatmap = run(image)
        ref = reference(image)
        assert heatmap.shape == (image.shape[0], image.shape[1])
        np.testing.assert_allclose(probabilities, ref.probabilities, atol=1e-5)
        np.testing.assert_allclose(heatmap, ref.heatmap, atol=2e-3)
        if ref.heatmap.std() > 1e-3:
            structured += 1
            assert parity.pearson(heatmap, ref.heatmap) > 0.99
    assert structured >= len(images) // 2  # the maps compared are not flat


def test_reference_matches_model_outputs(convert_image_dir: Path):
    """The reference explains what the Keras model predicts, cached across calls."""
    model, preprocess = sequential_flatten()
    image = _images(convert_image_dir, model, 1)[0]
    norm = normalisation.parse(preprocess, 1)
    logits = model(normalisation.apply(image[None].astype(np.float32), norm)).numpy()[0]
    first = reference_gradcam.gradcam(model, image, preprocess=preprocess)
    again = reference_gradcam.gradcam(model, image[None], preprocess=preprocess)
    np.testing.assert_allclose(first.probabilities, tf.nn.softmax(logits).numpy(), atol=1e-6)
    assert first.predicted == int(np.argmax(logits))
    assert first.heatmap.min() >= 0 and first.heatmap.max() == pytest.approx(1.0)
    np.testing.assert_array_equal(first.heatmap, again.heatmap)


def test_int8_head_runs_and_stays_faithful(convert_image_dir: Path, tmp_path: Path):
    model, preprocess = functional_bn_head()
    calib = _images(convert_image_dir, model, 20)
    blob = _tflite(model, preprocess, tmp_path, images=calib)
    ops, float_ops, custom = converter.list_ops(blob)
    assert not custom and "FLEX" not in " ".join(ops)
    assert {"CONV_2D", "FULLY_CONNECTED", "RESIZE_BILINEAR"} <= set(ops)
    assert "CONV_2D" not in float_ops and "FULLY_CONNECTED" not in float_ops  # the network itself is int8
    interpreter = parity.make_interpreter(blob)
    (detail,) = interpreter.get_input_details()
    assert detail["dtype"] == np.uint8 and list(detail["shape"]) == [1, 32, 32, 3]
    outputs = interpreter.get_signature_list()["serving_default"]["outputs"]
    assert sorted(outputs) == ["features", "heatmap", "probabilities"]  # features: for the input gate

    run = parity.tflite_runner(blob)
    reference = reference_gradcam.make_reference(model, preprocess=preprocess)
    rs = []
    for image in calib[:10]:
        probabilities, heatmap = run(image)
        assert probabilities.shape == (4,) and abs(float(probabilities.sum()) - 1.0) < 0.02
        assert heatmap.shape == (32, 32) and heatmap.min() >= 0.0 and heatmap.max() <= 1.0
        ref = reference(image)
        assert heatmap.max() == pytest.approx(1.0) or ref.heatmap.max() < 0.5  # normalised unless empty
        rs.append(parity.pearson(heatmap, ref.heatmap))
    assert np.nanmedian(rs) > 0.9

    # A black image gives an all-zero feature map: the heatmap is all zeros, not a division by zero.
    probabilities, heatmap = run(np.zeros((32, 32, 3), np.uint8))
    assert not heatmap.any() and abs(float(probabilities.sum()) - 1.0) < 0.02


def test_sensitive_parts_can_stay_float(convert_image_dir: Path, tmp_path: Path):
    """The escape hatch for nets that lose too much in int8: named layers or op types stay float (builtin)."""
    model, preprocess = functional_bn_head()
    calib = _images(convert_image_dir, model, 8)
    blob = _tflite(model, preprocess, tmp_path / "layer", images=calib, float_layers=["conv_b"])
    _, float_ops, custom = converter.list_ops(blob)
    assert float_ops.get("CONV_2D") == 1 and not custom
    blob = _tflite(model, preprocess, tmp_path / "ops", images=calib, float_ops=["FULLY_CONNECTED"])
    assert converter.list_ops(blob)[1].get("FULLY_CONNECTED", 0) >= 2
    with pytest.raises(ValueError, match="float layer 'conv_z' matches no op"):
        _tflite(model, preprocess, tmp_path / "typo", images=calib, float_layers=["conv_z"])


def test_without_heatmap_only_probabilities(convert_image_dir: Path, tmp_path: Path):
    """gradcam=False: the same input pipeline and network, one output (the benchmark's baseline)."""
    model, preprocess = sequential_flatten()
    image = _images(convert_image_dir, model, 1)[0]
    plain = parity.make_interpreter(_tflite(model, preprocess, tmp_path / "plain", gradcam=False))
    assert plain.get_signature_list()["serving_default"]["outputs"] == ["probabilities"]
    out = plain.get_signature_runner("serving_default")(image=image[None])["probabilities"][0]
    with_head, _ = parity.tflite_runner(_tflite(model, preprocess, tmp_path / "head"))(image)
    np.testing.assert_allclose(out, with_head, atol=1e-5)


def _head_model(*head_layers, pool=None):
    inputs = keras.Input((16, 16, 1))
    x = L.Conv2D(4, 3, name="conv")(inputs)
    x = (pool or L.GlobalAveragePooling2D())(x)
    for layer in head_layers:
        x = layer(x)
    return keras.Model(inputs, x)


def test_head_layer_without_closed_form_is_named():
    model = _head_model(L.Dense(3, activation="softmax"), pool=L.GlobalMaxPooling2D(name="gmp"))
    with pytest.raises(ValueError, match=r"'gmp' \(GlobalMaxPooling2D\)"):
        gradcam_head.split_model(model)
    model = _head_model(L.Lambda(lambda t: t * 2.0, name="double"), L.Dense(3))
    with pytest.raises(ValueError, match=r"'double' \(Lambda\)"):
        gradcam_head.split_model(model)
    model = _head_model(L.Dense(3, activation="selu", name="odd"), L.Dense(3))
    with pytest.raises(ValueError, match=r"activation 'selu' of head layer 'odd'"):
        gradcam_head.split_model(model)


def test_bad_targets_and_heads_are_explained():
    model = _head_model(L.Dense(3, name="scores"))
    with pytest.raises(ValueError, match=r"'scores' \(Dense\) outputs shape \(None, 3\).*4-D"):
        gradcam_head.split_model(model, "scores")
    with pytest.raises(ValueError, match="no layer named 'nope'"):
        gradcam_head.split_model(model, "nope")
    assert gradcam_head.split_model(model, "conv").target_layer == "conv"
    sigmoid = _head_model(L.Dense(3, activation="sigmoid", name="sig"))
    with pytest.raises(ValueError, match="must end in logits or softmax"):
        gradcam_head.split_model(sigmoid)

    inputs = keras.Input((16, 16, 1))
    feat = L.Conv2D(4, 3, name="conv")(inputs)
    a, b = L.GlobalAveragePooling2D()(feat), L.GlobalAveragePooling2D()(feat)
    branched = keras.Model(inputs, L.Dense(2)(L.Concatenate(name="join")([a, b])))
    with pytest.raises(ValueError, match=r"'join' \(Concatenate\) has 2 inputs"):
        gradcam_head.split_model(branched)


def test_any_size_model_gets_its_feature_shape_from_the_input_size(tmp_path: Path):
    """A fully convolutional model (input None x None) is converted at the size asked for."""
    keras.utils.set_random_seed(4)
    inputs = keras.Input((None, None, 1))
    x = L.Conv2D(6, 3, strides=2, activation="relu", name="conv")(inputs)
    model = keras.Model(inputs, L.Dense(3, activation="softmax")(L.GlobalAveragePooling2D()(x)))
    module, split = gradcam_head.build_module(model, norm=normalisation.parse("0-1", 1), input_size=24, channels=1)
    assert split.feature_shape == (11, 11, 6)
    run = parity.tflite_runner(converter.to_float32(converter.export_saved_model(module, model, tmp_path / "sm")))
    image = np.random.default_rng(4).integers(0, 256, (24, 24, 1)).astype(np.uint8)
    probabilities, heatmap = run(image)
    ref = reference_gradcam.gradcam(model, image, preprocess="0-1")
    np.testing.assert_allclose(probabilities, ref.probabilities, atol=1e-5)
    np.testing.assert_allclose(heatmap, ref.heatmap, atol=2e-3)
    with pytest.raises(ValueError, match="accepts any input size; pass --input-size"):
        converter.resolve_settings(model, None, source=None, calibration_dir=tmp_path, labels=["a", "b", "c"],
                                   preprocess="0-1", input_size=None, pipeline=None, name=None)
