"""`edge-convert` end to end: real Keras files in, real int8 TFLite out, read back as the device reads it.

One conversion (with --also-fp32 and --report) is shared by the checks on the written files; the error
cases stop before quantizing, so they are quick.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("tensorflow")

from click.testing import CliRunner  # noqa: E402

from convert import calibration  # noqa: E402
from convert.convert_cli import main  # noqa: E402
from edge.model_file import read_spec, weights_digest  # noqa: E402

LABELS = ["glioma", "meningioma", "notumor", "pituitary"]
L = keras.layers


def _tiny(pool=None, name: str = "tiny") -> "keras.Model":
    keras.utils.set_random_seed(5)
    inputs = keras.Input((32, 32, 1))
    x = L.MaxPooling2D()(L.Conv2D(8, 3, padding="same", activation="relu")(inputs))
    x = L.Conv2D(16, 3, padding="same", activation="relu", name="features")(x)
    x = (pool or L.GlobalAveragePooling2D())(x)
    return keras.Model(inputs, L.Dense(len(LABELS), activation="softmax", name="scores")(x), name=name)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keras") / "tiny.keras"
    _tiny().save(path)
    return path


@pytest.fixture(scope="module")
def calib_dir(convert_image_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared class folders, glioma cut to two images plus a corrupt one, so that every balanced
    selection of 12 or more reaches the corrupt file, which must be skipped and counted."""
    root = tmp_path_factory.mktemp("calib") / "images"
    shutil.copytree(convert_image_dir, root)
    for extra in sorted((root / "glioma").iterdir())[2:]:
        extra.unlink()
    (root / "glioma" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    return root


def invoke(*args) -> "object":
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def converted(model_file: Path, calib_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out_dir = tmp_path_factory.mktemp("out")
    result = invoke(model_file, "--calibration", calib_dir, "--out", out_dir / "tiny.tflite",
                    "--preprocess", "tf", "--pipeline", "mri-crop-v1", "--num-calibration", 12, "--also-fp32",
                    "--report", out_dir / "report", "--name", "tiny-cli", "--json")
    assert result.exit_code == 0, result.output
    return {"json": json.loads(result.stdout), "dir": out_dir}


def test_converts_to_int8_with_readable_metadata(converted: dict, model_file: Path):
    out = converted["dir"] / "tiny.tflite"
    data = out.read_bytes()
    spec = read_spec(data)
    assert spec.name == "tiny-cli"
    assert spec.labels == tuple(LABELS)  # from the calibration folder's class subfolders
    assert (spec.input_size, spec.channels, spec.pipeline) == (32, 1, "mri-crop-v1")
    assert spec.output_names == {"probabilities": "probabilities", "heatmap": "heatmap", "features": "features"}
    meta = spec.metadata
    assert meta["gradcam"] == {"target_layer": "features", "feature_shape": [16, 16, 16], "score": "logit",
                               "method": "gradcam", "layers": ["features"], "grid": [16, 16]}
    assert meta["outputs"]["heatmap"]["shape"] == [1, 32, 32]
    assert meta["normalisation"]["name"] == "tf" and meta["normalisation"]["folded"] is True
    assert meta["input"] == {"size": 32, "channels": 1, "colour": "grayscale", "pipeline": "mri-crop-v1",
                             "dtype": "uint8"}
    assert meta["source"] == {"file": "tiny.keras", "sha256": hashlib.sha256(model_file.read_bytes()).hexdigest(),
                              "format": "keras"}
    conv = meta["converter"]
    assert conv["tool"] == "edge-convert" and conv["quantization"] == "int8"
    assert conv["calibration"]["images"] == 12 and conv["calibration"]["skipped"] == 1
    # round-robin over the classes: glioma runs out after its two readable images
    assert conv["calibration"]["per_class"] == {"glioma": 2, "meningioma": 4, "notumor": 3, "pituitary": 3}
    assert meta["created"].endswith("Z")
    assert spec.weights_verified and meta["weights"] == weights_digest(data) == converted["json"]["weights"]

    report = converted["json"]
    assert report["ok"] is True and report["calibration"]["skipped_files"][0].startswith("broken.jpg")
    assert not [op for op in report["ops"] if op.startswith("CUSTOM")]

    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=data)
    assert interpreter.get_input_details()[0]["dtype"] == np.uint8
    runner = interpreter.get_signature_runner("serving_default")
    image = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 1)).astype(np.uint8)
    outputs = runner(image=image)
    assert abs(float(outputs["probabilities"].sum()) - 1.0) < 0.02
    assert outputs["heatmap"].shape == (1, 32, 32)
    assert 0.0 <= outputs["heatmap"].min() and outputs["heatmap"].max() <= 1.0


