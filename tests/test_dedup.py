"""convert.dedup / edge-dedup on a tiny data set built from the real sample scans: copies must be found
(byte-identical, re-encoded at JPEG quality 70, shifted by 3 pixels), different slices must not."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from convert import dedup
from convert.dedup_cli import main


def by_name(scans: list[Path]) -> dict[str, Path]:
    return {p.stem: p for p in scans}


@pytest.fixture()
def dataset(tmp_path: Path, sample_scans: list[Path]) -> Path:
    """root/Training and root/Testing with known copies; returns root."""
    s = by_name(sample_scans)
    needed = {"glioma_1", "glioma_2", "meningioma_1", "notumor_1", "notumor_2", "pituitary_1"}
    if not needed <= set(s):
        pytest.fail(f"the package's edge/samples/ lacks {sorted(needed - set(s))}")
    root = tmp_path / "ds"
    train, test = root / "Training", root / "Testing"
    for name in ("glioma_1", "meningioma_1", "notumor_1", "pituitary_1"):
        (train / name.split("_")[0]).mkdir(parents=True, exist_ok=True)
        shutil.copy(s[name], train / name.split("_")[0] / f"tr-{name}.jpg")
    shutil.copy(s["glioma_1"], train / "glioma" / "tr-glioma_1-again.jpg")  # a copy inside Training
    for cls in ("glioma", "meningioma", "notumor", "pituitary"):
        (test / cls).mkdir(parents=True)
    shutil.copy(s["glioma_1"], test / "glioma" / "exact.jpg")
    Image.open(s["meningioma_1"]).convert("L").save(test / "meningioma" / "q70.jpg", quality=70)
    pit = Image.open(s["pituitary_1"]).convert("L")
    pit.transform(pit.size, Image.AFFINE, (1, 0, -3, 0, 1, 0), fillcolor=0).save(test / "pituitary" / "shift3.png")
    shutil.copy(s["glioma_2"], test / "glioma" / "other.jpg")
    shutil.copy(s["notumor_2"], test / "notumor" / "other.jpg")
    (test / "notumor" / "broken.jpg").write_bytes(s["notumor_1"].read_bytes()[:300])
    hidden = test / "notumor" / ".ipynb_checkpoints"
    hidden.mkdir()
    shutil.copy(s["notumor_1"], hidden / "exact-checkpoint.jpg")
    return root


def test_hamming_matches_python_popcount():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**63, 7, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, 5, dtype=np.uint64)
    d = dedup.hamming(a, b)
    assert d.shape == (7, 5)
    assert d.tolist() == [[bin(int(x) ^ int(y)).count("1") for y in b] for x in a]
    assert dedup.hamming(np.array([2**64 - 1], np.uint64), np.array([0], np.uint64)).tolist() == [[64]]


def test_centring_undoes_a_shift(sample_scans: list[Path]):
    gray = np.asarray(Image.open(sample_scans[0]).convert("L"))
    shifted = np.zeros_like(gray)
    shifted[5:, 4:] = gray[:-5, :-4]
    a = np.asarray(dedup.centred_gray(gray), np.float32)
    b = np.asarray(dedup.centred_gray(shifted), np.float32)
    # Re-centred, the two differ far less than the raw images do.
    assert np.abs(a - b).mean() < 0.3 * np.abs(gray.astype(np.float32) - shifted).mean()


def test_finds_copies_and_only_copies(dataset: Path):
    report = dedup.check_leakage(dataset / "Training", dataset / "Testing")
    json.dumps(report)
    found = {p["test"]: p for p in report["pairs"]}
    assert set(found) == {"Testing/glioma/exact.jpg", "Testing/meningioma/q70.jpg", "Testing/pituitary/shift3.png"}
    assert found["Testing/glioma/exact.jpg"]["kind"] == "exact"
    assert {p["train"] for p in report["pairs"] if p["test"] == "Testing/glioma/exact.jpg"} == {
        "Training/glioma/tr-glioma_1.jpg", "Training/glioma/tr-glioma_1-again.jpg"}
    assert found["Testing/meningioma/q70.jpg"]["kind"] == "near"
    assert found["Testing/meningioma/q70.jpg"]["train"] == "Training/meningioma/tr-meningioma_1.jpg"
    assert found["Testing/pituitary/shift3.png"]["train"] == "Training/pituitary/tr-pituitary_1.jpg"
    for p in report["pairs"]:
        assert p["distance"] == max(p["phash"], p["dhash"]) <= report["threshold"] == dedup.DEFAULT_THRESHOLD
    assert report["dedup_test"] == ["Testing/glioma/other.jpg", "Testing/notumor/other.jpg"]
    assert report["test_total"] == 5 and report["test_with_duplicate"] == 3
    assert report["counts"]["test_with_exact"] == 1 and report["counts"]["test_with_near_only"] == 2
    assert report["per_class"]["glioma"] == {"test": 2, "with_duplicate": 1, "dedup": 1}
    assert report["per_class"]["pituitary"] == {"test": 1, "with_duplicate": 1, "dedup": 0}
    # The truncated file is listed, not fatal; the hidden checkpoint copy is not looked at.
    assert [u["path"] for u in report["unreadable"]] == ["Testing/notumor/broken.jpg"]
    assert "broken.jpg" in report["unreadable"][0]["error"]
    assert report["train_groups"] == [["Training/glioma/tr-glioma_1-again.jpg", "Training/glioma/tr-glioma_1.jpg"]]
    assert report["test_groups"] == []


def test_threshold_zero_keeps_exact_copies(dataset: Path):
    report = dedup.check_leakage(dataset / "Training", dataset / "Testing", threshold=0)
    assert "Testing/glioma/exact.jpg" not in report["dedup_test"]
    assert all(p["distance"] == 0 for p in report["pairs"])
    assert "Testing/glioma/other.jpg" in report["dedup_test"]


def test_cli_writes_report_and_summary(dataset: Path, tmp_path: Path):
    out = tmp_path / "dups" / "report.json"
    res = CliRunner().invoke(main, [str(dataset / "Training"), str(dataset / "Testing"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "test images with a copy in Training: 3 of 5" in res.stdout
    assert "warning:" in res.stderr and "broken.jpg" in res.stderr
    written = json.loads(out.read_text())
    assert written["dedup_test"] == ["Testing/glioma/other.jpg", "Testing/notumor/other.jpg"]
    res = CliRunner().invoke(main, [str(dataset / "Training"), str(dataset / "Testing"), "--json"])
    assert res.exit_code == 0
    assert json.loads(res.stdout) == written


def test_cli_missing_folder_is_one_line_error(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(main, [str(tmp_path / "nope"), str(tmp_path / "empty")])
    assert res.exit_code == 1
    assert res.stderr.strip().splitlines() == [f"edge-dedup: error: {tmp_path / 'nope'}: not a directory"]
