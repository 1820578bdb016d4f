"""Every kind of bad input gets one honest line naming the item and the problem, the right exit code, no
traceback, and never stops the rest of a batch."""
from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge import Classifier
from edge.decode import MAX_PIXELS, decode
from edge.errors import DicomError, InputError

PREFIX = "edge-classify: error: "


def blank_png(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit grayscale PNG of any size, written without allocating it (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)
    packer = zlib.compressobj(9)
    block = row * max(1, 4_000_000 // len(row))
    rows_per_block = len(block) // len(row)
    body = []
    for _ in range(height // rows_per_block):
        body.append(packer.compress(block))
    body.append(packer.compress(row * (height % rows_per_block)))
    body.append(packer.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(body))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture()
def bad(tmp_path: Path, scan_png: Path) -> dict[str, tuple[Path, str]]:
    """Bad inputs on disk: name -> (path, the problem its error line must state)."""
    d = tmp_path / "bad"
    d.mkdir()
    cases: dict[str, tuple[Path, str]] = {}

    cases["missing"] = (d / "missing.png", "no such file or directory")
    (d / "no-images").mkdir()
    (d / "no-images" / "notes.txt").write_text("nothing to see")
    cases["no images"] = (d / "no-images", "no images found")
    (d / "x.png").mkdir()
    cases["directory named like an image"] = (d / "x.png", "no images found")
    (d / "empty.png").write_bytes(b"")
    cases["zero bytes"] = (d / "empty.png", "file is empty (0 bytes)")
    jpeg = scan_png.parent / "full.jpg"
    Image.open(scan_png).save(jpeg, quality=95)
    (d / "truncated.jpg").write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    cases["truncated jpeg"] = (d / "truncated.jpg", "truncated or corrupt image data")
    (d / "text.png").write_text("this is not a PNG, only named like one\n" * 20)
    cases["text renamed .png"] = (d / "text.png", "not a recognised image")
    cases["decompression bomb"] = (blank_png(d / "bomb.png", 20000, 20000), "decompression bomb")
    cases["over our pixel limit"] = (blank_png(d / "huge.png", 8000, 8000), "over the 50 Mpx limit")
    Image.new("L", (1, 1), 128).save(d / "dot.png")
    cases["1x1"] = (d / "dot.png", "image is 1x1 px; at least 16x16 is needed")
    Image.new("L", (200, 10), 128).save(d / "sliver.png")
    cases["sliver"] = (d / "sliver.png", "image is 200x10 px")
    nan = np.full((32, 32), np.nan, np.float32)
    Image.fromarray(nan).save(d / "nan.tif")
    cases["NaN pixels"] = (d / "nan.tif", "non-finite")
    (d / "fake.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"garbage" * 10)
    cases["broken DICOM"] = (d / "fake.dcm", "")
    os.mkfifo(d / "pipe.png")
    cases["fifo"] = (d / "pipe.png", "not a regular file")
    return cases


@pytest.mark.parametrize("case", [
    "missing", "no images", "directory named like an image", "zero bytes", "truncated jpeg", "text renamed .png",
    "decompression bomb", "over our pixel limit", "1x1", "sliver", "NaN pixels", "broken DICOM", "fifo",
])
def test_bad_input_is_one_line_exit_1(cli, tiny_model_path: Path, bad, case: str):
    path, problem = bad[case]
    result = cli("--model", tiny_model_path, path)
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{PREFIX}{path}: ")
    assert problem in lines[0]
    assert lines[0].count(str(path)) == 1, "the item is named once"


def test_mixed_batch_keeps_going(cli, tiny_model_path: Path, bad, scan_png: Path):
    """Good scans among bad ones: all good results printed in order, every bad one reported, exit 1."""
    args = [scan_png] + [path for path, _ in bad.values()] + [scan_png.parent / "full.jpg"]
    result = cli("--model", tiny_model_path, "--json", *args)
    assert result.exit_code == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["source"] for r in records if r["status"] == "ok"] == [str(scan_png), str(scan_png.parent / "full.jpg")]
    assert [r["source"] for r in records if r["status"] == "error"] == [str(p) for p, _ in bad.values()]
    errors = result.stderr.splitlines()
    assert len(errors) == len(bad)
    assert [e[len(PREFIX):].split(": ")[0] for e in errors] == [str(p) for p, _ in bad.values()]


def test_real_process_never_prints_a_traceback(run_cli, tiny_model_path: Path, bad, scan_png: Path):
    proc = run_cli("--model", tiny_model_path, *[p for p, _ in bad.values()], scan_png)
    assert proc.returncode == 1
    assert len(proc.stdout.splitlines()) == 1 and str(scan_png) in proc.stdout
    assert "Traceback" not in proc.stderr
    assert all(line.startswith(PREFIX) for line in proc.stderr.splitlines())


def test_unreadable_file(run_cli, tiny_model_path: Path, scan_png: Path, tmp_path: Path, unprivileged: dict):
    """chmod 000 for real. CI runs as root, which ignores permission bits, so there the CLI process is
    started without the two capabilities that let root do so (the `unprivileged` fixture)."""
    locked = tmp_path / "locked.png"
    locked.write_bytes(scan_png.read_bytes())
    locked.chmod(0)
    proc = run_cli("--model", tiny_model_path, locked, scan_png, **unprivileged)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"{PREFIX}{locked}: permission denied"]
    assert len(proc.stdout.splitlines()) == 1


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "directory", "missing", "image"])
def test_bad_model_is_exit_2(cli, tiny_model_path: Path, scan_png: Path, tmp_path: Path, damage: str):
    model = tmp_path / "model.tflite"
    data = tiny_model_path.read_bytes()
    if damage == "truncated":
        model.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        model.write_bytes(np.random.default_rng(1).integers(0, 256, len(data), np.uint8).tobytes())
    elif damage == "empty":
        model.write_bytes(b"")
    elif damage == "directory":
        model.mkdir()
    elif damage == "image":
        model.write_bytes(scan_png.read_bytes())
    result = cli("--model", model, scan_png)
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{PREFIX}{model}: "), result.stderr


