"""stderr is one line per message, each `edge-classify: KIND: ...`: no library warning, native log line, bar
fragment or file name may split a line or print without the prefix."""
from __future__ import annotations

import json
import os
import re
import select
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

LINE = re.compile(r"^edge-classify: (error|warning|notice): \S")


def corrupt_exif_jpeg(source: Path, target: Path) -> Path:
    """A real scan whose EXIF block promises 100 bytes of a tag but holds 3: Pillow warns while reading it."""
    ifd = (struct.pack("<2sHI", b"II", 42, 8) + struct.pack("<H", 1) + struct.pack("<HHII", 0x010F, 2, 100, 20)
           + struct.pack("<I", 0) + b"abc")
    Image.open(source).save(target, exif=b"Exif\x00\x00" + ifd)
    return target


def test_a_corrupt_exif_block_prints_nothing(run_cli, tiny_model_path: Path, sample_scans: list[Path], tmp_path):
    scan = corrupt_exif_jpeg(sample_scans[0], tmp_path / "exif.jpg")
    proc = run_cli("--model", tiny_model_path, scan)
    assert proc.returncode == 0
    assert len(proc.stdout.splitlines()) == 1
    assert proc.stderr == "", "the EXIF block only loses the orientation hint; nothing to tell"


def test_a_missing_webcam_is_one_line(run_cli, tiny_model_path: Path):
    pytest.importorskip("cv2")
    if Path("/dev/video0").exists():
        pytest.skip("a camera is attached here")
    code = ("import sys; sys.modules['picamera2'] = None\n"
            "from edge.cli import main\n"
            f"main(['--model', {str(tiny_model_path)!r}, '--camera', '--count', '1'], prog_name='edge-classify')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert line.startswith("edge-classify: error: no camera found: picamera2 is not installed")
    assert line.endswith("webcam 0 cannot be opened (absent, busy, or no permission on /dev/video0)")


def test_errors_are_not_glued_to_the_progress_bar(tiny_model_path: Path, sample_scans: list[Path], tmp_path):
    """stderr on a terminal (a pty), stdout to a pipe: the bar is drawn, and every error starts its own line."""
    folder = tmp_path / "batch"
    folder.mkdir()
    for i in range(12):
        shutil.copy(sample_scans[i % len(sample_scans)], folder / f"scan-{i:02d}.jpg")
    (folder / "scan-05b.jpg").write_text("not a scan")
    main_fd, child_fd = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "--model", str(tiny_model_path), str(folder)],
                            stdout=subprocess.PIPE, stderr=child_fd, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    os.close(child_fd)
    raw = b""
    while True:
        ready, _, _ = select.select([main_fd], [], [], 120)
        if not ready:
            break
        try:
            chunk = os.read(main_fd, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        raw += chunk
    stdout = proc.communicate(timeout=120)[0]
    os.close(main_fd)
    assert proc.returncode == 1
    assert len(stdout.splitlines()) == 12
    text = raw.decode("utf-8", "replace")
    assert "classifying" in text, "the bar was drawn"
    (error_line,) = [line for line in text.splitlines() if "edge-classify:" in line]
    shown = error_line.rsplit("\r", 1)[-1].replace("\x1b[K", "")  # what the terminal shows on that line
    assert shown == f"edge-classify: error: {folder / 'scan-05b.jpg'}: not a recognised image (expected JPEG, " \
                    "PNG, BMP, TIFF or DICOM)"


def test_watch_log_lines_have_the_prefix(cli, tiny_model_path: Path, scan_png: Path, tmp_path: Path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(scan_png, inbox / "a.png")
    out = tmp_path / "results.jsonl"
    torn = b'{"schema": "edge-classify/1", "status": "ok", "sou'
    out.write_bytes(b"this is not a result\n" + torn)
    result = cli("--model", tiny_model_path, "--watch", inbox, "--out", out, "--once")
    assert result.exit_code == 0
    assert result.stderr.splitlines() == [
        f"edge-classify: warning: {out}: cutting a torn last line ({len(torn)} bytes) left by an interrupted run",
        f"edge-classify: warning: {out}:1: not a result line, ignored"]


def test_a_newline_in_a_file_name_stays_on_one_line(cli, tiny_model_path: Path, scan_png: Path, tmp_path: Path):
    good, bad = tmp_path / "good\nscan.png", tmp_path / "bad\nname.png"
    shutil.copy(scan_png, good)
    bad.write_text("not an image")
    result = cli("--model", tiny_model_path, good, bad)
    assert result.exit_code == 1
    (out_line,) = result.stdout.splitlines()
    assert out_line.startswith(str(tmp_path / "good\\nscan.png") + "  ")
    assert result.stderr.splitlines() == [
        f"edge-classify: error: {tmp_path / 'bad'}\\nname.png: not a recognised image (expected JPEG, PNG, BMP, "
        "TIFF or DICOM)"]
    as_json = cli("--model", tiny_model_path, "--json", good, bad)
    assert [json.loads(line)["source"] for line in as_json.stdout.splitlines()] == [str(good), str(bad)]
    assert all(LINE.match(line) for line in as_json.stderr.splitlines())
