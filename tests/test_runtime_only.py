"""A runtime-only install (`pip install .`, no extras) has no TensorFlow, Keras, matplotlib or imagehash.
The host-side CLIs must still answer --help, and refuse their work in one line naming the extra to install.

Simulated in a fresh interpreter whose imports of those packages fail, as they would there."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HOST_ONLY = ("tensorflow", "keras", "matplotlib", "imagehash", "jax", "torch")
HINT = 'which this install lacks; pip install "edge-mri[convert]"'


def run(module: str, prog: str, *args: object) -> subprocess.CompletedProcess:
    code = (f"import sys\nfor name in {HOST_ONLY!r}:\n    sys.modules[name] = None\n"
            f"from {module} import main\nmain(prog_name={prog!r})\n")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))


CLIS = [("convert.dedup_cli", "edge-dedup"), ("convert.convert_cli", "edge-convert"),
        ("convert.train_cli", "edge-train"), ("convert.evaluate_cli", "edge-evaluate"), ("benchmarks.cli", "edge-bench"),
        ("edge.cli", "edge-classify")]


@pytest.mark.parametrize("module, prog", CLIS)
def test_help_works_without_the_host_libraries(module: str, prog: str):
    done = run(module, prog, "--help")
    assert done.returncode == 0, done.stderr
    assert "Usage:" in done.stdout and done.stderr == ""


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    (tmp_path / "d").mkdir()
    return tmp_path / "d"


@pytest.mark.parametrize("module, prog, args, needs", [
    ("convert.dedup_cli", "edge-dedup", ["{d}", "{d}"], "edge-dedup needs imagehash"),
    ("convert.convert_cli", "edge-convert", ["{d}/m.keras", "--calibration", "{d}", "--out", "{d}/o.tflite"],
     "edge-convert needs tensorflow, keras"),
    ("convert.train_cli", "edge-train", ["{d}", "--out", "{d}/o.keras"],
     "edge-train (Keras on tensorflow) needs keras, tensorflow"),
    ("convert.evaluate_cli", "edge-evaluate", ["{d}/m.keras", "{d}"], "edge-evaluate on a Keras model needs keras"),
    ("convert.evaluate_cli", "edge-evaluate", ["{d}/m.tflite", "{d}", "--out", "{d}/report"],
     "edge-evaluate --out (its plots) needs matplotlib"),
])
def test_host_steps_name_the_extra_in_one_line(module: str, prog: str, args: list[str], needs: str, folder: Path):
    done = run(module, prog, *[a.format(d=folder) for a in args])
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [f"{prog}: error: {needs}, {HINT}"]


def test_the_device_runtime_classifies_without_them(tiny_model_path: Path, scan_png: Path):
    done = run("edge.cli", "edge-classify", "--model", tiny_model_path, scan_png)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 1 and done.stderr == ""
