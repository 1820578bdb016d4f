"""The finer heatmap: LayerCAM of an earlier map and the target, with the backward pass between them in closed form.

The closed form must equal TensorFlow's own gradient (exact maths, float), survive real TFLite conversion
(float32 close to exact, int8 close, builtin ops only), and refuse the layers it cannot differentiate by
name. The recovery of a Keras model from the bundled int8 file is checked against that file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from convert import block_backward, converter, gradcam_head, normalisation, parity, reference_gradcam  # noqa: E402
from convert.architectures import custom_cnn  # noqa: E402
from test_gradcam_head import _images, _randomise_batchnorm, _tflite  # noqa: E402

L = keras.layers
REPO = Path(__file__).resolve().parents[1]


def residual_cnn():
    """The custom-cnn architecture, small: stem, four residual stages, max-pools, GAP head; 64 px, 1 channel."""
    keras.utils.set_random_seed(5)
    model = custom_cnn(64, 1, 3, width=8)
    _randomise_batchnorm(model, 5)
    return model


def odd_pool_block():
    """Conv -> BN -> ReLU -> max-pool over a 7x7 map (a row and column the pool never reads) -> residual add."""
    keras.utils.set_random_seed(6)
    inputs = keras.Input((14, 14, 2))
    early = L.ReLU(name="early")(L.Conv2D(4, 3, strides=2, padding="same")(inputs))
    x = L.MaxPooling2D(2, name="pool")(early)
    a = L.Conv2D(6, 3, padding="same", activation="relu", name="c3")(x)
    a = L.BatchNormalization(name="bn")(L.Conv2D(6, 3, padding="same", use_bias=False, name="c3b")(a))
    b = L.Conv2D(6, 1, name="short")(x)
    x = L.ReLU(name="late")(L.Add()([a, b]))
    model = keras.Model(inputs, L.Dense(3)(L.GlobalAveragePooling2D()(x)))
    _randomise_batchnorm(model, 6)
    return model


def test_closed_form_backward_equals_the_tape():
    model = odd_pool_block()
    early_model = keras.Model(model.input, model.get_layer("early").output)
    x = tf.constant(np.random.default_rng(0).normal(size=(1, 14, 14, 2)).astype(np.float32))
    early = early_model(x)
    late, back = block_backward.replay(model, "early", "late", early)
    forward = keras.Model(model.input, model.get_layer("late").output)(x)
    np.testing.assert_allclose(late.numpy(), forward.numpy(), atol=1e-5)  # the replay computes the model
    upstream = tf.constant(np.random.default_rng(1).normal(size=late.shape).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(early)
        out = keras.Model(model.get_layer("early").output, model.get_layer("late").output)(early)
        score = tf.reduce_sum(out * upstream)
    expected = tape.gradient(score, early).numpy()
    got = back(upstream).numpy()
    assert np.abs(expected).max() > 0  # the test compares something
    # Where the early map is zero, ReLU ties inside a pool window share the gradient here (TensorFlow gives
    # it to one of them); LayerCAM multiplies the gradient by the map, so only the non-zero positions count.
    live = early.numpy() > 0
    assert live.mean() > 0.3
    np.testing.assert_allclose(got[live], expected[live], atol=1e-5)
    assert not got[:, 6:, :, :].any() and not got[:, :, 6:, :].any()  # the rows the pool never reads


def test_layer_cam_on_hand_made_maps():
    """Per position activation x positive gradient; each map to peak 1, summed, to peak 1 again."""
    a = np.zeros((1, 2, 2, 2), np.float32)
    a[0, 0, 0] = [1.0, 5.0]   # channel 1 has a negative gradient: it must not count
    a[0, 1, 1] = [2.0, 0.0]
    g = np.zeros((1, 2, 2, 2), np.float32)
    g[..., 0], g[..., 1] = 1.0, -1.0
    coarse = np.ones((1, 1, 1, 1), np.float32)
    heat = gradcam_head.layer_cam([tf.constant(a), tf.constant(coarse)], [tf.constant(g), tf.ones((1, 1, 1, 1))], 2)
    np.testing.assert_allclose(heat.numpy()[0], [[0.75, 0.5], [0.5, 1.0]], atol=1e-6)
    empty = gradcam_head.layer_cam([tf.zeros((1, 2, 2, 2))], [tf.ones((1, 2, 2, 2))], 4)
    assert not empty.numpy().any()  # an all-zero map stays zero, no division by zero


def test_fine_heatmap_survives_conversion(convert_image_dir: Path, tmp_path: Path):
    model = residual_cnn()
    images = _images(convert_image_dir, model, 20)
    reference = reference_gradcam.make_reference(model, preprocess="0-1", fine_layer="b2_out")
    fp32 = parity.tflite_runner(_tflite(model, "0-1", tmp_path / "fp32", fine_layer="b2_out"))
    int8_blob = _tflite(model, "0-1", tmp_path / "int8", images=images, fine_layer="b2_out")
    ops, float_ops, custom = converter.list_ops(int8_blob)
    assert not custom and "FLEX" not in " ".join(ops)
    assert "CONV_2D" not in float_ops  # the backward convolutions are int8 like the forward ones
    int8 = parity.tflite_runner(int8_blob)
    r32, r8 = [], []
    for image in images[:10]:
        ref = reference(image)
        p32, h32 = fp32(image)
        np.testing.assert_allclose(p32, ref.probabilities, atol=1e-5)
        np.testing.assert_allclose(h32, ref.heatmap, atol=2e-3)
        r32.append(parity.pearson(h32, ref.heatmap))
        r8.append(parity.pearson(int8(image)[1], ref.heatmap))
    assert np.median(r32) > 0.999
    # Random weights at 64 px quantize worse than a trained network (the bundled one's conversion: median
    # 0.9985 on 200 held-out scans, in its parity report); a wrong derivative would land far lower.
    assert np.median(r8) > 0.85
    # The fine map is not the coarse one: LayerCAM and Grad-CAM of the same model differ.
    coarse = reference_gradcam.make_reference(model, preprocess="0-1")
    assert np.median([parity.pearson(reference(i).heatmap, coarse(i).heatmap) for i in images[:10]]) < 0.99


def test_layers_without_a_closed_form_are_named():
    keras.utils.set_random_seed(7)
    inputs = keras.Input((16, 16, 1))
    early = L.ReLU(name="early")(L.Conv2D(4, 3, padding="same")(inputs))
    late = L.ReLU(name="late")(L.Conv2D(4, 3, strides=2, padding="same", name="strided")(early))
    model = keras.Model(inputs, L.Dense(2)(L.GlobalAveragePooling2D()(late)))
    with pytest.raises(ValueError, match="'strided'"):
        block_backward.nodes_between(model, "early", "late")
    with pytest.raises(ValueError, match="does not come after"):
        block_backward.nodes_between(model, "late", "late")
    with pytest.raises(ValueError, match="no layer named 'nope'"):
        gradcam_head.build_module(model, norm=normalisation.parse("0-1", 1), input_size=16, channels=1,
                                  target_layer="late", fine_layer="nope")


def test_metadata_names_the_method_layers_and_grid():
    split = gradcam_head.split_model(residual_cnn())
    assert converter._gradcam_metadata(split, None)["method"] == "gradcam"
    meta = converter._gradcam_metadata(split, ("b2_out", [8, 8, 32]))
    assert meta["method"] == "layercam" and meta["layers"] == ["b2_out", "b3_out"] and meta["grid"] == [8, 8]


@pytest.mark.parametrize("name", ["custom-cnn", "xception"])
def test_recovered_keras_model_computes_the_bundled_file(name: str, tmp_path: Path, tiny_model_path: Path):
    """Both bundled int8 files rebuild into Keras models that give the file's label on every bundled sample,
    probabilities within 0.05 (custom-cnn: its batch norms and normalisation folded; xception: separable
    convolutions, residual convolutions and the input normalisation folded into the first convolution)."""
    from convert.from_tflite import recover
    from convert.keras_io import load_model, save_model
    from edge import Classifier
    from edge.decode import decode
    from edge.preprocess import prepare

    model_file = REPO / "edge" / "models" / f"{name}.tflite"
    model, carried = recover(model_file)
    save_model(model, tmp_path / "recovered.keras", carried)
    model, carried = load_model(tmp_path / "recovered.keras")
    assert carried["recovered_from"]["sha256"] and carried["labels"] == ["glioma", "meningioma", "notumor", "pituitary"]
    assert carried["name"] == name
    clf = Classifier(model=model_file)
    samples = sorted((REPO / "edge" / "samples").glob("*.jpg"))
    assert samples
    size, channels = carried["input_size"], carried["channels"]
    norm = normalisation.parse(carried["preprocess"], channels)
    for path in samples:
        result = clf.classify(path)
        x = prepare(decode(path), size, channels, carried["pipeline"]).astype(np.float32)[None]
        p = model(normalisation.apply(x, norm), training=False).numpy()[0]
        assert clf.labels[int(np.argmax(p))] == result.label
        assert np.abs(p - np.array([result.probabilities[k] for k in clf.labels])).max() < 0.05
    with pytest.raises(ValueError, match="not a custom-cnn or xception conversion"):
        recover(tiny_model_path)
