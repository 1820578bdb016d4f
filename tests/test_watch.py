"""edge.watch with a real int8 model: exactly-once results across SIGKILL, slow writers and bad files."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge.classifier import Classifier
from edge.errors import EdgeError, InputError
from edge.watch import watch

LABELS = {"glioma", "meningioma", "notumor", "pituitary"}
IGNORED = (".hidden.jpg", "upload.jpg.part", "copying.tmp")


def results(out: Path) -> list[dict]:
    """Every line of the results file, insisting that the file is intact (complete lines, valid JSON)."""
    raw = out.read_bytes()
    assert raw == b"" or raw.endswith(b"\n"), "the results file ends in a torn line"
    return [json.loads(line) for line in raw.decode("utf-8").splitlines()]


def per_file(records: list[dict]) -> Counter:
    return Counter(Path(r["source"]).name for r in records)


def big_jpeg(sample: Path, size: int = 1024) -> bytes:
    """A real scan enlarged, so that decoding takes long enough for a kill to land mid-batch."""
    import io

    buffer = io.BytesIO()
    Image.open(sample).convert("L").resize((size, size), Image.BILINEAR).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def fill_inbox(inbox: Path, samples: list[Path]) -> tuple[list[str], list[str]]:
    """Good scans, bad files and files to be ignored; returns (good names, bad names)."""
    good = []
    for i, sample in enumerate(samples):
        name = f"scan-{i:02d}{sample.suffix}"
        (inbox / name).write_bytes(sample.read_bytes())
        good.append(name)
    (inbox / "garbage.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, np.uint8).tobytes())
    (inbox / "empty.png").write_bytes(b"")
    (inbox / "cut.jpg").write_bytes(samples[0].read_bytes()[:300])
    (inbox / "notes.txt").write_text("not a scan\n")
    bad = ["garbage.jpg", "empty.png", "cut.jpg", "notes.txt"]
    try:
        from pydicom.data import get_testdata_file

        (inbox / "mr.dcm").write_bytes(Path(get_testdata_file("MR_small.dcm")).read_bytes())
        (inbox / "mr-truncated.dcm").write_bytes(Path(get_testdata_file("MR_truncated.dcm")).read_bytes())
        good.append("mr.dcm")
        bad.append("mr-truncated.dcm")
    except ImportError:
        pass
    for name in IGNORED:
        (inbox / name).write_bytes(samples[0].read_bytes())
    return good, bad


def check_exactly_once(records: list[dict], good: list[str], bad: list[str]) -> None:
    counts = per_file(records)
    assert counts == Counter(good + bad), "each file exactly one line, ignored files none"
    for record in records:
        name = Path(record["source"]).name
        if name in good:
            assert record["status"] == "ok", record
            assert record["label"] in LABELS
            assert abs(sum(record["probabilities"].values()) - 1) < 0.02
        else:
            assert record["status"] == "error", record
            assert record["error"] and "\n" not in record["error"]
        assert record["size"] == (Path(record["source"])).stat().st_size


@pytest.fixture(scope="module")
def classifier(tiny_model_path):
    return Classifier(tiny_model_path)


@pytest.fixture()
def inbox(tmp_path):
    folder = tmp_path / "inbox"
    folder.mkdir()
    return folder


def test_once_handles_good_bad_and_ignored_files(classifier, inbox, sample_scans):
    good, bad = fill_inbox(inbox, sample_scans)
    out = inbox / "results.jsonl"  # inside the inbox: must not be classified itself
    emitted = []
    written = watch(classifier, inbox, out, settle_seconds=0, poll_interval=0.05, once=True, emit=emitted.append)
    records = results(out)
    assert written == len(records) == len(good) + len(bad)
    assert emitted == records
    check_exactly_once(records, good, bad)
    errors = {Path(r["source"]).name: r["error"] for r in records if r["status"] == "error"}
    assert "empty" in errors["empty.png"]
    before = out.read_bytes()
    assert watch(classifier, inbox, out, settle_seconds=0, poll_interval=0.05, once=True) == 0
    assert out.read_bytes() == before, "a second run repeats nothing"


def test_a_replaced_file_is_a_new_version(classifier, inbox, sample_scans):
    (inbox / "a.jpg").write_bytes(sample_scans[0].read_bytes())
    out = inbox.parent / "results.jsonl"
    assert watch(classifier, inbox, out, settle_seconds=0, once=True) == 1
    (inbox / "a.jpg").write_bytes(sample_scans[1].read_bytes())
    os.utime(inbox / "a.jpg", ns=(time.time_ns(), time.time_ns() + 5_000_000_000))
    assert watch(classifier, inbox, out, settle_seconds=0, once=True) == 1
    first, second = results(out)
    assert first["source"] == second["source"]
    assert (first["size"], first["mtime_ns"]) != (second["size"], second["mtime_ns"])


def test_a_torn_last_line_is_cut_and_its_file_redone(classifier, inbox, sample_scans):
    good, bad = fill_inbox(inbox, sample_scans[:3])
    out = inbox.parent / "results.jsonl"
    watch(classifier, inbox, out, settle_seconds=0, once=True)
    raw = out.read_bytes()
    out.write_bytes(raw[:-25])  # as if killed in the middle of writing the last line
    assert watch(classifier, inbox, out, settle_seconds=0, once=True) == 1
    check_exactly_once(results(out), good, bad)


def test_a_slowly_written_file_is_read_only_once_complete(classifier, inbox, sample_scans):
    data = big_jpeg(sample_scans[0])
    target = inbox / "slow.jpg"
    started = threading.Event()

    def writer():
        with target.open("wb") as fh:
            for i in range(0, len(data), len(data) // 10 + 1):
                fh.write(data[i:i + len(data) // 10 + 1])
                fh.flush()
                started.set()
                time.sleep(0.3)

    thread = threading.Thread(target=writer)
    thread.start()
    assert started.wait(10)
    try:
        written = watch(classifier, inbox, inbox.parent / "r.jsonl", settle_seconds=1.0, poll_interval=0.1,
                        once=True)
    finally:
        thread.join()
    (record,) = results(inbox.parent / "r.jsonl")
    assert written == 1
    assert record["status"] == "ok", record
    assert record["size"] == len(data)


class GrowsWhileRead:
    """The real classifier, but the scan's writer appends to it during the first classification."""

    def __init__(self, classifier: Classifier):
        self.classifier = classifier
        self.calls = 0

    def classify(self, path):
        self.calls += 1
        result = self.classifier.classify(path)
        if self.calls == 1:
            with open(path, "ab") as fh:
                fh.write(b"\0" * 100)  # bytes after the JPEG end marker: still a valid JPEG
        return result


