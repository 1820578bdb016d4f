"""Every command line of the project behaves alike at its edges: `--version`, one-line `PROG: error: ...`
usage errors with exit code 2, and empty paths refused rather than read as the current directory."""
from __future__ import annotations

import importlib
import re

import pytest
from click.testing import CliRunner

import edge

#: console script -> (module with `main`, arguments that make a valid call apart from the one under test)
CLIS = {
    "edge-classify": ("edge.cli", []),
    "edge-serve": ("edge.serve_cli", []),
    "edge-convert": ("convert.convert_cli", ["m.keras", "--calibration", "c", "--out", "o.tflite"]),
    "edge-train": ("convert.train_cli", [".", "--out", "o.keras"]),
    "edge-dedup": ("convert.dedup_cli", [".", "."]),
    "edge-evaluate": ("convert.evaluate_cli", ["m.tflite", "."]),
    "edge-bench": ("benchmarks.cli", ["run"]),
    "edge-gate": ("convert.gate_cli", ["calibrate", "m.tflite", "--data", ".", "--out", "o.tflite"]),
}


def invoke(prog: str, *args: str):
    main = importlib.import_module(CLIS[prog][0]).main
    return CliRunner().invoke(main, list(args), prog_name=prog)


@pytest.mark.parametrize("prog", CLIS)
def test_version(prog: str):
    result = invoke(prog, "--version")
    assert result.exit_code == 0, result.output
    assert re.fullmatch(rf"{prog} {re.escape(edge.__version__)} \((.*; )?Python \d+\.\d+\.\d+\)\n", result.stdout)


@pytest.mark.parametrize("prog", CLIS)
def test_an_unknown_option_is_one_error_line_exit_2(prog: str):
    result = invoke(prog, *CLIS[prog][1], "--no-such-option")
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{prog}") and ": error: " in lines[0] and "--no-such-option" in lines[0]
    assert lines[0].endswith("--help)"), "the line says where to read more"


@pytest.mark.parametrize("prog, args, option", [
    ("edge-convert", ["", "--calibration", "c", "--out", "o.tflite"], "MODEL"),
    ("edge-convert", ["m.keras", "--calibration", "c", "--out", ""], "--out"),
    ("edge-train", ["", "--out", "o.keras"], "DATA"),
    ("edge-dedup", ["", "."], "TRAIN_DIR"),
    ("edge-dedup", [".", ".", "--out", ""], "--out"),
    ("edge-evaluate", ["", "."], "MODEL"),
    ("edge-evaluate", ["m.tflite", ""], "DIR"),
    ("edge-evaluate", ["m.tflite", ".", "--out", ""], "--out"),
    ("edge-bench", ["run", "--images", ""], "--images"),
    ("edge-bench", ["run", "--model", ""], "--model"),
    ("edge-bench", ["run", "--out", ""], "--out"),
    ("edge-serve", ["--keep", ""], "--keep"),
    ("edge-serve", ["--model", ""], "--model"),
    ("edge-gate", ["calibrate", "", "--data", ".", "--out", "o.tflite"], "NAME|PATH"),
    ("edge-gate", ["calibrate", "m.tflite", "--data", ".", "--out", ""], "--out"),
])
def test_an_empty_path_is_a_usage_error(prog: str, args: list[str], option: str):
    result = invoke(prog, *args)
    assert result.exit_code == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"{prog}: error: ") and option in line and "empty" in line


def test_bench_takes_bundled_model_names_for_models_and_references(bundled_model, tmp_path):
    """Both names resolve before anything runs: the scan folder is empty, so the run stops at that."""
    result = invoke("edge-bench", "run", "--model", "custom-cnn", "--reference", f"big={bundled_model.stem}",
                    "--images", str(tmp_path))
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"edge-bench: error: {tmp_path}: no scans ("), "the models were accepted"
    unknown = invoke("edge-bench", "run", "--reference", "x=no-such-model")
    assert unknown.exit_code == 2 and "no such model (known: " in unknown.stderr


def test_evaluate_takes_a_bundled_model_name(bundled_model, sample_scans, tmp_path):
    """`edge-evaluate custom-cnn DIR`, as `edge-classify --model custom-cnn`: the samples sorted into classes."""
    import json
    import shutil

    for scan in sample_scans:
        (tmp_path / scan.name.split("_")[0]).mkdir(exist_ok=True)
        shutil.copy(scan, tmp_path / scan.name.split("_")[0] / scan.name)
    result = invoke("edge-evaluate", bundled_model.stem, str(tmp_path), "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model"]["name"] == bundled_model.stem and report["images"]["evaluated"] == len(sample_scans)
    unknown = invoke("edge-evaluate", "no-such-model", str(tmp_path))
    assert unknown.exit_code == 2
    (line,) = unknown.stderr.splitlines()
    assert line.startswith("edge-evaluate: error: ") and "no such model (known: " in line
