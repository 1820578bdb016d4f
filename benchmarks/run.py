"""Orchestrate one benchmark session: workers per model x threads, interleaved rounds, cold starts, soak.

Every configuration (a model under test or a reference, at one thread count) lives in its own
`benchmarks.worker` child for the whole session. Children are loaded one after another, then measured in
R rounds; in each round every configuration classifies the same slice of scans, in an order rotated per
round. Interleaving spreads slow drifts (thermal, governor, other load) over all configurations instead
of charging them to whichever ran last, and the per-round medians give `compare` a noise-resistant figure.
Only one child computes at a time; the others sleep on a pipe.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edge.decode import IMAGE_SUFFIXES
from edge.dicom import is_dicom

from . import soak as soak_mod
from .fingerprint import device_fingerprint, thermal_state
from .stats import STAGES, stage_report

SCHEMA = "edge-bench/1"
#: How long a child that closed its pipe (or printed its cold-start line) may take to exit.
EXIT_TIMEOUT_S = 60.0


class BenchError(Exception):
    """A benchmark could not run (no scans, a worker failed); the CLI prints it as one line."""


@dataclass(frozen=True)
class Config:
    """One measured configuration."""

    label: str | None  # None: the model's own name, known once the worker has loaded it
    role: str  # "model" (judged against the budget) or "reference" (reported as a ratio)
    kind: str  # "tflite" (through edge.Classifier) or "keras" (benchmarks.keras_reference)
    path: Path
    threads: int
    style: str | None = None  # kind "keras" only: "compiled" or "predict" (benchmarks.keras_reference.STYLES)


def find_images(directory: Path) -> list[Path]:
    """Scans under ``directory`` (recursively): image/DICOM suffixes or DICOM magic, sorted for a stable order."""
    if not directory.is_dir():
        raise BenchError(f"{directory}: not a directory of scans")
    found = sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and (p.suffix.lower() in IMAGE_SUFFIXES or (not p.suffix and is_dicom(p))))
    if not found:
        raise BenchError(f"{directory}: no scans ({', '.join(IMAGE_SUFFIXES)} or DICOM); "
                         "give --images DIR with a few real scans")
    return found


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _worker_config(cfg: Config, images: list[Path], warmup: int, cold: bool = False) -> str:
    return json.dumps({"kind": cfg.kind, "style": cfg.style, "model": str(cfg.path), "threads": cfg.threads,
                       "images": [str(p) for p in images], "warmup": warmup, "cold": cold})


class Worker:
    """A running `benchmarks.worker` child and its JSON-lines pipe."""

    def __init__(self, cfg: Config, images: list[Path], warmup: int):
        self.cfg = cfg
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.worker", _worker_config(cfg, images, warmup)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True, bufsize=1,
            env=_env())

    def _fail(self, message: str) -> BenchError:
        self.stderr.seek(0)
        tail = [ln for ln in self.stderr.read().decode("utf-8", "replace").splitlines() if ln.strip()]
        self.close()
        detail = f" ({tail[-1].strip()})" if tail and message.startswith("worker") else ""
        message = message.removeprefix(f"{self.cfg.path}: ")
        return BenchError(f"{self.cfg.path} [threads={self.cfg.threads}]: {message}{detail}")

    def read(self) -> dict[str, Any]:
        """Next event; a worker error or an early exit becomes a :class:`BenchError`."""
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=EXIT_TIMEOUT_S)
            raise self._fail(f"worker exited with code {self.proc.returncode}")
        msg = json.loads(line)
        if msg["event"] == "error":
            raise self._fail(msg["message"])
        return msg

    def send(self, **cmd: Any) -> None:
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise self._fail("worker exited unexpectedly") from None

    def request(self, **cmd: Any) -> dict[str, Any]:
        self.send(**cmd)
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


def cold_start_ms(cfg: Config, image: Path) -> float:
    """Wall-clock ms from spawning a fresh Python to its first classification result (one sample)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.worker",
                             _worker_config(cfg, [image], 0, cold=True)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    line = proc.stdout.readline()
    elapsed = (time.perf_counter() - t0) * 1000.0
    _, err = proc.communicate(timeout=EXIT_TIMEOUT_S)
    if line.strip() != "ok":
        last = (err.strip().splitlines() or ["no output"])[-1]
        raise BenchError(f"{cfg.path} [threads={cfg.threads}]: cold start failed ({last})")
    return elapsed


def rounds_plan(runs: int, rounds: int) -> tuple[int, int]:
    """(rounds, scans per round) covering at least ``runs`` measured scans."""
    rounds = max(1, min(rounds, runs))
    return rounds, math.ceil(runs / rounds)


def _result(cfg: Config, ready: dict, final: dict, rounds: list[dict], cold: list[float]) -> dict[str, Any]:
    stages = {}
    for stage in STAGES:
        per_round = [r["timings"].get(stage, []) for r in rounds]
        if any(per_round):
            stages[stage] = stage_report(per_round)
    scans = sum(r["scans"] for r in rounds)
    wall = sum(r["wall_s"] for r in rounds)
    rss_start = ready["rss_mb"]
    return {
        "label": cfg.label or ready["model_name"],
        "role": cfg.role,
        "kind": cfg.kind,
        "threads": cfg.threads,
        "model": {"name": ready["model_name"], "path": str(cfg.path), "sha256": ready["model_sha256"],
                  "size_bytes": cfg.path.stat().st_size},
        "backend": {"name": ready["backend"], "version": ready["backend_version"]},
        "scans": scans,
        "stages": stages,
        "samples_ms": {"end_to_end": [v for r in rounds for v in r["timings"].get("end_to_end", [])]},
        "import_ms": ready["import_ms"],
        "load_ms": ready["load_ms"],
        "first_inference_ms": ready["first_ms"],
        "cold_start_ms": float(np.median(cold)) if cold else None,
        "cold_start_samples_ms": cold,
        "throughput_scans_per_s": scans / wall if wall > 0 else None,
        "memory": {"peak_rss_mb": final["peak_rss_mb"], "rss_after_warmup_mb": rss_start,
                   "rss_end_mb": final["rss_mb"], "rss_growth_mb": final["rss_mb"] - rss_start},
        "skipped_scans": final.get("skipped", {}),
        "soak": None,
    }


