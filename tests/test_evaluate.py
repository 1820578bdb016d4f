"""edge-evaluate end to end: a tiny real Keras model (saved with its carried metadata) and a real int8 TFLite
model, over a small class-folder set written here; predictions are checked against an independent pass."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from convert.evaluate import evaluate, match_key
from convert.evaluate_cli import main
from edge.preprocess import prepare

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

LABELS = ["glioma", "meningioma", "notumor", "pituitary"]
CARRIED = {"name": "t", "labels": LABELS, "input_size": 32, "channels": 1, "pipeline": "mri-crop-v1",
           "preprocess": "tf"}
PER_CLASS = 4


@pytest.fixture(scope="module")
def keras_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import keras

    from convert.keras_io import save_model

    keras.utils.set_random_seed(3)
    inputs = keras.Input((32, 32, 1))
    x = keras.layers.Conv2D(6, 3, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(len(LABELS), activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    return save_model(model, tmp_path_factory.mktemp("model") / "t.keras", CARRIED)


def head(seed: int, size: int = 96) -> np.ndarray:
    """A synthetic grayscale 'head': a textured ellipse on black, different for every seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    cy, cx = size / 2 + rng.uniform(-8, 8, 2)
    ry, rx = rng.uniform(0.25, 0.42, 2) * size
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    texture = 110 + 90 * np.sin(xx / rng.uniform(2, 9)) * np.cos(yy / rng.uniform(2, 9))
    return np.clip(inside * texture + rng.normal(0, 6, (size, size)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ds/Testing/<label>/ with PER_CLASS images each (JPEG and PNG, gray and RGB) plus one truncated file."""
    root = tmp_path_factory.mktemp("ds") / "Testing"
    for k, label in enumerate(LABELS):
        (root / label).mkdir(parents=True)
        for i in range(PER_CLASS):
            img = Image.fromarray(head(10 * k + i))
            if i % 2:
                img.convert("RGB").save(root / label / f"{label}_{i}.jpg", quality=90)
            else:
                img.save(root / label / f"{label}_{i}.png")
    good = (root / "glioma" / "glioma_1.jpg").read_bytes()
    (root / "glioma" / "zz_truncated.jpg").write_bytes(good[: len(good) // 3])
    return root


@pytest.fixture(scope="module")
def dedup_report(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A de-duplication report keeping images 0 and 1 of every class (paths like 'Testing/glioma/x.png')."""
    keep = [f"Testing/{label}/{name}" for label in LABELS for name in sorted(os.listdir(data_dir / label))[:2]]
    path = tmp_path_factory.mktemp("dedup") / "dups.json"
    path.write_text(json.dumps({"threshold": 4, "dedup_test": keep}))
    return path


def independent_predictions(keras_path: Path, data_dir: Path) -> dict[str, str]:
    """Predicted label per file, via PIL decoding, prepare and the tf normalisation written out by hand."""
    import keras

    model = keras.models.load_model(keras_path, compile=False)
    out = {}
    for label in LABELS:
        for p in sorted((data_dir / label).iterdir()):
            try:
                gray = np.asarray(Image.open(p).convert("L"))
            except OSError:
                continue
            x = (prepare(gray, 32, 1, "mri-crop-v1")[None].astype(np.float32) - 127.5) / 127.5
            out[str(p)] = LABELS[int(np.argmax(model.predict_on_batch(x)[0]))]
    return out


def check_consistent(subset: dict) -> None:
    cm = np.array(subset["confusion"])
    assert cm.sum() == subset["n"]
    assert subset["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    assert [c["support"] for c in subset["per_class"].values()] == cm.sum(axis=1).tolist()
    assert 0.0 <= subset["ece"] <= 1.0


def test_keras_end_to_end_cli(keras_model: Path, data_dir: Path, dedup_report: Path, tmp_path: Path):
    out = tmp_path / "report"
    res = CliRunner().invoke(main, [str(keras_model), str(data_dir), "--dedup", str(dedup_report), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "de-duplicated" in res.stdout and "macro-AUC" in res.stdout
    warnings = [line for line in res.stderr.splitlines() if line.startswith("edge-evaluate: warning:")]
    assert len(warnings) == 1 and "zz_truncated.jpg" in warnings[0]
    for name in ("metrics.json", "confusion_all.json", "confusion_all.png", "confusion_dedup.json",
                 "confusion_dedup.png"):
        assert (out / name).is_file(), name
    for subset in ("all", "dedup"):
        with Image.open(out / f"confusion_{subset}.png") as png:
            assert png.format == "PNG" and min(png.size) > 200
    result = json.loads((out / "metrics.json").read_text())
    assert result["images"] == {"found": 4 * PER_CLASS + 1, "evaluated": 4 * PER_CLASS, "unreadable": 1,
                                "per_class": {label: PER_CLASS for label in LABELS}}
    assert result["subsets"]["all"]["n"] == 4 * PER_CLASS
    assert result["subsets"]["dedup"]["n"] == 2 * len(LABELS)
    assert result["dedup"]["found"] == result["dedup"]["listed"] == 2 * len(LABELS)
    for subset in ("all", "dedup"):
        check_consistent(result["subsets"][subset])
        saved = json.loads((out / f"confusion_{subset}.json").read_text())
        assert saved["confusion"] == result["subsets"][subset]["confusion"] and saved["labels"] == LABELS


def test_keras_predictions_match_an_independent_pass(keras_model: Path, data_dir: Path, dedup_report: Path):
    result = evaluate(keras_model, data_dir, dedup=dedup_report)
    expected = independent_predictions(keras_model, data_dir)
    got = {p["path"]: p["predicted"] for p in result["predictions"]}
    assert got == expected
    cm = np.zeros((4, 4), int)
    for p in result["predictions"]:
        cm[LABELS.index(p["true"]), LABELS.index(p["predicted"])] += 1
        assert sum(p["probabilities"]) == pytest.approx(1.0, abs=1e-4)
    assert cm.tolist() == result["subsets"]["all"]["confusion"]
    keep = set(json.loads(dedup_report.read_text())["dedup_test"])
    dedup_pred = [p for p in result["predictions"] if match_key(p["path"]) in keep]
    dcm = np.zeros((4, 4), int)
    for p in dedup_pred:
        dcm[LABELS.index(p["true"]), LABELS.index(p["predicted"])] += 1
    assert dcm.tolist() == result["subsets"]["dedup"]["confusion"]


def test_limit_and_json(keras_model: Path, data_dir: Path):
    res = CliRunner().invoke(main, [str(keras_model), str(data_dir), "--limit", "1", "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["limit"] == 1 and result["subsets"]["all"]["n"] == len(LABELS)
    assert "dedup" not in result["subsets"]


def test_tflite_goes_through_the_device_classifier(tiny_model_path: Path, data_dir: Path, dedup_report: Path):
    from edge import Classifier

    result = evaluate(tiny_model_path, data_dir, dedup=dedup_report, threads=1)
    assert result["model"]["format"] == "tflite" and result["model"]["labels"] == LABELS
    assert result["images"]["unreadable"] == 1
    clf = Classifier(model=tiny_model_path, threads=1)
    for p in result["predictions"]:
        r = clf.classify(p["path"])
        assert p["predicted"] == r.label
        assert p["probabilities"] == pytest.approx([r.probabilities[label] for label in LABELS], abs=1e-6)
    for subset in ("all", "dedup"):
        check_consistent(result["subsets"][subset])


@pytest.mark.parametrize("case", ["stray-folder", "dedup-no-match", "no-metadata", "suffix"])
def test_unusable_inputs_are_one_line_errors(case: str, keras_model: Path, data_dir: Path, tmp_path: Path):
    model, folder, extra = keras_model, data_dir, []
    if case == "stray-folder":
        folder = tmp_path / "Testing"
        (folder / "tumour").mkdir(parents=True)
        expected = "tumour are not labels of the model"
    elif case == "dedup-no-match":
        report = tmp_path / "d.json"
        report.write_text(json.dumps({"dedup_test": ["Other/glioma/x.jpg"]}))
        extra = ["--dedup", str(report)]
        expected = "none of its 1 de-duplicated paths"
    elif case == "no-metadata":
        import keras

        inputs = keras.Input((32, 32, 1))
        model = tmp_path / "plain.keras"
        keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(keras.layers.Flatten()(inputs))).save(model)
        expected = "no carried metadata"
    else:
        model = tmp_path / "model.onnx"
        model.write_bytes(b"x")
        expected = "expected a .tflite, .keras or .h5 model"
    res = CliRunner().invoke(main, [str(model), str(folder), *extra])
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edge-evaluate: error: ") and expected in lines[0], res.stderr


def test_learning_curves_png(tmp_path: Path):
    from convert.plots import learning_curves

    history = {"loss": [1.2, 0.8, 0.6], "val_loss": [1.3, 0.9, 0.8], "accuracy": [0.4, 0.6, 0.7],
               "val_accuracy": [0.35, 0.55, 0.6], "learning_rate": [1e-3, 1e-3, 5e-4]}
    path = learning_curves(history, tmp_path / "curves" / "lc.png", "tiny")
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size[0] > png.size[1]
    # Without validation (or without accuracy) the remaining curves are still drawn.
    assert learning_curves({"loss": [1.0, 0.5]}, tmp_path / "loss.png", "loss only").is_file()
    with pytest.raises(ValueError, match="history has none of loss, accuracy"):
        learning_curves({"lr": [0.1]}, tmp_path / "none.png", "nothing")


def test_converted_tflite_agrees_with_its_keras_model(keras_model: Path, data_dir: Path, tmp_path: Path):
    """The same model evaluated as Keras (float) and, after the real converter, as int8 TFLite on the device path."""
    converter = pytest.importorskip("convert.converter")
    tflite = converter.convert_model(keras_model, calibration_dir=data_dir, out=tmp_path / "t.tflite",
                                     num_calibration=16).out
    k = evaluate(keras_model, data_dir)
    t = evaluate(tflite, data_dir, threads=1)
    assert t["model"]["format"] == "tflite" and t["model"]["labels"] == k["model"]["labels"] == LABELS
    assert t["images"] == k["images"]
    kp = {p["path"]: np.array(p["probabilities"]) for p in k["predictions"]}
    tp = {p["path"]: np.array(p["probabilities"]) for p in t["predictions"]}
    assert kp.keys() == tp.keys()
    clear = 0
    for path, probs in kp.items():
        assert np.abs(probs - tp[path]).max() < 0.01, path  # measured: 0.002
        top2 = np.sort(probs)[-2:]
        if top2[1] - top2[0] > 0.02:  # a Keras winner by more than twice the tolerance must survive int8
            clear += 1
            assert tp[path].argmax() == probs.argmax(), path
    assert clear >= len(kp) // 2


def test_paired_comparison_of_two_runs(keras_model: Path, tiny_model_path: Path, data_dir: Path,
                                       dedup_report: Path, tmp_path: Path):
    """convert.paired reads two real edge-evaluate outputs: the images only one model gets right, the exact
    McNemar p of that split, errors with / without a training copy; a run against itself changes nothing; runs
    of different images are one error line, exit 1."""
    from convert.metrics import mcnemar_exact
    from convert.paired import main as paired_main

    outs = []
    for model, name in ((keras_model, "a"), (tiny_model_path, "b")):
        res = CliRunner().invoke(main, [str(model), str(data_dir), "--dedup", str(dedup_report), "--out",
                                        str(tmp_path / name)])
        assert res.exit_code == 0, res.output
        outs.append(tmp_path / name)
    res = CliRunner().invoke(paired_main, [str(outs[0]), str(outs[1] / "metrics.json"), "--dedup",
                                           str(dedup_report), "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    preds = [{match_key(p["path"]): p["true"] == p["predicted"]
              for p in json.loads((o / "metrics.json").read_text())["predictions"]} for o in outs]
    only_a = sorted(k for k in preds[0] if preds[0][k] and not preds[1][k])
    only_b = sorted(k for k in preds[0] if preds[1][k] and not preds[0][k])
    assert (got["right_only_a"], got["right_only_b"]) == (only_a, only_b)
    assert got["mcnemar_p"] == mcnemar_exact(len(only_a), len(only_b))
    kept = set(json.loads(dedup_report.read_text())["dedup_test"])
    for name, right in (("a", preds[0]), ("b", preds[1])):
        errors = [k for k, ok in right.items() if not ok]
        assert got[f"errors_{name}"] == {"with_copy": sum(k not in kept for k in errors),
                                         "without_copy": sum(k in kept for k in errors)}
    same = CliRunner().invoke(paired_main, [str(outs[0]), str(outs[0]), "--json"])
    assert json.loads(same.output)["only_a"] == 0 and json.loads(same.output)["mcnemar_p"] == 1.0
    res = CliRunner().invoke(main, [str(keras_model), str(data_dir), "--limit", "1", "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    bad = CliRunner().invoke(paired_main, [str(outs[0]), str(tmp_path / "c")])
    assert bad.exit_code == 1 and len(bad.output.strip().splitlines()) == 1 and "same images" in bad.output
