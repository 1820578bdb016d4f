"""`edge-classify` end to end: output formats, inputs, overlays, options, determinism, and the bundled model."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import edge
from edge.cli import OverlayNames, expand

LABELS = {"glioma", "meningioma", "notumor", "pituitary"}
LINE = re.compile(r"^(?P<path>\S.*?)  (?P<label>\w+)  (?P<conf>\d{1,3}\.\d)%  (?P<ms>\d+\.\d) ms(?P<rest>.*)$")
SAMPLES = Path(__file__).resolve().parent.parent / "edge" / "samples"


@pytest.fixture()
def scans(tmp_path: Path, scan_png: Path) -> Path:
    """A folder tree: two scans with the same name in different folders, plus things a walk must skip."""
    root = tmp_path / "scans"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / ".cache").mkdir()
    shutil.copy(scan_png, root / "a" / "scan.png")
    Image.open(scan_png).transpose(Image.FLIP_LEFT_RIGHT).save(root / "b" / "scan.png")
    Image.open(scan_png).save(root / "b" / "other.jpg")
    shutil.copy(scan_png, root / ".cache" / "hidden.png")
    shutil.copy(scan_png, root / "a" / "scan.png.heatmap.png")
    (root / "notes.txt").write_text("not a scan")
    (root / "README").write_text("no suffix, not DICOM")
    return root


def test_text_line_per_scan(cli, tiny_model_path: Path, scans: Path):
    result = cli("--model", tiny_model_path, scans)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [LINE.match(line)["path"] for line in lines] == [
        str(scans / "a" / "scan.png"), str(scans / "b" / "other.jpg"), str(scans / "b" / "scan.png")]
    for line in lines:
        match = LINE.match(line)
        assert match["label"] in LABELS and 0 < float(match["conf"]) <= 100 and match["rest"] == ""
    assert result.stderr == ""


def test_json_lines_schema(cli, tiny_model_path: Path, scans: Path):
    result = cli("--model", tiny_model_path, "--json", "--top-k", "3", scans)
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 3
    for record in records:
        assert Path(record["source"]).is_file()
        assert record["label"] in LABELS and set(record["probabilities"]) == LABELS
        assert record["confidence"] == record["probabilities"][record["label"]] == record["top_k"][0]["probability"]
        assert len(record["top_k"]) == 3 and record["top_k"][0]["label"] == record["label"]
        assert abs(sum(record["probabilities"].values()) - 1) < 0.02
        assert set(record["timings_ms"]) == {"decode", "preprocess", "invoke", "postprocess", "total"}
        assert record["model"]["name"] == "tiny-test" and len(record["model"]["sha256"]) == 64
        assert record["backend"]["name"] == "litert"
        assert record["overlay"] is None and "sop_instance_uid" not in record


def test_top_k_text_shows_runners_up(cli, tiny_model_path: Path, scan_png: Path):
    result = cli("--model", tiny_model_path, "-k", "3", scan_png)
    match = LINE.match(result.stdout.strip())
    runners = re.findall(r"(\w+) (\d+\.\d)%", match["rest"])
    assert len(runners) == 2 and {label for label, _ in runners} <= LABELS - {match["label"]}


def test_glob_patterns_are_expanded(cli, tiny_model_path: Path, scans: Path):
    result = cli("--model", tiny_model_path, str(scans / "**" / "*.png"))
    paths = [LINE.match(line)["path"] for line in result.stdout.splitlines()]
    # An explicit pattern takes what it matches (the overlay too); hidden folders stay out of '**'.
    assert paths == sorted(paths) and str(scans / "b" / "scan.png") in paths
    assert not any(".cache" in p for p in paths)
    assert result.exit_code == 0


def test_each_file_is_classified_once(tiny_model_path: Path, scans: Path):
    items = expand([str(scans / "a"), str(scans / "a" / "scan.png"), str(scans)])
    assert [i.display for i in items] == [str(scans / "a" / "scan.png"), str(scans / "b" / "other.jpg"),
                                          str(scans / "b" / "scan.png")]


def test_heatmap_overlays_are_written_without_collisions(cli, tiny_model_path: Path, scans: Path, tmp_path: Path):
    out = tmp_path / "overlays" / "nested"
    result = cli("--model", tiny_model_path, "--heatmap", out, "--json", scans)
    assert result.exit_code == 0, result.stderr
    written = sorted(p.name for p in out.iterdir())
    assert written == ["other.jpg.heatmap.png", "scan.png-2.heatmap.png", "scan.png.heatmap.png"]
    for record in map(json.loads, result.stdout.splitlines()):
        overlay = Image.open(record["overlay"])
        assert overlay.format == "PNG" and overlay.mode == "RGB" and overlay.height > overlay.width
    # A second run rewrites the same files instead of piling up new names.
    assert cli("--model", tiny_model_path, "--heatmap", out, scans).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == written


def test_overlay_names():
    names = OverlayNames(Path("out"))
    assert names("x/scan.png") == Path("out/scan.png.heatmap.png")
    assert names("y/scan.png") == Path("out/scan.png-2.heatmap.png")
    assert names("y/SCAN.png") == Path("out/SCAN.png-3.heatmap.png"), "case-insensitive filesystems too"
    assert names("ct.dcm", "[frame 3]") == Path("out/ct.dcm.frame3.heatmap.png")


def test_heatmap_needs_a_model_with_a_heatmap(cli, tiny_rgb_plain_model_path: Path, scan_png: Path, tmp_path):
    result = cli("--model", tiny_rgb_plain_model_path, "--heatmap", tmp_path / "o", scan_png)
    assert result.exit_code == 2
    assert result.stderr.strip() == "edge-classify: error: --heatmap: model tiny-rgb-plain has no heatmap output"
    plain = cli("--model", tiny_rgb_plain_model_path, scan_png)
    assert plain.exit_code == 0 and LINE.match(plain.stdout.strip())


def test_threads_and_repeated_runs_agree(cli, tiny_model_path: Path, scans: Path):
    def answers(*extra):
        result = cli("--model", tiny_model_path, "--json", *extra, scans)
        assert result.exit_code == 0
        return [(r["source"], r["label"], r["probabilities"]) for r in map(json.loads, result.stdout.splitlines())]

    reference = answers()
    for threads in ("1", "2", "4", "1"):
        assert answers("--threads", threads) == reference


def test_tensorflow_backend_can_be_forced(cli, tiny_model_path: Path, scan_png: Path):
    pytest.importorskip("tensorflow")
    result = cli("--model", tiny_model_path, "--backend", "tensorflow", "--json", scan_png)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["backend"]["name"] == "tensorflow"
    assert result.stderr == ""


def test_missing_backend_is_exit_2(cli, tiny_model_path: Path, scan_png: Path):
    try:
        import tflite_runtime  # noqa: F401
        pytest.skip("tflite_runtime is installed here")
    except ImportError:
        pass
    result = cli("--model", tiny_model_path, "--backend", "tflite_runtime", scan_png)
    assert result.exit_code == 2 and result.stdout == ""
    assert re.fullmatch(r"edge-classify: error: backend 'tflite_runtime' is not installed \(.*\)\n", result.stderr)


def test_version_help_and_list_models(cli):
    version = cli("--version")
    assert version.exit_code == 0
    assert re.fullmatch(rf"edge-classify {re.escape(edge.__version__)} \(backend litert \d[^;]*; Python [\d.]+\)\n",
                        version.stdout)
    helptext = cli("--help").stdout
    for needle in ("Examples:", "Exit codes:", "--heatmap", "--json", "--top-k", "--list-models", "--watch",
                   "--camera", "--frame", "--window", "--keep-uids", "edge-classify edge/samples/"):
        assert needle in helptext
    listing = cli("--list-models")
    assert listing.exit_code == 0 and listing.stdout.strip()
    as_json = cli("--list-models", "--json")
    assert as_json.exit_code == 0
    for line in as_json.stdout.splitlines():
        info = json.loads(line)
        assert {"name", "sha256", "labels", "input_size", "size_bytes"} <= set(info)


@pytest.mark.parametrize("args, message", [
    ((), "give at least one PATH"),
    (("--frame", "x", "a.png"), "--frame"),
    (("--frame", "-1", "a.png"), "--frame"),
    (("--window", "40", "a.png"), "CENTRE,WIDTH"),
    (("--window", "40,0", "a.png"), "width must be positive"),
    (("--threads", "0", "a.png"), "--threads"),
    (("--top-k", "0", "a.png"), "--top-k"),
    (("--camera", "a.png"), "PATH and --camera cannot be combined"),
    (("--interval", "2", "a.png"), "--interval only applies to --camera"),
    (("--once", "a.png"), "--once only applies to --watch"),
    (("--settle", "5", "a.png"), "--settle only applies to --watch"),
    (("--watch", ".", "--settle", "-1"), "--settle"),
    (("--backend", "onnx", "a.png"), "--backend"),
    (("--no-such-option",), "no-such-option"),
    (("",), "a PATH is an empty string"),
    (("a.png", ""), "a PATH is an empty string"),
    (("--model", "", "a.png"), "--model is an empty string"),
    (("--heatmap", "", "a.png"), "'--heatmap': the path is empty"),
    (("--watch", ""), "'--watch': the path is empty"),
    (("--watch", ".", "--out", ""), "'--out': the path is empty"),
])
def test_usage_errors_are_one_line_exit_2(cli, args, message):
    result = cli(*args)
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("edge-classify: error: ") and message in lines[0]


def test_watch_and_camera_modes_use_the_field_helpers(cli, tiny_model_path: Path, scan_png: Path, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(scan_png, inbox / "scan.png")
    (inbox / "bad.png").write_text("not a scan")
    out = tmp_path / "results.jsonl"
    result = cli("--model", tiny_model_path, "--watch", inbox, "--out", out, "--once")
    assert result.exit_code == 1, "a rejected file in the inbox counts as a failure"
    assert LINE.match(result.stdout.strip())["path"] == str((inbox / "scan.png").resolve())
    assert "bad.png: not a recognised image" in result.stderr
    assert len(out.read_text().splitlines()) == 2


def test_real_console_entry_point(run_cli, tiny_model_path: Path, scan_png: Path):
    """The installed process: exit code, clean stderr (no native log lines), and no TensorFlow import."""
    proc = run_cli("--model", tiny_model_path, scan_png, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert proc.returncode == 0, proc.stderr
    assert LINE.match(proc.stdout.strip())["label"] in LABELS
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert any(name.startswith("ai_edge_litert") for name in imported)
    forbidden = [n for n in imported if n.split(".")[0] in ("tensorflow", "keras", "matplotlib", "convert", "benchmarks")]
    assert forbidden == []
    assert [line for line in proc.stderr.splitlines() if not line.startswith("import time:")] == []


# --- the bundled model on the shipped samples (pass once the lead commits them) -----------------------

def test_bundled_model_classifies_the_samples(cli, bundled_model: Path, sample_scans: list[Path]):
    result = cli("--json", SAMPLES)
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(r["source"]).name for r in records] == [p.name for p in sample_scans]
    for record in records:
        expected = Path(record["source"]).name.split("_")[0]
        assert record["label"] == expected, f"{record['source']}: {record['label']} {record['confidence']:.3f}"
        assert record["model"]["name"] == "custom-cnn"


def test_bundled_model_overlays_and_text(cli, bundled_model: Path, sample_scans: list[Path], tmp_path: Path):
    result = cli("--heatmap", tmp_path, *sample_scans[:2])
    assert result.exit_code == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2
    for scan in sample_scans[:2]:
        overlay = np.asarray(Image.open(tmp_path / f"{scan.name}.heatmap.png"))
        assert overlay.shape[1] >= 224
