"""How much a bundled model's heatmaps depend on the scan: the figure both model cards quote.

    python docs/heatmap_specificity.py custom-cnn xception [--images ../shared/data/brain-tumor-mri/Testing]

For 200 randomly drawn test images (seed 0) it correlates each heatmap with the average heatmap of all of
them. A median Pearson r near 1 means the map is mostly the same picture whatever the scan: faithful to
the model, but no lesion marker. A map that is flat (no positive evidence anywhere, as a focal model's
map of a healthy slice can be) has no correlation: those are counted and left out of r. Also reports
where the peak sits (fraction of the image height) of the other maps.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np

from convert.explain_metrics import r_with_average
from edge import Classifier


def specificity(model: str, images: list[Path]) -> dict[str, float]:
    """Median and 10th percentile of r(heatmap, mean heatmap) over the maps that are not flat, how many
    are flat, and the peak row's median and quartiles."""
    clf = Classifier(model, threads=1)
    maps = np.stack([clf.classify(path).heatmap for path in images])
    vectors = maps.reshape(len(maps), -1)
    varied = vectors.std(axis=1) > 0
    r = r_with_average(vectors)[varied]
    rows = np.array([np.unravel_index(np.argmax(h), h.shape)[0] / h.shape[0] for h in maps[varied]])
    return {"maps": int(np.sum(varied)), "flat": int(np.sum(~varied)), "median_r": float(np.median(r)),
            "p10_r": float(np.percentile(r, 10)),
            "peak_row_median": float(np.median(rows)), "peak_row_q1": float(np.percentile(rows, 25)),
            "peak_row_q3": float(np.percentile(rows, 75))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--images", type=Path, default=Path("../shared/data/brain-tumor-mri/Testing"))
    parser.add_argument("-n", type=int, default=200)
    args = parser.parse_args()
    files = sorted(args.images.rglob("*.jpg"))
    random.Random(0).shuffle(files)
    for model in args.models:
        s = specificity(model, files[: args.n])
        print(f"{model}: r(heatmap, mean heatmap) median {s['median_r']:.3f}, p10 {s['p10_r']:.3f} "
              f"({s['maps']} maps; {s['flat']} flat, left out); "
              f"peak at {s['peak_row_median']:.2f} of the height (IQR {s['peak_row_q1']:.2f}-{s['peak_row_q3']:.2f})")


if __name__ == "__main__":
    main()