def _unique_labels(results: list[dict]) -> None:
    """Two models under test with the same embedded name (say int8 and fp16 builds) get their file stem added."""
    for res in results:
        twins = [r for r in results if r["label"] == res["label"] and r["threads"] == res["threads"]]
        if len(twins) > 1:
            for r in twins:
                r["label"] = f"{r['label']} ({Path(r['model']['path']).stem})"


def judge(results: list[dict], budget_ms: float) -> None:
    """Verdict per model under test (end-to-end p99 within budget) and ratios of references to it."""
    for res in results:
        if res["role"] != "model":
            res["verdict"] = None
            continue
        p99 = res["stages"]["end_to_end"]["p99"]
        res["budget_ms"] = budget_ms
        res["verdict"] = "PASS" if p99 is not None and p99 <= budget_ms else "FAIL"
        res["ratios"] = {}
        for ref in results:
            if ref["role"] == "reference" and ref["threads"] == res["threads"]:
                res["ratios"][ref["label"]] = ratios(ref, res)


def ratios(ref: dict, base: dict) -> dict[str, float | None]:
    """Reference / model for the figures a reader compares (2.0 = the reference is twice as slow/big)."""
    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    def p50(res: dict, stage: str) -> float | None:
        return res["stages"].get(stage, {}).get("p50")

    return {"end_to_end_p50": div(p50(ref, "end_to_end"), p50(base, "end_to_end")),
            "invoke_p50": div(p50(ref, "invoke"), p50(base, "invoke")),
            "peak_rss": div(ref["memory"]["peak_rss_mb"], base["memory"]["peak_rss_mb"]),
            "size": div(ref["model"]["size_bytes"], base["model"]["size_bytes"])}


def progress_length(configs: list[Config], rounds: int, cold_runs: int, soak_samples: int) -> int:
    """Units of the progress bar: one per worker load, round x config, cold start and soak sample."""
    soaked = sum(1 for c in configs if c.role == "model")
    return len(configs) * (1 + rounds + cold_runs) + soaked * soak_samples


def run_session(configs: list[Config], images: list[Path], *, runs: int, warmup: int, rounds: int,
                cold_runs: int, budget_ms: float, soak_s: float | None = None, sample_s: float = 10.0,
                advance: Callable[[int], None] = lambda n: None) -> dict[str, Any]:
    """Measure every configuration and return the JSON-ready session (schema :data:`SCHEMA`)."""
    rounds, per_round = rounds_plan(runs, rounds)
    thermal_start = thermal_state()
    started = datetime.now(timezone.utc)
    workers: list[Worker] = []
    try:
        ready = []
        for cfg in configs:
            workers.append(Worker(cfg, images, warmup))
            ready.append(workers[-1].read())
            advance(1)
        measured: list[list[dict]] = [[] for _ in configs]
        for r in range(rounds):
            shift = r % len(configs)
            for i in list(range(shift, len(configs))) + list(range(shift)):
                measured[i].append(workers[i].request(cmd="round", offset=r * per_round, runs=per_round))
                advance(1)
        soaks: dict[int, dict] = {}
        if soak_s:
            for i, cfg in enumerate(configs):
                if cfg.role == "model":
                    soaks[i] = _soak(workers[i], rounds * per_round, soak_s, sample_s, advance)
        finals = [w.request(cmd="finish") for w in workers]
    finally:
        for w in workers:
            w.close()
    cold: list[list[float]] = [[] for _ in configs]
    for _ in range(cold_runs):
        for i, cfg in enumerate(configs):
            cold[i].append(cold_start_ms(cfg, images[0]))
            advance(1)
    results = [_result(cfg, ready[i], finals[i], measured[i], cold[i]) for i, cfg in enumerate(configs)]
    for i, soak_raw in soaks.items():
        results[i]["soak"] = soak_mod.analyse(soak_raw["t_s"], soak_raw["end_to_end_ms"], soak_raw["rss_mb"],
                                              soak_s, sample_s)
    _unique_labels(results)
    judge(results, budget_ms)
    fingerprint = device_fingerprint()
    fingerprint["thermal"] = {"start": thermal_start, "end": thermal_state()}
    return {
        "schema": SCHEMA,
        "created": started.isoformat(timespec="seconds"),
        "seconds": round((datetime.now(timezone.utc) - started).total_seconds(), 1),
        "settings": {"runs": runs, "warmup": warmup, "rounds": rounds, "runs_per_round": per_round,
                     "cold_starts": cold_runs, "budget_ms": budget_ms, "soak_s": soak_s,
                     "sample_s": sample_s if soak_s else None,
                     "images": {"count": len(images), "first": str(images[0])}},
        "fingerprint": fingerprint,
        "results": results,
    }


def _soak(worker: Worker, offset: int, seconds: float, sample_s: float,
          advance: Callable[[int], None]) -> dict[str, Any]:
    worker.send(cmd="soak", offset=offset, seconds=seconds, sample_s=sample_s)
    expected = int(seconds // sample_s)
    seen = 0
    while True:
        msg = worker.read()
        if msg["event"] == "sample":
            if seen < expected:
                advance(1)
                seen += 1
            continue
        advance(expected - seen)
        return msg
