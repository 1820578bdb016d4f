"""Human reports of a benchmark session: a markdown table, ratio lines, and an end-to-end latency histogram.

matplotlib is optional here: benchmarks run on a Raspberry Pi or Jetson where it is often not installed,
and a missing plot must not cost the measurements. Without it the histogram is skipped with a notice.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:,.0f}"


def _mb(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _text(v: Any) -> str:
    """A fingerprint field as the report shows it: '-' where this device does not expose it (no cpufreq in a
    container or VM, no thermal zones), never Python's ``None``."""
    return "-" if v is None or v == "" else str(v)


def _thermal(state: dict[str, Any] | None) -> str:
    """``cpu-thermal 51.2 C, throttled now: no`` from one `fingerprint.thermal_state` sample, or '-'."""
    state = state or {}
    parts = [f"{zone} {temp:.1f} C" for zone, temp in (state.get("zones_c") or {}).items()]
    if state.get("vcgencmd_temp_c") is not None:
        parts.append(f"vcgencmd {state['vcgencmd_temp_c']:.1f} C")
    throttled = state.get("throttled") or {}
    for key in ("under_voltage_now", "throttled_now", "throttled_since_boot"):
        if throttled.get(key) is not None:
            parts.append(f"{key.replace('_', ' ')}: {'yes' if throttled[key] else 'no'}")
    return ", ".join(parts) or "-"


def ratio_lines(session: dict[str, Any]) -> list[str]:
    """One line per model under test x threads, e.g.
    ``p50 end-to-end: int8 12.1 ms | fp32 20.3 ms (1.68x) | keras+tape 310 ms (25.6x)``."""
    by_key = {(r["label"], r["threads"]): r for r in session["results"]}
    lines = []
    for res in session["results"]:
        if res["role"] != "model" or not res.get("ratios"):
            continue
        parts = [f"{res['label']} {_ms(res['stages']['end_to_end']['p50'])} ms"]
        for ref_label, ratio in res["ratios"].items():
            ref = by_key[(ref_label, res["threads"])]
            parts.append(f"{ref_label} {_ms(ref['stages']['end_to_end']['p50'])} ms "
                         f"({_x(ratio['end_to_end_p50'])})")
        lines.append(f"p50 end-to-end, {res['threads']} thread(s): " + " | ".join(parts))
    return lines


