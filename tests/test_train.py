"""The whole host-to-device path on the shipped real sample: edge-train -> edge-convert -> edge-classify."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("tensorflow")

SAMPLE = Path(__file__).parent / "data" / "mri_sample"
LABELS = ["glioma", "meningioma", "notumor", "pituitary"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from convert.train_cli import main as train_main

    out = tmp_path_factory.mktemp("train") / "tiny.keras"
    result = CliRunner().invoke(train_main, [str(SAMPLE), "--out", str(out), "--input-size", "32",
                                             "--epochs", "1", "--batch-size", "8", "--val-fraction", "0.25"])
    assert result.exit_code == 0, result.output
    return out


def test_train_writes_model_log_and_curves(trained: Path) -> None:
    run_dir = trained.parent / "tiny_run"
    assert (run_dir / "log.csv").read_text().count("\n") == 2  # header + one epoch
    assert (run_dir / "learning_curves.png").stat().st_size > 1000
    with zipfile.ZipFile(trained) as zf:
        carried = json.loads(zf.read("edge_mri.json"))
    assert carried["labels"] == LABELS
    assert (carried["input_size"], carried["channels"], carried["pipeline"]) == (32, 1, "mri-crop-v1")
    assert carried["training"]["epochs_run"] == 1
    assert carried["training"]["train"] + carried["training"]["val"] == 32


def test_train_convert_classify(trained: Path, tmp_path: Path) -> None:
    from convert.convert_cli import main as convert_main
    from edge import Classifier
    from edge.cli import main as classify_main

    tfl = tmp_path / "tiny.tflite"
    res = CliRunner().invoke(convert_main, [str(trained), "--calibration", str(SAMPLE), "--out", str(tfl),
                                            "--num-calibration", "16"])
    assert res.exit_code == 0, res.output
    clf = Classifier(tfl, threads=1)
    assert clf.spec.labels == tuple(LABELS) and clf.spec.pipeline == "mri-crop-v1"
    r = clf.classify(next((SAMPLE / "glioma").glob("*.jpg")))
    assert r.label in LABELS
    assert abs(sum(r.probabilities.values()) - 1) < 0.02
    assert r.heatmap.shape == (32, 32) and 0 <= r.heatmap.min() and r.heatmap.max() <= 1
    out = CliRunner().invoke(classify_main, ["--model", str(tfl), "--json", str(SAMPLE / "notumor")])
    assert out.exit_code == 0, out.output
    lines = [json.loads(x) for x in out.output.splitlines() if x.startswith("{")]
    assert len(lines) == 8 and all(x["label"] in LABELS for x in lines)


def test_init_continues_from_a_trained_model(trained: Path, tmp_path: Path) -> None:
    import keras

    from convert.train_cli import main as train_main

    out = tmp_path / "second.keras"
    res = CliRunner().invoke(train_main, [str(SAMPLE), "--out", str(out), "--input-size", "32", "--epochs", "1",
                                          "--batch-size", "8", "--lr", "0", "--val-fraction", "0.25",
                                          "--init", str(trained)])
    assert res.exit_code == 0, res.output
    # With a zero learning rate the weights are exactly those of the starting model.
    a = keras.models.load_model(trained, compile=False).get_weights()
    b = keras.models.load_model(out, compile=False).get_weights()
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b) if x.ndim > 1)
    bad = CliRunner().invoke(train_main, [str(SAMPLE), "--out", str(tmp_path / "b.keras"), "--input-size", "48",
                                          "--epochs", "1", "--init", str(trained)])
    assert bad.exit_code == 2 and "--init" in bad.output


@pytest.fixture(scope="module")
def fine_tuned(trained: Path) -> Path:
    """``trained`` fine-tuned one epoch at a high learning rate with its batch norms frozen."""
    from convert.train_cli import main as train_main

    out = trained.parent / "frozen.keras"
    res = CliRunner().invoke(train_main, [str(SAMPLE), "--out", str(out), "--input-size", "32", "--epochs", "1",
                                          "--batch-size", "8", "--lr", "1e-2", "--val-fraction", "0.25",
                                          "--init", str(trained), "--freeze-batchnorm"])
    assert res.exit_code == 0, res.output
    return out


def test_freeze_batchnorm_keeps_the_statistics_while_the_convolutions_learn(trained: Path, fine_tuned: Path,
                                                                            tmp_path: Path) -> None:
    """--freeze-batchnorm (for a model recovered from its int8 file, whose batch norms are folded away):
    a fine-tune changes the kernels but no batch norm's scale, offset or moving statistics."""
    import keras

    from convert.train_cli import main as train_main

    a, b = (keras.models.load_model(p, compile=False) for p in (trained, fine_tuned))
    norms = [layer.name for layer in a.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms
    for name in norms:
        assert all(np.array_equal(x, y) for x, y in zip(a.get_layer(name).get_weights(), b.get_layer(name).get_weights()))
    assert not np.array_equal(a.get_layer("stem_conv").get_weights()[0], b.get_layer("stem_conv").get_weights()[0])
    bad = CliRunner().invoke(train_main, [str(SAMPLE), "--out", str(tmp_path / "x.keras"), "--arch", "xception",
                                          "--weights", "none", "--freeze-batchnorm"])
    assert bad.exit_code == 2 and "--freeze-batchnorm" in bad.output


def test_weight_average_walks_the_line_from_the_start_to_the_fine_tune(trained: Path, fine_tuned: Path,
                                                                       tmp_path: Path) -> None:
    """WiSE-FT: alpha 0 is the start, 1 the fine-tune, 0.5 the midpoint of every weight (the network's
    features change with it); models that are not one network are refused in one line, exit 1."""
    import keras

    from convert.weight_average import main as average_main

    start, tuned = (keras.models.load_model(p, compile=False).get_weights() for p in (trained, fine_tuned))
    outs = {}
    for alpha in ("0", "0.5", "1"):
        out = tmp_path / f"wise{alpha}.keras"
        res = CliRunner().invoke(average_main, [str(trained), str(fine_tuned), "--alpha", alpha, "--out", str(out)])
        assert res.exit_code == 0, res.output
        outs[alpha] = keras.models.load_model(out, compile=False)
    for got, want in ((outs["0"], start), (outs["1"], tuned)):
        assert all(np.allclose(x, y, rtol=0, atol=1e-7) for x, y in zip(got.get_weights(), want))
    mid = outs["0.5"].get_weights()
    moved = [i for i, (a, b) in enumerate(zip(start, tuned)) if not np.array_equal(a, b)]
    assert moved and all(np.allclose(mid[i], (start[i] + tuned[i]) / 2, atol=1e-6) for i in range(len(mid)))
    # The network computes something else (its last feature map, before a softmax that a 1-epoch tiny model
    # may saturate on random inputs).
    x = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 1)).astype(np.float32)
    feats = [keras.Model(m.input, m.get_layer("b3_out").output).predict(x, verbose=0) for m in (outs["0.5"], outs["0"])]
    assert not np.allclose(*feats)
    with zipfile.ZipFile(tmp_path / "wise0.5.keras") as zf:
        carried = json.loads(zf.read("edge_mri.json"))
    assert carried["weight_average"] == {"start": trained.name, "tuned": fine_tuned.name, "alpha": 0.5}
    assert carried["labels"] == LABELS and carried["input_size"] == 32

    other = tmp_path / "other.keras"
    from convert.train_cli import main as train_main

    res = CliRunner().invoke(train_main, [str(SAMPLE), "--out", str(other), "--input-size", "48", "--epochs", "1",
                                          "--batch-size", "8", "--val-fraction", "0.25"])
    assert res.exit_code == 0, res.output
    bad = CliRunner().invoke(average_main, [str(trained), str(other), "--alpha", "0.5", "--out", str(tmp_path / "b.keras")])
    assert bad.exit_code == 1 and "input_size" in bad.output and len(bad.output.strip().splitlines()) == 1
    assert not (tmp_path / "b.keras").exists()
    h5 = CliRunner().invoke(average_main, [str(trained), str(fine_tuned), "--alpha", "0.5", "--out", str(tmp_path / "w.h5")])
    assert h5.exit_code == 1 and "w.h5" in h5.output and len(h5.output.strip().splitlines()) == 1


