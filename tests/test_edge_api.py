"""The Python API of the device runtime with real int8 TFLite models and real LiteRT interpreters."""
from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge import Classifier, Result
from edge.backend import find_backend, load_interpreter
from edge.classifier import TIMING_KEYS
from edge.decode import decode
from edge.errors import BackendError, InputError, ModelError
from edge.overlay import INFERNO, blend, colorize, save_overlay
from edge.preprocess import heatmap_to_image, prepare, prepare_with_geometry, stretch, to_gray_float
from edge.registry import DEFAULT_MODEL, list_models, resolve

LABELS = ("glioma", "meningioma", "notumor", "pituitary")


def head(height: int, width: int, centre: tuple[int, int], radius: int, dtype=np.uint8, peak: float = 220.0):
    """A textured bright ellipse-ish 'head' on black, the shape mri-crop-v1 is built to find."""
    yy, xx = np.mgrid[:height, :width]
    inside = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < radius ** 2
    texture = 0.6 + 0.4 * np.sin(xx / 3.0) * np.cos(yy / 4.0)
    return (inside * texture * peak).astype(dtype)


@pytest.fixture(scope="module")
def clf(tiny_model_path: Path) -> Classifier:
    return Classifier(tiny_model_path, threads=1)


# --- preprocess additions -------------------------------------------------------------------------------

@pytest.mark.parametrize("image", [
    head(64, 64, (30, 34), 22),
    head(48, 100, (24, 70), 20),
    head(120, 50, (80, 25), 22, dtype=np.uint16, peak=4000.0),
    np.repeat(head(70, 90, (35, 40), 30)[..., None], 3, axis=2),
    np.zeros((40, 40), np.uint8),
])
@pytest.mark.parametrize("pipeline", ["mri-crop-v1", "resize"])
@pytest.mark.parametrize("channels", [1, 3])
def test_prepare_with_geometry_returns_exactly_prepare(image, pipeline, channels):
    expected = prepare(image, 32, channels, pipeline)
    got, geometry = prepare_with_geometry(image, 32, channels, pipeline)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert got.tobytes() == expected.tobytes()
    assert geometry.image_shape == image.shape[:2]
    top, left, bottom, right = geometry.box
    assert 0 <= top < bottom <= image.shape[0] and 0 <= left < right <= image.shape[1]


def test_heatmap_maps_back_onto_the_original_pixels():
    """Mapping the model's own input back through the geometry must land on the same anatomy."""
    image = head(90, 150, (45, 100), 35)
    pixels, geometry = prepare_with_geometry(image, 64, 1)
    assert geometry.box[1] > 40, "the head is on the right; the crop should have dropped the left"
    back = heatmap_to_image(pixels[..., 0] / 255.0, geometry)
    assert back.shape == image.shape and back.dtype == np.float32
    top, left, bottom, right = geometry.box
    assert not back[:, :left].any() and not back[:, right:].any(), "nothing outside the crop box"
    seen = stretch(to_gray_float(image)[top:bottom, left:right]).astype(np.float32)
    corr = np.corrcoef(back[top:bottom, left:right].ravel(), seen.ravel())[0, 1]
    assert corr > 0.9


def test_heatmap_geometry_for_plain_resize():
    image = np.zeros((40, 80), np.uint8)
    _, geometry = prepare_with_geometry(image, 32, 1, "resize")
    heat = np.zeros((32, 32), np.float32)
    heat[:, :16] = 1.0
    back = heatmap_to_image(heat, geometry)
    assert back.shape == (40, 80)
    assert back[:, :35].min() > 0.99 and back[:, 45:].max() < 0.01


# --- backend and registry ------------------------------------------------------------------------------

def test_backend_prefers_litert_and_reports_version():
    module, info = find_backend()
    assert info.name == "litert"
    assert info.version == importlib.metadata.version("ai-edge-litert")
    assert module.__name__ == "ai_edge_litert.interpreter"


def test_forcing_a_missing_or_unknown_backend_is_a_backend_error():
    with pytest.raises(BackendError, match="unknown backend"):
        find_backend("onnx")
    try:
        import tflite_runtime  # noqa: F401
    except ImportError:
        with pytest.raises(BackendError, match="tflite_runtime.*not installed"):
            find_backend("tflite_runtime")


def test_load_interpreter_rejects_garbage_as_a_model_error():
    with pytest.raises(ModelError):
        load_interpreter(b"TFL3" * 100)
    with pytest.raises(BackendError, match="threads"):
        load_interpreter(b"", threads=0)