def test_model_with_corrupt_graph_but_valid_metadata_is_exit_2(cli, tiny_model_path: Path, scan_png: Path,
                                                              tmp_path: Path):
    """Flip bytes inside the graph, past the header the metadata reader needs: the interpreter must refuse."""
    data = bytearray(tiny_model_path.read_bytes())
    for offset in range(40, 1500, 7):
        data[offset] ^= 0xFF
    model = tmp_path / "flipped.tflite"
    model.write_bytes(bytes(data))
    result = cli("--model", model, scan_png)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith(f"{PREFIX}{model}: ") and len(result.stderr.splitlines()) == 1


def test_heatmap_dir_that_is_a_file_is_a_usage_error(cli, tiny_model_path: Path, scan_png: Path):
    result = cli("--model", tiny_model_path, "--heatmap", scan_png, scan_png)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith(PREFIX) and "--heatmap" in result.stderr


# --- the Python API raises typed errors that name the item ---------------------------------------------

@pytest.mark.parametrize("source, message", [
    (3, "<array>: cannot classify a int"),
    (np.zeros((4, 4), np.uint8), "<array>: image is 4x4 px"),
    (np.zeros((2, 3, 40, 40), np.uint8), "<array>: array of shape (2, 3, 40, 40) is not an image"),
    (np.array([["a"] * 20] * 20), "<array>: array of dtype <U1 is not an image"),
    (np.full((20, 20), np.inf, np.float32), "<array>: image has non-finite"),
    (b"", "<bytes>: no data"),
    (b"GIF89a-but-not-really" * 10, "<bytes>: not a recognised image"),
])
def test_api_errors_are_input_errors(tiny_model_path: Path, source, message: str):
    clf = Classifier(tiny_model_path)
    with pytest.raises(InputError) as info:
        clf.classify(source)
    assert str(info.value).startswith(message)


def test_an_empty_path_is_an_error_not_the_current_directory(tiny_model_path: Path):
    from edge.classifier import Classifier
    from edge.errors import InputError, ModelError

    with pytest.raises(InputError, match=r"^'': empty path"):
        Classifier(tiny_model_path).classify("")
    with pytest.raises(ModelError, match="empty model name or path"):
        Classifier("")


def test_a_lazily_opened_truncated_pil_image_is_an_input_error(scan_png: Path, tmp_path: Path):
    cut = tmp_path / "cut.png"
    cut.write_bytes(scan_png.read_bytes()[:200])
    with pytest.raises(InputError, match=r"^<PIL image>: (truncated or )?corrupt image data"):
        decode(Image.open(cut))


def test_pixel_limit_is_adjustable_and_checked_before_decoding(tmp_path: Path):
    path = blank_png(tmp_path / "wide.png", 4000, 100)
    assert decode(path).shape == (100, 4000)
    with pytest.raises(InputError, match=r"wide.png: image is 4000x100 .* over the 0 Mpx limit"):
        decode(path, max_pixels=399_999)
    assert MAX_PIXELS == 50_000_000


def test_directory_and_broken_dicom_errors_are_typed(tmp_path: Path):
    with pytest.raises(InputError, match="is a directory"):
        decode(tmp_path)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\x00" * 128 + b"DICM" + b"\x01" * 40)
    with pytest.raises(DicomError, match=f"^{broken}: "):
        decode(broken)