def test_operating_point_offset_on_hand_made_scores() -> None:
    """The lowest notumor offset that meets the false-alarm budget: raised when the model is over it, lowered
    (more tumours found) when it has budget to spare, an error when no offset on the grid meets it."""
    from convert.operating_point import MAX_OFFSET, choose_offset, false_alarms

    # column 1 is "healthy"; a row is a false alarm while the offset is below its margin (best tumour
    # class over healthy): 0.92, 0.29, -0.51, -2.08
    lp = np.log(np.array([[0.5, 0.2, 0.3], [0.4, 0.3, 0.3], [0.2, 0.5, 0.3], [0.1, 0.8, 0.1]]))
    margins = np.max(np.delete(lp, 1, axis=1), axis=1) - lp[:, 1]
    assert false_alarms(lp, 1, 0.0) == 2 and false_alarms(lp, 1, 1.0) == 0
    for budget in (0, 1, 2, 3):
        off = choose_offset(lp, 1, budget)
        assert false_alarms(lp, 1, off) <= budget < false_alarms(lp, 1, off - 0.05) or off == -MAX_OFFSET
    # budget 0 needs every margin crossed: the first grid point above the largest margin
    assert choose_offset(lp, 1, 0) == pytest.approx(np.ceil(margins.max() / 0.05 + 1e-9) * 0.05)
    assert choose_offset(lp, 1, 3) < 0  # spare budget: the third slice may be called a tumour too
    from convert.operating_point import rate_budget

    assert rate_budget(0.0162, 495) == 8 and rate_budget(0.016, 495) == 7 and rate_budget(0.5, 4) == 2
    hopeless = np.log(np.array([[0.999999, 1e-6, 1e-6]]))
    with pytest.raises(ValueError, match="no notumor offset"):
        choose_offset(hopeless, 1, 0)


