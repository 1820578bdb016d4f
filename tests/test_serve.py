"""`edge-serve` driven over HTTP as a clinic's phone or software would: the real server (a subprocess on a
free loopback port), the bundled model and sample scans, pydicom's DICOM test files."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from serve_server import classify, multipart, open_upload, read_reply, request, running_server

from edge.records import SCHEMA

pytest.importorskip("starlette", reason='edge-serve needs its extra: pip install "edge-mri[serve]"')

SAMPLE_LABEL = re.compile(r"^([a-z]+)_\d+$")
#: Keys of a record that differ from one classification to the next of the same scan.
VOLATILE = {"time", "timings_ms", "source"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An empty working folder and an empty TMPDIR for the module's server: both must stay empty."""
    return {"cwd": tmp_path_factory.mktemp("serve-cwd"), "tmp": tmp_path_factory.mktemp("serve-tmp")}


@pytest.fixture(scope="module")
def server(folders: dict[str, Path]):
    with running_server("--threads", "2", "--queue", "16", cwd=folders["cwd"],
                        env={"TMPDIR": str(folders["tmp"])}) as s:
        yield s


def label_of(path: Path) -> str:
    match = SAMPLE_LABEL.match(path.stem)
    assert match, path
    return match.group(1)


def stable(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in VOLATILE}


def png_of(data_url: str):
    from PIL import Image

    assert data_url.startswith("data:image/png;base64,")
    raw = base64.b64decode(data_url.split(",", 1)[1])
    image = Image.open(io.BytesIO(raw))
    image.load()
    return raw, image


def test_health_models_and_the_page_served_by_the_device(server):
    health = request(server, "GET", "/healthz")
    assert health.status == 200 and health.headers["cache-control"] == "no-store"
    body = health.json()
    assert body["status"] == "ok" and body["model"]["name"] == "custom-cnn" and body["workers"] == 2
    assert body["capacity"] == 18 and body["token_required"] is False and body["max_upload_bytes"] == 32_000_000
    models = request(server, "GET", "/api/models").json()
    assert models["loaded"]["labels"] == ["glioma", "meningioma", "notumor", "pituitary"]
    assert {m["name"] for m in models["bundled"]} == {"custom-cnn", "xception"}
    assert all("path" not in m for m in models["bundled"]), "no install paths in answers"

    page = request(server, "GET", "/")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    html = page.body.decode()
    assert re.search(r'<input id="camera" type="file" accept="image/\*,\.dcm" capture', html)
    assert re.search(r'<input id="files" type="file" [^>]*multiple', html)
    assert "Decision support, not a diagnosis" in html and 'name="viewport"' in html
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert assets and all(a.startswith("/assets/") or a.startswith("data:") for a in assets), assets
    for asset in (a for a in assets if a.startswith("/assets/")):
        reply = request(server, "GET", asset)
        assert reply.status == 200 and reply.body, asset
        assert b"http://" not in reply.body and b"https://" not in reply.body, f"{asset} loads from elsewhere"


