"""Compare two `edge-bench run --out` files and decide whether the new one regressed.

Method (also in `edge-bench compare --help` and baselines/README.md): results are matched by model label
and thread count (models under test only; references are context). For invoke and end-to-end latency the
figures judged are the *robust* p50 and p90: the median over the run's interleaved rounds of each
round's p50/p90, so one disturbed round cannot move them. A metric regresses when

    new - base > max(tolerance x base, absolute floor)

with floors of 0.5 ms for latency and 2 MB for peak RSS, so sub-millisecond jitter on a fast model and
allocator noise are never called regressions. Lower is better for every metric.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .fingerprint import same_device
from .run import SCHEMA

#: (name shown, how to read it from a result, unit) for every metric that can fail a compare.
METRICS = (
    ("invoke p50", ("stages", "invoke", "robust_p50"), "ms"),
    ("invoke p90", ("stages", "invoke", "robust_p90"), "ms"),
    ("end-to-end p50", ("stages", "end_to_end", "robust_p50"), "ms"),
    ("end-to-end p90", ("stages", "end_to_end", "robust_p90"), "ms"),
    ("peak RSS", ("memory", "peak_rss_mb"), "MB"),
)
FLOOR_MS = 0.5
FLOOR_MB = 2.0


class CompareError(Exception):
    """A file cannot be compared (unreadable, not edge-bench JSON); exit code 2 at the CLI."""


def load(path: Path) -> dict[str, Any]:
    """Read and sanity-check one `edge-bench run --out` file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise CompareError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CompareError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("results"), list):
        raise CompareError(f"{path}: not an edge-bench result file (expected schema {SCHEMA!r})")
    return data


def parse_tolerance(text: str) -> float:
    """``10%`` -> 0.10 and ``0.1`` -> 0.10 (a bare number is a fraction)."""
    s = text.strip()
    try:
        value = float(s[:-1]) / 100.0 if s.endswith("%") else float(s)
    except ValueError:
        raise ValueError(f"cannot read tolerance {text!r}; use e.g. 10% or 0.1") from None
    if value < 0:
        raise ValueError(f"tolerance {text!r} must not be negative")
    return value


def _get(res: dict, keys: tuple[str, ...]) -> float | None:
    cur: Any = res
    for k in keys:
        if not isinstance(cur, dict) or k not in cur:
            break
        cur = cur[k]
    else:
        return float(cur) if cur is not None else None
    if keys[-1].startswith("robust_"):  # files without rounds: fall back to the plain percentile
        return _get(res, keys[:-1] + (keys[-1][len("robust_"):],))
    return None


def _models(session: dict) -> dict[tuple[str, int], dict]:
    return {(r["label"], int(r["threads"])): r for r in session["results"] if r.get("role") == "model"}


def compare(base: dict, new: dict, tolerance: float, floor_ms: float = FLOOR_MS,
            floor_mb: float = FLOOR_MB) -> dict[str, Any]:
    """Row per matched model x threads x metric with its status (``ok``, ``better``, ``REGRESSION``)."""
    b, n = _models(base), _models(new)
    rows = []
    for key in sorted(set(b) & set(n)):
        for name, path, unit in METRICS:
            old, cur = _get(b[key], path), _get(n[key], path)
            if old is None or cur is None:
                continue
            allowed = max(tolerance * old, floor_ms if unit == "ms" else floor_mb)
            delta = cur - old
            status = "REGRESSION" if delta > allowed else "better" if -delta > allowed else "ok"
            rows.append({"model": key[0], "threads": key[1], "metric": name, "unit": unit, "base": old,
                         "new": cur, "delta": delta, "delta_pct": 100.0 * delta / old if old else None,
                         "allowed": allowed, "status": status})
    notes = [f"only in base: {m} x{t}" for m, t in sorted(set(b) - set(n))]
    notes += [f"only in new: {m} x{t}" for m, t in sorted(set(n) - set(b))]
    differing = same_device(base.get("fingerprint", {}), new.get("fingerprint", {}))
    if differing:
        notes.append("device fingerprints differ in " + ", ".join(differing) + "; latency deltas may not be comparable")
    for key in sorted(set(b) & set(n)):
        if b[key]["model"].get("sha256") != n[key]["model"].get("sha256"):
            notes.append(f"{key[0]} x{key[1]}: model file changed (sha256 {b[key]['model'].get('sha256', '')[:12]} "
                         f"-> {n[key]['model'].get('sha256', '')[:12]})")
    if not rows:
        notes.append("no model x threads configuration appears in both files")
    regressions = sum(1 for r in rows if r["status"] == "REGRESSION")
    return {"tolerance": tolerance, "floor_ms": floor_ms, "floor_mb": floor_mb, "rows": rows, "notes": notes,
            "regressions": regressions, "matched": len(set(b) & set(n))}


def markdown(result: dict[str, Any], base_name: str, new_name: str) -> str:
    """Delta table for a terminal or a pull-request comment."""
    out = [f"# edge-bench compare: {base_name} -> {new_name}", "",
           f"tolerance {100 * result['tolerance']:g}% (floors {result['floor_ms']:g} ms, {result['floor_mb']:g} MB); "
           "latency = median of per-round percentiles", "",
           "| model | threads | metric | base | new | delta | delta % | status |",
           "|---|---:|---|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        pct = "-" if r["delta_pct"] is None else f"{r['delta_pct']:+.1f}%"
        out.append(f"| {r['model']} | {r['threads']} | {r['metric']} | {r['base']:.2f} {r['unit']} "
                   f"| {r['new']:.2f} {r['unit']} | {r['delta']:+.2f} | {pct} | {r['status']} |")
    out += [""] + [f"- note: {n}" for n in result["notes"]]
    verdict = (f"{result['regressions']} regression(s)" if result["regressions"]
               else f"no regression across {result['matched']} model x threads configuration(s)")
    out.append(f"\n**{verdict}**")
    return "\n".join(out) + "\n"