def test_operating_point_moves_only_the_notumor_bias_to_the_references_false_alarms(
        trained: Path, fine_tuned: Path, tmp_path: Path) -> None:
    """The CLI scores the run's own held-out healthy slices (class folder and the extra source's held-out
    subjects), writes the model with only its notumor bias moved, by the offset it records, to no more false
    alarms than the reference; a file that is not a model is one error line, exit 1."""
    import keras

    from convert.keras_io import load_model
    from convert.operating_point import held_out, log_probs, main as op_main

    out = tmp_path / "op.keras"
    args = ["--data", str(SAMPLE), "--extra-healthy", str(IXI), "--val-fraction", "0.25"]
    res = CliRunner().invoke(op_main, [str(fine_tuned), "--reference", str(trained), *args, "--out", str(out),
                                       "--json"])
    assert res.exit_code == 0, res.output
    with zipfile.ZipFile(out) as zf:
        record = json.loads(zf.read("edge_mri.json"))["operating_point"]
    assert json.loads(res.output.strip().splitlines()[-1]) == {**record, "out": str(out)}
    images = held_out(SAMPLE, (IXI,), 32, None, 0.25, 0)
    healthy = LABELS.index("notumor")
    n_healthy = int(np.sum(images["y"] == healthy)) + len(images["extra"])
    assert len(images["extra"]) > 0 and record["healthy_held_out"] == n_healthy
    assert record["false_alarms_after"] <= record["budget"] and record["reference"] == trained.name
    before, after = (keras.models.load_model(p, compile=False) for p in (fine_tuned, out))
    wb, wa = before.get_weights(), after.get_weights()
    assert all(np.array_equal(x, y) for x, y in zip(wb[:-1], wa[:-1]))
    shift = np.zeros(len(LABELS), np.float32)
    shift[healthy] = record["offset"]
    assert np.allclose(wa[-1], wb[-1] + shift, atol=1e-6)
    _, carried = load_model(out)
    x = np.concatenate([images["x"][images["y"] == healthy], images["extra"]])
    assert int(np.sum(log_probs(after, carried, x).argmax(1) != healthy)) == record["false_alarms_after"]
    outside = tmp_path / "external-dev" / "feltrin44"  # the offset is never chosen on external scans
    for label in LABELS:
        (outside / label).mkdir(parents=True)
    res = CliRunner().invoke(op_main, [str(fine_tuned), "--reference", str(trained), "--data", str(outside),
                                       "--out", str(tmp_path / "x.keras")])
    assert res.exit_code == 2 and "validation-only" in res.output and not (tmp_path / "x.keras").exists()
    rated = CliRunner().invoke(op_main, [str(fine_tuned), "--false-alarm-rate", "0", *args, "--out",
                                         str(tmp_path / "r.keras"), "--json"])
    assert rated.exit_code == 0, rated.output
    rec = json.loads(rated.output.strip().splitlines()[-1])
    assert rec["budget"] == 0 and rec["false_alarms_after"] == 0 and rec["rate"] == 0 and "reference" not in rec
    assert rec["offset"] >= record["offset"] or record["budget"] == 0  # a zero budget needs at least as much
    both = CliRunner().invoke(op_main, [str(fine_tuned), "--reference", str(trained), "--false-alarm-rate", "0.1",
                                        *args, "--out", str(tmp_path / "y.keras")])
    assert both.exit_code == 2 and "exactly one" in both.output and not (tmp_path / "y.keras").exists()
    bad = tmp_path / "not_a_model.keras"
    bad.write_bytes(b"not a zip")
    res = CliRunner().invoke(op_main, [str(bad), "--reference", str(trained), *args, "--out", str(tmp_path / "b.keras")])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1 and "not_a_model.keras" in res.output


