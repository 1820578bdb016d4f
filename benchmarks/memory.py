"""`edge-bench memory`: peak RSS and wall time of `edge-classify` on the worst inputs it accepts.

The inputs are made in a temporary folder from a bundled sample scan (so the head crop, the gate and the
heatmap run as on a real scan): a 7070 x 7070 JPEG (RGB), 16-bit grayscale PNG, uncompressed float32 TIFF
and 16-bit DICOM (just under the 50 Mpx limit, `edge.decode.MAX_PIXELS`), a multi-frame 16-bit DICOM
(400 frames of 512 x 512, 210 MB, of which the first frame is classified), the largest RGB PNG within the
decoded-bytes limit of formats that are decoded whole (`edge.decode.MAX_DECODED_BYTES`) and one over it,
20000 x 16 and 16 x 20000 strips, a 200000 x 16 strip, and the sample itself for reference. Each is classified
by a fresh `edge-classify` process, with and without ``--heatmap``; its peak RSS is the kernel's high-water mark
for that process (``getrusage(RUSAGE_CHILDREN)`` in a small wrapper that starts it), its time the wall clock
from spawn to exit (interpreter start and model load included), so both are what a user of the command sees.

A row passes when the process stayed within the bounds and ended as expected: answered (a record with
status ok, refer or refused), or, for an input over a documented limit, refused with a one-line error.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import click
import numpy as np
from PIL import Image

import edge
from edge.cli_common import NonEmptyPath, error
from edge.decode import MAX_DECODED_BYTES, MAX_PIXELS
from edge.errors import ModelError
from edge.registry import resolve

from .fingerprint import device_fingerprint
from .run import BenchError

PROG = "edge-bench"
SCHEMA = "edge-bench-memory/1"
SAMPLE = Path(edge.__file__).resolve().parent / "samples" / "glioma_1.jpg"
MB = 1024.0 * 1024.0
#: One run of `edge-classify` that takes longer than this is stopped and reported as failed.
RUN_TIMEOUT_S = 300
#: Side of the multi-frame DICOM's frames (at most ``--side``).
FRAME_SIDE = 512
#: Side of the largest RGB PNG within MAX_DECODED_BYTES (Pillow keeps RGB at 4 bytes a pixel).
RGB_PNG_LIMIT_SIDE = math.isqrt(MAX_DECODED_BYTES // 4)


@dataclass(frozen=True)
class Case:
    """One generated input: its file name, what it is, its size (width, height), how it ends when all is well,
    and how it is written."""

    name: str
    what: str
    size: tuple[int, int]
    expect: str  # "answered", "refused" (a one-line error by a documented limit) or "either"
    write: Callable[[Path], None]


def _scan(size: tuple[int, int], mode: str = "L") -> Image.Image:
    """The bundled sample scan resized (bicubic) to ``size`` (width, height)."""
    return Image.open(SAMPLE).convert(mode).resize(size, Image.BICUBIC)


def _write_png16(path: Path, side: int) -> None:
    gray = np.asarray(_scan((side, side)))
    wide = gray.astype(np.uint16)
    del gray
    wide *= 257
    Image.fromarray(wide).save(path, compress_level=1)


def _write_float_tiff(path: Path, side: int) -> None:
    _scan((side, side)).convert("F").point(lambda v: v / 255.0).save(path)


def _write_dicom(path: Path, side: int, frames: int = 1) -> None:
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import ExplicitVRLittleEndian

    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    gray = np.asarray(_scan((side, side))).astype(np.uint16)
    gray *= 16  # 12-bit values, as an MR scanner stores them
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = gray.tobytes() * frames
    if frames > 1:
        ds.NumberOfFrames = frames
    for keyword in ("WindowCenter", "WindowWidth"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)


def cases(side: int, strip: int, long_strip: int, frames: int = 0) -> list[Case]:
    """The inputs at these sizes: ``side`` for the squares, ``strip`` and ``long_strip`` for the strips,
    ``frames`` for the multi-frame DICOM (0: none)."""
    rgb_side = min(side, RGB_PNG_LIMIT_SIDE)
    with Image.open(SAMPLE) as sample:
        sample_size = sample.size
    square = (side, side)
    out = [
        Case("sample.jpg", f"the sample scan ({SAMPLE.name}), for reference", sample_size, "answered",
             lambda p: p.write_bytes(SAMPLE.read_bytes())),
        Case(f"photo-{side}.jpg", f"{side}x{side} RGB JPEG", square, "answered",
             lambda p: _scan(square, "RGB").save(p, quality=90)),
        Case(f"gray16-{side}.png", f"{side}x{side} 16-bit grayscale PNG", square, "answered",
             lambda p: _write_png16(p, side)),
        Case(f"float-{side}.tif", f"{side}x{side} float32 TIFF, uncompressed", square, "answered",
             lambda p: _write_float_tiff(p, side)),
        Case(f"rgb-{rgb_side}.png", f"{rgb_side}x{rgb_side} RGB PNG (within the decoded-bytes limit)",
             (rgb_side, rgb_side), "answered", lambda p: _scan((rgb_side, rgb_side), "RGB").save(p, compress_level=1)),
    ]
    if side > RGB_PNG_LIMIT_SIDE:
        out.append(Case(f"rgb-{side}.png", f"{side}x{side} RGB PNG (over the decoded-bytes limit)", square, "refused",
                        lambda p: _scan(square, "RGB").save(p, compress_level=1)))
    if importlib.util.find_spec("pydicom") is not None:  # the [dicom] extra
        out.append(Case(f"mr16-{side}.dcm", f"{side}x{side} 16-bit DICOM, uncompressed", square, "answered",
                        lambda p: _write_dicom(p, side)))
        if frames:  # the file's pixel data is far larger than the frame classified: it must not be read whole
            f = min(side, FRAME_SIDE)
            mb = frames * f * f * 2 / 1e6
            out.append(Case(f"mr16-{frames}x{f}.dcm", f"{frames}-frame {f}x{f} 16-bit DICOM ({mb:.0f} MB), frame 0",
                            (f, f), "answered", lambda p: _write_dicom(p, f, frames)))
    out += [
        Case(f"strip-{strip}x16.png", f"{strip}x16 strip PNG", (strip, 16), "answered",
             lambda p: _scan((strip, 16)).save(p)),
        Case(f"strip-16x{strip}.png", f"16x{strip} strip PNG", (16, strip), "answered",
             lambda p: _scan((16, strip)).save(p)),
        Case(f"strip-{long_strip}x16.png", f"{long_strip}x16 strip PNG", (long_strip, 16), "either",
             lambda p: _scan((long_strip, 16)).save(p)),
    ]
    return out


def _child_env() -> dict[str, str]:
    """The child imports the same `edge` as this process, wherever it was started from."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    root = str(Path(edge.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


