"""Write an external-validation report (convert/external.py) as JSON, markdown and a PNG of rates with intervals.

The markdown is meant to be pasted as a model card's "Scans from elsewhere" section, so it carries what a
reader needs to trust or redo it: the model file's sha256, the exact command, and what each measure counts.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from .external import DEFINITIONS

JSON_NAME, MARKDOWN_NAME, PLOT_NAME = "external.json", "external.md", "external.png"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _cells(row: dict[str, Any]) -> list[str]:
    lo, hi = row["ci95"]
    return [_pct(row["rate"]), f"{100 * lo:.1f}-{100 * hi:.1f}%", f"{row['k']} / {row['n']}"]


def _table(header: Sequence[str], keys: Sequence[str], rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = ["| " + " | ".join([*header, "rate", "95% CI", "k / n"]) + " |",
             "|" + "---|" * len(header) + "---:|---:|---:|"]
    lines += ["| " + " | ".join([str(r[k]) for k in keys] + _cells(r)) + " |" for r in rows]
    return lines


def markdown(result: dict[str, Any]) -> str:
    """The report as markdown: the main table (one row per set and measure), then per source and per variant."""
    m = result["model"]
    threads = m.get("threads")
    runtime = m["format"] + (f", {m['backend']}" if m.get("backend") else "") + (
        f", {threads} thread{'s' if threads > 1 else ''}" if threads else "")
    lines = [
        "## Scans from elsewhere",
        "",
        f"Model `{m['name']}` ({runtime}), file `{m['path']}`, sha256 `{m['sha256']}`; measured {result['created']}"
        + (f" with `{result['command']}`" if result.get("command") else "") + ".",
        "",
        *_table(["set", "source", "measure"], ["name", "source", "measure"], result["rows"]),
        "",
        "; ".join(f"**{k}**: {v}" for k, v in DEFINITIONS.items()) + ". 95% CI: Wilson score interval.",
    ]
    if result["unreadable"]:
        lines += ["", f"{len(result['unreadable'])} image(s) could not be read and are left out (listed in the JSON)."]
    if result["sources"]:
        lines += ["", "### Per source", "", *_table(["source", "measure"], ["source", "measure"], result["sources"])]
    if result["variants"]:
        lines += ["", "### Per variant (the rest of the sub-folder name, e.g. the MRI sequence)", "",
                  *_table(["set", "variant", "measure"], ["name", "variant", "measure"], result["variants"])]
    lines += _separation(result.get("separation") or [])
    lines += _variant_separation(result.get("separation_by_variant") or [])
    return "\n".join(lines) + "\n"


def _separation(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The threshold-free table: tumour groups down, healthy groups across, AUC (95% interval) in each cell."""
    if not rows:
        return []
    healthy = {r["healthy"]: r["n_healthy"] for r in rows}
    tumours = {r["tumours"]: r["n_tumours"] for r in rows}
    cells = {(r["tumours"], r["healthy"]): r for r in rows}
    lines = ["", "### Tumours against healthy slices, at any border (ROC AUC)", "",
             "| tumours \\ healthy | " + " | ".join(f"{h} ({n})" for h, n in healthy.items()) + " |",
             "|---|" + "---:|" * len(healthy)]
    for t, n in tumours.items():
        row = [f"{t} ({n})"]
        for h in healthy:
            r = cells.get((t, h))
            row.append("" if r is None else
                       f"{r['auc']:.3f} ({r['ci95'][0]:.3f}-{r['ci95'][1]:.3f}); {_pct(r['balanced'])}")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "AUC of the tumour probability (1 - P(notumor)) of each set's tumour images against each set's "
                  "healthy images (counts in brackets): how well tumours and healthy slices are told apart at any "
                  "border, not only at the model's own; 95% interval: Hanley and McNeil (1982). After the "
                  "semicolon: the most that tumours found and healthy spared reach at once at any one threshold "
                  "on that probability (the best border for two equal bars)."]
    return lines


def _variant_separation(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The same AUC within one set and one variant (e.g. T2 tumours against T2 normals), one row each."""
    if not rows:
        return []
    lines = ["", "### The same within one variant (tumours and healthy slices of one sequence)", "",
             "| set | variant | tumours | healthy | AUC (95% interval) | best common rate |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['set']} | {r['variant']} | {r['n_tumours']} | {r['n_healthy']} | {r['auc']:.3f} "
              f"({r['ci95'][0]:.3f}-{r['ci95'][1]:.3f}) | {_pct(r['balanced'])} |" for r in rows]
    lines += ["", "A set's tumours of one variant against its own healthy images of that variant: with the "
                  "sequence held fixed, only \"is there a tumour\" is left to tell them apart. Variants without "
                  "healthy images of their own have no row."]
    return lines


def write_outputs(result: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write external.json, external.md, external.png and, with a test split, evaluate's own metrics files."""
    from . import evaluate, plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / JSON_NAME, out / MARKDOWN_NAME]
    paths[0].write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    paths[1].write_text(markdown(result), encoding="utf-8")
    if result["rows"]:
        paths.append(plots.rates_with_intervals(result["rows"], out / PLOT_NAME,
                                                f"{result['model']['name']}: scans from elsewhere"))
    if result["test"] is not None:
        paths += evaluate.write_outputs(result["test"], out)
    return paths
