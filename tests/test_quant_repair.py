"""The per-layer int8 error report and the repair loop, on a small model built to lose agreement in one layer.

The model is a small CNN whose middle convolution ("outlier") has one output channel with a huge constant
activation that the next layer ignores: in float nothing changes, but in int8 that channel stretches the
layer's one activation scale so far that the other fifteen channels round to zero, and most answers change.
The model is trained briefly on synthetic scans of four textures (horizontal stripes,
vertical stripes, a checkerboard, flat; gray, since the device feeds an RGB model the grayscale image three
times), so the float model answers each class with a clear margin. Textures rather than brightness levels:
the agreement check measures scanner-style variants of the held-out scans (gain, contrast, gamma, blur,
noise), which would move a brightness level into its neighbour's class but leave a texture what it is.
Conversions are real and run in the real LiteRT interpreter.

The repair's latency budget is set out of reach here: invoke times of a model this small are noise, and
the tests must not depend on the machine's speed.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("tensorflow")

from click.testing import CliRunner  # noqa: E402

from convert import converter  # noqa: E402
from convert.convert_cli import main  # noqa: E402
from edge.model_file import read_spec  # noqa: E402

L = keras.layers
LABELS = ["glioma", "meningioma", "notumor", "pituitary"]
SIZE = 32
#: Training epochs of the small model.
EPOCHS = 8
#: Stripe and checker period in pixels.
PERIOD = 8
#: 254 per class: 1,000 held-out images beside 16 for calibration, enough to show 99.5% with 95% confidence.
PER_CLASS = 254
#: The float file of this small model is mostly the two convolutions the repair keeps float.
SIZE_BUDGET = 4.0
NO_LATENCY_LIMIT = 1000.0


@pytest.fixture(scope="module")
def textures_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Class folders of 32x32 grayscale 'scans': one texture per class, with pixel noise."""
    from PIL import Image

    root = tmp_path_factory.mktemp("textures")
    for c, label in enumerate(LABELS):
        (root / label).mkdir()
        for i, pixels in enumerate(_scans(np.full(PER_CLASS, c), seed=c)):
            Image.fromarray(pixels[..., 0]).save(root / label / f"{label}_{i}.png")
    return root


def _scans(labels: np.ndarray, seed: int) -> np.ndarray:
    """uint8 [N, S, S, 3] scans of the given classes' textures at a random phase and brightness, gray repeated
    to RGB."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:SIZE, :SIZE]
    half = PERIOD // 2
    patterns = np.stack([(rows // half) % 2, (cols // half) % 2, (rows // half + cols // half) % 2,
                         np.zeros_like(rows)]).astype(np.float32) * 2 - 1
    shifts = rng.integers(0, PERIOD, (labels.size, 2))
    pattern = np.stack([np.roll(patterns[c], tuple(s), axis=(0, 1)) for c, s in zip(labels, shifts)])
    base = rng.uniform(90, 160, (labels.size, 1, 1))
    gray = base + 50 * pattern + rng.normal(0, 20, pattern.shape)
    return np.repeat(np.clip(gray, 0, 255).astype(np.uint8)[..., None], 3, axis=3)


def _body() -> list:
    """The small CNN's layers, after the input."""
    return [L.Conv2D(8, 3, padding="same", activation="relu", name="c1"),
            L.Conv2D(16, 3, padding="same", activation="relu", name="outlier"),
            L.Conv2D(16, 3, padding="same", activation="relu", name="features"),
            L.GlobalAveragePooling2D(name="gap"), L.Dense(len(LABELS), name="logits")]  # logits, no softmax


def _stack(x, layers: list):
    for layer in layers:
        x = layer(x)
    return x


@functools.lru_cache(maxsize=1)
def _trained_weights() -> tuple:
    """The small CNN's weights after brief training on the textures and their scanner-style variants, once
    per test session (every model of this file starts from them)."""
    from convert import augment

    keras.utils.set_random_seed(3)
    body = _body()
    inputs = keras.Input((SIZE, SIZE, 3))
    # the "tf" normalisation, inside the model only while training
    trainer = keras.Model(inputs, _stack(L.Rescaling(1 / 127.5, -1.0)(inputs), body))
    images = _scans(np.arange(4 * PER_CLASS) % 4, seed=9)
    images = np.concatenate([images, augment.scanner_variants(images, seed=11)])
    trainer.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    trainer.fit(images.astype(np.float32), np.arange(len(images)) % 4, epochs=EPOCHS, batch_size=64, verbose=0)
    return tuple(layer.get_weights() for layer in body)


def small_model(outlier: bool) -> "keras.Model":
    """The small CNN, trained (`_trained_weights`); with ``outlier``, the middle convolution's first channel
    then becomes a constant 2,000 that the next layer ignores."""
    body = _body()
    inputs = keras.Input((SIZE, SIZE, 3))
    model = keras.Model(inputs, _stack(inputs, body))  # converted with --preprocess tf, as a published model is
    for layer, weights in zip(body, _trained_weights()):
        layer.set_weights([w.copy() for w in weights])
    if outlier:
        kernel, bias = model.get_layer("outlier").get_weights()
        kernel[..., 0], bias[0] = 0.0, 2000.0
        model.get_layer("outlier").set_weights([kernel, bias])
        kernel, bias = model.get_layer("features").get_weights()
        kernel[:, :, 0, :] = 0.0  # the outlier channel is ignored
        model.get_layer("features").set_weights([kernel, bias])
    return model


