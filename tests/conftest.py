"""Shared fixtures: real (tiny) TFLite models built once per session, and the bundled model and sample scans
of the package under test; the markers that pick the fast loop; and the check that the package under test is
the installed one.

The tiny models are random Keras CNNs (32x32 input) with an in-graph Grad-CAM head, converted to full-int8
TFLite with a uint8 input and the runtime's metadata embedded: the same kind of file the real converter
writes, small enough to build in seconds on a busy 2-core machine.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import sysconfig
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parent.parent
#: `-m device`, the fast loop: the device side (runtime, CLIs, decode, DICOM, watch, camera, bench, records,
#: the web server and its page).
#: Nothing here trains or converts a real network; TensorFlow only builds the session's tiny test models.
DEVICE_MODULES = {"test_bad_inputs", "test_bench", "test_camera", "test_cli_classify", "test_cli_conventions",
                  "test_cli_edge_cases", "test_dicom", "test_edge_api", "test_gate", "test_mask_geometry",
                  "test_model_integrity",
                  "test_overlay", "test_readme", "test_records", "test_runtime_only", "test_serve",
                  "test_serve_browser", "test_stderr", "test_watch"}
#: `-m slow`: TensorFlow training or conversion of real networks (a minute or more each on 2 busy cores).
SLOW_MODULES = {"test_train", "test_gradcam_head", "test_equalise", "test_convert_cli", "test_quant_repair",
                "test_gate_calibration"}
SLOW_TESTS = {"test_bench.py::test_run_with_keras_reference",
              "test_bench.py::test_keras_predict_style_agrees_with_compiled",
              "test_bench.py::test_keras_reference_matches_model_and_analytic_gradcam"}


def _package_dir() -> Path:
    """The `edge` package the tests import: the installed one, or the checkout's in an editable install."""
    spec = importlib.util.find_spec("edge")
    if spec is None or spec.origin is None:
        raise pytest.UsageError("edge-mri is not installed; pip install -e \".[test]\" (or \".[test]\") first")
    return Path(spec.origin).resolve().parent


def _checkout_shadows_the_install() -> str | None:
    """Why this run would test the checkout's edge/ instead of an installed (not editable) edge-mri, if so.

    A package-data omission (a model or sample scan left out of the wheel) only shows when the installed
    package is tested. `python -m pytest` run in the checkout imports the checkout's edge/, and every CLI a
    test starts with `python -m` or `-c` puts its current folder first on sys.path, so the current folder
    must not hold edge/ either.
    """
    installed = Path(sysconfig.get_paths()["purelib"]) / "edge" / "__init__.py"
    if not installed.is_file():  # an editable install (or none): the checkout is the package under test
        return None
    for candidate in (_package_dir() / "__init__.py", Path.cwd() / "edge" / "__init__.py"):
        if candidate.is_file() and candidate.resolve() != installed.resolve():
            return (f"edge-mri is installed in {installed.parent.parent}, but this run would test {candidate.parent}: "
                    "run the tests from tests/ (cd tests && python -m pytest -q), or install with pip install -e")
    return None


def pytest_configure(config: pytest.Config) -> None:
    problem = _checkout_shadows_the_install()
    if problem:
        raise pytest.UsageError(problem)


def pytest_report_header(config: pytest.Config) -> str:
    return f"edge-mri under test: {_package_dir()}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Markers by module, kept here in one place (some test files belong to engineers working on them)."""
    for item in items:
        module = item.path.stem
        if module in SLOW_MODULES or f"{item.path.name}::{item.originalname}" in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
        elif module in DEVICE_MODULES:
            item.add_marker(pytest.mark.device)


PACKAGE = _package_dir()
BUNDLED_MODEL = PACKAGE / "models" / "custom-cnn.tflite"
SAMPLES_DIR = PACKAGE / "samples"
LABELS = ("glioma", "meningioma", "notumor", "pituitary")
TINY_SIZE = 32


def save_dicom(ds, out: Path, **changes) -> Path:
    """Write pydicom dataset ``ds`` to ``out`` as a DICOM file, with some elements changed (None deletes one)."""
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(out, enforce_file_format=True)
    return out


