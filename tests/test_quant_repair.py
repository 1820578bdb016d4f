"""The per-layer int8 error report and the repair loop, on a small model built to lose agreement in one layer.

The model is a small CNN whose middle convolution ("outlier") has one output channel with a huge constant
activation that the next layer ignores: in float nothing changes, but in int8 that channel stretches the
layer's one activation scale so far that the other fifteen channels round to zero, and most answers change.
The head is fitted in closed form (least squares) to synthetic scans of four brightness levels (the device
feeds an RGB model the grayscale image three times, so the classes cannot differ by colour), so the float
model answers each class with a clear margin. Conversions are real and run in the real LiteRT interpreter.

The repair's latency budget is set out of reach here: invoke times of a model this small are noise, and
the tests must not depend on the machine's speed.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("tensorflow")

from click.testing import CliRunner  # noqa: E402

from convert import converter, normalisation  # noqa: E402
from convert.convert_cli import main  # noqa: E402
from edge.model_file import read_spec  # noqa: E402

L = keras.layers
LABELS = ["glioma", "meningioma", "notumor", "pituitary"]
SIZE = 32
LEVELS = np.array([40, 100, 160, 220])
#: 254 per class: 1,000 held-out images beside 16 for calibration, enough to show 99.5% with 95% confidence.
PER_CLASS = 254
#: The float file of this small model is mostly the two convolutions the repair keeps float.
SIZE_BUDGET = 4.0
NO_LATENCY_LIMIT = 1000.0


@pytest.fixture(scope="module")
def levels_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Class folders of 32x32 grayscale 'scans': one brightness level per class, with pixel noise."""
    from PIL import Image

    root = tmp_path_factory.mktemp("levels")
    for c, label in enumerate(LABELS):
        (root / label).mkdir()
        for i, pixels in enumerate(_scans(np.full(PER_CLASS, c), seed=c)):
            Image.fromarray(pixels[..., 0]).save(root / label / f"{label}_{i}.png")
    return root


def _scans(labels: np.ndarray, seed: int) -> np.ndarray:
    """uint8 [N, S, S, 3] scans of the given classes' brightness levels, gray repeated to RGB."""
    noise = np.random.default_rng(seed).normal(0, 25, (labels.size, SIZE, SIZE, 1))
    gray = np.clip(LEVELS[labels][:, None, None, None] + noise, 0, 255).astype(np.uint8)
    return np.repeat(gray, 3, axis=3)


def _fit_head(model, images: np.ndarray) -> None:
    """Least-squares logits on the pooled features: a clear margin for every class."""
    x = normalisation.apply(images.astype(np.float32), normalisation.parse("tf", 3))
    features = keras.Model(model.inputs, model.get_layer("gap").output).predict(x, verbose=0)
    labels = np.arange(len(images)) % len(LABELS)
    solution, *_ = np.linalg.lstsq(np.c_[features, np.ones(len(features))], 10.0 * np.eye(4)[labels], rcond=None)
    model.get_layer("logits").set_weights([solution[:-1].astype(np.float32), solution[-1].astype(np.float32)])


def small_model(outlier: bool) -> "keras.Model":
    keras.utils.set_random_seed(3)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inputs)
    x = L.Conv2D(16, 3, padding="same", activation="relu", name="outlier")(x)
    x = L.Conv2D(16, 3, padding="same", activation="relu", name="features")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inputs, L.Dense(len(LABELS), name="logits")(x))  # logits, no softmax
    if outlier:
        kernel, bias = model.get_layer("outlier").get_weights()
        bias[0] = 2000.0
        model.get_layer("outlier").set_weights([kernel, bias])
        kernel, bias = model.get_layer("features").get_weights()
        kernel[:, :, 0, :] = 0.0  # the outlier channel is ignored: float answers do not depend on it
        model.get_layer("features").set_weights([kernel, bias])
    _fit_head(model, _scans(np.arange(4 * PER_CLASS) % 4, seed=9))
    return model


@pytest.fixture(scope="module")
def repaired(levels_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The outlier model saved as .keras and converted by the real CLI with default target and a report."""
    out = tmp_path_factory.mktemp("repaired")
    small_model(outlier=True).save(out / "outlier.keras")
    result = CliRunner().invoke(main, [str(out / "outlier.keras"), "--calibration", str(levels_dir), "--out",
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
    assert record["heldout"] == "calibration-folder images not used for calibration"
    assert record["before"]["images"] == 4 * PER_CLASS - 16
    ops, float_ops, custom = converter.list_ops(data)
    assert not custom and float_ops.get("CONV_2D") == 2 and ops["CONV_2D"] == 3
    assert "Kept in float (1 tensor with the ops reading them): `outlier` (CONV_2D)" in repaired["stdout"]
    # the parity report measured the repaired file
    parity = json.loads((repaired["dir"] / "report" / "parity.json").read_text())
    assert parity["variants"]["int8"]["top1_agreement"] >= 0.995


def test_nothing_changes_when_the_target_is_met(levels_dir: Path, tmp_path: Path):
    model = small_model(outlier=False)
    checked = converter.convert_model(model, calibration_dir=levels_dir, out=tmp_path / "plain.tflite",
                                      preprocess="tf", num_calibration=16)
    unchecked = converter.convert_model(model, calibration_dir=levels_dir, out=tmp_path / "off.tflite",
                                        preprocess="tf", num_calibration=16, agreement=0)
    assert checked.repair["before"]["agreement"] >= 0.995
    assert checked.repair["steps"] == [] and checked.repair["probes"] == []
    assert checked.repair["kept_float"] == [] and unchecked.repair is None
    assert checked.metadata["weights"] == unchecked.metadata["weights"], "the same int8 weights and graph"
    assert checked.ops == unchecked.ops and checked.float_ops == unchecked.float_ops


def test_budget_stops_the_repair_and_says_so(levels_dir: Path, tmp_path: Path):
    result = converter.convert_model(small_model(outlier=True), calibration_dir=levels_dir,
                                     out=tmp_path / "capped.tflite", preprocess="tf", num_calibration=16,
                                     size_budget=1.01, latency_budget=NO_LATENCY_LIMIT)
    record = result.repair
    assert record["reached"] is False and "would exceed a budget" in record["reason"]
    assert "outlier" not in [k["layer"] for k in record["kept_float"]] and record["after"]["agreement"] < 0.995
    outlier_run = [p for p in record["probes"] if "outlier" in p["first"] + p["last"]]
    assert outlier_run and all(p["check"] is None and p["size_ratio"] > 1.01 for p in outlier_run)
    assert all(step["size_ratio"] <= 1.01 or step["check"] is None for step in record["steps"])