def test_fp32_twin_and_parity_report(converted: dict):
    fp32 = converted["dir"] / "tiny_fp32.tflite"
    spec = read_spec(fp32.read_bytes())
    assert spec.metadata["converter"]["quantization"] == "float32" and spec.labels == tuple(LABELS)
    assert spec.weights_verified and spec.metadata["weights"] == weights_digest(fp32.read_bytes())
    int8 = read_spec((converted["dir"] / "tiny.tflite").read_bytes()).metadata["weights"]
    assert spec.metadata["weights"]["sha256"] != int8["sha256"], "each file records its own weights"

    report_dir = converted["dir"] / "report"
    parity = json.loads((report_dir / "parity.json").read_text())
    assert set(parity["variants"]) == {"int8", "fp32"}
    # 17 readable images - 12 for calibration = 5 held out
    assert parity["images"] == 5
    fp = parity["variants"]["fp32"]
    assert fp["top1_agreement"] == 1.0 and fp["heatmap_pearson"]["min"] > 0.99
    assert fp["probability_abs_diff"]["max"] < 1e-4
    q = parity["variants"]["int8"]
    assert q["accuracy_keras"] is not None and q["probability_abs_diff"]["max"] < 0.1
    assert q["heatmap_pearson"]["median"] > 0.9
    assert "top-1 agreement" in (report_dir / "parity.txt").read_text()
    assert (report_dir / "heatmaps.png").read_bytes()[:4] == b"\x89PNG"


def test_legacy_h5_with_labels_and_logits_head(calib_dir: Path, tmp_path: Path):
    """A legacy .h5 file ending in logits; --labels name the classes; the summary is human-readable."""
    keras.utils.set_random_seed(6)
    inputs = keras.Input((32, 32, 3))
    x = L.Flatten()(L.Conv2D(4, 3, strides=2, activation="relu")(inputs))
    path = tmp_path / "logits.h5"
    keras.Model(inputs, L.Dense(4)(L.Dropout(0.1)(x))).save(path)
    result = invoke(path, "--calibration", calib_dir, "--out", tmp_path / "m.tflite", "--preprocess", "0-1",
                    "--labels", "a,b,c,d", "--num-calibration", 4)
    assert result.exit_code == 0, result.output
    assert "labels: a, b, c, d" in result.stdout and "Grad-CAM target layer" in result.stdout
    assert "weights checksum: sha256 " in result.stdout
    spec = read_spec((tmp_path / "m.tflite").read_bytes())
    assert spec.labels == ("a", "b", "c", "d") and spec.channels == 3 and spec.pipeline == "resize"
    assert spec.metadata["source"]["format"] == "h5"


def test_no_heatmap_variant_for_measuring_the_head(model_file: Path, calib_dir: Path, tmp_path: Path):
    """--no-heatmap: same model, only `probabilities` (what edge-bench compares the head against)."""
    out = tmp_path / "nohead.tflite"
    result = invoke(model_file, "--calibration", calib_dir, "--out", out, "--preprocess", "tf", "--no-heatmap",
                    "--num-calibration", 4)
    assert result.exit_code == 0, result.output
    spec = read_spec(out.read_bytes())
    assert list(spec.metadata["outputs"]) == ["probabilities"] and spec.metadata["gradcam"] is None
    from edge import Classifier

    classified = Classifier(out).classify(np.zeros((40, 40), np.uint8))
    assert classified.heatmap is None and abs(sum(classified.probabilities.values()) - 1.0) < 0.02
    result = invoke(model_file, "--calibration", calib_dir, "--out", tmp_path / "x.tflite", "--preprocess", "tf",
                    "--no-heatmap", "--report", tmp_path / "report")
    assert result.exit_code == 2 and "needs the Grad-CAM head" in _error(result)


