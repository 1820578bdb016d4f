"""Host side of the input gate: `edge-gate calibrate` retrofits a model file (features output by a flatbuffer
edit, gate fitted on training folders, weights untouched), `edge-gate measure` counts per set, and
`edge-convert` writes both for every new conversion."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import LABELS
from convert.gate_calibration import MIN_IMAGES, VARIANT_RECIPE
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
    # the threshold is a percentile of the held-out scans and their scanner-style variants, both counted
    assert cal["held_out_referred"] <= 0.02 and cal["held_out_variants_referred"] <= 0.02 and cal["quantile"] == 99.0
    assert 0 < cal["held_out_referred"] + cal["held_out_variants_referred"]
    assert all(r["held_out_referred"] + r["held_out_variants_referred"] <= 0.01 * 2 * r["held_out"] + 1
               for r in per.values()), "<= 1% of each reference"
    assert len(list((tmp_path / "cache" / "gate").glob(f"*-{VARIANT_RECIPE}-*.npz"))) == len(per), "variants apart"
    assert 0 <= cal["variants_referred_unseen"] <= 1
    clf = Classifier(out)
    scan = next((classes / LABELS[0]).iterdir())
    r = clf.classify(scan)
    assert r.ood_score is not None and r.features.shape == (clf.gate.width,)
    assert r.probabilities == Classifier(tiny_model_path).classify(scan).probabilities

    # A second run reads the features from the cache, and --layer scores an earlier feature map instead.
    again = calibrate(tiny_model_path, "--data", classes, "--data", extra, "--out", tmp_path / "mid.tflite",
                      "--cache-dir", tmp_path / "cache", "--layer", "features", "--components", "4")
    assert again.exit_code == 0, again.output
    assert "% of the held-out variants referred by a gate fitted without them" in again.stdout
    mid = read_spec((tmp_path / "mid.tflite").read_bytes()).metadata
    assert mid["outputs"]["features"]["shape"] == [1, 16, 16, 16] and mid["gate"]["calibration"]["components"] == 4
    assert Classifier(tmp_path / "mid.tflite").classify(scan).features.shape == (16,)


def test_a_layer_is_found_by_its_scope_not_by_an_op_of_the_same_name() -> None:
    """Xception's residual sums are layers add, add_1, ...; every batch norm also has ops named add_1. The
    bundled model's --layer add_1 is the entry flow's 256-channel sum, not a batch norm of block 14."""
    from convert.features_output import find_layer
    from convert.flatbuffer import load

    model = load((Path(__file__).parents[1] / "edge" / "models" / "xception.tflite").read_bytes())
    graph = model.subgraphs[0]
    for layer, channels in (("add_1", 256), ("add_3", 728), ("add_10", 728)):
        tensor = graph.tensors[find_layer(model, layer)]
        assert re.search(rf"/{layer}_\d+/Add$", tensor.name.decode()) and tensor.shape[-1] == channels


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


def test_export_variant_is_a_seeded_small_export() -> None:
    """A variant is reduced to between one and two model inputs (never enlarged), keeps its aspect, is uint8
    whatever the decoded type, and is the same for the same seed and place and another for another."""
    from convert.gate_calibration import export_variant

    rng = np.random.default_rng(0)
    scan = rng.integers(0, 256, (300, 400), dtype=np.uint8)
    sizes = set()
    for index in range(8):
        out = export_variant(scan, 32, 7, index)
        assert out.dtype == np.uint8 and 32 <= max(out.shape) <= 64
        assert abs(out.shape[1] / out.shape[0] - 4 / 3) < 0.1
        sizes.add(out.shape)
    assert len(sizes) > 1, "a random size per scan"
    assert np.array_equal(export_variant(scan, 32, 7, 3), export_variant(scan, 32, 7, 3))
    assert not np.array_equal(export_variant(scan, 32, 7, 3), export_variant(scan, 32, 8, 3))
    small = rng.uniform(0, 255, (20, 24)).astype(np.float32)  # as a DICOM decodes: float in [0, 255]
    out = export_variant(small, 32, 7, 0)
    assert out.shape == small.shape and out.dtype == np.uint8
    rgb = rng.integers(0, 256, (100, 80, 3), dtype=np.uint8)
    assert export_variant(rgb, 32, 7, 0).shape[2] == 3


def test_variant_features_are_seeded_export_style_changes(tiny_model_path: Path, training, tmp_path: Path):
    """Each scan's variant is decoded as the device decodes it and made a small export with another site's
    pixel changes: the same seed gives the same features, another seed or the scan as read others."""
    from convert.gate_calibration import features, variant_features

    gated = tmp_path / "gated.tflite"
    classes, extra = training
    assert calibrate(tiny_model_path, "--data", classes, "--data", extra, "--out", gated, "--cache-dir",
                     tmp_path / "cache").exit_code == 0
    paths = sorted((classes / LABELS[0]).iterdir())[:6]
    as_read, _ = features(gated, paths, cache_dir=None)
    first, ok = variant_features(gated, paths, 5, cache_dir=None)
    again, _ = variant_features(gated, paths, 5, cache_dir=None)
    other, _ = variant_features(gated, paths, 6, cache_dir=None)
    assert ok.all() and np.array_equal(first, again)
    assert not np.allclose(first, as_read) and not np.allclose(first, other)