def test_train_rejects_weights_for_custom_cnn(tmp_path: Path) -> None:
    from convert.train_cli import main as train_main

    res = CliRunner().invoke(train_main, [str(SAMPLE), "--out", str(tmp_path / "x.keras"), "--weights", "none"])
    assert res.exit_code == 2 and "--weights applies to --arch xception only" in res.output


def test_class_weights_and_split_are_balanced() -> None:
    from convert.dataset import class_weights, stratified_split

    y = np.array([0] * 30 + [1] * 10)
    w = class_weights(y, 2)
    assert w[1] == pytest.approx(3 * w[0])
    tr, va = stratified_split(y, 0.2, seed=0)
    assert set(np.bincount(y[va])) == {6, 2} and np.intersect1d(tr, va).size == 0
    assert np.array_equal(stratified_split(y, 0.2, seed=0)[1], va)


def test_xception_two_phase_training_on_cached_features(tmp_path: Path) -> None:
    """Phases 1-2 run on finite cached activations, phase 3 on live images through the whole unfrozen base
    (BatchNorm statistics untouched), and the saved model is a whole Xception classifier."""
    import csv

    from convert.train_cli import main as train_main

    out = tmp_path / "x.keras"
    res = CliRunner().invoke(train_main, [str(SAMPLE), "--arch", "xception", "--weights", "none", "--out", str(out),
                                          "--input-size", "71", "--epochs", "1", "--fine-tune-epochs", "1",
                                          "--full-epochs", "1", "--feature-copies", "1", "--batch-size", "8",
                                          "--val-fraction", "0.25"])
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "x_run"
    for log in ("phase1_log.csv", "phase2_log.csv", "phase3_log.csv"):
        rows = list(csv.DictReader((run_dir / log).open()))
        assert len(rows) == 1 and np.isfinite(float(rows[0]["loss"])), rows
    with zipfile.ZipFile(out) as zf:
        carried = json.loads(zf.read("edge_mri.json"))
    assert (carried["name"], carried["channels"], carried["input_size"]) == ("xception", 3, 71)
    import keras

    from convert.keras_io import load_model

    # An interrupted run continues phase 3 from its checkpoint (a long CPU run can span sessions).
    again = tmp_path / "again.keras"
    res = CliRunner().invoke(train_main, [str(SAMPLE), "--arch", "xception", "--weights", "none", "--out", str(again),
                                          "--input-size", "71", "--full-epochs", "1", "--batch-size", "8",
                                          "--val-fraction", "0.25", "--init", str(run_dir / "phase3_best.weights.h5")])
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "again_run" / "phase1_log.csv").exists()
    assert len(list(csv.DictReader((tmp_path / "again_run" / "phase3_log.csv").open()))) == 1
    res = CliRunner().invoke(train_main, [str(SAMPLE), "--arch", "xception", "--weights", "none", "--out", str(again),
                                          "--input-size", "71", "--init", str(run_dir / "phase3_best.weights.h5")])
    assert res.exit_code == 2 and "give --full-epochs" in res.output

    model, _ = load_model(out)
    norms = [layer for layer in model.get_layer("xception").layers
             if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and all(np.all(l.moving_mean.numpy() == 0) and np.all(l.moving_variance.numpy() == 1) for l in norms)

    # The generalising recipe fine-tunes the trained model: gray slices (class folders, another source, pastes)
    # repeated into three channels, the mask loss on the base's own 3x3 map, every batch norm frozen.
    tuned_out = tmp_path / "g.keras"
    res = CliRunner().invoke(train_main, [str(SAMPLE), "--arch", "xception", "--init", str(out), "--out",
                                          str(tuned_out), "--input-size", "71", "--epochs", "1", "--batch-size", "8",
                                          "--lr", "1e-2", "--val-fraction", "0.25", "--masks", str(MASKS),
                                          "--extra-healthy", str(IXI), "--paste-fraction", "1", "--mask-weight", "1"])
    assert res.exit_code == 0, res.output
    tuned, carried = load_model(tuned_out)
    assert carried["channels"] == 3 and carried["training"]["recipe"]["grid"] == 3
    assert json.loads((tmp_path / "g_run" / "files.json").read_text())["healthy_train"]
    bases = [m.get_layer("xception") for m in (model, tuned)]
    pairs = [(a, b) for a, b in zip(*(base.layers for base in bases)) if a.get_weights()]
    assert all(all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights()))
               for a, b in pairs if isinstance(a, keras.layers.BatchNormalization))
    assert any(not np.array_equal(a.get_weights()[0], b.get_weights()[0])
               for a, b in pairs if not isinstance(a, keras.layers.BatchNormalization))
    res = CliRunner().invoke(train_main, [str(SAMPLE), "--arch", "xception", "--out", str(tmp_path / "h.keras"),
                                          "--input-size", "71", "--masks", str(MASKS)])
    assert res.exit_code == 2 and "--init" in res.output