def test_registry_lists_and_resolves_models(tmp_path: Path, tiny_model_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert list_models(empty) == []
    with pytest.raises(ModelError, match=f"{DEFAULT_MODEL}.*none bundled"):
        resolve(None, empty)

    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(tiny_model_path, models / "tiny.tflite")
    (models / "tiny.md").write_text("# tiny\n")
    [info] = list_models(models)
    assert info.name == "tiny" and info.labels == LABELS and info.input_size == 32 and info.channels == 1
    assert info.sha256 == hashlib.sha256(tiny_model_path.read_bytes()).hexdigest()
    assert info.size_bytes == tiny_model_path.stat().st_size and info.card == models / "tiny.md"
    assert resolve("tiny", models) == models / "tiny.tflite"
    assert resolve(str(tiny_model_path), models) == tiny_model_path
    with pytest.raises(ModelError, match=r"nope: no such model \(known: tiny\)"):
        resolve("nope", models)
    with pytest.raises(ModelError, match="no such model file"):
        resolve(str(tmp_path / "missing.tflite"), models)
    with pytest.raises(ModelError, match="is a directory"):
        resolve(str(models), models)


def test_bundled_registry_lists_the_default_model(bundled_model: Path):
    names = [m.name for m in list_models()]
    assert DEFAULT_MODEL in names
    assert resolve(None) == bundled_model
    assert bundled_model.with_suffix(".md").is_file(), "every bundled model ships a model card"


@pytest.mark.parametrize("info", list_models(), ids=lambda info: info.name)
def test_every_bundled_model_has_a_card_and_classifies_the_samples(info) -> None:
    """Each shipped model (custom-cnn and xception) gets the eight real sample scans right, with a heatmap."""
    assert info.card is not None and info.labels == LABELS
    samples = sorted((Path(__file__).resolve().parent.parent / "edge" / "samples").glob("*.jpg"))
    clf = Classifier(info.path, threads=2)
    results = [clf.classify(path) for path in samples]
    assert [r.label for r in results] == [path.stem.rsplit("_", 1)[0] for path in samples]
    for r in results:
        assert r.heatmap.shape == (info.input_size, info.input_size)
        assert r.heatmap.min() >= 0 and r.heatmap.max() == pytest.approx(1.0, abs=1e-3)


# --- Classifier --------------------------------------------------------------------------------------

def test_classify_result_fields(clf: Classifier, scan_png: Path, tiny_model_path: Path):
    result = clf.classify(scan_png)
    assert isinstance(result, Result)
    assert result.label in LABELS and list(result.probabilities) == list(LABELS)
    assert result.confidence == max(result.probabilities.values()) == result.probabilities[result.label]
    assert abs(sum(result.probabilities.values()) - 1.0) < 0.02
    assert set(result.timings) == set(TIMING_KEYS) and all(v >= 0 for v in result.timings.values())
    assert result.timings["total"] >= result.timings["invoke"]
    assert result.model == "tiny-test"
    assert result.model_sha256 == hashlib.sha256(tiny_model_path.read_bytes()).hexdigest()
    assert (result.backend, result.backend_version) == (clf.backend.name, clf.backend.version)
    assert result.source == str(scan_png) and result.frame == ""
    top = result.top_k(3)
    assert len(top) == 3 and top[0] == (result.label, result.confidence)
    assert [p for _, p in top] == sorted((p for _, p in top), reverse=True)

    assert result.heatmap.shape == (32, 32) and result.heatmap.dtype == np.float32
    assert 0.0 <= result.heatmap.min() and result.heatmap.max() <= 1.0 and result.heatmap.max() > 0.2
    on_image = result.heatmap_on_image()
    assert on_image.shape == (64, 64) and on_image.dtype == np.float32


def test_to_json_has_top_k_and_no_arrays(clf: Classifier, scan_png: Path):
    result = clf.classify(scan_png)
    data = json.loads(result.to_json(top_k=2))
    assert data == result.to_dict(top_k=2)
    assert data["source"] == str(scan_png) and data["label"] == result.label
    assert [t["label"] for t in data["top_k"]] == [label for label, _ in result.top_k(2)]
    assert set(data["timings_ms"]) == set(TIMING_KEYS)
    assert data["model"] == {"name": "tiny-test", "sha256": result.model_sha256}
    assert data["backend"]["name"] == "litert" and data["has_heatmap"] is True
    assert "heatmap" not in data and "image" not in data
    assert len(result.to_json()) < 2000


def test_every_kind_of_source_gives_the_same_answer(clf: Classifier, scan_png: Path):
    by_path = clf.classify(scan_png)
    by_str = clf.classify(str(scan_png))
    by_bytes = clf.classify(scan_png.read_bytes())
    by_pil = clf.classify(Image.open(scan_png))
    by_array = clf.classify(np.asarray(Image.open(scan_png)))
    for other in (by_str, by_bytes, by_pil, by_array):
        assert other.probabilities == by_path.probabilities
        assert np.array_equal(other.heatmap, by_path.heatmap)
    assert (by_bytes.source, by_pil.source, by_array.source) == ("<bytes>", "<PIL image>", "<array>")


def test_threads_and_repeats_do_not_change_answers(tiny_model_path: Path, scan_png: Path):
    sample = sorted((Path(__file__).resolve().parent.parent / "edge" / "samples").glob("*.jpg"))[:3]
    inputs = [scan_png, *sample]
    reference = None
    for threads in (1, 2, 4):
        clf = Classifier(tiny_model_path, threads=threads)
        for _ in range(2):
            answers = [(r.label, r.probabilities, r.heatmap.tobytes()) for r in map(clf.classify, inputs)]
            reference = reference or answers
            assert answers == reference, f"threads={threads} changed an answer"


def test_model_without_heatmap_rgb_input_and_resize_pipeline(tiny_rgb_plain_model_path: Path, scan_png: Path):
    clf = Classifier(tiny_rgb_plain_model_path)
    assert not clf.has_heatmap and clf.spec.channels == 3 and clf.spec.pipeline == "resize"
    result = clf.classify(scan_png)
    assert result.label in LABELS and result.heatmap is None and result.heatmap_on_image() is None
    assert result.to_dict()["has_heatmap"] is False
    out = save_overlay(result, scan_png.parent / "plain.png")
    assert Image.open(out).size[0] >= 64


@pytest.fixture(scope="module")
def uint8_reference(build_model, tmp_path_factory) -> Classifier:
    return Classifier(build_model(tmp_path_factory.mktemp("uint8") / "m.tflite", input_type="uint8"))


@pytest.mark.parametrize("input_type", ["int8", "float32"])
def test_input_quantization_follows_the_input_tensor(input_type: str, build_model, tmp_path_factory,
                                                      uint8_reference: Classifier, scan_png: Path):
    """The same network with an int8 (zero point -128) or float32 input must see the same pixels."""
    path = build_model(tmp_path_factory.mktemp(input_type) / "m.tflite", input_type=input_type)
    other = Classifier(path)
    assert other._input["dtype"] == (np.int8 if input_type == "int8" else np.float32)
    a, b = uint8_reference.classify(scan_png), other.classify(scan_png)
    assert a.label == b.label
    assert max(abs(a.probabilities[k] - b.probabilities[k]) for k in LABELS) <= 2 / 256
    assert np.abs(a.heatmap - b.heatmap).mean() < 0.02


def test_tensorflow_lite_backend_agrees_with_litert(tiny_model_path: Path, scan_png: Path, clf: Classifier):
    """The last-resort backend gives the same verdict (TensorFlow is already loaded here by the fixture)."""
    pytest.importorskip("tensorflow")
    tf_clf = Classifier(tiny_model_path, backend="tensorflow")
    assert tf_clf.backend.name == "tensorflow"
    a, b = clf.classify(scan_png), tf_clf.classify(scan_png)
    assert a.label == b.label
    assert max(abs(a.probabilities[k] - b.probabilities[k]) for k in LABELS) <= 1 / 256 + 1e-6


def test_model_errors_name_the_model(tmp_path: Path, tiny_model_path: Path):
    broken = tmp_path / "broken.tflite"
    broken.write_bytes(tiny_model_path.read_bytes()[:3000])
    with pytest.raises(ModelError, match="broken.tflite"):
        Classifier(broken)
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelError, match="junk.tflite: not a TFLite flatbuffer"):
        Classifier(junk)
    with pytest.raises(ModelError, match="no-such-model"):
        Classifier("no-such-model")


