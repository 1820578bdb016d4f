"""Describe the device a benchmark ran on, so two result files are only compared like with like.

Latency on a Raspberry Pi or Jetson depends as much on the frequency governor, the temperature and
throttling (under-voltage, thermal caps), and the Jetson power mode as on the model. Everything is read
from /proc and /sys or from the vendor tools when they exist; what a platform does not expose is None,
never an error, so the same harness runs on a laptop, a Pi and a Jetson.
"""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

CPU_ROOT = Path("/sys/devices/system/cpu")
THERMAL_ROOT = Path("/sys/class/thermal")


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip().strip("\x00") or None
    except OSError:
        return None


def _tool(*argv: str) -> str | None:
    """Output of a vendor tool (vcgencmd, nvpmodel) when installed and working, else None."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def cpu_model() -> str | None:
    """Human CPU/board name: the device-tree model on Arm boards, else /proc/cpuinfo, else platform."""
    board = _read(Path("/proc/device-tree/model"))
    info = _read(Path("/proc/cpuinfo")) or ""
    cpu = None
    for key in ("model name", "Hardware", "Processor", "cpu model"):
        m = re.search(rf"^{key}\s*:\s*(.+)$", info, re.MULTILINE)
        if m:
            cpu = m.group(1).strip()
            break
    cpu = cpu or platform.processor() or None
    if board and cpu and board != cpu:
        return f"{board} ({cpu})"
    return board or cpu


def frequencies() -> dict[str, Any]:
    """Governor and current/max frequency (MHz) per CPU, from cpufreq when the kernel exposes it."""
    cpus = sorted(CPU_ROOT.glob("cpu[0-9]*"), key=lambda p: int(p.name[3:]))
    governors, cur, mx = set(), [], []
    for cpu in cpus:
        base = cpu / "cpufreq"
        g = _read(base / "scaling_governor")
        if g:
            governors.add(g)
        c, m = _read(base / "scaling_cur_freq"), _read(base / "cpuinfo_max_freq")
        if c and c.isdigit():
            cur.append(int(c) / 1000.0)
        if m and m.isdigit():
            mx.append(int(m) / 1000.0)
    return {"governor": ",".join(sorted(governors)) or None,
            "current_mhz": cur or None,
            "max_mhz": max(mx) if mx else None}


def thermal_zones() -> dict[str, float]:
    """Temperature (deg C) of every thermal zone, keyed by its type (cpu-thermal, CPU-therm, GPU-therm, ...)."""
    temps: dict[str, float] = {}
    for zone in sorted(THERMAL_ROOT.glob("thermal_zone*")):
        raw = _read(zone / "temp")
        if raw is None or not raw.lstrip("-").isdigit():
            continue
        name = _read(zone / "type") or zone.name
        if name in temps:
            name = f"{name}/{zone.name}"
        temps[name] = int(raw) / 1000.0
    return temps


def thermal_state() -> dict[str, Any]:
    """Temperatures and throttling now; sampled at the start and at the end of a run."""
    state: dict[str, Any] = {"zones_c": thermal_zones() or None}
    temp = _tool("vcgencmd", "measure_temp")
    if temp:
        m = re.search(r"([-\d.]+)", temp)
        state["vcgencmd_temp_c"] = float(m.group(1)) if m else None
    throttled = _tool("vcgencmd", "get_throttled")
    if throttled:
        m = re.search(r"0x([0-9a-fA-F]+)", throttled)
        bits = int(m.group(1), 16) if m else None
        state["throttled"] = {"raw": throttled, "under_voltage_now": bool(bits & 0x1) if bits is not None else None,
                              "throttled_now": bool(bits & 0x4) if bits is not None else None,
                              "throttled_since_boot": bool(bits & 0x40000) if bits is not None else None}
    return state


def device_fingerprint() -> dict[str, Any]:
    """Static description of the machine and software stack (model and backend details come from workers)."""
    uname = platform.uname()
    return {
        "hostname": uname.node,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "machine": uname.machine,
        "os": _os_release() or f"{uname.system} {uname.release}",
        "kernel": uname.release,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "frequency": frequencies(),
        "jetson_power_mode": _tool("nvpmodel", "-q"),
        "executable": sys.executable,
    }


def _os_release() -> str:
    text = _read(Path("/etc/os-release")) or ""
    m = re.search(r'^PRETTY_NAME="?([^"\n]+)"?', text, re.MULTILINE)
    return m.group(1) if m else ""


def same_device(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Fingerprint fields that differ in a way that makes latency comparisons suspect (empty = comparable)."""
    keys = ("cpu", "cores", "machine", "kernel", "python", "numpy")
    return [k for k in keys if a.get(k) != b.get(k)]