def test_live_phases_train_what_each_phase_unfreezes(tmp_path: Path) -> None:
    """The accelerator recipe (no feature cache): phase 1 moves only the head, phase 2 block 14 too, and
    neither touches the entry flow or BatchNorm statistics; the checkpoint loads back into the model."""
    from convert import train
    from convert.architectures import xception
    from convert.dataset import load_folder, stratified_split

    data = load_folder(SAMPLE, 71, 3, train.PIPELINE)
    tr, va = stratified_split(data.y, 0.25, seed=0)
    cfg = train.TrainConfig(arch="xception", data=SAMPLE, out=tmp_path / "x.keras", input_size=71, epochs=1,
                            batch_size=8, fine_tune_epochs=1)
    model, base = xception(71, len(LABELS), None)

    def snapshot():
        return {name: [w.copy() for w in (model if name == "predictions" else base).get_layer(name).get_weights()]
                for name in ("predictions", "block1_conv1", "block14_sepconv1", "block14_sepconv1_bn")}

    def moved(a, b, name):
        return any(not np.array_equal(x, y) for x, y in zip(a[name], b[name]))

    before = snapshot()
    histories = train._live_phases(cfg, model, base, data.take(tr), data.take(va), tmp_path)
    after = snapshot()
    assert len(histories) == 2 and all(np.isfinite(h["loss"]).all() for h in histories)
    assert moved(before, after, "predictions") and moved(before, after, "block14_sepconv1")
    assert not moved(before, after, "block1_conv1") and not moved(before, after, "block14_sepconv1_bn")
    fresh, _ = xception(71, len(LABELS), None)
    fresh.load_weights(str(tmp_path / "phase2_best.weights.h5"))
    assert len(fresh.get_weights()) == len(model.get_weights())


def test_intensity_augmentation_is_random_in_training_and_identity_at_inference() -> None:
    from convert import augment

    x = np.tile(np.linspace(0, 255, 32, dtype=np.float32)[None, :, None, None], (4, 1, 32, 3))
    layer = augment.Intensity(seed=1)
    assert np.array_equal(np.asarray(layer(x, training=False)), x)
    y = np.asarray(layer(x, training=True))
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 255
    assert not np.allclose(y, x, atol=1.0)
    assert len({float(np.abs(y[i] - x[i]).mean()) for i in range(4)}) == 4, "one draw per image"


def test_scanner_variants_are_seeded_uint8_and_change_every_image() -> None:
    """The conversion check's images: the same seed gives the same variants, another seed others; each image
    changes, stays uint8 of the same shape, and one batch boundary does not repeat a draw."""
    from convert import augment

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (augment.VARIANT_BATCH + 3, 24, 24, 3), dtype=np.uint8)
    a, b, c = augment.scanner_variants(x, 5), augment.scanner_variants(x, 5), augment.scanner_variants(x, 6)
    assert a.dtype == np.uint8 and a.shape == x.shape
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    changed = np.abs(a.astype(int) - x).mean(axis=(1, 2, 3))
    assert (changed > 1.0).all(), "every image gets a change"
    assert len(np.unique(np.round(changed, 3))) > 0.9 * len(x), "a draw per image, across batches too"


