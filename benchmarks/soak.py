"""Soak analysis: does latency or memory creep when a device classifies for minutes or hours?

A kiosk or scanner-side box runs for days; a leak of a few hundred kB per scan or a slow thermal slide
does not show in a 50-run benchmark. The worker classifies continuously and samples RSS every few
seconds; this module turns that into drift figures a person can judge at a glance.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .stats import linear_slope, summarise

#: Share of the soak's scans compared at its start and at its end.
EDGE_FRACTION = 0.10
#: Sampled points kept in the JSON for plotting (the full per-scan series can be ~100k values).
SERIES_POINTS = 200


def _downsample(t: Sequence[float], ms: Sequence[float], points: int) -> list[list[float]]:
    """Median latency per equal-count bucket, so a long soak stays a small JSON series."""
    if not t:
        return []
    buckets = np.array_split(np.arange(len(t)), min(points, len(t)))
    return [[round(float(np.median(np.asarray(t)[b])), 3), round(float(np.median(np.asarray(ms)[b])), 4)]
            for b in buckets if b.size]


def analyse(t_s: Sequence[float], latency_ms: Sequence[float], rss: Sequence[Sequence[float]],
            seconds: float, sample_s: float) -> dict[str, Any]:
    """Latency drift (p50 of the first vs last 10% of scans, and slope in ms/hour) and RSS drift (MB/hour)."""
    n = len(latency_ms)
    k = max(1, int(n * EDGE_FRACTION)) if n else 0
    first = summarise(latency_ms[:k])["p50"] if n else None
    last = summarise(latency_ms[-k:])["p50"] if n else None
    slope_s = linear_slope(t_s, latency_ms)
    rss_t = [p[0] for p in rss]
    rss_mb = [p[1] for p in rss]
    rss_slope_s = linear_slope(rss_t, rss_mb)
    return {
        "seconds": seconds,
        "sample_s": sample_s,
        "scans": n,
        "end_to_end": summarise(latency_ms),
        "latency_drift": {
            "first_p50_ms": first,
            "last_p50_ms": last,
            "change_pct": (100.0 * (last - first) / first) if first else None,
            "slope_ms_per_hour": None if slope_s is None else slope_s * 3600.0,
        },
        "rss_drift": {
            "start_mb": rss_mb[0] if rss_mb else None,
            "end_mb": rss_mb[-1] if rss_mb else None,
            "max_mb": max(rss_mb) if rss_mb else None,
            "slope_mb_per_hour": None if rss_slope_s is None else rss_slope_s * 3600.0,
        },
        "rss_samples": [[round(a, 3), round(b, 3)] for a, b in zip(rss_t, rss_mb)],
        "latency_series": _downsample(t_s, latency_ms, SERIES_POINTS),
    }


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``10m``, ``1.5h`` -> seconds (a bare number is seconds)."""
    s = text.strip().lower()
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    scale = units.get(s[-1:], None)
    number = s[:-1] if scale else s
    try:
        value = float(number) * (scale or 1.0)
    except ValueError:
        raise ValueError(f"cannot read duration {text!r}; use e.g. 30s, 10m or 2h") from None
    if value <= 0:
        raise ValueError(f"duration {text!r} must be positive")
    return value