#: Runs one command and writes its exit code, wall time and peak RSS (KiB; bytes on macOS) as JSON to argv[1].
#: A small process of its own, because Linux counts in a child's peak RSS the memory of the process it was
#: forked from (the harness, or a test runner of several hundred MB): from this wrapper that is a few MB.
_WRAPPER = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.call(sys.argv[2:], stdin=subprocess.DEVNULL)
wall = time.perf_counter() - start
with open(sys.argv[1], "w") as out:
    json.dump({"exit_code": code, "wall_s": wall,
               "maxrss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}, out)
"""


def measure(path: Path, model: str, heatmap_dir: Path | None, workdir: Path) -> dict[str, Any]:
    """Run `edge-classify --json` on one file in a fresh process: exit code, record, peak RSS, wall time."""
    args = [sys.executable, "-m", "edge.cli", "--json", "--model", model, str(path)]
    if heatmap_dir is not None:
        args += ["--heatmap", str(heatmap_dir)]
    out_path, err_path, usage_path = workdir / "stdout.txt", workdir / "stderr.txt", workdir / "usage.json"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        try:
            subprocess.run([sys.executable, "-c", _WRAPPER, str(usage_path), *args], stdin=subprocess.DEVNULL,
                           stdout=out, stderr=err, cwd=workdir, env=_child_env(), timeout=RUN_TIMEOUT_S, check=True)
        except subprocess.TimeoutExpired:
            raise BenchError(f"edge-classify {path.name} ran for over {RUN_TIMEOUT_S} s") from None
        except subprocess.CalledProcessError as exc:
            raise BenchError(f"the measuring wrapper failed on {path.name} (exit {exc.returncode})") from None
    usage = json.loads(usage_path.read_text(encoding="utf-8"))
    record: dict[str, Any] = {}
    for line in out_path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
    stderr = err_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    errors = [line for line in stderr if line.startswith("edge-classify: error: ")]
    scale = 1.0 if sys.platform == "darwin" else 1024.0  # ru_maxrss: bytes on macOS, KiB on Linux
    return {"exit_code": usage["exit_code"], "status": record.get("status"),
            "message": record.get("error") or record.get("message"),
            "error_lines": len(errors), "stderr_last": stderr[-1] if stderr else "",
            "peak_rss_mb": usage["maxrss"] * scale / MB, "wall_s": usage["wall_s"],
            "classify_ms": (record.get("timings_ms") or {}).get("total"), "overlay": record.get("overlay")}


def judge(row: dict[str, Any], expect: str, max_rss_mb: float, max_seconds: float) -> None:
    """Add ``outcome`` (answered, refused, failed), ``within_bounds`` and ``pass`` to a measured row."""
    answered = row["status"] in ("ok", "refer", "refused")  # a record the gate may have refused: still bounded
    refused = row["exit_code"] == 1 and row["status"] == "error" and row["error_lines"] == 1
    row["outcome"] = "answered" if answered else "refused" if refused else "failed"
    row["within_bounds"] = row["peak_rss_mb"] <= max_rss_mb and row["wall_s"] <= max_seconds
    ends_well = row["outcome"] == expect or (expect == "either" and row["outcome"] != "failed")
    row["pass"] = bool(ends_well and row["within_bounds"])


def run_memory_bench(*, model: str, side: int, strip: int, long_strip: int, frames: int, max_rss_mb: float,
                     max_seconds: float,
                     advance: Callable[[int], None] = lambda n: None) -> dict[str, Any]:
    """Generate the inputs, measure each with and without --heatmap; the whole session as a dict."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="edge-bench-memory-") as tmp:
        folder = Path(tmp)
        overlays = folder / "overlays"
        overlays.mkdir()
        for case in cases(side, strip, long_strip, frames):
            path = folder / case.name
            case.write(path)
            for heatmap in (False, True):
                row = {"input": case.name, "what": case.what, "size": list(case.size),
                       "file_bytes": path.stat().st_size,
                       "heatmap": heatmap, "expect": case.expect,
                       **measure(path, model, overlays if heatmap else None, folder)}
                if row["overlay"]:
                    with Image.open(row["overlay"]) as drawn:
                        row["overlay_size"] = list(drawn.size)
                judge(row, case.expect, max_rss_mb, max_seconds)
                rows.append(row)
                advance(1)
            path.unlink()
    return {"schema": SCHEMA, "command": "edge-bench memory " + " ".join(sys.argv[2:]),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": device_fingerprint(),
            "model": model, "bounds": {"peak_rss_mb": max_rss_mb, "wall_s": max_seconds},
            "limits": {"max_pixels": MAX_PIXELS, "max_decoded_bytes": MAX_DECODED_BYTES},
            "results": rows}


def markdown(session: dict[str, Any]) -> str:
    bounds = session["bounds"]
    device = session["device"]
    lines = [f"`edge-classify --model {session['model']}` on generated worst-case inputs, one fresh process each; "
             f"bounds {bounds['peak_rss_mb']:g} MB peak RSS and {bounds['wall_s']:g} s wall (process start to exit); "
             f"{device.get('cpu') or '?'}, {device.get('cores')} cores",
             "",
             "| input | --heatmap | outcome | peak RSS MB | wall s | classify ms | overlay px | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for r in session["results"]:
        outcome = r["outcome"] if r["outcome"] != "answered" else f"answered ({r['status']})"
        ms = "-" if r["classify_ms"] is None else f"{r['classify_ms']:.0f}"
        drawn = "x".join(map(str, r["overlay_size"])) if r.get("overlay_size") else "-"
        lines.append(f"| {r['what']} | {'yes' if r['heatmap'] else 'no'} | {outcome} | {r['peak_rss_mb']:.0f} | "
                     f"{r['wall_s']:.2f} | {ms} | {drawn} | {'PASS' if r['pass'] else 'FAIL'} |")
    refused = [r for r in session["results"] if r["outcome"] == "refused"]
    for r in refused[:1]:
        lines += ["", f"Refused by a documented limit: {r['input']}: {r['message']}"]
    accepted = [r for r in session["results"] if r["outcome"] == "answered" and r["input"] != "sample.jpg"]
    if accepted:
        worst = max(accepted, key=lambda r: r["peak_rss_mb"])
        lines += ["", f"Worst accepted input: {worst['what']}{' with --heatmap' if worst['heatmap'] else ''}, "
                      f"{worst['peak_rss_mb']:.0f} MB peak RSS."]
    return "\n".join(lines)


@click.command("memory")
@click.option("--model", default="custom-cnn", show_default=True, metavar="NAME|PATH",
              help="Model edge-classify loads: bundled name or .tflite path.")
@click.option("--side", default=7070, show_default=True, type=click.IntRange(64, 7071),
              help="Side of the square inputs (7070: just under the 50 Mpx limit).")
@click.option("--strip", default=20000, show_default=True, type=click.IntRange(64),
              help="Length of the 16-pixel strips.")
@click.option("--long-strip", default=200000, show_default=True, type=click.IntRange(64),
              help="Length of the longest 16-pixel strip.")
@click.option("--frames", default=400, show_default=True, type=click.IntRange(0, 4000),
              help="Frames of the multi-frame DICOM input (0 leaves it out).")
@click.option("--max-rss-mb", default=250.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Bound on each process's peak RSS.")
@click.option("--max-seconds", default=3.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Bound on each process's wall time, from spawn to exit.")
@click.option("--out", "out_path", type=NonEmptyPath(dir_okay=False, path_type=Path), metavar="FILE",
              help="Write the results (JSON, schema edge-bench-memory/1) here.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of the markdown table.")
def memory_cmd(model: str, side: int, strip: int, long_strip: int, frames: int, max_rss_mb: float, max_seconds: float,
               out_path: Path | None, as_json: bool) -> None:
    """Peak RSS and wall time of edge-classify on the worst inputs it accepts, with and without --heatmap.

    Writes the inputs to a temporary folder one at a time (the largest, the float TIFF and the multi-frame
    DICOM, are 200 and 210 MB at the default sizes), then
    runs `edge-classify --json` on each in a fresh process and reads that process's own peak RSS from the
    kernel. Other load on the machine adds to the wall times, not to the RSS.

    \b
    Examples:
      edge-bench memory
      edge-bench memory --model xception --max-rss-mb 400 --out memory.json
      edge-bench memory --side 1000 --strip 4000 --long-strip 20000     # a quick look

    \b
    Exit codes:
      0  every input ended as expected within the bounds
      1  at least one input went over a bound or ended otherwise than expected (a crash, an error)
      2  bad usage, or the measurement itself failed
    """
    try:
        resolved = str(resolve(model))
    except ModelError as exc:
        raise click.BadParameter(str(exc), param_hint="--model") from None
    n_rows = 2 * len(cases(side, strip, long_strip, frames))
    try:
        with click.progressbar(length=n_rows, label="measuring edge-classify", file=sys.stderr) as bar:
            session = run_memory_bench(model=resolved, side=side, strip=strip, long_strip=long_strip, frames=frames,
                                       max_rss_mb=max_rss_mb, max_seconds=max_seconds, advance=bar.update)
    except BenchError as exc:
        error(PROG, exc)
        sys.exit(2)
    session["model"] = model
    click.echo(json.dumps(session, indent=1) if as_json else markdown(session))
    if out_path is not None:
        out_path.write_text(json.dumps(session, indent=1), encoding="utf-8")
    failed = [f"{r['input']}{' --heatmap' if r['heatmap'] else ''}" for r in session["results"] if not r["pass"]]
    if failed:
        error(PROG, f"FAIL: over a bound or not as expected: {', '.join(failed)}")
        sys.exit(1)