def test_classification_never_imports_tensorflow(tiny_model_path: Path, scan_png: Path, tmp_path: Path):
    code = (
        "import sys\n"
        "from edge import Classifier\n"
        "from edge.overlay import save_overlay\n"
        f"r = Classifier({str(tiny_model_path)!r}).classify({str(scan_png)!r})\n"
        f"save_overlay(r, {str(tmp_path / 'o.png')!r})\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('tensorflow', 'keras', 'matplotlib', 'convert', 'benchmarks'))\n"
        "print(r.label, bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split()[0] in LABELS


# --- decoding: every image mode classifies --------------------------------------------------------------

def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _modes() -> dict[str, bytes]:
    gray = Image.fromarray(head(64, 64, (30, 34), 22))
    rgb = Image.merge("RGB", (gray, gray, gray))
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(np.where(np.asarray(gray) > 0, 255, 0).astype(np.uint8)))
    la = gray.copy().convert("LA")
    gray16 = Image.fromarray(head(64, 64, (30, 34), 22, dtype=np.uint16, peak=3000.0))
    pal = rgb.convert("P", palette=Image.ADAPTIVE, colors=64)
    pal_t = pal.copy()
    pal_t.info["transparency"] = 0
    return {
        "L.png": _save(gray, "PNG"),
        "L.jpg": _save(gray, "JPEG", quality=95),
        "L.bmp": _save(gray, "BMP"),
        "1.png": _save(gray.point(lambda v: 255 if v > 60 else 0).convert("1"), "PNG"),
        "I16.png": _save(gray16, "PNG"),
        "I16.tif": _save(gray16, "TIFF"),
        "F.tif": _save(Image.fromarray(head(64, 64, (30, 34), 22, dtype=np.float32, peak=1.0)), "TIFF"),
        "RGB.jpg": _save(rgb, "JPEG", quality=95),
        "RGB.tif": _save(rgb, "TIFF"),
        "RGBA.png": _save(rgba, "PNG"),
        "LA.png": _save(la, "PNG"),
        "P.png": _save(pal, "PNG"),
        "P-transparent.png": _save(pal_t, "PNG"),
        "CMYK.jpg": _save(rgb.convert("CMYK"), "JPEG", quality=95),
        "CMYK.tif": _save(rgb.convert("CMYK"), "TIFF"),
    }