def build_tiny_model(path: Path, *, channels: int = 1, heatmap: bool = True, pipeline: str = "mri-crop-v1",
                     name: str = "tiny-test", seed: int = 7, input_type: str = "uint8") -> Path:
    """Write a random tiny CNN as an int8 .tflite with our metadata; the heatmap is an analytic Grad-CAM.

    ``input_type`` is the interpreter-facing input: ``uint8`` (the contract; scale 1, zero point 0 for
    0..255 calibration data), ``int8`` (zero point -128, so the runtime must quantize) or ``float32``.

    For conv features F followed by global average pooling and a dense layer W, the Grad-CAM weights of
    class c are W[:, c] / (h*w), so the map is relu(F . W[:, c]) normalised to [0, 1] -- computed in the
    graph, as the converter's Grad-CAM head does, then upsampled to the input size.
    """
    import tempfile

    import keras
    import numpy as np
    import tensorflow as tf

    from convert.metadata import embed_metadata

    keras.utils.set_random_seed(seed)
    size = TINY_SIZE
    inputs = keras.Input((size, size, channels))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="features")(x)
    features = keras.Model(inputs, x)
    dense = keras.layers.Dense(len(LABELS), name="logits")
    dense.build((None, 16))
    kernel = tf.constant(dense.kernel.numpy())
    bias = tf.constant(dense.bias.numpy())

    def serve(image):
        fmap = features(image)
        logits = tf.matmul(tf.reduce_mean(fmap, axis=[1, 2]), kernel) + bias
        out = {"probabilities": tf.nn.softmax(logits)}
        if heatmap:
            weights = tf.gather(kernel, tf.argmax(logits, axis=-1), axis=1)[:, 0]
            cam = tf.nn.relu(tf.tensordot(fmap, weights, axes=[[3], [0]]))
            cam = cam / (tf.reduce_max(cam) + 1e-6)
            out["heatmap"] = tf.image.resize(cam[..., None], [size, size])[..., 0]
        return out

    spec = tf.TensorSpec([1, size, size, channels], tf.float32, name="image")
    with tempfile.TemporaryDirectory() as tmp:
        archive = keras.export.ExportArchive()
        archive.track(features)
        archive.add_endpoint("serving_default", serve, input_signature=[spec])
        archive.write_out(tmp, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        rng = np.random.default_rng(seed)
        converter.representative_dataset = lambda: (
            [rng.integers(0, 256, (1, size, size, channels)).astype(np.float32)] for _ in range(16)
        )
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if input_type != "float32":
            converter.inference_input_type = {"uint8": tf.uint8, "int8": tf.int8}[input_type]
        tflite = converter.convert()
    outputs = {"probabilities": {"name": "probabilities", "shape": [1, len(LABELS)]}}
    if heatmap:
        outputs["heatmap"] = {"name": "heatmap", "shape": [1, size, size], "class": "predicted", "range": [0, 1]}
    metadata = {
        "schema": 1,
        "name": name,
        "labels": list(LABELS),
        "input": {"size": size, "channels": channels, "colour": "grayscale" if channels == 1 else "rgb",
                  "pipeline": pipeline, "dtype": "uint8"},
        "normalisation": {"name": "tf", "mean": [127.5], "std": [127.5], "folded": True},
        "outputs": outputs,
        "gradcam": {"target_layer": "features", "feature_shape": [size // 2, size // 2, 16], "score": "logit"},
        "source": {"file": "tiny-test.keras", "sha256": "0" * 64, "format": "keras"},
        "converter": {"tool": "tests/conftest.py", "version": "0", "tensorflow": tf.__version__,
                      "quantization": "int8", "calibration": {"images": 16, "skipped": 0, "per_class": {}},
                      "settings": {}},
        "created": "2026-01-01T00:00:00Z",
    }
    path.write_bytes(embed_metadata(tflite, metadata))
    return path


@pytest.fixture(scope="session")
def build_model():
    """The tiny-model builder itself, for tests that need a variant (input type, channels, no heatmap)."""
    return build_tiny_model


def convert_tiny_model(path: Path, workdir: Path, seed: int = 7) -> Path:
    """The same kind of tiny random CNN, converted by the real `edge-convert` pipeline (Grad-CAM head,
    int8 calibration on synthetic heads, embedded metadata)."""
    import keras
    import numpy as np
    from PIL import Image

    from convert.converter import convert_model

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((TINY_SIZE, TINY_SIZE, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="features")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(len(LABELS), activation="softmax")(x))
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    for label in LABELS:
        (workdir / label).mkdir(parents=True, exist_ok=True)
        for i in range(4):
            disc = (yy - 32) ** 2 + (xx - 30 - i) ** 2 < (18 + 2 * i) ** 2
            Image.fromarray((disc * rng.integers(40, 256, (64, 64))).astype(np.uint8)).save(workdir / label / f"{i}.png")
    convert_model(model, calibration_dir=workdir, out=path, labels=list(LABELS), preprocess="tf",
                  pipeline="mri-crop-v1", name="tiny-test", num_calibration=16)
    return path


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real int8 TFLite model: 32x32x1 grayscale, mri-crop-v1, outputs probabilities + heatmap.

    Converted by `convert.converter.convert_model` where the converter is installed (the file a user
    would get); otherwise built by :func:`build_tiny_model`, which follows the same model-file contract.
    """
    path = tmp_path_factory.mktemp("models") / "tiny.tflite"
    try:
        import convert.converter  # noqa: F401
    except ImportError:
        return build_tiny_model(path)
    return convert_tiny_model(path, tmp_path_factory.mktemp("calibration"))


@pytest.fixture(scope="session")
def tiny_rgb_plain_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real int8 model with 3 input channels, the ``resize`` pipeline and no heatmap output."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-rgb-plain.tflite", channels=3,
                            heatmap=False, pipeline="resize", name="tiny-rgb-plain", seed=11)


@pytest.fixture(scope="session")
def bundled_model() -> Path:
    """The default bundled model, in the package under test. Missing is a failure, not a skip: it means the
    package left it out (setup.py's package_data) and `edge-classify` without --model cannot work."""
    if not BUNDLED_MODEL.is_file():
        pytest.fail(f"{BUNDLED_MODEL} is missing from the package under test")
    return BUNDLED_MODEL


@pytest.fixture(scope="session")
def sample_scans() -> list[Path]:
    """The real sample scans shipped in the package's edge/samples/ (label = file name prefix before '_');
    none is a failure, as for the bundled model (the README's first command classifies them)."""
    scans = sorted(p for p in SAMPLES_DIR.glob("*_*.*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not scans:
        pytest.fail(f"{SAMPLES_DIR} holds no sample scans in the package under test")
    return scans


@pytest.fixture()
def scan_png(tmp_path: Path) -> Path:
    """A synthetic 64x64 'head' (bright disc on black) as an 8-bit grayscale PNG."""
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[:64, :64]
    disc = ((yy - 30) ** 2 + (xx - 34) ** 2 < 22 ** 2).astype(np.float32)
    image = (disc * (120 + 100 * np.sin(xx / 5.0) * np.cos(yy / 7.0))).clip(0, 255).astype(np.uint8)
    path = tmp_path / "scan.png"
    Image.fromarray(image).save(path)
    return path


@pytest.fixture()
def run_cli():
    """Run the real `edge-classify` command in a fresh interpreter, as a user would; returns CompletedProcess."""
    import subprocess

    def run(*args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
        full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **(env or {}))
        kwargs.setdefault("timeout", 300)
        return subprocess.run([sys.executable, "-m", "edge.cli", *map(str, args)], capture_output=True,
                              text=True, env=full_env, **kwargs)

    return run


def _drop_file_override() -> None:
    """In a child process: drop CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH from the bounding set, so that after
    exec even root is refused what permission bits forbid (root ignores them only through those two)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.fixture()
def unprivileged(tmp_path: Path) -> dict:
    """`subprocess` keyword arguments that make a child honour permission bits even when run as root;
    skips where that cannot be arranged (not Linux, or a container that forbids dropping capabilities)."""
    import subprocess

    extra: dict = {}
    if os.geteuid() == 0:
        if not sys.platform.startswith("linux"):
            pytest.skip("root ignores file permissions and capabilities can only be dropped on Linux here")
        extra["preexec_fn"] = _drop_file_override
    locked = tmp_path / ".probe-locked"
    locked.write_text("x")
    locked.chmod(0)
    probe = f"import sys\ntry:\n open({str(locked)!r}, 'rb')\nexcept PermissionError:\n sys.exit(3)\n"
    try:
        check = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=60, **extra)
    except subprocess.SubprocessError:
        pytest.skip("cannot drop root's file-permission override in this container")
    finally:
        locked.unlink()
    if check.returncode != 3:
        pytest.skip("permission bits are not enforced here")
    return extra


@pytest.fixture()
def cli():
    """Invoke `edge-classify` in-process (fast); the result has exit_code, stdout and stderr apart."""
    from click.testing import CliRunner

    from edge.cli import main

    def invoke(*args: str):
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke


@pytest.fixture(scope="session")
def convert_image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Class folders (the four labels) of five 64x64 PNG scans each, for calibration and parity tests.

    Real test-set slices from ../shared when present, else synthetic heads (a bright ellipse with a
    class-dependent blob). Session-wide and read-only: copy it before adding files.
    """
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("convert-images")
    shared = REPO.parent / "shared" / "data" / "brain-tumor-mri" / "Testing"
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:64, :64]
    for c, label in enumerate(LABELS):
        (root / label).mkdir()
        sources = sorted((shared / label).glob("*.jpg"))[:5] if (shared / label).is_dir() else []
        for i in range(5):
            if sources:
                image = Image.open(sources[i]).convert("L").resize((64, 64), Image.BILINEAR)
            else:
                head = ((yy - 32) / 26.0) ** 2 + ((xx - 32) / 22.0) ** 2 < 1
                blob = (yy - 16 - 8 * c) ** 2 + (xx - 20 - 6 * i) ** 2 < 36
                pixels = head * rng.integers(60, 140, (64, 64)) + blob * 110
                image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            image.save(root / label / f"{label}_{i}.png")
    return root
