"""`edge-bench serve`: what a clinic's phones see from `edge-serve`, measured over loopback.

The real server is started as a subprocess (its own model, workers and queue, exactly as `edge-serve`
runs), warmed up, and then driven by 1, 4 and 16 concurrent clients in turn, each a thread with its own
keep-alive connection that uploads the sample scans one after another (POST /api/classify, overlay
included). Reported per client count: requests per second over the phase's wall clock, per-request
latency (min/p50/p90/p99/max), errors; and the server's peak RSS (VmHWM, Linux; sampled RSS elsewhere),
after each phase. The clients run on the same machine and share its cores with the server, so on a small
board the figures are a floor; what matters is their ratio between client counts and builds.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import click

import edge
from edge.cli_common import THREADS, NonEmptyPath, error

from .fingerprint import device_fingerprint
from .run import BenchError, find_images
from .stats import summarise

PROG = "edge-bench"
SCHEMA = "edge-bench-serve/1"
SAMPLES_DIR = Path(edge.__file__).resolve().parent / "samples"
DEFAULT_CLIENTS = (1, 4, 16)
START_TIMEOUT_S = 300
_READY = re.compile(r"^edge-serve: notice: serving .* at http://([^/\s]+):(\d+)/ ")


def _clients(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        values = []
    if not values or any(not 1 <= v <= 256 for v in values):
        raise click.BadParameter(f"{text!r}: give client counts from 1 to 256 like 1,4,16", param_hint="--clients")
    return values


class _Server:
    """`edge-serve` as a subprocess on a free loopback port; its stderr is drained by a thread."""

    def __init__(self, args: list[str]):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen([sys.executable, "-m", "edge.serve_cli", "--port", "0", *args], env=env,
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        text=True)
        self.lines: list[str] = []
        self.address: tuple[str, int] | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(START_TIMEOUT_S) or self.address is None:
            self.stop()
            raise BenchError("edge-serve did not start: " + (" | ".join(self.lines[-3:]) or "no output"))
        self._rss_samples: list[float] = []

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))
            match = _READY.match(line)
            if match and self.address is None:
                self.address = (match.group(1), int(match.group(2)))
                self._ready.set()
        self._ready.set()

    def peak_rss_mb(self) -> float:
        """Peak resident memory of the server process so far (VmHWM; psutil's current RSS elsewhere)."""
        try:
            with open(f"/proc/{self.process.pid}/status", encoding="ascii") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            return int(fields["VmHWM"].split()[0]) / 1024.0
        except (OSError, KeyError, ValueError):
            import psutil

            return psutil.Process(self.process.pid).memory_info().rss / (1024.0 * 1024.0)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)