@pytest.mark.parametrize("name", sorted(_modes()))
def test_every_image_mode_decodes_and_classifies(name: str, clf: Classifier, tmp_path: Path):
    path = tmp_path / name
    path.write_bytes(_modes()[name])
    image = decode(path)
    assert image.shape[:2] == (64, 64) and image.ndim in (2, 3)
    assert image.ndim == 2 or image.shape[2] == 3
    result = clf.classify(path)
    assert result.label in LABELS and result.heatmap_on_image().shape == (64, 64)
    assert save_overlay(result, tmp_path / "o.png").stat().st_size > 0


def test_sixteen_bit_depth_is_kept():
    gray16 = head(64, 64, (30, 34), 22, dtype=np.uint16, peak=3000.0)
    image = decode(_save(Image.fromarray(gray16), "PNG"))
    assert image.dtype == np.uint16 and np.array_equal(image, gray16)


def test_alpha_is_composited_on_black():
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:, 16:, 3] = 255
    image = decode(_save(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert image.shape == (32, 32, 3)
    assert image[:, :16].max() == 0 and image[:, 16:].min() == 200
    assert np.array_equal(decode(rgba), image)


def test_exif_orientation_is_applied(clf: Classifier, tmp_path: Path):
    stored = head(40, 64, (20, 40), 18)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "phone.jpg"
    Image.fromarray(stored).save(path, "JPEG", quality=95, exif=exif)
    image = decode(path)
    assert image.shape == (64, 40)
    assert np.abs(image.astype(int) - np.rot90(stored, -1).astype(int)).mean() < 4
    assert clf.classify(path).heatmap_on_image().shape == (64, 40)
    assert np.array_equal(decode(Image.open(path)), image), "a PIL image is turned upright too"


# --- overlay -------------------------------------------------------------------------------------------

def test_colormap_and_blend():
    assert INFERNO.shape == (256, 3) and INFERNO.dtype == np.uint8
    assert tuple(colorize(np.array(0.0))) == (0, 0, 4) and tuple(colorize(np.array(1.0))) == (252, 255, 164)
    luminance = INFERNO.astype(float) @ [0.299, 0.587, 0.114]
    assert np.all(np.diff(luminance) > -1.0), "inferno brightens monotonically"
    image = head(32, 32, (16, 16), 12)
    cold = blend(image, np.zeros((32, 32), np.float32))
    assert np.array_equal(cold[..., 0], image) and np.array_equal(cold[..., 2], image)
    hot = blend(image, np.ones((32, 32), np.float32))
    assert not np.array_equal(hot, cold)


def test_overlay_png_has_scan_heatmap_and_caption(clf: Classifier, scan_png: Path, tmp_path: Path):
    result = clf.classify(scan_png)
    out = save_overlay(result, tmp_path / "overlay.png")
    picture = np.asarray(Image.open(out).convert("RGB"))
    assert picture.shape[1] >= 256 and picture.shape[0] > picture.shape[1], "enlarged scan + caption bar"
    scan_part, bar = picture[:picture.shape[1]], picture[picture.shape[1]:]
    assert (bar > 200).any(), "caption text is drawn"
    colourful = np.abs(scan_part[..., 0].astype(int) - scan_part[..., 2].astype(int)) > 20
    assert colourful.mean() > 0.01, "heatmap colour is blended in"