def test_the_samples_get_their_labels_and_exactly_the_cli_record_with_its_overlay(server, sample_scans, tmp_path):
    overlays = tmp_path / "overlays"
    cli = subprocess.run([sys.executable, "-m", "edge.cli", "--json", "--top-k", "2", "--heatmap", str(overlays),
                          *map(str, sample_scans)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert cli.returncode == 0, cli.stderr
    expected = [json.loads(line) for line in cli.stdout.splitlines()]
    labels = set()
    for scan, want in zip(sample_scans, expected):
        reply = classify(server, scan.read_bytes(), scan.name, query="?top_k=2")
        assert reply.status == 200, reply.body[:300]
        record = reply.json()
        assert record["label"] == label_of(scan), scan.name
        assert record["source"] == scan.name
        overlay_png = record.pop("overlay_png")
        assert record.pop("overlay") is None and want.pop("overlay"), "no file is written for the overlay"
        assert stable(record) == stable(want), scan.name
        raw, image = png_of(overlay_png)
        assert image.mode == "RGB" and min(image.size) >= 128
        assert raw == (overlays / f"{scan.name}.heatmap.png").read_bytes(), "the CLI's overlay, byte for byte"
        labels.add(record["label"])
    assert labels == {"glioma", "meningioma", "notumor", "pituitary"}


def _dicom_without_pixels() -> bytes:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("rtplan.dcm")).read_bytes()


def test_bad_uploads_get_4xx_json_and_one_log_line_each_and_the_server_lives_on(server, sample_scans):
    pytest.importorskip("pydicom")
    jpeg = next(p for p in sample_scans if p.suffix == ".jpg").read_bytes()
    cases = [
        ("notes.txt", b"Patient came in on Tuesday.\n" * 20, 415, "not a recognised image"),
        ("cut.jpg", jpeg[: len(jpeg) // 2], 422, "truncated"),
        ("plan.dcm", _dicom_without_pixels(), 422, "no pixel data"),
        ("empty.png", b"", 422, "no data (0 bytes)"),
    ]
    before = len(server.log())
    for name, data, status, problem in cases:
        reply = classify(server, data, name)
        assert reply.status == status, (name, reply.body)
        record = reply.json()
        assert record["schema"] == SCHEMA and record["status"] == "error" and record["source"] == name
        assert record["error"].startswith(f"{name}: ") and problem in record["error"], record
        assert "\n" not in record["error"] and "Traceback" not in record["error"]
    # not multipart, no file field, a bad option
    plain = request(server, "POST", "/api/classify", jpeg, {"Content-Type": "image/jpeg"})
    assert plain.status == 415 and "multipart/form-data" in plain.json()["error"]
    body, content_type = multipart(jpeg, "scan.jpg", field_name="image")
    nofile = request(server, "POST", "/api/classify", body, {"Content-Type": content_type})
    assert nofile.status == 400 and "the scan goes in the form field 'file', not 'image'" in nofile.json()["error"]
    assert classify(server, jpeg, "scan.jpg", query="?top_k=9").status == 400
    assert request(server, "GET", "/api/classify").status == 405
    log = server.wait_for_log(before + len(cases) + 4)[before:]
    errors = [line for line in log if line.startswith("edge-serve: error: ")]
    assert len(errors) == len(cases) + 4 and len(log) == len(errors), log
    assert all("Traceback" not in line for line in log)
    for (name, _, status, _), line in zip(cases, errors):
        assert f"error: {status} POST /api/classify" in line and name not in line, "the log names no file"
    good = sample_scans[0]
    assert classify(server, good.read_bytes(), good.name).json()["label"] == label_of(good)
    assert server.process.poll() is None


def test_16_concurrent_uploads_are_answered_as_sequential_ones(server, sample_scans):
    scans = [sample_scans[i % len(sample_scans)] for i in range(16)]
    sequential = [classify(server, s.read_bytes(), s.name) for s in scans]
    start = threading.Barrier(16)

    def upload(scan: Path):
        start.wait()
        return classify(server, scan.read_bytes(), scan.name)

    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(upload, scans))
    assert [r.status for r in concurrent] == [200] * 16
    for scan, one, other in zip(scans, sequential, concurrent):
        a, b = one.json(), other.json()
        assert stable(a) == stable(b), scan.name
        assert a["label"] == label_of(scan)


def _png_over_a_megabyte() -> bytes:
    """A real scan as an uncompressed 1100x1100 PNG: bigger than the 1 MB a framework would spool to disk."""
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[:1100, :1100]
    head = ((yy - 550) ** 2 + (xx - 550) ** 2 < 450 ** 2) * (120 + 80 * np.sin(xx / 9.0) * np.cos(yy / 13.0))
    buffer = io.BytesIO()
    Image.fromarray(head.clip(0, 255).astype(np.uint8)).save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


def test_dicom_uploads_leak_no_patient_data(server):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.PatientName, ds.PatientID, ds.InstitutionName = "Secretname^Jane", "XQ-77123", "Hospital Secreto"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    good = buffer.getvalue()
    ds.PixelData = ds.PixelData[:-64]
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    truncated = buffer.getvalue()
    before = len(server.log())
    ok = classify(server, good, "study.dcm")
    bad = classify(server, truncated, "study2.dcm")
    assert ok.status == 200 and ok.json()["overlay_png"], ok.body[:200]
    assert bad.status == 422 and "truncated" in bad.json()["error"]
    text = (ok.body + bad.body).decode() + "\n".join(server.wait_for_log(before + 2)[before:])
    for secret in ("Secretname", "Jane", "XQ-77123", "Secreto"):
        assert secret not in text, f"patient data {secret!r} came out"


def test_nothing_is_written_to_disk(server, folders, sample_scans):
    """After DICOM, a big PNG and everything the tests before sent, the server's folder and TMPDIR are empty."""
    pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    big = _png_over_a_megabyte()
    assert len(big) > 1_100_000
    assert classify(server, big, "big.png").status == 200
    assert classify(server, Path(get_testdata_file("MR_small.dcm")).read_bytes(), "mr.dcm").status == 200
    assert classify(server, sample_scans[0].read_bytes(), sample_scans[0].name).status == 200
    assert sorted(os.listdir(folders["cwd"])) == [] and sorted(os.listdir(folders["tmp"])) == []
    assert not any(f.path.startswith((str(folders["tmp"]), "/tmp/")) for f in _open_files(server.process.pid))


def _open_files(pid: int):
    import psutil

    return psutil.Process(pid).open_files()


def test_an_oversized_upload_gets_413_and_the_server_lives_on(tmp_path, sample_scans):
    big = _png_over_a_megabyte()
    with running_server("--threads", "1", "--max-upload-mb", "1", cwd=tmp_path) as server:
        reply = classify(server, big, "big.png")  # the declared length is over the limit: refused unread
        assert reply.status == 413, reply.body[:200]
        assert reply.json()["status"] == "error" and "over the 1 MB" in reply.json()["error"]
        # no Content-Length (chunked): refused as the body passes the limit
        body, content_type = multipart(big, "big.png")
        chunks = (body[i:i + 65536] for i in range(0, len(body), 65536))
        import http.client

        connection = http.client.HTTPConnection(server.host, server.port, timeout=60)
        connection.request("POST", "/api/classify", body=chunks, headers={"Content-Type": content_type},
                           encode_chunked=True)
        response = connection.getresponse()
        assert response.status == 413 and "over the 1 MB" in json.loads(response.read())["error"]
        connection.close()
        scan = sample_scans[0]
        assert classify(server, scan.read_bytes(), scan.name).json()["label"] == label_of(scan)


def test_a_full_server_answers_503_with_retry_after(tmp_path, sample_scans):
    """One worker, no queue: an upload in progress holds the only slot, so the next request is turned away
    at once; when the first completes, both it and the next succeed."""
    scan = sample_scans[0]
    with running_server("--threads", "1", "--queue", "0", cwd=tmp_path) as server:
        body, content_type = multipart(scan.read_bytes(), scan.name)
        held = open_upload(server, body, content_type, sent=len(body) // 2)
        for _ in range(500):
            if request(server, "GET", "/healthz").json()["admitted"] == 1:
                break
        else:
            pytest.fail("the held upload never took its slot")
        busy = classify(server, scan.read_bytes(), scan.name)
        assert busy.status == 503 and busy.headers["retry-after"] == "1"
        assert "busy" in busy.json()["error"]
        held.sendall(body[len(body) // 2:])
        first = read_reply(held)
        held.close()
        assert first.status == 200 and first.json()["label"] == label_of(scan)
        assert classify(server, scan.read_bytes(), scan.name).status == 200


def test_keep_dir_keeps_uploads_under_hashed_names_with_their_records(tmp_path, sample_scans):
    pytest.importorskip("pydicom")
    keep = tmp_path / "kept"
    scan = sample_scans[0]
    with running_server("--threads", "1", "--keep", str(keep), cwd=tmp_path) as server:
        assert classify(server, scan.read_bytes(), "Doe_John_scan.jpg").status == 200
        assert classify(server, b"not an image", "Doe_John_notes.txt").status == 415
    names = sorted(p.name for p in keep.iterdir())
    assert "results.jsonl" in names and len(names) == 3, names
    assert not any("Doe" in n or "John" in n for n in names), "kept files are never named by the client"
    records = [json.loads(line) for line in (keep / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["ok", "error"]
    assert records[0]["label"] == label_of(scan) and "overlay_png" not in records[0]
    assert all(r["source"] in names for r in records)
    assert (keep / records[0]["source"]).read_bytes() == scan.read_bytes()
    assert "Doe" not in (keep / "results.jsonl").read_text()


def test_a_token_guards_the_api_but_not_health_or_page(tmp_path, sample_scans):
    token = "s3cret-token-0123456789"
    scan = sample_scans[0]
    with running_server("--threads", "1", "--token", token, cwd=tmp_path) as server:
        assert request(server, "GET", "/healthz").json()["token_required"] is True
        assert request(server, "GET", "/").status == 200
        for given in (None, "wrong-token-0123456789"):
            reply = classify(server, scan.read_bytes(), scan.name, token=given)
            assert reply.status == 401 and reply.headers["www-authenticate"].startswith("Bearer")
            assert reply.json()["status"] == "error"
        headers = {"Authorization": f"Bearer {token}"}
        assert request(server, "GET", "/api/models").status == 401
        assert request(server, "GET", "/api/models", headers=headers).status == 200
        assert classify(server, scan.read_bytes(), scan.name, token=token).json()["label"] == label_of(scan)
        assert token not in "\n".join(server.log()), "the token is never logged"


def _serve(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    from serve_server import edge_serve_command

    return subprocess.run([*edge_serve_command(), *args], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env=dict(os.environ, **(env or {})), stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("args, problem", [
    (["--host", "0.0.0.0"], "--host 0.0.0.0 is not a loopback address"),
    (["--host", "::"], "--host :: is not a loopback address"),
    (["--host", "clinic-pi.local"], "is not a loopback address"),
    (["--host", "0.0.0.0", "--token", "short"], "at least 16"),
    (["--token", "has spaces in it 0123456789"], "printable ASCII without spaces"),
    (["--model", "no-such-model"], "no such model"),
])
def test_unsafe_or_wrong_options_are_refused_in_one_line(args, problem, tmp_path):
    result = _serve(*args, cwd=tmp_path, env={"EDGE_SERVE_TOKEN": ""})
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("edge-serve: error: ") and problem in line, line


def test_the_token_may_come_from_the_environment(tmp_path):
    """EDGE_SERVE_TOKEN is read as --token (so it need not sit in a unit file's command line): too short
    here, so the start stops at that, which shows it was read."""
    result = _serve("--host", "0.0.0.0", cwd=tmp_path, env={"EDGE_SERVE_TOKEN": "short"})
    assert result.returncode == 2 and "at least 16" in result.stderr


def test_loopback_is_recognised():
    from edge.serve_cli import is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.5", "::1", "[::1]", "localhost", "LOCALHOST"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.20", "10.0.0.2", "pi.local", ""))


def test_edge_bench_serve_reports_throughput_latency_and_memory(tmp_path):
    out = tmp_path / "serve.json"
    result = subprocess.run([str(Path(sys.executable).parent / "edge-bench"), "serve", "--clients", "1,2", "--requests", "6",
                             "--threads", "1", "--out", str(out)], capture_output=True, text=True, timeout=600,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    session = json.loads(out.read_text())
    assert [r["clients"] for r in session["results"]] == [1, 2]
    for r in session["results"]:
        assert r["requests"] == 6 and r["errors"] == 0 and r["requests_per_s"] > 0
        assert 0 < r["latency_ms"]["p50"] <= r["latency_ms"]["p99"]
    assert session["server"]["peak_rss_mb"] > 10
    assert "| clients |" in result.stdout and "requests/s" in result.stdout


REPO = Path(__file__).resolve().parent.parent
RECORDS = REPO / "docs" / "RECORDS.md"
#: Documented as present only in some cases (DICOM frames, --keep-uids, the watch folder's keys).
OPTIONAL = {"frame", "sop_instance_uid", "retry", "size", "mtime_ns"}


def documented_keys(status: str) -> set[str]:
    """Keys docs/RECORDS.md lists for a record of ``status`` ("in": all, or a list naming the status)."""
    keys: set[str] = set()
    table = RECORDS.read_text(encoding="utf-8").split("| key | in | meaning |", 1)[1].split("\n\n", 1)[0]
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`"):
            scope = re.findall(r"[a-z]+", cells[1].split(";")[0])
            if scope == ["all"] or status in scope:
                keys.update(re.findall(r"`([a-z_]+)`", cells[0]))
    return keys


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def no_verdict_images() -> dict[str, tuple[bytes, str]]:
    """Images the input gate turns away whatever the model's calibration: name -> (PNG, reason code)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(3)
    return {"blank.png": (_png(Image.new("L", (224, 224), 0)), "flat"),
            "colour.png": (_png(Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8))), "colour")}


def test_records_have_the_documented_keys_and_no_verdict_without_status_ok(server, sample_scans):
    """A sample (ok), a blank and a colour image (refused by the input gate), an unreadable file (error)."""
    turned_away = no_verdict_images()
    answers = [classify(server, sample_scans[0].read_bytes(), sample_scans[0].name)]
    answers += [classify(server, data, name) for name, (data, _) in turned_away.items()]
    answers.append(classify(server, b"not an image", "notes.txt"))
    records = [a.json() for a in answers]
    assert [a.status for a in answers] == [200, 200, 200, 415]
    assert [r["status"] for r in records] == ["ok", "refused", "refused", "error"]
    assert [r["reason"] for r in records[1:3]] == [reason for _, reason in turned_away.values()]
    for record in records:
        assert record["schema"] == SCHEMA
        allowed = documented_keys(record["status"])
        assert set(record) - allowed == set(), f"undocumented keys in a {record['status']} record"
        assert allowed - OPTIONAL - set(record) == set(), f"documented keys missing from a {record['status']} record"
    for record in records[1:3]:
        assert record["label"] is None and record["confidence"] is None and record["top_k"] == []
        assert record["probabilities"] is None and record["has_heatmap"] is False
        assert record["message"].endswith("no verdict") and record["overlay_png"].startswith("data:image/png")
    log = "\n".join(server.log())
    assert "refused flat" in log and "refused colour" in log, "the log gives the reason code, never a label"


def test_a_plot_is_referred_when_the_model_carries_a_gate_else_the_start_says_it_cannot_be(server):
    """Out-of-distribution referral needs the model's gate calibration; without one the server says so at
    start (as edge-classify does), and the page says so too (models.loaded.gate)."""
    gate = request(server, "GET", "/api/models").json()["loaded"]["gate"]
    plot = classify(server, (REPO / "docs" / "latency.png").read_bytes(), "latency.png").json()
    if gate:
        assert plot["status"] in ("refer", "refused") and plot["label"] is None, plot
    else:
        assert any("carries no input-gate calibration" in line for line in server.log()[:3]), server.log()[:3]


def test_the_readme_serve_commands_use_real_flags():
    from click.testing import CliRunner

    from benchmarks.serve import serve_cmd
    from edge.serve_cli import main

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for prog, command in (("edge-serve", main), ("edge-bench serve", serve_cmd)):
        lines = [line for line in re.findall(r"^(?:\$ )?(" + prog + r" .*)$", readme, re.M)]
        assert lines, f"the README shows no {prog} command"
        helptext = CliRunner().invoke(command, ["--help"]).output
        used = {flag for line in lines for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", line.split("#")[0])}
        assert sorted(f for f in used if f not in helptext) == [], prog


def test_without_the_serve_extra_it_says_what_to_install(tmp_path):
    code = ("import sys\nfor name in ('starlette', 'uvicorn', 'python_multipart'):\n    sys.modules[name] = None\n"
            "from edge.serve_cli import main\nmain(['--port', '0'], prog_name='edge-serve')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("edge-serve: error: ") and 'pip install "edge-mri[serve]"' in line