def markdown(session: dict[str, Any]) -> str:
    """The whole session as markdown: results table, ratios, stage breakdown, soak drift, device."""
    fp = session["fingerprint"]
    s = session["settings"]
    out = [f"# edge-bench {session['created']}", "",
           f"{_text(fp.get('cpu'))} · {_text(fp.get('cores'))} cores · {_text(fp.get('machine'))} · "
           f"{_text(fp.get('os'))} · Python {_text(fp.get('python'))} · numpy {_text(fp.get('numpy'))}", "",
           f"{s['rounds']} interleaved rounds x {s['runs_per_round']} scans after {s['warmup']} warm-up, "
           f"{s['images']['count']} distinct scans; budget: end-to-end p99 <= {s['budget_ms']:g} ms.", "",
           "| model | role | threads | e2e p50 ms | e2e p99 ms | invoke p50 ms | peak RSS MB | load ms "
           "| first ms | cold start ms | scans/s | verdict | ratios (e2e p50) |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in session["results"]:
        e2e, inv = r["stages"]["end_to_end"], r["stages"].get("invoke", {})
        rat = ", ".join(f"{k} {_x(v['end_to_end_p50'])}" for k, v in (r.get("ratios") or {}).items()) or "-"
        thr = "-" if r["throughput_scans_per_s"] is None else f"{r['throughput_scans_per_s']:.1f}"
        out.append(f"| {r['label']} | {r['role']} | {r['threads']} | {_ms(e2e['p50'])} | {_ms(e2e['p99'])} "
                   f"| {_ms(inv.get('p50'))} | {_mb(r['memory']['peak_rss_mb'])} | {_ms(r['load_ms'])} "
                   f"| {_ms(r['first_inference_ms'])} | {_ms(r['cold_start_ms'])} | {thr} "
                   f"| {r.get('verdict') or '-'} | {rat} |")
    lines = ratio_lines(session)
    if lines:
        out += ["", "## Ratios", ""] + [f"- {ln}" for ln in lines]
    out += ["", "## Stages (ms: p50 / p90 / p99 / max)", "",
            "| model | threads | decode | preprocess | invoke | postprocess | end-to-end |",
            "|---|---:|---|---|---|---|---|"]
    for r in session["results"]:
        cells = []
        for stage in ("decode", "preprocess", "invoke", "postprocess", "end_to_end"):
            st = r["stages"].get(stage)
            cells.append("-" if st is None else " / ".join(_ms(st[k]) for k in ("p50", "p90", "p99", "max")))
        out.append(f"| {r['label']} | {r['threads']} | " + " | ".join(cells) + " |")
    soaked = [r for r in session["results"] if r.get("soak")]
    if soaked:
        out += ["", "## Soak", "", "| model | threads | seconds | scans | first 10% p50 ms | last 10% p50 ms "
                "| latency slope ms/h | RSS start MB | RSS end MB | RSS slope MB/h |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in soaked:
            k, ld, rd = r["soak"], r["soak"]["latency_drift"], r["soak"]["rss_drift"]
            out.append(f"| {r['label']} | {r['threads']} | {k['seconds']:g} | {k['scans']} "
                       f"| {_ms(ld['first_p50_ms'])} | {_ms(ld['last_p50_ms'])} | {_ms(ld['slope_ms_per_hour'])} "
                       f"| {_mb(rd['start_mb'])} | {_mb(rd['end_mb'])} | {_ms(rd['slope_mb_per_hour'])} |")
    out += ["", "## Device", ""]
    freq = fp.get("frequency") or {}
    thermal = fp.get("thermal") or {}
    max_mhz = freq.get("max_mhz")
    out += [f"- CPU: {_text(fp.get('cpu'))} ({_text(fp.get('cores'))} cores), "
            f"governor {_text(freq.get('governor'))}, max {'-' if max_mhz is None else f'{max_mhz:g} MHz'}",
            f"- kernel {_text(fp.get('kernel'))}, Jetson power mode: {_text(fp.get('jetson_power_mode'))}",
            f"- thermal at start: {_thermal(thermal.get('start'))}", f"- thermal at end: {_thermal(thermal.get('end'))}"]
    for r in {r["label"]: r for r in session["results"]}.values():
        out.append(f"- {r['label']}: {r['model']['path']} ({r['model']['size_bytes']:,} bytes, "
                   f"sha256 {r['model']['sha256'][:12]}), backend {r['backend']['name']} {r['backend']['version']}")
    return "\n".join(out) + "\n"


def histogram(session: dict[str, Any], path: Path) -> str | None:
    """Write the end-to-end latency histogram PNG; return a notice instead when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"matplotlib is not installed; skipped the histogram {path}"
    import numpy as np

    series = [(f"{r['label']} x{r['threads']}", np.asarray(r["samples_ms"]["end_to_end"], dtype=float))
              for r in session["results"] if r["samples_ms"]["end_to_end"]]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    lo = min(float(v.min()) for _, v in series)
    hi = max(float(v.max()) for _, v in series)
    log = hi / max(lo, 1e-6) > 20
    bins = np.geomspace(max(lo, 1e-3), hi, 60) if log else np.linspace(lo, hi, 60)
    for name, values in series:
        ax.hist(values, bins=bins, histtype="step", linewidth=1.5, label=f"{name} (p50 {np.median(values):.2f} ms)")
    if log:
        ax.set_xscale("log")
    budget = session["settings"]["budget_ms"]
    if budget <= hi * 1.5:
        ax.axvline(budget, color="red", linestyle="--", linewidth=1, label=f"budget {budget:g} ms")
    ax.set_xlabel("end-to-end latency per scan (ms)")
    ax.set_ylabel("scans")
    ax.set_title(f"edge-bench {session['created']} · {session['fingerprint'].get('cpu')}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None
