"""One record shape for every mode of `edge-classify` (file batch, --watch, --camera), as docs/RECORDS.md
documents it: the test reads the documented keys from that page, so the page and the code cannot drift."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from edge.records import SCHEMA

DOC = Path(__file__).resolve().parent.parent / "docs" / "RECORDS.md"
OPTIONAL = {"frame", "sop_instance_uid", "retry"}  # documented as present only in some cases
NO_VERDICT = ("refer", "refused")
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def documented() -> dict[str, set[str]]:
    """Status or mode -> keys, from the key table of docs/RECORDS.md (`| `a`, `b` | ok, refer | ... |`).

    A key whose `in` cell carries a qualifier after ';' (`ok; edge-serve only`) is listed under ``"other"``:
    documented, but not in every record of those statuses. The table of reason codes that follows is not keys.
    """
    keys: dict[str, set[str]] = {}
    text = DOC.read_text(encoding="utf-8").split("Reason codes")[0]
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`"):
            names = set(re.findall(r"`([a-z_]+)`", cells[0]))
            where, qualified = cells[1].split(";")[0], ";" in cells[1]
            for status in (w.strip() for w in where.split(",")):
                keys.setdefault("other" if qualified else status, set()).update(names)
    return keys


def check(record: dict, mode: str) -> None:
    """Every documented key its status needs, and none that is not documented for this mode."""
    doc = documented()
    allowed = doc["all"] | doc[record["status"]] | (doc["watch"] if mode == "watch" else set())
    required = allowed - OPTIONAL
    assert record["schema"] == SCHEMA == "edge-classify/2"
    assert set(record) - allowed == set(), f"undocumented keys in a {mode} record"
    assert required - set(record) == set(), f"documented keys missing from a {mode} record"
    assert TIME.match(record["time"])
    if record["status"] == "error":
        assert "\n" not in record["error"] and record["error"].startswith(record["source"])
    if record["status"] in NO_VERDICT:
        assert record["label"] is None and record["probabilities"] is None and record["message"]


@pytest.fixture()
def inputs(tmp_path: Path, scan_png: Path) -> tuple[Path, Path]:
    good = tmp_path / "in" / "good.png"
    good.parent.mkdir()
    shutil.copy(scan_png, good)
    bad = tmp_path / "in" / "bad.png"
    bad.write_text("not an image")
    return good, bad


def test_the_documented_table_lists_the_keys():
    doc = documented()
    assert {"all", "ok", "refer", "refused", "error", "watch"} <= set(doc)
    assert {"schema", "status", "source", "time"} <= doc["all"] and "error" in doc["error"]
    assert doc["ok"] == doc["refer"] == doc["refused"], "one shape with or without a verdict"
    assert {"ood_score", "reason", "message", "label"} <= doc["ok"]


def test_batch_json_records_results_and_errors(cli, tiny_model_path: Path, inputs, tmp_path: Path):
    good, bad = inputs
    result = cli("--model", tiny_model_path, "--json", "--heatmap", tmp_path / "o", good, bad,
                 tmp_path / "missing.png")
    assert result.exit_code == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["status"], r["source"]) for r in records] == [
        ("ok", str(good)), ("error", str(bad)), ("error", str(tmp_path / "missing.png"))]
    for record in records:
        check(record, "batch")
    assert Path(records[0]["overlay"]).is_file()
    assert result.stderr.splitlines() == [f"edge-classify: error: {r['error']}" for r in records[1:]]
    plain = json.loads(cli("--model", tiny_model_path, "--json", good).stdout)
    assert plain["overlay"] is None


def test_refused_and_referred_records_have_the_same_shape(cli, bundled_model: Path, tmp_path: Path):
    import numpy as np
    from PIL import Image

    blank, board = tmp_path / "blank.png", tmp_path / "board.png"
    Image.new("L", (128, 128), 0).save(blank)
    yy, xx = np.mgrid[:128, :128]
    Image.fromarray((((yy // 16 + xx // 16) % 2) * 255).astype(np.uint8)).save(board)
    result = cli("--model", bundled_model, "--json", "--heatmap", tmp_path / "o", blank, board)
    assert result.exit_code == 3
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["status"], r["reason"]) for r in records] == [("refused", "flat"), ("refer", "out_of_distribution")]
    for record in records:
        check(record, "batch")
        assert Path(record["overlay"]).is_file() and record["has_heatmap"] is False


def test_watch_out_and_json_are_the_same_records(cli, tiny_model_path: Path, inputs, tmp_path: Path):
    good, bad = inputs
    out = tmp_path / "results.jsonl"
    result = cli("--model", tiny_model_path, "--watch", good.parent, "--out", out, "--once", "--json", "-k", "2")
    assert result.exit_code == 1
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written == [json.loads(line) for line in result.stdout.splitlines()]
    assert {r["source"]: r["status"] for r in written} == {str(good.resolve()): "ok", str(bad.resolve()): "error"}
    for record in written:
        check(record, "watch")
        assert record["size"] == Path(record["source"]).stat().st_size
    (ok,) = [r for r in written if r["status"] == "ok"]
    assert len(ok["top_k"]) == 2, "--top-k applies to watched files too"


def test_camera_records(cli, tiny_model_path: Path, sample_scans: list[Path], tmp_path: Path,
                        monkeypatch: pytest.MonkeyPatch):
    """The real --camera loop, fed by replayed frames (there is no camera here), one of them broken."""
    import edge.camera

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(sample_scans[0].read_bytes()[:200])
    frames = [sample_scans[0], broken, sample_scans[1]]
    monkeypatch.setattr(edge.camera, "open_source", lambda kind="auto": edge.camera.FileSequenceSource(frames))
    result = cli("--model", tiny_model_path, "--camera", "--interval", "0.01", "--json", "--heatmap", tmp_path / "o")
    assert result.exit_code == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["source"], r["status"]) for r in records] == [
        ("camera:frame-0001", "ok"), ("camera:frame-0002", "error"), ("camera:frame-0003", "ok")]
    for record in records:
        check(record, "camera")
    assert Path(records[0]["overlay"]).is_file() and "heatmap" not in records[0]
    assert str(broken) in records[1]["error"]


def test_a_results_file_from_before_the_schema_is_still_read_as_done(tiny_model_path: Path, inputs,
                                                                    tmp_path: Path):
    from edge.classifier import Classifier
    from edge.watch import watch

    good, bad = inputs
    bad.unlink()
    st = good.resolve().stat()
    out = tmp_path / "old.jsonl"
    out.write_text(json.dumps({"file": str(good.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                               "status": "ok", "result": {"label": "glioma"}}) + "\n")
    assert watch(Classifier(tiny_model_path), good.parent, out, settle_seconds=0, once=True) == 0