def _body(data: bytes, name: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _client(address: tuple[str, int], bodies: list[tuple[bytes, str]], count: int, offset: int,
            latencies: list[float], errors: list[str]) -> None:
    """One client: ``count`` uploads over one keep-alive connection (a new one after any failure)."""
    connection = http.client.HTTPConnection(*address, timeout=120)
    for i in range(count):
        body, content_type = bodies[(offset + i) % len(bodies)]
        start = time.perf_counter()
        try:
            connection.request("POST", "/api/classify", body=body, headers={"Content-Type": content_type})
            response = connection.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            connection.close()
            connection = http.client.HTTPConnection(*address, timeout=120)
            continue
        elapsed = (time.perf_counter() - start) * 1000.0
        if response.status != 200:
            errors.append(f"HTTP {response.status}: {payload[:120]!r}")
            continue
        latencies.append(elapsed)
    connection.close()


def _phase(address: tuple[str, int], bodies: list[tuple[bytes, str]], clients: int, requests: int) -> dict[str, Any]:
    """``requests`` uploads shared by ``clients`` concurrent clients; throughput over the phase's wall clock."""
    shares = [requests // clients + (1 if i < requests % clients else 0) for i in range(clients)]
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    threads = [threading.Thread(target=_client, args=(address, bodies, shares[i], i, latencies[i], errors))
               for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    flat = [v for per_client in latencies for v in per_client]
    return {"clients": clients, "requests": requests, "errors": len(errors), "first_errors": errors[:3],
            "wall_s": wall, "requests_per_s": len(flat) / wall if wall > 0 else None, "latency_ms": summarise(flat)}


def run_serve_bench(*, model: str | None, threads: int, clients: list[int], requests: int, warmup: int,
                    images: Path) -> dict[str, Any]:
    """Start edge-serve, warm it up, measure each client count in turn; the whole session as a dict."""
    scans = find_images(images)
    bodies = [_body(p.read_bytes(), p.name) for p in scans]
    args = ["--threads", str(threads), "--queue", str(max(clients))] + (["--model", model] if model else [])
    server = _Server(args)
    assert server.address is not None
    try:
        warm: list[float] = []
        warm_errors: list[str] = []
        _client(server.address, bodies, warmup, 0, warm, warm_errors)
        if warm_errors:
            raise BenchError(f"edge-serve failed during warm-up: {warm_errors[0]}")
        rss_ready = server.peak_rss_mb()
        results = []
        for count in clients:
            result = _phase(server.address, bodies, count, requests)
            result["server_peak_rss_mb"] = server.peak_rss_mb()
            results.append(result)
        peak = server.peak_rss_mb()
    finally:
        server.stop()
    return {"schema": SCHEMA, "command": "edge-bench serve " + " ".join(sys.argv[2:]),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": device_fingerprint(),
            "server": {"args": args, "workers": threads, "peak_rss_mb": peak, "peak_rss_after_warmup_mb": rss_ready},
            "scans": [p.name for p in scans], "results": results}


def markdown(session: dict[str, Any]) -> str:
    server = session["server"]
    lines = [f"edge-serve over loopback: {server['workers']} worker(s) ({' '.join(server['args'])}), "
             f"{len(session['scans'])} scans cycled, overlay included; {session['device'].get('cpu') or '?'}, "
             f"{session['device'].get('cores')} cores",
             "",
             "| clients | requests | requests/s | p50 ms | p90 ms | p99 ms | max ms | errors | server peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in session["results"]:
        lat = r["latency_ms"]

        def ms(key: str) -> str:
            return "-" if lat[key] is None else f"{lat[key]:.1f}"

        rps = "-" if r["requests_per_s"] is None else f"{r['requests_per_s']:.1f}"
        lines.append(f"| {r['clients']} | {r['requests']} | {rps} | {ms('p50')} | {ms('p90')} | {ms('p99')} | "
                     f"{ms('max')} | {r['errors']} | {r['server_peak_rss_mb']:.1f} |")
    lines += ["", f"Server peak RSS: {server['peak_rss_mb']:.1f} MB (after warm-up: "
                  f"{server['peak_rss_after_warmup_mb']:.1f} MB)."]
    return "\n".join(lines)


@click.command("serve")
@click.option("--model", metavar="NAME|PATH", help="Model the server loads: bundled name or .tflite path.")
@click.option("--threads", type=THREADS, default=max(1, min(4, os.cpu_count() or 1)), show_default=True,
              help="The server's worker threads (edge-serve --threads).")
@click.option("--clients", "clients_text", default=",".join(map(str, DEFAULT_CLIENTS)), show_default=True,
              metavar="N,N,...", help="Concurrent client counts, measured one after another.")
@click.option("--requests", default=200, show_default=True, type=click.IntRange(1),
              help="Uploads per client count (shared by its clients).")
@click.option("--warmup", default=8, show_default=True, type=click.IntRange(1), help="Unmeasured uploads first.")
@click.option("--images", type=NonEmptyPath(file_okay=False, path_type=Path),
              help="Directory of scans to cycle through (default: edge/samples/).")
@click.option("--out", "out_path", type=NonEmptyPath(dir_okay=False, path_type=Path), metavar="FILE",
              help="Write the results (JSON, schema edge-bench-serve/1) here.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of the markdown table.")
def serve_cmd(model: str | None, threads: int, clients_text: str, requests: int, warmup: int, images: Path | None,
              out_path: Path | None, as_json: bool) -> None:
    """Requests/s and latency of edge-serve for 1, 4 and 16 concurrent clients over loopback, and its peak RSS.

    Needs the serve extra (pip install "edge-mri[serve]"). The server runs as `edge-serve` would, with
    --queue at least the largest client count so no request is turned away; each client uploads the scans
    in turn over its own keep-alive connection. The clients share this machine's cores with the server.

    \b
    Examples:
      edge-bench serve
      edge-bench serve --model xception --threads 2 --clients 1,4,16 --requests 400 --out serve.json

    \b
    Exit codes:
      0  measured (errors, if any, are counted in the table)
      2  bad usage, no scans, or the server could not start
    """
    from edge.cli_common import require_extra

    require_extra(["starlette", "uvicorn", "python_multipart"], "serve", "edge-bench serve")
    clients = _clients(clients_text)
    try:
        session = run_serve_bench(model=model, threads=threads, clients=clients, requests=requests, warmup=warmup,
                                  images=images or SAMPLES_DIR)
    except BenchError as exc:
        error(PROG, exc)
        sys.exit(2)
    text = markdown(session)
    click.echo(json.dumps(session, indent=1) if as_json else text)
    if out_path is not None:
        out_path.write_text(json.dumps(session, indent=1), encoding="utf-8")
