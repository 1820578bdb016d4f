"""edge-evaluate --masks end to end: the bundled int8 model, the real interpreter and real Kaggle training scans
(tests/data/mri_sample) with six committed tumour masks; figures are re-derived independently for one scan."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from convert import explain_metrics as em
from convert.evaluate_cli import main
from convert.explain_eval import head_region, load_mask
from edge import Classifier
from edge.errors import InputError
from edge.preprocess import prepare

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "tests" / "data" / "mri_sample"
MASKS = REPO / "tests" / "data" / "mri_sample_masks"
BR35H = REPO.parent / "shared" / "data" / "external-dev" / "br35h_tumour"
N_MASKS = 6


def invoke(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def test_classify_input_is_classify_without_preprocessing(bundled_model: Path):
    clf = Classifier(bundled_model, threads=1)
    scan = SAMPLE / "glioma" / "Tr-gl_0098.jpg"
    full = clf.classify(scan)
    spec = clf.spec
    direct = clf.classify_input(prepare(np.asarray(Image.open(scan).convert("L")), spec.input_size, spec.channels,
                                        spec.pipeline))
    assert direct.probabilities == full.probabilities
    np.testing.assert_array_equal(direct.heatmap, full.heatmap)
    assert direct.image is None and direct.geometry is None
    with pytest.raises(InputError, match=r"uint8 \[96, 96, 1\]"):
        clf.classify_input(np.zeros((96, 96, 1), np.float32))
    with pytest.raises(InputError, match="got uint8 \\[64, 64, 1\\]"):
        clf.classify_input(np.zeros((64, 64, 1), np.uint8))


def test_class_folders_end_to_end(bundled_model: Path, tmp_path: Path):
    out = tmp_path / "explain"
    res = invoke(bundled_model, SAMPLE, "--masks", MASKS, "--out", out, "--deletion-limit", 2, "--threads", 1)
    assert res.exit_code == 0, res.output
    assert "| pointing game" in res.stdout and "deletion AUC" in res.stdout
    report = json.loads((out / "explanations.json").read_text())
    n_images = len(list(SAMPLE.rglob("*.jpg")))
    assert report["images"] == {"found": n_images, "with_mask": N_MASKS, "without_mask": n_images - N_MASKS,
                                "unreadable": 0, "evaluated": N_MASKS, "deletion_evaluated": 2}
    assert report["grouped_by"] == "true"
    assert list(report["summary"]) == ["all", "glioma", "meningioma", "pituitary"]
    rows = report["per_image"]
    assert sorted(Path(r["path"]).stem for r in rows) == sorted(p.stem for p in MASKS.rglob("*.png"))
    all_ = report["summary"]["all"]
    assert all_["n"] == N_MASKS and all_["deletion_n"] == 2
    assert all_["pointing_game"] == pytest.approx(np.mean([r["hit"] for r in rows]))
    assert all_["mass_ratio"]["median"] == pytest.approx(np.median([r["mass_ratio"] for r in rows]))
    deleted = [r for r in rows if "deletion_auc" in r]
    assert len(deleted) == 2
    for r in deleted:
        for key in ("deletion_auc", "insertion_auc", "deletion_auc_random", "insertion_auc_random"):
            assert 0.0 <= r[key] <= 1.0
    assert (out / "explanations.md").read_text().startswith("| custom-cnn (true class) | all | glioma |")
    for label in ("glioma", "meningioma", "pituitary"):
        with Image.open(out / f"overlays_{label}.png") as png:
            assert png.format == "PNG" and png.size[0] > 300

    # One scan, recomputed here from the classifier's result and the mask file.
    row = next(r for r in rows if r["path"].endswith("Tr-me_0076.jpg"))
    r = Classifier(bundled_model, threads=1).classify(row["path"])
    heat = r.heatmap_on_image()
    mask = np.asarray(Image.open(MASKS / "meningioma" / "Tr-me_0076.png")) > 127
    head = np.zeros(heat.shape, bool)
    t, left, b, right = r.geometry.box
    head[t:b, left:right] = True
    y, x = row["peak"]
    assert heat[y, x] == heat.max()
    assert row["hit"] == (np.hypot(*(np.argwhere(mask) - [y, x]).T).min() <= 15 * max(heat.shape) / 224)
    energy = heat[mask].sum() / heat.sum()
    assert row["energy"] == pytest.approx(energy, abs=1e-5)
    assert row["mass_ratio"] == pytest.approx(energy / (mask[head].sum() / head.sum()), rel=1e-4)


def test_flat_folder_groups_by_predicted_class_and_skips_scans_without_a_mask(bundled_model: Path, tmp_path: Path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for p in sorted(MASKS.rglob("*.png"))[:3]:
        shutil.copy(SAMPLE / p.parent.name / f"{p.stem}.jpg", images)
        shutil.copy(p, masks)
    shutil.copy(SAMPLE / "notumor" / "Tr-no_0121.jpg", images)
    res = invoke(bundled_model, images, "--masks", masks, "--json", "--deletion-limit", 0, "--threads", 1)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["images"]["with_mask"] == 3 and report["images"]["without_mask"] == 1
    assert report["grouped_by"] == "predicted" and all(r["true"] is None for r in report["per_image"])
    assert sum(s["n"] for name, s in report["summary"].items() if name != "all") == 3
    assert report["summary"]["all"]["deletion_n"] == 0


@pytest.mark.skipif(not BR35H.is_dir(), reason="../shared/data/external-dev (Br35H with masks) is not here")
def test_external_flat_set_from_shared(bundled_model: Path, tmp_path: Path):
    res = invoke(bundled_model, BR35H / "images", "--masks", BR35H / "masks", "--limit", 3, "--deletion-limit", 0,
                 "--json", "--threads", 1)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["images"]["evaluated"] == 3
    assert all(r["image_shape"] != [224, 224] or r["tolerance_px"] == 15 for r in report["per_image"])


def test_mask_of_another_size_is_resized_nearest_and_head_is_the_crop_box(tmp_path: Path):
    from edge.preprocess import prepare_with_geometry

    small = np.zeros((50, 40), np.uint8)
    small[10:20, 5:15] = 255
    Image.fromarray(small).save(tmp_path / "m.png")
    mask = load_mask(tmp_path / "m.png", (100, 80))
    assert mask.shape == (100, 80) and mask.sum() == 400 and mask[20:40, 10:30].all()
    image = np.zeros((100, 80), np.uint8)
    image[20:90, 10:70] = 150
    _, geometry = prepare_with_geometry(image, 32, 1)
    head = head_region(geometry)
    t, left, b, right = geometry.box
    assert head.sum() == (b - t) * (right - left) and head[t:b, left:right].all()
    # a uniform model-space map lands uniformly on the head: mass ratio 1 for any mask inside it
    from edge.preprocess import heatmap_to_image

    uniform = heatmap_to_image(np.ones((32, 32), np.float32), geometry)
    assert em.mass_ratio(uniform, mask & head, head) == pytest.approx(1.0, rel=0.02)


@pytest.mark.parametrize("case", ["no-mask-dir", "no-matching-mask", "keras-model", "deletion-limit-alone", "dedup"])
def test_unusable_inputs(case: str, bundled_model: Path, tmp_path: Path):
    args, code, expected = [bundled_model, SAMPLE, "--masks", MASKS], 1, ""
    if case == "no-mask-dir":
        args[3], expected = tmp_path / "absent", "not a directory (mask folder)"
    elif case == "no-matching-mask":
        (tmp_path / "m").mkdir()
        args[3], expected = tmp_path / "m", "none of the"
    elif case == "keras-model":
        args[0], expected = tmp_path / "model.keras", "run through the TFLite model"
    elif case == "deletion-limit-alone":
        args, code, expected = [bundled_model, SAMPLE, "--deletion-limit", 3], 2, "--deletion-limit needs --masks"
    else:
        (tmp_path / "d.json").write_text("{}")
        args, code, expected = args + ["--dedup", tmp_path / "d.json"], 2, "takes no --dedup"
    res = invoke(*args)
    assert res.exit_code == code, res.output
    assert expected in res.stderr
    if code == 1:
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("edge-evaluate: error: "), res.stderr
