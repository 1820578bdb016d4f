"""How often the input gate turns real MRI away, and how often it lets a non-MRI input through, per set.

Every image goes through `edge.Classifier`, the device's code path, and is counted by the status it gets:
``ok`` (a verdict), ``refused`` (by reason) or ``refer``. For a set of real brain MRI (the test split, the
external sets of ``data/external_sets.json``) the interesting share is the one without a verdict; for a
folder of inputs that are not brain MRI, the share that got one. Each share comes with its Wilson 95%
interval. Measuring on validation-only sets is fine; choosing the threshold on them is not, and nothing
here feeds back into the calibration.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from convert.dataset import images_under
from convert.metrics import wilson_interval

MRI, NOT_MRI = "mri", "not-mri"

Progress = Callable[[Sequence[Path], str], Iterable[Path]]


@dataclass(frozen=True)
class GateSet:
    """A named list of images and what they are: real brain MRI, or not."""

    name: str
    paths: tuple[Path, ...]
    kind: str


def folder_set(name: str, folder: Path, kind: str) -> GateSet:
    paths = tuple(images_under(Path(folder)))
    if not paths:
        raise ValueError(f"{folder}: no images")
    return GateSet(name, paths, kind)


def measure(model: str | Path, sets: Sequence[GateSet], *, threads: int | None = None,
            progress: Progress | None = None, command: str | None = None) -> dict[str, Any]:
    """Per set: images, unreadable, ok, refused (by reason), referred, and the share that is the gate's miss
    (no verdict for MRI, a verdict for the rest) with its Wilson interval; the scores' quartiles too."""
    from edge import Classifier
    from edge.errors import InputError

    clf = Classifier(model, threads=threads)
    rows = []
    for gate_set in sets:
        statuses: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        scores, unreadable, answered = [], 0, []
        for path in (progress(gate_set.paths, gate_set.name) if progress else gate_set.paths):
            try:
                result = clf.classify(path)
            except InputError:
                unreadable += 1
                continue
            statuses[result.status] += 1
            if result.reason:
                reasons[result.reason] += 1
            if result.ood_score is not None:
                scores.append(result.ood_score)
            if result.status == "ok" and gate_set.kind == NOT_MRI:
                answered.append(str(path))
        n = sum(statuses.values())
        missed = (n - statuses["ok"]) if gate_set.kind == MRI else statuses["ok"]
        low, high = wilson_interval(missed, n) if n else (0.0, 0.0)
        quartiles = ([round(float(v), 3) for v in _quantiles(scores, (0.5, 0.99, 1.0))] if scores else None)
        rows.append({"set": gate_set.name, "kind": gate_set.kind, "images": n, "unreadable": unreadable,
                     "ok": statuses["ok"], "refer": statuses["refer"], "refused": statuses["refused"],
                     "reasons": dict(sorted(reasons.items())), "missed": missed,
                     "share": round(missed / n, 5) if n else None,
                     "interval": [round(low, 5), round(high, 5)], "ood_score_p50_p99_max": quartiles,
                     "answered": answered})
    gate = clf.spec.metadata.get("gate") or {}
    return {"schema": 1, "kind": "gate-rates", "command": command,
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "model": {"name": clf.spec.name, "sha256": clf.spec.sha256, "path": str(clf.path)},
            "gate": {"threshold": gate.get("threshold"), "calibration": gate.get("calibration")},
            "rows": rows}


def _quantiles(values: list[float], qs: Sequence[float]) -> list[float]:
    ordered = sorted(values)
    return [ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))] for q in qs]


def markdown(report: dict[str, Any]) -> str:
    """The model card's table: per set, what the gate did, and the miss share with its interval."""
    lines = ["| set | images | refused | referred | answered | gate's miss | 95% interval |",
             "|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        what = "no verdict" if row["kind"] == MRI else "a verdict"
        low, high = row["interval"]
        share = f"{100 * row['share']:.1f}% ({what})" if row["share"] is not None else "-"
        lines.append(f"| {row['set']} | {row['images']} | {row['refused']} | {row['refer']} | {row['ok']} | "
                     f"{share} | {100 * low:.1f}-{100 * high:.1f}% |")
    model = report["model"]
    lines += ["", f"Model `{model['name']}` sha256 `{model['sha256'][:16]}...`; command: `{report['command']}`"]
    return "\n".join(lines) + "\n"
