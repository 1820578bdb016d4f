"""The input gate (issue 13): inputs that are not brain-MRI slices get no verdict, real scans still do.

Driven through the real CLI (`edge-classify ... --json`), the Python API, the watch folder and the camera loop,
with both bundled models and a corpus of 44 degenerate and non-MRI inputs (tests/nonmri_corpus.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import nonmri_corpus
from conftest import save_dicom
from edge import Classifier
from edge import gate
from edge.errors import ModelError
from edge.records import ok_record

MODELS = ("custom-cnn", "xception")
NO_VERDICT = {"refer", "refused"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every corpus input in one folder (the shipped ones copied, under their own names)."""
    import shutil

    folder = tmp_path_factory.mktemp("corpus")
    for path in nonmri_corpus.build(tmp_path_factory.mktemp("drawn")):
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def sagittal(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return nonmri_corpus.mri_sagittal(tmp_path_factory.mktemp("mri") / "s1045.png")


@pytest.mark.parametrize("model", MODELS)
def test_no_corpus_input_gets_a_verdict_through_the_cli(run_cli, corpus: Path, model: str):
    files = sorted(corpus.iterdir())
    assert len(files) >= 30
    done = run_cli(corpus, "--model", model, "--json")
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(records) == len(files), done.stderr
    answered = [(r["source"], r.get("label"), r.get("ood_score")) for r in records if r["status"] not in NO_VERDICT]
    assert answered == [], "every degenerate or non-MRI input is refused or referred"
    assert done.returncode == 3, "exit 3: none failed, some got no verdict (edge-classify --help)"
    for r in records:
        assert r["label"] is None and r["confidence"] is None and r["probabilities"] is None and r["top_k"] == []
        assert r["has_heatmap"] is False and r["message"] == gate.REASONS[r["reason"]][1]
        assert gate.status_of(r["reason"]) == r["status"] and r["ood_score"] > 0
    reasons = {r["reason"] for r in records}
    assert {"flat", "low_contrast", "aspect_ratio", "colour", "out_of_distribution"} <= reasons


@pytest.mark.parametrize("model", MODELS)
def test_real_scans_are_answered(run_cli, sample_scans: list[Path], sagittal: Path, model: str):
    """The bundled samples, and a real sagittal brain MRI from another scanner (matplotlib's sample data)."""
    done = run_cli(*sample_scans, sagittal, "--model", model, "--json")
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == 0, done.stdout
    assert [r["status"] for r in records] == ["ok"] * (len(sample_scans) + 1)
    for r in records:
        assert r["label"] in r["probabilities"] and r["reason"] is None and r["message"] is None
        assert 0 < r["ood_score"] <= 1


def test_text_lines_say_why_there_is_no_verdict(run_cli, corpus: Path, sample_scans: list[Path]):
    missing = corpus / "gone.png"
    done = run_cli(sample_scans[0], corpus / "black.png", corpus / "text-page.png", missing)
    lines = done.stdout.splitlines()
    assert lines[0].split()[1] in ("glioma", "meningioma", "notumor", "pituitary")
    assert f"{corpus / 'black.png'}  REFUSED  The image is blank (one flat value): refused, no verdict  " in lines[1]
    assert (f"{corpus / 'text-page.png'}  REFER  Not like the brain MRI this model was trained on: referred, "
            "no verdict  ") in lines[2]
    assert done.returncode == 1 and f"{missing}: no such file" in done.stderr, "a failure outranks a referral"


def test_api_result_carries_status_reason_and_score(corpus: Path, sample_scans: list[Path]):
    clf = Classifier()
    assert clf.gate is not None and clf.spec.weights_verified
    ok = clf.classify(sample_scans[0])
    assert ok.status == "ok" and ok.reason is None and ok.message is None and 0 < ok.ood_score <= 1
    assert ok.features is not None and ok.features.shape == (clf.gate.width,)
    refer = clf.classify(corpus / "checkerboard-8.png")
    assert refer.status == "refer" and refer.reason == "out_of_distribution" and refer.ood_score > 1
    assert refer.message.endswith("referred, no verdict")
    record = ok_record(refer)
    assert record["schema"] == "edge-classify/2" and record["status"] == "refer" and record["label"] is None
    # The network's own output stays on the Result for audit, never in the record.
    assert refer.label in clf.labels and record["probabilities"] is None
    flat = clf.classify(np.full((64, 64), 7, np.uint8))
    assert (flat.status, flat.reason) == ("refused", "flat")


@pytest.mark.parametrize("image, reason", [
    (np.zeros((224, 224), np.uint8), "flat"),
    (np.full((100, 100, 3), (255, 0, 0), np.uint8), "flat"),
    ((120 + np.arange(224 * 224).reshape(224, 224) % 5).astype(np.uint8), "low_contrast"),
    (np.linspace(1000, 1010, 64 * 64, dtype=np.float32).reshape(64, 64), "low_contrast"),
    (np.random.default_rng(0).integers(0, 256, (64, 400), dtype=np.uint8), "aspect_ratio"),
    (np.random.default_rng(1).integers(0, 256, (200, 200, 3), dtype=np.uint8), "colour"),
    (np.pad(np.full((30, 30), 200, np.uint8), 90), "no_head"),  # a small bright patch, no head-sized object
])
def test_image_checks(image: np.ndarray, reason: str):
    assert gate.check_image(image) == reason


def test_image_checks_pass_real_scans_of_every_kind(sample_scans: list[Path], sagittal: Path):
    from edge.decode import decode

    for path in [*sample_scans, sagittal]:
        image = decode(path)
        assert gate.check_image(image) is None, path
        assert gate.check_image(image.astype(np.float32) / 255.0) is None, "float scans too"
        assert gate.check_image(image.astype(np.uint16) * 64) is None, "and 16-bit ones"
    rgb = np.asarray(Image.open(sample_scans[0]).convert("RGB"))
    cast = (rgb * np.array([1.0, 0.9, 0.7])).astype(np.uint8)  # a warm colour cast: a photo of a film
    assert gate.check_image(cast) is None


def test_a_malformed_gate_is_a_model_error():
    meta = {"gate": {"method": "mahalanobis-pca", "means": gate.encode_array(np.zeros((2, 4))),
                     "basis": gate.encode_array(np.eye(4)[:, :2]), "variances": gate.encode_array(np.ones(2)),
                     "residual_variance": 1.0, "threshold": 2.0}}
    loaded = gate.OodGate.from_metadata(meta)
    assert loaded.width == 4 and loaded.score(np.zeros(4)) == 0.0
    assert abs(loaded.score(np.array([2.0, 0, 0, 0])) - np.sqrt(4 / 2)) < 1e-6
    assert gate.OodGate.from_metadata({}) is None
    for broken in ({"method": "energy"}, dict(meta["gate"], threshold=0),
                   dict(meta["gate"], variances=gate.encode_array(np.ones(3))),
                   dict(meta["gate"], means={"dtype": "float32", "shape": [2, 4], "base64": "!!"})):
        with pytest.raises(ModelError):
            gate.OodGate.from_metadata({"gate": broken})


def test_overlay_of_a_referred_scan_shows_no_heat_and_says_why(corpus: Path, tmp_path: Path):
    from edge.overlay import NO_VERDICT as WORDS, overlay_image

    result = Classifier().classify(corpus / "checkerboard-32.png")
    assert result.status == "refer" and result.heatmap is not None
    picture = np.asarray(overlay_image(result)).astype(int)
    scan = picture[:448]
    assert (np.abs(scan[..., 0] - scan[..., 2]) < 3).all(), "the scan in grayscale: no heat drawn"
    caption = picture[448:]
    amber = (caption[..., 0] > 180) & (caption[..., 0] - caption[..., 2] > 80)
    assert amber.any(axis=1).sum() > 20, f"'{WORDS}' and the reason, in amber"


def test_watch_and_camera_carry_the_status(run_cli, corpus: Path, sample_scans: list[Path], tmp_path: Path):
    import shutil

    from edge.camera import FileSequenceSource, run_camera

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(sample_scans[0], inbox / "scan.jpg")
    shutil.copy(corpus / "white.png", inbox / "white.png")
    out = tmp_path / "results.jsonl"
    done = run_cli("--watch", inbox, "--once", "--settle", "0", "--out", out)
    assert done.returncode == 3, done.stderr
    written = {Path(r["source"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert written["scan.jpg"]["status"] == "ok" and written["white.png"]["status"] == "refused"
    assert written["white.png"]["reason"] == "flat" and "size" in written["white.png"]
    again = run_cli("--watch", inbox, "--once", "--settle", "0", "--out", out)
    assert again.returncode == 0 and len(out.read_text().splitlines()) == 2, "a refusal is final, not retried"

    emitted: list[dict] = []
    run_camera(Classifier(), interval=0, count=None, preview=False, heatmap_dir=tmp_path / "shots",
               emit=emitted.append, source=FileSequenceSource([sample_scans[0], corpus / "text-page.png"]))
    assert [r["status"] for r in emitted] == ["ok", "refer"]
    assert emitted[1]["label"] is None and Path(emitted[1]["overlay"]).is_file()


@pytest.mark.parametrize("model", MODELS)
def test_bundled_models_carry_the_gate_and_its_measured_rates(model: str):
    from edge.registry import resolve

    clf = Classifier(model)
    meta = clf.spec.metadata
    assert clf.spec.weights_verified, "the retrofit recorded the weights checksum"
    assert meta["outputs"]["features"]["name"] == "features" and clf.gate is not None
    cal = meta["gate"]["calibration"]
    assert cal["held_out_referred"] <= 0.01 and {r["reference"] for r in cal["per_reference"]} == {
        "glioma", "meningioma", "notumor", "pituitary", "ixi-healthy/train"}
    assert all("external-dev" not in f and "dev" != Path(f).name for f in cal["folders"]), "training data only"
    card = resolve(model).with_suffix(".md").read_text(encoding="utf-8")
    assert "## Input gate" in card and f"{meta['gate']['threshold']:.4g}" in card
    layer = meta["outputs"]["features"]["layer"].split()[0]
    assert f"`{layer}`" in card and f"{cal['components']} components" in card, "the card names the shipped layer"
    assert cal["variants_referred_unseen"] <= 0.02, "a steady layer (edge-gate calibrate --layer)"


def _scan_as_dicom(scan: Path, out: Path, **header: str | None) -> Path:
    """A real scan's pixels in an MR DICOM file (pydicom's MR_small.dcm as the template, its window and
    rescale removed) with some header elements set (None deletes one)."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    gray = np.asarray(Image.open(scan).convert("L"), np.uint16)
    ds.Rows, ds.Columns = gray.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = gray.tobytes()
    for keyword in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept", "BodyPartExamined"):
        if keyword in ds:
            delattr(ds, keyword)
    return save_dicom(ds, out, **header)


@pytest.mark.parametrize("model", MODELS)
def test_a_dicom_header_that_names_another_modality_or_body_part_is_refused(run_cli, sample_scans: list[Path],
                                                                              tmp_path: Path, model: str):
    """The same brain MRI pixels in six DICOM files that differ only in Modality and Body Part Examined: what
    the scanner wrote decides CT and abdomen; a head, an unknown local word, no body part or an OT
    (secondary capture) export leave the verdict to the pixels, which answer it."""
    scan = sample_scans[0]
    cases = {"mr-head": ({"BodyPartExamined": "HEAD"}, "ok", None),
             "mr-kopf": ({"BodyPartExamined": "KOPF"}, "ok", None),
             "mr-none": ({}, "ok", None),
             "ot": ({"Modality": "OT"}, "ok", None),
             "ct-head": ({"Modality": "CT", "BodyPartExamined": "HEAD"}, "refused", "other_modality"),
             "mr-abdomen": ({"BodyPartExamined": "ABDOMEN"}, "refused", "other_body_part"),
             "mr-l-spine": ({"BodyPartExamined": "L SPINE"}, "refused", "other_body_part")}
    files = [_scan_as_dicom(scan, tmp_path / f"{name}.dcm", **header) for name, (header, _, _) in cases.items()]
    done = run_cli(*files, "--model", model, "--json")
    records = {Path(r["source"]).stem: r for r in map(json.loads, done.stdout.splitlines())}
    assert done.returncode == 3, done.stderr
    for name, (_, status, reason) in cases.items():
        r = records[name]
        assert (r["status"], r["reason"]) == (status, reason), name
        if status == "ok":
            assert r["label"] == records["mr-head"]["label"], name
        else:
            assert r["label"] is None and r["message"] == gate.REASONS[reason][1]


def test_check_header_rules():
    assert gate.check_header(None, None) is None
    assert gate.check_header("MR", "BRAIN") is None and gate.check_header("OT", None) is None
    assert gate.check_header("MR", "HEADNECK") is None, "an unknown or partly-head value refuses nothing"
    assert gate.check_header("US", "HEAD") == "other_modality" and gate.check_header("SEG", None) == "other_modality"
    assert gate.check_header("MR", "KNEE") == "other_body_part"
    assert gate.check_header("MR", "T_SPINE") == "other_body_part"
