"""Bounded memory (issue 13): the worst inputs edge-classify accepts, through the real CLI.

Every input is made here, at test time: a 7070 x 7070 JPEG, 16-bit PNG and float TIFF (just under the 50 Mpx
limit), 20000 x 16 and 16 x 20000 strips and a 200000 x 16 one, and an RGB PNG over the decoded-bytes
limit. Each is classified (or refused by the documented limit) and its answer, geometry and overlay checked;
how much memory and time they take is measured by `edge-bench memory`, never asserted here.
"""
from __future__ import annotations

import importlib.util
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageOps, TiffImagePlugin

from edge import Classifier
from edge.decode import MAX_DECODED_BYTES, decode
from edge.overlay import MAX_SIDE, MIN_WIDTH, display_size
from edge.preprocess import CANVAS_SIDE, heatmap_to_image, mask_to_model, model_rect, prepare_with_geometry
from edge.reduce import WORK_PIXELS, block_mean, factor

pytestmark = pytest.mark.device

SIDE = 7070
STRIP = 20000
ANSWERED = ("ok", "refer", "refused")


def _record(result) -> dict:
    """The one JSON record of a run that answered (a verdict, or the gate's refer / refused)."""
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, (result.stdout, result.stderr)
    record = json.loads(lines[0])
    assert record["status"] in ANSWERED, record
    assert result.exit_code == 0 or record["status"] != "ok", result.stderr
    return record