def test_calibration_selection_is_balanced_deterministic_and_skips_bad_files(calib_dir: Path, tmp_path: Path):
    kwargs = dict(size=32, channels=1, pipeline="mri-crop-v1")
    first = calibration.load_calibration(calib_dir, count=10, seed=4, **kwargs)
    again = calibration.load_calibration(calib_dir, count=10, seed=4, **kwargs)
    assert first.paths == again.paths and np.array_equal(first.images, again.images)
    assert sorted(first.per_class.values()) == [2, 2, 3, 3]
    everything = calibration.load_calibration(calib_dir, count=100, **kwargs)
    assert len(everything.paths) == 17 and [p.name for p, _ in everything.skipped] == ["broken.jpg"]
    rest = calibration.load_images(calib_dir, count=100, exclude=first.paths, **kwargs)
    assert len(rest.paths) == 7 and not set(rest.paths) & set(first.paths)
    assert first.images.dtype == np.uint8 and first.images.shape == (10, 32, 32, 1)

    flat = tmp_path / "flat"
    flat.mkdir()
    for path in first.paths[:3]:
        shutil.copy(path, flat / path.name)
    loose = calibration.load_calibration(flat, count=5, **kwargs)
    assert loose.per_class == {"": 3}


def _error(result) -> str:
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("edge-convert: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_missing_model_file(calib_dir: Path, tmp_path: Path):
    result = invoke(tmp_path / "nope.keras", "--calibration", calib_dir, "--out", tmp_path / "m.tflite")
    assert result.exit_code == 3
    assert "nope.keras: no such model file" in _error(result)


def test_calibration_folder_without_images(model_file: Path, tmp_path: Path):
    (tmp_path / "empty" / "glioma").mkdir(parents=True)
    (tmp_path / "empty" / "glioma" / "notes.txt").write_text("no images here")
    result = invoke(model_file, "--calibration", tmp_path / "empty", "--out", tmp_path / "m.tflite", "--json")
    assert result.exit_code == 3
    assert "no images found" in _error(result)
    assert json.loads(result.stdout) == {"ok": False, "error": _error(result).split("error: ", 1)[1],
                                         "exit_code": 3}


def test_bad_preprocess_is_a_usage_error(model_file: Path, calib_dir: Path, tmp_path: Path):
    result = invoke(model_file, "--calibration", calib_dir, "--out", tmp_path / "m.tflite", "--preprocess", "fancy")
    assert result.exit_code == 2
    assert "unknown normalisation 'fancy'" in _error(result)
    assert not (tmp_path / "m.tflite").exists()


def test_non_4d_target_layer(model_file: Path, calib_dir: Path, tmp_path: Path):
    result = invoke(model_file, "--calibration", calib_dir, "--out", tmp_path / "m.tflite", "--preprocess", "tf",
                    "--target-layer", "scores")
    assert result.exit_code == 1
    assert "'scores' (Dense) outputs shape (None, 4)" in _error(result)


def test_global_max_pooling_head_names_the_layer(calib_dir: Path, tmp_path: Path):
    path = tmp_path / "gmp.keras"
    _tiny(pool=L.GlobalMaxPooling2D(name="gmp"), name="gmp").save(path)
    result = invoke(path, "--calibration", calib_dir, "--out", tmp_path / "m.tflite", "--preprocess", "tf")
    assert result.exit_code == 1
    assert "'gmp' (GlobalMaxPooling2D)" in _error(result)


def test_wrong_label_count(model_file: Path, calib_dir: Path, tmp_path: Path):
    result = invoke(model_file, "--calibration", calib_dir, "--out", tmp_path / "m.tflite", "--preprocess", "tf",
                    "--labels", "a,b")
    assert result.exit_code == 1
    assert "--labels names 2 classes but the model outputs 4" in _error(result)


def test_console_script_help():
    """The installed entry point answers --help without importing TensorFlow (fast on a device host)."""
    done = subprocess.run([sys.executable, "-c", "import sys; from convert.convert_cli import main; "
                           "main(['--help'], standalone_mode=False); print('tensorflow' in sys.modules)"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Exit codes" in done.stdout and "--num-calibration" in done.stdout
    assert done.stdout.strip().endswith("False")