def test_a_file_that_changes_while_being_read_waits_and_is_read_again(classifier, inbox, sample_scans):
    (inbox / "a.jpg").write_bytes(sample_scans[0].read_bytes())
    growing = GrowsWhileRead(classifier)
    assert watch(growing, inbox, inbox.parent / "r.jsonl", settle_seconds=0.2, poll_interval=0.05, once=True) == 1
    (record,) = results(inbox.parent / "r.jsonl")
    assert growing.calls == 2
    assert record["size"] == (inbox / "a.jpg").stat().st_size


def test_a_second_watcher_on_the_same_results_is_refused(classifier, inbox, sample_scans):
    (inbox / "a.jpg").write_bytes(sample_scans[0].read_bytes())
    out = inbox.parent / "r.jsonl"
    stop, first_result = threading.Event(), threading.Event()
    thread = threading.Thread(target=watch, args=(classifier, inbox, out),
                              kwargs=dict(settle_seconds=0, poll_interval=0.05, stop=stop,
                                          emit=lambda record: first_result.set()))
    thread.start()
    try:
        assert first_result.wait(30)
        with pytest.raises(EdgeError, match="another watch"):
            watch(classifier, inbox, out, once=True)
        (inbox / "b.jpg").write_bytes(sample_scans[1].read_bytes())
        deadline = time.monotonic() + 30
        while len(results(out)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive(), "setting stop ends a running watch"
    assert per_file(results(out)) == Counter(["a.jpg", "b.jpg"]), "a running watch picks up new files"


def test_a_missing_folder_is_an_input_error(classifier, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        watch(classifier, tmp_path / "absent", tmp_path / "r.jsonl", once=True)


def start_watch(model: Path, inbox: Path, out: Path, log: Path, *, once: bool) -> subprocess.Popen:
    """The real `edge-classify --watch`, as the systemd unit runs it (JSON records go to `log`)."""
    args = ["--watch", str(inbox), "--out", str(out), "--model", str(model), "--json"] + (["--once"] if once else [])
    with log.open("w") as stdout:
        return subprocess.Popen([sys.executable, "-m", "edge.cli", *args], stdout=stdout,
                                stderr=subprocess.PIPE, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))


def wait_for_lines(out: Path, count: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if out.exists() and out.read_bytes().count(b"\n") >= count:
            return
        if process.poll() is not None:
            pytest.fail(f"watch exited early ({process.returncode}): {process.stderr.read()}")
        time.sleep(0.01)
    pytest.fail(f"no {count} results within {timeout} s")


def test_sigkill_and_restart_neither_repeat_nor_lose_a_result(tiny_model_path, inbox, sample_scans):
    good, bad = fill_inbox(inbox, sample_scans)
    big = big_jpeg(sample_scans[0])
    for i in range(24):
        (inbox / f"big-{i:02d}.jpg").write_bytes(big)
        good.append(f"big-{i:02d}.jpg")
    slow = inbox / "slow.jpg"
    done_writing = threading.Event()

    def writer():
        with slow.open("wb") as fh:
            for i in range(0, len(big), 4096):
                fh.write(big[i:i + 4096])
                fh.flush()
                time.sleep(0.25 * 4096 * 12 / len(big))  # about 3 s in all
        done_writing.set()

    thread = threading.Thread(target=writer)
    thread.start()
    good.append("slow.jpg")
    out = inbox.parent / "results.jsonl"
    log = inbox.parent / "stdout.jsonl"
    try:
        killed_at = []
        for target in (5, 15):
            process = start_watch(tiny_model_path, inbox, out, log, once=False)
            wait_for_lines(out, target, process)
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            killed_at.append(out.read_bytes().count(b"\n"))  # complete lines; a torn tail is the restart's job
        assert killed_at[-1] < len(good) + len(bad), "the kills landed before the work was done"
        thread.join()
        assert done_writing.is_set()
        process = start_watch(tiny_model_path, inbox, out, log, once=True)
        _, stderr = process.communicate(timeout=120)
    finally:
        thread.join()
    records = results(out)
    check_exactly_once(records, good, bad)
    last_run = [json.loads(line) for line in log.read_text().splitlines()]
    assert last_run == records[killed_at[-1]:], "the restarted run reports exactly the lines it added"
    failed = any(r["status"] == "error" for r in last_run)
    assert process.returncode == (1 if failed else 0), stderr
    assert "Traceback" not in stderr


# --- an unusable --out is one line, exit 2, at once (never a traceback, a hang or a 5 GB "journal") -------

@pytest.fixture()
def one_scan_inbox(inbox, sample_scans):
    (inbox / "a.jpg").write_bytes(sample_scans[0].read_bytes())
    return inbox


def assert_refused(result_code: int, stdout: str, stderr: str, out: Path, problem: str) -> None:
    assert result_code == 2 and stdout == ""
    assert stderr.splitlines() == [f"edge-classify: error: {out}: {problem}"], stderr


@pytest.mark.parametrize("device", ["/dev/null", "/dev/full", "fifo"])
def test_out_that_is_not_a_regular_file_is_refused(cli, tiny_model_path, one_scan_inbox, tmp_path, device):
    out = Path(device)
    if device == "fifo":
        out = tmp_path / "results.fifo"
        os.mkfifo(out)
    elif not out.exists():
        pytest.skip(f"{device} does not exist here")
    kind = "a FIFO (named pipe)" if device == "fifo" else "a character device"
    result = cli("--model", tiny_model_path, "--watch", one_scan_inbox, "--out", out, "--once")
    assert_refused(result.exit_code, result.stdout, result.stderr, out,
                   f"the results file must be a regular file, not {kind}")


def test_out_dev_zero_is_refused_without_reading_it(run_cli, tiny_model_path, one_scan_inbox):
    """In a child process: reading /dev/zero as the journal would never end (the timeout only guards that)."""
    if not Path("/dev/zero").exists():
        pytest.skip("/dev/zero does not exist here")
    try:
        proc = run_cli("--model", tiny_model_path, "--watch", one_scan_inbox, "--out", "/dev/zero", "--once",
                       timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("--out /dev/zero hangs")
    assert_refused(proc.returncode, proc.stdout, proc.stderr, Path("/dev/zero"),
                   "the results file must be a regular file, not a character device")


def test_out_in_a_folder_that_cannot_be_created(run_cli, tiny_model_path, one_scan_inbox, tmp_path, unprivileged):
    locked = tmp_path / "read-only"
    locked.mkdir()
    locked.chmod(0o500)
    out = locked / "sub" / "results.jsonl"
    proc = run_cli("--model", tiny_model_path, "--watch", one_scan_inbox, "--out", out, "--once", **unprivileged)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"edge-classify: error: {out.parent}: cannot create the folder of the results file (Permission denied)"]


def test_a_results_file_that_cannot_grow_stops_the_watch(run_cli, tiny_model_path, one_scan_inbox, tmp_path):
    """A full disk, for real: the child may not write one more byte to a file (RLIMIT_FSIZE, EFBIG), the
    same write failure as ENOSPC. Nothing is reported as done, so the scan is classified on the next run."""
    import resource

    out = tmp_path / "results.jsonl"
    out.write_bytes(b"")

    def no_room() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))

    proc = run_cli("--model", tiny_model_path, "--watch", one_scan_inbox, "--out", out, "--once", "--json",
                   preexec_fn=no_room)
    assert_refused(proc.returncode, proc.stdout, proc.stderr, out, "cannot write the results file (File too large)")
    assert out.read_bytes() == b""