def _texture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Bright uint8 texture with no black pixel, so every pixel of a strip shows on its overlay."""
    return np.random.default_rng(seed).integers(60, 255, (height, width), dtype=np.uint8)


def _blank_rgb_png(path: Path, width: int, height: int) -> Path:
    """A valid black RGB PNG of any size, written a row at a time (never held in memory)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    packer, row = zlib.compressobj(9), b"\x00" * (1 + 3 * width)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def worst(tmp_path_factory: pytest.TempPathFactory, sample_scans: list[Path]) -> dict[str, Path]:
    """The worst accepted inputs, made from a real sample scan (the squares) or bright texture (the strips)."""
    d = tmp_path_factory.mktemp("worst")
    scan = Image.open(next(p for p in sample_scans if p.name.startswith("glioma"))).convert("L")
    big = scan.resize((SIDE, SIDE), Image.BICUBIC)
    big.save(d / "big.jpg", quality=90)
    k = factor(SIDE, SIDE)
    big.resize((-(-SIDE // k),) * 2, Image.BOX).save(d / "twin.png")  # the downsized twin, decoded as it is
    wide = np.asarray(big).astype(np.uint16)
    wide *= 257
    Image.fromarray(wide).save(d / "gray16.png", compress_level=1)
    del wide
    big.convert("F").point(lambda v: v / 255.0).save(d / "float.tif")
    del big
    Image.fromarray(_texture(16, STRIP)).save(d / "wide-strip.png")
    Image.fromarray(_texture(STRIP, 16, 1)).save(d / "tall-strip.png")
    Image.fromarray(_texture(16, 10 * STRIP, 2)).save(d / "long-strip.png")
    return {p.stem: p for p in d.iterdir()}


def test_a_big_jpeg_is_decoded_reduced_and_answers_as_its_downsized_twin(cli, worst: dict[str, Path]):
    k = factor(SIDE, SIDE)
    assert k > 1 and decode(worst["big"]).shape == (-(-SIDE // k),) * 2
    big = _record(cli("--json", worst["big"]))
    twin = _record(cli("--json", worst["twin"]))
    assert big["status"] == twin["status"]
    if big["status"] == "ok":
        assert big["label"] == twin["label"]
        assert max(abs(big["probabilities"][c] - twin["probabilities"][c]) for c in big["probabilities"]) <= 0.05


@pytest.mark.parametrize("name", ["big", "gray16", "float"])
def test_a_7070_px_scan_is_answered_with_an_overlay_of_bounded_size(cli, worst: dict[str, Path], tmp_path: Path,
                                                                    name: str):
    record = _record(cli("--json", "--heatmap", tmp_path, worst[name]))
    with Image.open(record["overlay"]) as overlay:
        assert overlay.size[0] == MAX_SIDE, "a square scan is drawn at the overlay's bounded size"


def test_reduced_16_bit_and_float_scans_keep_their_depth_and_agree(worst: dict[str, Path]):
    png, tif = decode(worst["gray16"]), decode(worst["float"])
    assert png.dtype == np.uint16 and tif.dtype == np.float32 and png.shape == tif.shape
    assert png.size <= WORK_PIXELS
    np.testing.assert_allclose(png / 65535.0, tif, atol=1 / 255)


@pytest.mark.parametrize("name, shape", [("wide-strip", (16, STRIP)), ("tall-strip", (STRIP, 16))])
def test_a_strip_is_answered_and_its_overlay_has_its_shape(cli, worst: dict[str, Path], tmp_path: Path, name: str,
                                                          shape: tuple[int, int]):
    record = _record(cli("--json", "--heatmap", tmp_path, worst[name]))
    overlay = np.asarray(Image.open(record["overlay"]).convert("L"))
    ph, pw = display_size(shape)
    assert max(ph, pw) == MAX_SIDE and (ph > pw) == (shape[0] > shape[1])
    assert overlay.shape[1] == max(pw, MIN_WIDTH)
    lit = np.argwhere(overlay[:ph] > 0)  # the picture is at the top; the strip's texture has no black pixel
    (top, left), (bottom, right) = lit.min(axis=0), lit.max(axis=0) + 1
    assert (bottom - top, right - left) == (ph, pw)
    assert not overlay[ph].any(), "below the picture comes the black margin of the caption panel"


def test_a_200000_px_strip_is_answered_without_a_memory_error(run_cli, worst: dict[str, Path]):
    done = run_cli("--json", worst["long-strip"])
    assert "MemoryError" not in done.stderr and "Traceback" not in done.stderr
    assert json.loads(done.stdout)["status"] in ANSWERED


def test_a_format_decoded_whole_is_refused_over_the_decoded_bytes_limit(cli, tmp_path: Path):
    side = int((MAX_DECODED_BYTES / 4) ** 0.5) + 1
    path = _blank_rgb_png(tmp_path / "poster.png", side, side)
    result = cli(str(path))
    assert result.exit_code == 1 and result.stdout == ""
    assert len([line for line in result.stderr.splitlines() if ": error: " in line]) == 1
    assert f"poster.png: image is {side}x{side} px (RGB PNG), which is decoded whole" in result.stderr
    assert f"over the {MAX_DECODED_BYTES / 2**20:.0f} MiB limit" in result.stderr


def test_the_heatmap_of_a_reduced_scan_lines_up_with_the_head(tmp_path: Path, sample_scans: list[Path]):
    """The head on the right of a 7000 x 3600 photo: the crop and the heat are on the right of the reduced scan."""
    scan = Image.open(sample_scans[0]).convert("L").resize((3000, 3000), Image.BICUBIC)
    canvas = Image.new("L", (7000, 3600))
    canvas.paste(scan, (3800, 300))
    canvas.save(tmp_path / "offset.jpg", quality=90)
    result = Classifier().classify(tmp_path / "offset.jpg")
    h, w = result.image.shape[:2]
    k = 7000 / w  # libjpeg's 1/2, 1/4 or 1/8, then a whole factor
    assert h * w <= WORK_PIXELS and abs(h * k - 3600) <= k
    top, left, bottom, right = result.geometry.box
    assert 3800 - 0.05 * 3000 <= left * k and right * k <= 6800 + 0.05 * 3000, "the crop is the pasted scan"
    heat = result.heatmap_on_image()
    assert heat.shape == (h, w) and heat[:, :left].max() == 0 and heat[:, right:].max() == 0
    assert heat[top:bottom, left:right].max() > 0


def test_a_long_crop_goes_to_model_space_and_its_maps_come_back(tmp_path: Path):
    """A crop longer than the canvas limit is never padded to a square canvas, and the mask / heatmap maps
    between image and model space stay each other's inverse."""
    image = _texture(200, 3 * CANVAS_SIDE // 2 * 2)
    image[:, :300] = 0  # background left of the head
    pixels, geometry = prepare_with_geometry(image, 96, 1)
    assert max(geometry.canvas) > CANVAS_SIDE
    t, l, b, r = model_rect(geometry)
    assert (t, l, b, r) == tuple(int(v) for v in (t, l, b, r)) and b - t >= 1
    assert pixels[:int(t)].max() == 0 and pixels[int(b):].max() == 0 and pixels[int(t):int(b)].max() > 0
    mask = np.zeros(image.shape, np.float32)
    mask[40:160, 1000:2000] = 1
    back = heatmap_to_image(mask_to_model(mask, geometry), geometry)
    assert back.shape == image.shape
    inside, outside = back[60:140, 1100:1900].mean(), back[:, 2300:].mean() + back[:, 300:800].mean()
    assert inside > 0.8 and outside < 0.05


@pytest.mark.parametrize("kind", ["float single strip", "float 7-row strips", "rgb tiff", "16-bit tiff", "bmp"])
def test_uncompressed_files_read_in_bands_equal_the_whole_decode_reduced(tmp_path: Path, monkeypatch, kind: str):
    rng = np.random.default_rng(3)
    shape = (2300, 2100)
    path = tmp_path / ("scan.bmp" if kind == "bmp" else "scan.tif")
    if kind.startswith("float"):
        image = Image.fromarray(rng.random(shape, dtype=np.float32))
    elif kind == "16-bit tiff":
        image = Image.fromarray(rng.integers(0, 65535, shape, dtype=np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 255, shape + (3,), dtype=np.uint8))
    if kind == "float 7-row strips":
        monkeypatch.setattr(TiffImagePlugin, "WRITE_LIBTIFF", True)
        image.save(path, compression="raw", tiffinfo={278: 7})
    else:
        image.save(path)
    with Image.open(path) as opened:
        assert opened.tile[0][0] == "raw" and (len(opened.tile) > 1) == (kind == "float 7-row strips")
        whole = np.asarray(opened.convert("RGB") if kind in ("rgb tiff", "bmp") else opened)
    k = factor(shape[1], shape[0])
    assert k > 1
    reduced = decode(path)
    np.testing.assert_array_equal(reduced, block_mean(whole.astype(reduced.dtype), k))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_the_exif_orientation_is_applied_as_pillow_applies_it(tmp_path: Path, orientation: int):
    image = Image.fromarray(_texture(48, 80, orientation))
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(tmp_path / "turned.png", exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "turned.png")))
    np.testing.assert_array_equal(decode(tmp_path / "turned.png"), expected)


def test_a_big_array_is_reduced_in_its_own_dtype():
    image = np.zeros((4000, 3000), np.uint16)
    image[1000:3000, 500:2500] = 40000
    out = decode(image)
    assert out.dtype == np.uint16 and out.shape == (2000, 1500)
    assert out[600, 500] == 40000 and out[100, 100] == 0


def test_a_big_dicom_frame_is_reduced_before_it_becomes_float(tmp_path: Path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file
    from pydicom.uid import ExplicitVRLittleEndian

    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    side = 2900
    raw = np.zeros((side, side), np.uint16)
    raw[700:2200, 600:2300] = 3000
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = raw.tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(tmp_path / "big.dcm", enforce_file_format=True)
    image = decode(tmp_path / "big.dcm")
    k = factor(side, side)
    assert image.dtype == np.float32 and image.shape == (-(-side // k),) * 2
    assert image[1450 // k, 1450 // k] > image[10, 10] + 100, "the bright square stays where it was"


@pytest.mark.parametrize("signed", [0, 1])
def test_a_reduced_dicom_frame_clears_the_bits_above_bits_stored_as_pydicom_does(tmp_path: Path, signed: int):
    """The bits above Bits Stored are cleared (or sign-extended) band by band, as pydicom does to a whole frame."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file
    from pydicom.pixels import pixel_array
    from pydicom.uid import ExplicitVRLittleEndian

    side, rng = 2900, np.random.default_rng(signed)
    values = rng.integers(-2000 if signed else 0, 2000 if signed else 4000, (side, side))
    raw = ((values & 0xFFF) | (rng.integers(0, 16, (side, side)) << 12)).astype(np.uint16)  # junk above bit 12
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, signed
    ds.PixelData = raw.tobytes()
    for keyword in ("WindowCenter", "WindowWidth"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(tmp_path / "bits.dcm", enforce_file_format=True)
    reduced = block_mean(pixel_array(pydicom.dcmread(tmp_path / "bits.dcm")), factor(side, side)).astype(np.float64)
    expected = (reduced - reduced.min()) * (255.0 / (reduced.max() - reduced.min()))  # min-max VOI: no window
    np.testing.assert_allclose(decode(tmp_path / "bits.dcm"), expected, atol=1e-3)


def test_the_memory_benchmark_runs_on_a_small_configuration(tmp_path: Path):
    from benchmarks.cli import main

    out = tmp_path / "memory.json"
    # No bound on time here (a unit test asserts no wall clock): only on what each run did and its memory.
    result = CliRunner().invoke(main, ["memory", "--side", "300", "--strip", "600", "--long-strip", "2400",
                                       "--frames", "8", "--max-seconds", "1e9", "--out", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    session = json.loads(out.read_text())
    assert session["schema"] == "edge-bench-memory/1"
    rows = session["results"]
    assert {r["heatmap"] for r in rows} == {False, True} and len(rows) % 2 == 0
    assert all(r["pass"] and r["outcome"] == "answered" and 10 < r["peak_rss_mb"] <= 250 for r in rows), rows
    assert all((r["overlay"] is not None) == r["heatmap"] for r in rows)
    assert "| 600x16 strip PNG | yes | answered" in result.output
    if importlib.util.find_spec("pydicom") is not None:
        assert "| 8-frame 300x300 16-bit DICOM (1 MB), frame 0 | no | answered" in result.output