def test_edge_enhancement_sharpens_half_the_images_and_keeps_flat_regions() -> None:
    """An unsharp mask: across a step edge the enhanced images overshoot on both sides (brighter than the
    bright side, darker than the dark side), flat regions stay as they were, and about half the images are
    left alone."""
    from convert import augment

    x = np.full((200, 16, 16, 1), 80.0, np.float32)
    x[:, :, 8:] = 160.0
    rng = np.random.default_rng(0)
    y = np.asarray(augment.edge_enhancement(
        x, lambda shape, lo, hi: rng.uniform(lo, hi, shape).astype(np.float32),
        lambda shape: rng.standard_normal(shape).astype(np.float32)))
    changed = np.abs(y - x).max(axis=(1, 2, 3)) > 0
    assert 0.35 < changed.mean() < 0.65
    edge = y[changed][:, 4:12, 6:10, 0]
    assert (edge.max(axis=(1, 2)) > 160 + 0.5 * 80 / 3 - 1e-3).all()
    assert (edge.min(axis=(1, 2)) < 80 - 0.5 * 80 / 3 + 1e-3).all()
    np.testing.assert_allclose(y[:, 4:12, 1:5], x[:, 4:12, 1:5])
    np.testing.assert_allclose(y[:, 4:12, 11:15], x[:, 4:12, 11:15])


def test_contrast_curves_reorder_tissue_brightness_keep_black_background_and_touch_only_their_share() -> None:
    """Three "tissues" (grey levels 60, 120, 200) on a black background: a curve keeps the background at 0,
    stays within 0..255 and maps each tissue to one new level; across images the order of the
    tissues changes (a gain or gamma change never does), about ``share`` of the images change, and the
    layer is the identity at inference."""
    from convert import augment

    x = np.zeros((400, 8, 8, 1), np.float32)
    x[:, :, 2:4], x[:, :, 4:6], x[:, :, 6:] = 60.0, 120.0, 200.0
    rng = np.random.default_rng(0)
    y = np.asarray(augment.contrast_curves(x, lambda shape, lo, hi: rng.uniform(lo, hi, shape).astype(np.float32),
                                           0.5))
    changed = np.abs(y - x).max(axis=(1, 2, 3)) > 1e-3
    assert 0.4 < changed.mean() < 0.6
    np.testing.assert_array_equal(y[~changed], x[~changed])
    c = y[changed]
    assert (c[:, :, :2] == 0).all(), "background stays black"
    assert c.min() >= 0 and c.max() <= 255.0 + 1e-3
    levels = c[:, 0, [2, 4, 6], 0]
    assert np.allclose(c[:, :, 2:4], levels[:, None, None, :1]), "one tissue, one new level"
    orders = {tuple(np.argsort(row)) for row in levels}
    assert len(orders) >= 5 and (0, 1, 2) in orders, "tissue order reshuffled, the original order among them"
    layer = augment.ContrastCurves(1.0, seed=3)
    assert np.array_equal(np.asarray(layer(x, training=False)), x)
    assert not np.allclose(np.asarray(layer(x, training=True)), x)


