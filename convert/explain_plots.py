"""Evaluation grids of heatmap overlays with the lesion outline: where a map works and where it fails.

Each cell is the overlay a device draws (`edge.overlay.blend`: the scan in gray, inferno heat over the head
with opacity following heat), so the grid shows what a clinician would see, plus the mask's outline in cyan
(`edge.overlay.draw_outline`) and the map's peak as a cross. Host-side only (matplotlib, headless Agg, object
API as in `convert/plots.py`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from edge.decode import decode  # noqa: E402
from edge.overlay import ALPHA, HEAT_FLOOR, blend, draw_outline  # noqa: E402
from edge.preprocess import Geometry, heatmap_to_image  # noqa: E402

#: Cells per row; a grid shows at most one row of the best and one of the worst scans.
COLUMNS = 6


def best_and_worst_grid(rows: Sequence[dict[str, Any]], members: Sequence[int], heatmaps: Sequence[np.ndarray],
                        geometries: Sequence[Geometry], path: str | Path, title: str) -> Path:
    """Write the ``COLUMNS`` best and ``COLUMNS`` worst of ``members`` (indices into ``rows``) by mass ratio.

    ``rows`` are per-scan records of `convert.explain_eval` (path, mask, predicted, mass_ratio, hit, peak);
    scans with no mass ratio rank last. With fewer than two rows' worth, each scan appears once.
    """
    from .explain_eval import load_mask

    ranked = sorted(members, key=lambda i: -(rows[i]["mass_ratio"] if rows[i]["mass_ratio"] is not None else -1))
    best_n = min(COLUMNS, math.ceil(len(ranked) / 2))
    picks = [("best", ranked[:best_n]), ("worst", ranked[best_n:][-COLUMNS:][::-1])]
    picks = [(name, idx) for name, idx in picks if idx]
    columns = max(len(idx) for _, idx in picks)
    fig = Figure(figsize=(2.1 * columns + 0.9, 2.45 * len(picks) + 0.5))
    grid = fig.add_gridspec(len(picks), columns + 1, width_ratios=[1] * columns + [0.08], wspace=0.06, hspace=0.3)
    for r, (name, indices) in enumerate(picks):
        for c in range(columns):
            ax = fig.add_subplot(grid[r, c])
            ax.set_axis_off()
            if c >= len(indices):
                continue
            i = indices[c]
            row = rows[i]
            image = decode(row["path"])
            heat = heatmap_to_image(heatmaps[i], geometries[i])
            outline = draw_outline(blend(image, heat), load_mask(Path(row["mask"]), heat.shape),
                                   width=max(1, round(max(heat.shape) / 200)))
            ax.imshow(outline, interpolation="antialiased")
            if row["peak"] is not None:
                ax.plot(row["peak"][1], row["peak"][0], marker="+", color="lime", markersize=9, mew=1.5)
            ratio = "n/a" if row["mass_ratio"] is None else f"{row['mass_ratio']:.1f}x"
            ax.set_title(f"{Path(row['path']).stem}\n{row['predicted']} {row['confidence']:.0%}, {ratio}, "
                         f"{'hit' if row['hit'] else 'miss'}", fontsize=6.5)
            if c == 0:
                ax.text(-0.06, 0.5, name, transform=ax.transAxes, rotation=90, ha="right", va="center", fontsize=9)
    bar = fig.add_subplot(grid[:, columns])
    fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), "inferno"), cax=bar,
                 label=f"heat (over the head; none below {HEAT_FLOOR:g}, opacity up to {ALPHA:g})")
    fig.suptitle(f"{title}\ncyan: lesion mask outline, +: heatmap peak", fontsize=9)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=100, bbox_inches="tight")
    return p
