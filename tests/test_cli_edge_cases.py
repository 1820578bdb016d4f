"""Small promises of the CLIs that a new user or an adversary checks first (issue 14, item 10): options that
do not apply are said so, --threads has an upper bound, content beats a file name, a model path that is a
pipe or a device is refused at once, reports never print Python's None, and a closed pipe ends quietly.

All through the real commands with the bundled model, so no TensorFlow is needed."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner


def run(module: str, *args: object, timeout: float = 120) -> subprocess.CompletedProcess:
    """The CLI whose `main` is in ``module``, in a fresh interpreter, as its console script runs it."""
    code = f"from {module} import main\nmain(prog_name={module!r})\n"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))


def errors_and_notices(stderr: str) -> list[str]:
    """stderr without the bundled model's "no weights checksum" notice (it depends on the lead's retrain)."""
    return [line for line in stderr.splitlines() if "records no weights checksum" not in line]


def test_dicom_only_options_on_a_png_are_one_notice(cli, bundled_model: Path, sample_scans: list[Path]):
    result = cli("--model", bundled_model, sample_scans[0], "--window", "40,80", "--frame", "0")
    assert result.exit_code == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1
    assert errors_and_notices(result.stderr) == [
        f"edge-classify: notice: --frame, --window only apply to DICOM files; 1 input(s) are not DICOM and are "
        f"classified without them: {sample_scans[0]}"]
    plain = cli("--model", bundled_model, sample_scans[0])
    assert errors_and_notices(plain.stderr) == [], "no notice without a DICOM-only option"


def test_dicom_only_options_on_dicom_files_give_no_notice(cli, bundled_model: Path, tmp_path: Path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    scan = Path(shutil.copy(get_testdata_file("MR_small.dcm"), tmp_path / "mr"))  # DICOM by content alone
    assert pydicom.dcmread(scan).Modality == "MR"
    result = cli("--model", bundled_model, scan, "--window", "600,1200")
    assert result.exit_code == 3, result.stderr  # MR_small is an MR but no brain slice: referred (input gate)
    assert errors_and_notices(result.stderr) == []


@pytest.mark.parametrize("prog, module, args", [
    ("edge-classify", "edge.cli", ["--threads", "{n}", "{scan}"]),
    ("edge-evaluate", "convert.evaluate_cli", ["{model}", "{dir}", "--threads", "{n}"]),
    ("edge-bench", "benchmarks.cli", ["run", "--threads", "1,{n}"]),
])
def test_threads_have_one_upper_bound(prog: str, module: str, args: list[str], bundled_model: Path,
                                      sample_scans: list[Path]):
    import importlib

    from edge.backend import MAX_THREADS

    main = importlib.import_module(module).main
    fill = {"scan": sample_scans[0], "model": bundled_model, "dir": sample_scans[0].parent}
    result = CliRunner().invoke(main, [a.format(n=MAX_THREADS + 1, **fill) for a in args], prog_name=prog)
    assert result.exit_code == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"{prog}: error: ") and "--threads" in line and str(MAX_THREADS) in line


def test_threads_at_the_bound_run_and_the_api_refuses_more(cli, bundled_model: Path, sample_scans: list[Path]):
    from edge import Classifier
    from edge.backend import MAX_THREADS
    from edge.errors import BackendError

    assert cli("--model", bundled_model, "--threads", MAX_THREADS, sample_scans[0]).exit_code == 0
    with pytest.raises(BackendError, match=f"1 to {MAX_THREADS}"):
        Classifier(bundled_model, threads=MAX_THREADS + 1)


def test_an_image_named_dcm_is_decoded_by_its_content(cli, bundled_model: Path, sample_scans: list[Path],
                                                      tmp_path: Path):
    from PIL import Image

    from edge import Classifier

    jpeg = tmp_path / "photo.dcm"
    jpeg.write_bytes(sample_scans[0].read_bytes())
    png = tmp_path / "export.DICOM"
    Image.open(sample_scans[0]).save(png, format="PNG")
    result = cli("--model", bundled_model, "--json", jpeg, png, sample_scans[0])
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["status"] for r in records] == ["ok"] * 3
    assert len({r["label"] for r in records}) == 1, "the same pixels, whatever the name"
    assert Classifier(bundled_model).classify(png).label == records[2]["label"]


@pytest.fixture()
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "model.tflite"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("special", ["fifo", "/dev/zero"])
@pytest.mark.parametrize("module, args", [
    ("edge.cli", ["--model", "{model}", "{scan}"]),
    ("benchmarks.cli", ["run", "--model", "{model}", "--runs", "1", "--cold-starts", "0"]),
    ("convert.evaluate_cli", ["{model}", "{dir}"]),
])
def test_a_model_that_is_a_pipe_or_a_device_is_one_line_at_once(special: str, module: str, args: list[str],
                                                                 request: pytest.FixtureRequest,
                                                                 sample_scans: list[Path]):
    model = request.getfixturevalue("fifo") if special == "fifo" else Path(special)
    fill = {"model": model, "scan": sample_scans[0], "dir": sample_scans[0].parent}
    done = run(module, *[a.format(**fill) for a in args], timeout=60)  # a blocked read would time out
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert f"{model}: not a regular file (a pipe, socket or device)" in line, line


def test_watch_text_lines_honour_top_k(cli, bundled_model: Path, sample_scans: list[Path], tmp_path: Path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(sample_scans[0], inbox)
    result = cli("--model", bundled_model, "--watch", inbox, "--out", tmp_path / "r.jsonl", "--once",
                 "--settle", "0", "--top-k", "3")
    assert result.exit_code == 0, result.stderr
    (line,) = result.stdout.splitlines()
    assert line.count("%") == 3, f"verdict and two runners-up: {line}"
    (record,) = [json.loads(r) for r in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(record["top_k"]) == 3


def test_bench_report_never_prints_none(bundled_model: Path, tmp_path: Path):
    """On this device and on one that exposes nothing (no cpufreq, no thermal zones, unknown CPU)."""
    from benchmarks import report

    done = run("benchmarks.cli", "run", "--model", bundled_model, "--threads", "1", "--runs", "2", "--rounds", "1",
               "--warmup", "0", "--cold-starts", "0", "--out", tmp_path / "s.json")
    assert done.returncode == 0, done.stderr
    assert "None" not in done.stdout
    session = json.loads((tmp_path / "s.json").read_text())
    fp = session["fingerprint"]
    fp.update(cpu=None, kernel=None, jetson_power_mode=None, frequency={"governor": None, "max_mhz": None},
              thermal={"start": {"zones_c": None}, "end": {"zones_c": None}})
    text = report.markdown(session)
    assert "None" not in text and "{" not in text
    assert "- thermal at start: -" in text and "governor -, max -" in text
    fp["thermal"]["end"] = {"zones_c": {"cpu-thermal": 51.25}, "throttled": {"throttled_now": False}}
    assert "- thermal at end: cpu-thermal 51.2 C, throttled now: no" in report.markdown(session)


@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_a_closed_pipe_ends_quietly_with_141(bundled_model: Path, sample_scans: list[Path], extra: list[str]):
    """`edge-classify ... | head -1`: the reader is gone before the output is (here: before the first line)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    code = "from edge.cli import main\nmain(prog_name='edge-classify')\n"
    done = subprocess.run([sys.executable, "-c", code, "--model", str(bundled_model), *extra,
                           *map(str, sample_scans)], stdout=write_end, stderr=subprocess.PIPE, text=True,
                          timeout=120, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    os.close(write_end)
    assert done.returncode == 141, done.stderr
    assert errors_and_notices(done.stderr) == [], "no traceback, no 'Exception ignored', no error line"


def test_a_closed_stdout_is_no_traceback(bundled_model: Path, sample_scans: list[Path]):
    """`edge-classify ... >&-`: Python starts with sys.stdout None; the results have nowhere to go."""
    code = "from edge.cli import main\nmain(prog_name='edge-classify')\n"
    done = subprocess.run([sys.executable, "-c", code, "--model", str(bundled_model), str(sample_scans[0])],
                          preexec_fn=lambda: os.close(1), stderr=subprocess.PIPE, text=True, timeout=120,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert "Traceback" not in done.stderr and errors_and_notices(done.stderr) == []
    assert done.returncode == 0