def test_anchor_loss_keeps_the_start_answers_on_main_images_and_leaves_the_others_free() -> None:
    """A network that learnt a toy task (a bright square = class 1) is fine-tuned on the opposite labels.
    With the anchor, the class folders' images (is_main 1) keep the start's answers, while another source's
    images (is_main 0, brighter noise) pay nothing and many follow their new labels (features are shared, so
    not all); without it both flip. The
    anchor is zero before the first step and on every image that is not the class folders' own."""
    import keras

    from convert import guided
    from convert.architectures import custom_cnn
    from convert.train import freeze_batchnorm

    rng = np.random.default_rng(0)
    n, size = 64, 32
    is_main = np.arange(n) % 2 == 0
    x = rng.uniform(0, 120, (n, size, size, 1)).astype(np.float32)
    x[~is_main] += 120.0
    x[n // 2:, 8:24, 8:24] = 255.0
    y = (np.arange(n) >= n // 2).astype(np.int64)
    masks, has, ones = np.zeros((n, size, size), np.uint8), np.zeros(n, bool), np.ones(n, np.float32)

    keras.utils.set_random_seed(0)
    start = custom_cnn(size, 1, 2, width=8)
    freeze_batchnorm(start)  # as the recipe's fine-tunes (--freeze-batchnorm): a 4-batch epoch cannot settle them
    plain = guided.wrapper(start, "b3_out", seed=0)
    guided.compile_wrapper(plain, keras.optimizers.Adam(3e-3), 0.0)
    inputs, targets, weight = guided.as_batch(x, masks, y, has, ones, 2)
    plain.fit(inputs, targets, sample_weight=weight, batch_size=16, epochs=12, verbose=0)
    learnt = np.asarray(plain.predict(inputs, verbose=0)[guided.PROBABILITIES]).argmax(1) == y
    assert learnt.mean() > 0.9, "the toy task is learnt"

    def fine_tuned(anchor_weight: float) -> tuple[np.ndarray, np.ndarray]:
        net = keras.models.clone_model(start)
        net.set_weights(start.get_weights())
        freeze_batchnorm(net)
        teacher = keras.models.clone_model(start)
        teacher.set_weights(start.get_weights())
        model = guided.wrapper(net, "b3_out", seed=1, teacher=teacher)
        guided.compile_wrapper(model, keras.optimizers.Adam(3e-3), 0.0, anchor_weight)
        inputs, targets, weight = guided.as_batch(x, masks, 1 - y, has, ones, 2, is_main)
        before = np.asarray(model.predict(inputs, verbose=0)[guided.ANCHOR])
        assert np.abs(before).max() < 1e-4
        model.fit(inputs, targets, sample_weight=weight, batch_size=16, epochs=12, verbose=0)
        after = model.predict(inputs, verbose=0)
        assert (np.asarray(after[guided.ANCHOR])[~is_main] == 0).all()
        kept = np.asarray(after[guided.PROBABILITIES]).argmax(1) == y
        return kept[is_main].mean(), kept[~is_main].mean()

    (held_main, held_other), (free_main, free_other) = fine_tuned(20.0), fine_tuned(0.0)
    assert held_main > 0.9 and free_main < 0.3, (held_main, free_main)
    assert held_other < 0.65 and free_other < 0.3, (held_other, free_other)


def test_validation_probes_score_the_runs_own_held_out_images(trained: Path, tmp_path: Path) -> None:
    """The probes use exactly the run's held-out images (same count as its files.json), paste held-out tumours
    into held-out healthy slices, and report rates; a file that is not a model is one error line, exit 1."""
    from convert.validation_probes import main as probes_main

    args = ["--data", str(SAMPLE), "--masks", str(MASKS), "--extra-healthy", str(IXI), "--val-fraction", "0.25",
            "--paste-fraction", "3"]
    res = CliRunner().invoke(probes_main, [str(trained), *args, "--json"])
    assert res.exit_code == 0, res.output
    record = json.loads(res.output.strip().splitlines()[-1])
    held_out = json.loads((trained.parent / "tiny_run" / "files.json").read_text())["val"]
    assert record["held_out"] == len(held_out)
    for key in ("accuracy", "curves_accuracy", "curves_tumour_found", "curves_healthy_spared"):
        assert 0.0 <= record[key] <= 1.0
    # seed 0 holds out no masked tumour of this sample; seed 1's split holds out three
    res = CliRunner().invoke(probes_main, [str(trained), *args, "--seed", "1", "--json"])
    record = json.loads(res.output.strip().splitlines()[-1])
    assert record["pastes"] > 0 and 0.0 <= record["pastes_found"] <= 1.0
    bad = tmp_path / "not_a_model.keras"
    bad.write_bytes(b"not a zip")
    res = CliRunner().invoke(probes_main, [str(bad), *args])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1 and "not_a_model.keras" in res.output


MASKS = Path(__file__).parent / "data" / "mri_sample_masks"
IXI = Path(__file__).parent / "data" / "ixi_sample"


def test_guided_recipe_trains_converts_and_writes_its_file_lists(tmp_path: Path) -> None:
    """Masks, another source's healthy slices, pastes and the mask loss in one tiny run; the stride-8 model
    (last stage narrowed) converts with a 2x finer heatmap grid and the run lists exactly the files it
    trained on."""
    import csv

    from convert.convert_cli import main as convert_main
    from convert.train_cli import main as train_main
    from edge import Classifier

    out = tmp_path / "g.keras"
    res = CliRunner().invoke(train_main, [str(SAMPLE), "--out", str(out), "--input-size", "32", "--epochs", "1",
                                          "--batch-size", "8", "--val-fraction", "0.25", "--stride", "8",
                                          "--last-width", "48", "--masks", str(MASKS), "--extra-healthy", str(IXI),
                                          "--paste-fraction", "1", "--mask-weight", "1"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader((tmp_path / "g_run" / "log.csv").open()))
    assert len(rows) == 1 and 0 < float(rows[0]["outside_loss"]) <= 1 and np.isfinite(float(rows[0]["val_loss"]))
    files = json.loads((tmp_path / "g_run" / "files.json").read_text())
    assert len(files["healthy_train"]) + len(files["healthy_val"]) == 8
    subjects = lambda key: {Path(p).name.split("_")[0] for p in files[key]}  # noqa: E731
    assert subjects("healthy_train") and subjects("healthy_val") and not subjects("healthy_train") & subjects("healthy_val")
    assert len(files["train"]) + len(files["val"]) == 32
    with zipfile.ZipFile(out) as zf:
        recipe = json.loads(zf.read("edge_mri.json"))["training"]["recipe"]
    assert recipe["grid"] == 4 and recipe["last_width"] == 48 and recipe["pastes_per_epoch"] > 0
    tfl = tmp_path / "g.tflite"
    res = CliRunner().invoke(convert_main, [str(out), "--calibration", str(SAMPLE), "--out", str(tfl),
                                            "--num-calibration", "16"])
    assert res.exit_code == 0, res.output
    r = Classifier(tfl, threads=1).classify(next((SAMPLE / "glioma").glob("*.jpg")))
    assert r.heatmap.shape == (32, 32)


def test_guided_options_are_checked(tmp_path: Path) -> None:
    from convert.train_cli import main as train_main

    base = [str(SAMPLE), "--out", str(tmp_path / "x.keras")]
    res = CliRunner().invoke(train_main, base + ["--paste-fraction", "0.5"])
    assert res.exit_code == 2 and "need --masks" in res.output
    for option, said in ((["--masks", str(MASKS)], "give its edge-train model as --init"),
                         (["--last-width", "128"], "custom-cnn only")):
        res = CliRunner().invoke(train_main, base + ["--arch", "xception", "--weights", "none"] + option)
        assert res.exit_code == 2 and said in res.output
    bad = tmp_path / "external-dev" / "healthy"
    bad.mkdir(parents=True)
    res = CliRunner().invoke(train_main, base + ["--extra-healthy", str(bad), "--epochs", "1"])
    assert res.exit_code == 2 and "validation-only" in res.output
    # nor can DATA itself be external data: not for training, nor for choosing an operating point on it
    outside = tmp_path / "external-dev" / "feltrin44"
    for label in LABELS:
        (outside / label).mkdir(parents=True)
    res = CliRunner().invoke(train_main, [str(outside), "--out", str(tmp_path / "y.keras"), "--epochs", "1"])
    assert res.exit_code == 2 and "validation-only" in res.output


def test_outside_energy_counts_positive_evidence_outside_the_mask() -> None:
    from convert.guided import outside_energy

    mask = np.zeros((1, 4, 4), np.float32)
    mask[0, :2] = 1
    inside = np.where(mask > 0, 2.0, -1.0).astype(np.float32)  # all positive evidence inside
    half = np.ones((1, 4, 4), np.float32)
    got = outside_energy(np.concatenate([inside, half]), np.concatenate([mask, mask]))
    assert np.allclose(np.asarray(got), [0.0, 0.5], atol=1e-5)


def test_mask_loss_moves_the_class_evidence_onto_the_lesion() -> None:
    """On a toy task where a lesion and a decoy both predict the class, the mask loss makes the class map
    leave the decoy: its outside-mask energy ends far lower than the same training without the loss."""
    import keras

    from convert import guided
    from convert.architectures import custom_cnn

    rng = np.random.default_rng(0)
    n, size = 64, 32
    x = np.full((n, size, size, 1), 60, np.float32)
    masks = np.zeros((n, size, size), np.uint8)
    y = np.zeros(n, np.int64)
    for i in range(n):
        if i % 2:  # class 1 ("lesion" at a random place, plus a decoy at a fixed place)
            r, c = rng.integers(2, 22, size=2)
            x[i, r:r + 8, c:c + 8] = 250
            masks[i, r:r + 8, c:c + 8] = 255
            x[i, 26:31, 26:31] = 250
            y[i] = 1
    has = y == 1
    inputs, targets, weight = guided.as_batch(x, masks, y, has, np.ones(n, np.float32), 2)

    def trained_outside(mask_weight: float) -> float:
        keras.utils.set_random_seed(0)
        net = custom_cnn(size, 1, 2, width=8, stride=8)
        model = guided.wrapper(net, "b3_out", seed=0)
        guided.compile_wrapper(model, keras.optimizers.Adam(3e-3), mask_weight)
        model.fit(inputs, targets, sample_weight=weight, batch_size=16, epochs=10, verbose=0)
        return float(np.mean(np.asarray(model.predict(inputs, verbose=0)[guided.OUTSIDE])[has]))

    with_loss, without = trained_outside(2.0), trained_outside(0.0)
    assert with_loss < 0.75 * without, (with_loss, without)
