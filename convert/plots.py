"""Report figures (confusion matrix, learning curves, rates with intervals) as PNG files, with matplotlib's
headless Agg backend.

Host-side only: the device draws its heatmap overlays with PIL (edge/overlay.py) and never imports this.
Figures are built with the object API (no pyplot state), so plotting from a training loop or a test leaks
no open figures and needs no display.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

#: Keras history keys drawn by :func:`learning_curves`: one panel per metric, training and validation.
PANELS = (("loss", "Loss"), ("accuracy", "Accuracy"))


def confusion_matrix(cm: np.ndarray, labels: Sequence[str], path: str | Path, title: str) -> Path:
    """Write a confusion matrix (rows: true class) coloured by row-normalised recall, annotated with counts."""
    cm = np.asarray(cm, np.int64)
    k = len(labels)
    if cm.shape != (k, k):
        raise ValueError(f"confusion matrix of shape {cm.shape} does not match {k} labels")
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    side = 1.6 + 0.9 * k
    fig = Figure(figsize=(side + 1.2, side))
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{cm[i, j]}\n{share[i, j]:.0%}", ha="center", va="center", fontsize=9,
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), labels, rotation=30, ha="right")
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}\n(n={int(cm.sum())}, accuracy {np.trace(cm) / max(int(cm.sum()), 1):.1%})", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def learning_curves(history: dict[str, Sequence[float]], path: str | Path, title: str) -> Path:
    """Write loss and accuracy per epoch (training solid, validation dashed) from a Keras ``History.history``.

    Panels whose keys are absent are left out, so a run without validation still gets its training curves.
    """
    panels = [(key, name) for key, name in PANELS if history.get(key) or history.get(f"val_{key}")]
    if not panels:
        raise ValueError(f"history has none of {', '.join(k for k, _ in PANELS)} (keys: {', '.join(history) or 'none'})")
    fig = Figure(figsize=(5.0 * len(panels), 4.0))
    for n, (key, name) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, len(panels), n)
        for series, style, label in ((key, "-", "training"), (f"val_{key}", "--", "validation")):
            values = history.get(series)
            if values:
                ax.plot(range(1, len(values) + 1), values, style, marker="o", markersize=3, label=label)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(name.lower())
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


#: Bar colour per external-validation measure (convert/external.py).
MEASURE_COLOURS = {"accuracy": "tab:gray", "tumour found": "tab:red", "healthy spared": "tab:green",
                   "right class": "tab:blue"}


def rates_with_intervals(rows: Sequence[dict], path: str | Path, title: str) -> Path:
    """Write one horizontal bar per row (``name``, ``measure``, ``rate``, ``ci95``, ``n``), top to bottom in
    row order, with its 95% interval as an error bar: how far a rate may be from the truth is half the story
    on a set of a few hundred scans."""
    if not rows:
        raise ValueError("no rows to plot")
    y = np.arange(len(rows))[::-1]
    rate = np.array([r["rate"] for r in rows])
    lo, hi = np.array([r["ci95"] for r in rows]).T
    fig = Figure(figsize=(8.0, 1.0 + 0.32 * len(rows)))
    ax = fig.add_subplot()
    ax.barh(y, rate * 100, color=[MEASURE_COLOURS.get(r["measure"], "tab:purple") for r in rows], alpha=0.8,
            xerr=np.vstack([rate - lo, hi - rate]) * 100, error_kw={"capsize": 3, "elinewidth": 1})
    for yi, r, top in zip(y, rows, hi):
        inside = r["rate"] > 0.2  # short bars get their figure past the interval, in black
        ax.text(1 if inside else 100 * top + 1, yi, f"{r['rate']:.1%}", va="center", fontsize=8,
                color="white" if inside else "black")
    names = [r["name"] if r["name"].endswith(r["measure"]) else f"{r['name']}, {r['measure']}" for r in rows]
    ax.set_yticks(y, [f"{name} (n={r['n']})" for name, r in zip(names, rows)], fontsize=8)
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of images (bars: 95% Wilson interval)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Figure, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=120)
    return p