# --- only the file's own faults are final; what may pass is retried; a pausing writer gets one line --------

class FinishesTheWriter:
    """The real classifier; classifying `trigger` makes the paused writer of `target` write the rest.

    Deterministic stand-in for a writer that pauses longer than the settle time: `target` is read while
    incomplete, fails, and is completed before the watch looks at it again."""

    def __init__(self, classifier: Classifier, trigger: str, target: Path, rest: bytes):
        self.classifier, self.trigger, self.target, self.rest = classifier, trigger, target, rest

    def classify(self, path):
        if Path(path).name == self.trigger and self.rest:
            with self.target.open("ab") as fh:
                fh.write(self.rest)
            self.rest = b""
        return self.classifier.classify(path)


def test_a_writer_pausing_past_the_settle_time_gets_one_ok_line(classifier, inbox, sample_scans):
    data = big_jpeg(sample_scans[0])
    slow, other = inbox / "a-slow.jpg", inbox / "b-other.jpg"
    slow.write_bytes(data[: len(data) // 2])
    other.write_bytes(sample_scans[1].read_bytes())
    past = time.time_ns() - 10_000_000_000
    os.utime(slow, ns=(past, past))  # read first (oldest first), and so while still half written
    os.utime(other, ns=(past + 1, past + 1))
    out = inbox.parent / "r.jsonl"
    watcher = FinishesTheWriter(classifier, other.name, slow, data[len(data) // 2:])
    watch(watcher, inbox, out, settle_seconds=0.2, poll_interval=0.05, once=True)
    records = results(out)
    assert per_file(records) == Counter([slow.name, other.name]), "no error line before the ok line"
    assert {r["status"] for r in records} == {"ok"}
    assert next(r for r in records if r["source"] == str(slow))["size"] == len(data)


def test_a_dicom_dropped_before_pydicom_is_installed_is_retried(classifier, inbox, monkeypatch):
    pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    (inbox / "mr.dcm").write_bytes(Path(get_testdata_file("MR_small.dcm")).read_bytes())
    out = inbox.parent / "r.jsonl"
    monkeypatch.setitem(sys.modules, "pydicom", None)  # as on a board where `.[dicom]` is not installed yet
    emitted = []
    assert watch(classifier, inbox, out, settle_seconds=0, once=True, emit=emitted.append) == 0
    (record,) = emitted
    assert record["status"] == "error" and record["retry"] is True and "pydicom" in record["error"]
    assert results(out) == [], "a failure that may pass is not recorded"
    monkeypatch.undo()  # pydicom installed; the service restarts
    assert watch(classifier, inbox, out, settle_seconds=0, once=True) == 1
    (done,) = results(out)
    assert done["status"] == "ok" and done["source"] == str(inbox / "mr.dcm")


def test_an_unreadable_file_is_reported_then_classified_once_readable(run_cli, tiny_model_path, inbox, sample_scans,
                                                                      unprivileged):
    locked, good = inbox / "locked.jpg", inbox / "good.jpg"
    locked.write_bytes(sample_scans[0].read_bytes())
    good.write_bytes(sample_scans[1].read_bytes())
    locked.chmod(0)
    out = inbox.parent / "results.jsonl"
    args = ("--model", tiny_model_path, "--watch", inbox, "--out", out, "--once", "--settle", "0")
    first = run_cli(*args, **unprivileged)
    assert first.returncode == 1
    assert first.stderr.splitlines() == [
        f"edge-classify: error: {locked}: permission denied (not recorded; tried again later)"]
    assert per_file(results(out)) == Counter([good.name])
    locked.chmod(0o644)
    second = run_cli(*args, **unprivileged)
    assert second.returncode == 0, second.stderr
    assert per_file(results(out)) == Counter([good.name, locked.name])
    assert all(r["status"] == "ok" for r in results(out))