@pytest.fixture(scope="module")
def repaired(textures_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The outlier model saved as .keras and converted by the real CLI with default target and a report."""
    out = tmp_path_factory.mktemp("repaired")
    small_model(outlier=True).save(out / "outlier.keras")
    result = CliRunner().invoke(main, [str(out / "outlier.keras"), "--calibration", str(textures_dir), "--out",
                                       str(out / "outlier.tflite"), "--preprocess", "tf", "--num-calibration", "16",
                                       "--size-budget", str(SIZE_BUDGET), "--latency-budget", str(NO_LATENCY_LIMIT),
                                       "--report", str(out / "report")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return {"dir": out, "stdout": result.stdout}


def test_debugger_report_ranks_the_outlier_layer_first(repaired: dict):
    report_dir = repaired["dir"] / "report"
    data = json.loads((report_dir / "quantization.json").read_text())
    layers = data["layers"]
    assert layers[0]["layer"] == "outlier" and layers[0]["op"] == "CONV_2D"
    # the outlier's damage is invisible to the tensor-wide measures, plain in the per-channel one
    assert layers[0]["channel_noise_to_signal"] > 0.5 > 0.05 > layers[0]["noise_to_signal"]
    assert layers[0]["channel_noise_to_signal"] > 2 * layers[1]["channel_noise_to_signal"]
    ranks = [e["channel_noise_to_signal"] for e in layers]
    assert ranks == sorted(ranks, reverse=True)
    # keeping it float means its reader too; the cost is the two convolutions' weights, int8 -> float32
    assert any("features" in r for r in layers[0]["readers"])
    assert layers[0]["weights"] >= 3 * 3 * 8 * 16 + 3 * 3 * 16 * 16
    assert layers[0]["float_extra_bytes"] > 3 * (3 * 3 * 8 * 16 + 3 * 3 * 16 * 16) * 0.9
    timed = [e for e in layers if e["invoke_ms_delta"] is not None]
    assert len(timed) == min(5, len(layers)) and data["baseline_invoke_ms"] > 0
    markdown = (report_dir / "quantization.md").read_text()
    assert "| 1 | outlier (CONV_2D) |" in markdown
    assert "Kept in float (1 tensor with the ops reading them): `outlier` (CONV_2D)" in markdown
    assert (report_dir / "quantization.png").read_bytes()[:4] == b"\x89PNG"


def test_repair_reaches_the_target_and_names_the_layer(repaired: dict):
    data = (repaired["dir"] / "outlier.tflite").read_bytes()
    record = read_spec(data).metadata["converter"]["settings"]["repair"]
    assert record["before"]["agreement"] < 0.8, "the model must lose agreement in int8 to test the repair"
    assert record["reached"] is True and record["after"]["lower_95"] >= 0.995
    assert [k["layer"] for k in record["kept_float"]] == ["outlier"]
    assert record["heldout"] == ("calibration-folder images not used for calibration, each with a seeded "
                                "scanner-style intensity change")
    assert record["before"]["images"] == 4 * PER_CLASS - 16
    ops, float_ops, custom = converter.list_ops(data)
    assert not custom and float_ops.get("CONV_2D") == 2 and ops["CONV_2D"] == 3
    assert "Kept in float (1 tensor with the ops reading them): `outlier` (CONV_2D)" in repaired["stdout"]
    # the parity report measured the repaired file
    parity = json.loads((repaired["dir"] / "report" / "parity.json").read_text())
    assert parity["variants"]["int8"]["top1_agreement"] >= 0.995


def test_nothing_changes_when_the_target_is_met(textures_dir: Path, tmp_path: Path):
    model = small_model(outlier=False)
    checked = converter.convert_model(model, calibration_dir=textures_dir, out=tmp_path / "plain.tflite",
                                      preprocess="tf", num_calibration=16)
    unchecked = converter.convert_model(model, calibration_dir=textures_dir, out=tmp_path / "off.tflite",
                                        preprocess="tf", num_calibration=16, agreement=0)
    assert checked.repair["before"]["agreement"] >= 0.995
    assert checked.repair["steps"] == [] and checked.repair["probes"] == []
    assert checked.repair["kept_float"] == [] and unchecked.repair is None
    assert checked.metadata["weights"] == unchecked.metadata["weights"], "the same int8 weights and graph"
    assert checked.ops == unchecked.ops and checked.float_ops == unchecked.float_ops


def test_budget_stops_the_repair_and_says_so(textures_dir: Path, tmp_path: Path):
    result = converter.convert_model(small_model(outlier=True), calibration_dir=textures_dir,
                                     out=tmp_path / "capped.tflite", preprocess="tf", num_calibration=16,
                                     size_budget=1.01, latency_budget=NO_LATENCY_LIMIT)
    record = result.repair
    assert record["reached"] is False and "would exceed a budget" in record["reason"]
    assert "outlier" not in [k["layer"] for k in record["kept_float"]] and record["after"]["agreement"] < 0.995
    outlier_run = [p for p in record["probes"] if "outlier" in p["first"] + p["last"]]
    assert outlier_run and all(p["check"] is None and p["size_ratio"] > 1.01 for p in outlier_run)
    assert all(step["size_ratio"] <= 1.01 or step["check"] is None for step in record["steps"])
