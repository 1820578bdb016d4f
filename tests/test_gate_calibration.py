"""Host side of the input gate: `edge-gate calibrate` retrofits a model file (features output by a flatbuffer
edit, gate fitted on training folders, weights untouched), `edge-gate measure` counts per set, and
`edge-convert` writes both for every new conversion."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import LABELS
from convert.gate_calibration import MIN_IMAGES
from convert.gate_cli import main as gate_main
from edge import Classifier
from edge.model_file import read_spec, weights_digest


def _heads(folder: Path, n: int, seed: int, names: str = "{i}.png") -> None:
    """``n`` synthetic 64x64 heads (a textured disc on black) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    for i in range(n):
        r = rng.uniform(18, 26)
        disc = (yy - 32 - rng.uniform(-3, 3)) ** 2 + (xx - 32 - rng.uniform(-3, 3)) ** 2 < r * r
        texture = 110 + 60 * np.sin(xx / rng.uniform(3, 6)) * np.cos(yy / rng.uniform(3, 6))
        pixels = disc * (texture + rng.normal(0, 10, (64, 64)))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / names.format(i=i, s=i // 10))


@pytest.fixture(scope="module")
def training(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(class folders, 110 scans each; a flat folder of 'extra healthy' scans of 12 subjects)."""
    root = tmp_path_factory.mktemp("gate-data")
    for c, label in enumerate(LABELS):
        _heads(root / "Training" / label, 110, seed=c)
    _heads(root / "extra" / "train", 120, seed=9, names="S{s:02d}_{i}.png")
    return root / "Training", root / "extra" / "train"


def calibrate(*args: str):
    return CliRunner().invoke(gate_main, ["calibrate", *map(str, args)], catch_exceptions=False)


def test_calibrate_retrofits_a_model_without_touching_its_weights(tiny_model_path: Path, training, tmp_path: Path):
    classes, extra = training
    out = tmp_path / "gated.tflite"
    result = calibrate(tiny_model_path, "--data", classes, "--data", extra, "--out", out, "--cache-dir",
                       tmp_path / "cache", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    before, after = read_spec(tiny_model_path.read_bytes()), read_spec(out.read_bytes())
    assert after.weights_verified and weights_digest(out.read_bytes()) == before.metadata["weights"]
    assert summary["identical"] == {"images": 64, "probabilities": "identical", "heatmap": "identical"}
    gate = after.metadata["gate"]
    assert gate["references"] == [*LABELS, "extra/train"]
    cal = gate["calibration"]
    per = {r["reference"]: r for r in cal["per_reference"]}
    assert per["extra/train"]["held_out"] == 20, "held out by subject: 2 of 12, all 10 scans of each"
    assert 0 < cal["held_out_referred"] <= 0.02 and cal["quantile"] == 99.0
    assert all(r["held_out_referred"] <= 0.01 * r["held_out"] + 1 for r in per.values()), "<= 1% of each reference"
    clf = Classifier(out)
    scan = next((classes / LABELS[0]).iterdir())
    r = clf.classify(scan)
    assert r.ood_score is not None and r.features.shape == (clf.gate.width,)
    assert r.probabilities == Classifier(tiny_model_path).classify(scan).probabilities

    # A second run reads the features from the cache, and --layer scores an earlier feature map instead.
    again = calibrate(tiny_model_path, "--data", classes, "--data", extra, "--out", tmp_path / "mid.tflite",
                      "--cache-dir", tmp_path / "cache", "--layer", "features", "--components", "4", "--json")
    assert again.exit_code == 0, again.output
    mid = read_spec((tmp_path / "mid.tflite").read_bytes()).metadata
    assert mid["outputs"]["features"]["shape"] == [1, 16, 16, 16] and mid["gate"]["calibration"]["components"] == 4
    assert Classifier(tmp_path / "mid.tflite").classify(scan).features.shape == (16,)


def test_calibrate_refuses_validation_data_and_too_few_scans(tiny_model_path: Path, tmp_path: Path):
    held_out = tmp_path / "external-dev" / "set"
    _heads(held_out / "glioma", 3, seed=1)
    refused = calibrate(tiny_model_path, "--data", held_out, "--out", tmp_path / "x.tflite", "--cache-dir",
                        tmp_path / "c")
    assert refused.exit_code == 1 and "validation-only" in refused.stderr
    few = tmp_path / "few"
    _heads(few / "glioma", 20, seed=2)
    small = calibrate(tiny_model_path, "--data", few, "--out", tmp_path / "x.tflite", "--cache-dir", tmp_path / "c")
    assert small.exit_code == 1 and f"at least {MIN_IMAGES}" in small.stderr
    assert not (tmp_path / "x.tflite").exists() and not (tmp_path / "c").exists(), "counted before any invoke"


def test_measure_counts_per_set_and_writes_the_card_table(tiny_model_path: Path, sample_scans, tmp_path: Path):
    mri, other = tmp_path / "mri", tmp_path / "other"
    mri.mkdir()
    for scan in sample_scans[:3]:
        (mri / scan.name).write_bytes(scan.read_bytes())
    other.mkdir()
    Image.new("L", (64, 64), 0).save(other / "black.png")
    Image.new("RGB", (64, 200), (0, 0, 255)).save(other / "strip.png")
    out = tmp_path / "report"
    result = CliRunner().invoke(gate_main, ["measure", str(tiny_model_path), "--mri", str(mri), "--not-mri",
                                            str(other), "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "gate.json").read_text())
    rows = {Path(r["set"]).name: r for r in report["rows"]}
    assert rows["other"]["refused"] == 2 and rows["other"]["reasons"] == {"aspect_ratio": 1, "flat": 1}
    assert rows["other"]["missed"] == 0 and rows["mri"]["images"] == 3
    assert "| set | images | refused | referred |" in (out / "gate.md").read_text() == result.stdout


def test_a_new_conversion_has_the_features_output_and_a_gate(tiny_model_path: Path, training, tmp_path: Path):
    """The session's tiny conversion (16 calibration scans) has the output but too few scans for a gate;
    one with a training-size calibration folder gets both."""
    small = read_spec(tiny_model_path.read_bytes()).metadata
    assert small["outputs"]["features"]["shape"] == [1, 16] and "gate" not in small

    import keras

    from convert.converter import convert_model

    keras.utils.set_random_seed(3)
    inputs = keras.Input((32, 32, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(len(LABELS), activation="softmax")(x))
    notes: list[str] = []
    classes, extra = training
    convert_model(model, calibration_dir=classes, out=tmp_path / "new.tflite", labels=list(LABELS), preprocess="tf",
                  pipeline="mri-crop-v1", num_calibration=16, agreement=0, gate_data=[extra], log=notes.append)
    meta = read_spec((tmp_path / "new.tflite").read_bytes()).metadata
    assert meta["gate"]["references"] == [*LABELS, "extra/train"] and meta["weights"]
    assert any(n.startswith("input gate: ") for n in notes), notes
    clf = Classifier(tmp_path / "new.tflite")
    assert clf.gate.width == 8 and clf.classify(next((classes / "glioma").iterdir())).ood_score is not None
