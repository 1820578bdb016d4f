"""The measured process: one model at one thread count, driven by `edge-bench run` over stdin/stdout.

Measuring in a child keeps the harness out of the numbers: its imports (click, matplotlib, TensorFlow for
the Keras reference of another configuration) never inflate this process's peak RSS, and a model's
interpreter threads never share a process with another model's. Only the standard library and the
runner (``edge`` or the Keras reference) are imported here; memory is read from /proc on Linux and
only falls back to psutil elsewhere.

Protocol: the configuration is JSON in ``argv[1]`` (``kind``, ``model``, ``threads``, ``images``, ``warmup``,
``cold``, and for ``kind == "keras"`` the reference ``style``: see `benchmarks.keras_reference.STYLES`);
replies are JSON lines on the original stdout (the child's fd 1 is pointed at stderr first, so a backend
that prints cannot corrupt the protocol).
Commands, one JSON line each on stdin: ``round`` (classify ``runs`` scans from ``offset``), ``soak``
(classify for ``seconds``, streaming a ``sample`` event every ``sample_s``), ``finish``.
With ``"cold": true`` the process loads, classifies one scan, prints one line and exits: the parent
times that from spawn to the line, which is a user's cold start.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, TextIO

from edge.errors import InputError

MB = 1024.0 * 1024.0


def _protocol_stream() -> TextIO:
    """Keep the real stdout for replies and send anything else written to fd 1 to stderr."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def _reply(out: TextIO, event: str, **payload: Any) -> None:
    out.write(json.dumps({"event": event, **payload}) + "\n")
    out.flush()


def import_runner(kind: str) -> type:
    """Import what a configuration needs (for TFLite, the interpreter module too), so load time is the model's.

    Returns the class whose constructor loads a model (see `load_runner`): `edge.Classifier`, or the
    Keras reference for ``kind == "keras"``.
    """
    if kind == "keras":
        import keras  # noqa: F401
        import tensorflow  # noqa: F401

        from benchmarks.keras_reference import KerasGradCam

        return KerasGradCam
    from edge import Classifier
    from edge.backend import find_backend

    find_backend()
    return Classifier


def load_runner(runner_class: type, cfg: dict[str, Any]) -> Any:
    """Load the configuration's model; a Keras reference also gets its style (compiled or predict + tape)."""
    if cfg["kind"] == "keras":
        return runner_class(cfg["model"], threads=cfg["threads"], style=cfg["style"])
    return runner_class(cfg["model"], threads=cfg["threads"])


def memory_mb() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MB: /proc/self/status on Linux, psutil/resource elsewhere."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024.0, int(fields["VmHWM"].split()[0]) / 1024.0
    except (OSError, KeyError, ValueError):
        import psutil

        rss = psutil.Process().memory_info().rss / MB
        try:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak_mb = peak / MB if sys.platform == "darwin" else peak / 1024.0
        except ImportError:
            peak_mb = rss
        return rss, max(rss, peak_mb)


def measure(classify: Callable[[str], Any], image: str) -> tuple[Any, dict[str, float]]:
    """Classify one scan; return the result and its stage timings plus the harness's end-to-end ms."""
    t0 = time.perf_counter()
    result = classify(image)
    e2e = (time.perf_counter() - t0) * 1000.0
    timings = {k: float(v) for k, v in result.timings.items()}
    timings["end_to_end"] = e2e
    return result, timings


class _Session:
    """A loaded runner plus the per-scan bookkeeping shared by rounds and the soak."""

    def __init__(self, cfg: dict[str, Any], out: TextIO):
        self.cfg, self.out = cfg, out
        self.images: list[str] = cfg["images"]
        self.skipped: dict[str, str] = {}
        t0 = time.perf_counter()
        runner_class = import_runner(cfg["kind"])
        t1 = time.perf_counter()
        self.runner = load_runner(runner_class, cfg)
        self.import_ms = (t1 - t0) * 1000.0
        self.load_ms = (time.perf_counter() - t1) * 1000.0
        self.last = None

    def scan(self, index: int) -> dict[str, float] | None:
        """Classify image ``index`` (cycling); a scan the runtime rejects is recorded once and skipped."""
        path = self.images[index % len(self.images)]
        if path in self.skipped:
            return None
        try:
            self.last, timings = measure(self.runner.classify, path)
        except InputError as exc:
            self.skipped[path] = str(exc)
            return None
        return timings

    def first(self) -> float:
        """Time of the first classification after load (lazy allocations, caches, delegate set-up)."""
        for i in range(len(self.images)):
            t = self.scan(i)
            if t is not None:
                return t["end_to_end"]
        raise RuntimeError("the runtime rejected every scan: " + "; ".join(self.skipped.values()))

    def run_round(self, offset: int, runs: int) -> dict[str, Any]:
        timings: dict[str, list[float]] = {}
        t0 = time.perf_counter()
        done = 0
        for i in range(offset, offset + runs):
            t = self.scan(i)
            if t is None:
                continue
            done += 1
            for k, v in t.items():
                timings.setdefault(k, []).append(round(v, 4))
        wall = time.perf_counter() - t0
        rss, _ = memory_mb()
        return {"timings": timings, "scans": done, "wall_s": wall, "rss_mb": rss}

    def soak(self, offset: int, seconds: float, sample_s: float) -> dict[str, Any]:
        times, lat, rss = [], [], [[0.0, memory_mb()[0]]]
        t0 = time.perf_counter()
        next_sample = sample_s
        i = offset
        while True:
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds:
                break
            t = self.scan(i)
            i += 1
            if t is not None:
                times.append(round(elapsed, 3))
                lat.append(round(t["end_to_end"], 4))
            if elapsed >= next_sample:
                rss.append([round(elapsed, 3), memory_mb()[0]])
                _reply(self.out, "sample", t=elapsed, scans=len(lat), rss_mb=rss[-1][1])
                next_sample += sample_s
        rss.append([round(time.perf_counter() - t0, 3), memory_mb()[0]])
        return {"t_s": times, "end_to_end_ms": lat, "rss_mb": rss}


def _cold(cfg: dict[str, Any], out: TextIO) -> None:
    runner = load_runner(import_runner(cfg["kind"]), cfg)
    runner.classify(cfg["images"][0])
    out.write("ok\n")
    out.flush()


def main() -> int:
    cfg = json.loads(sys.argv[1])
    out = _protocol_stream()
    if cfg.get("cold"):
        _cold(cfg, out)
        return 0
    try:
        session = _Session(cfg, out)
        first_ms = session.first()
        for i in range(cfg["warmup"]):
            session.scan(i + 1)
        last = session.last
        rss, _ = memory_mb()
        _reply(out, "ready", import_ms=session.import_ms, load_ms=session.load_ms, first_ms=first_ms, rss_mb=rss,
               model_name=last.model, model_sha256=last.model_sha256, backend=last.backend,
               backend_version=last.backend_version)
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["cmd"] == "round":
                _reply(out, "round", **session.run_round(cmd["offset"], cmd["runs"]))
            elif cmd["cmd"] == "soak":
                _reply(out, "soak", **session.soak(cmd["offset"], cmd["seconds"], cmd["sample_s"]))
            elif cmd["cmd"] == "finish":
                rss, peak = memory_mb()
                _reply(out, "final", rss_mb=rss, peak_rss_mb=peak, skipped=session.skipped)
                return 0
        return 0
    except Exception as exc:  # noqa: BLE001 - every failure must reach the parent as one line
        _reply(out, "error", type=type(exc).__name__, message=str(exc) or repr(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())
