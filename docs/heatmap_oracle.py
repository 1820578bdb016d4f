"""How alike would the heatmaps be if each were exactly its lesion? The floor under issue 12's specificity bar.

    python docs/heatmap_oracle.py 96:6 96:12 150:5 [--images DIR --masks DIR]

`edge-evaluate --masks` reports the median Pearson r of each map with the set's average map (issue 12: <= 0.6).
Lesions are not spread evenly over the head (pituitary tumours all sit at the sella, meningiomas at the
surface), so even a perfect lesion marker has some r with its own average, and a coarse grid raises it: a map
on a 5x5 or 6x6 grid cannot be sharper than the lesion's coverage of those cells. For each SIZE:GRID this takes
every test tumour slice's mask in model space (the device's crop and resize), pools it to GRID x GRID (each
cell's lesion share) and upsamples it bilinearly, as Grad-CAM's map is, then reports the median r with the
average of those maps, overall and per class; and the same for the masks at full resolution.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

SHARED = Path("../shared/data")


def oracle_r(size: int, grid: int, images: Path, masks: Path, cache_dir: Path) -> dict[str, dict[str, float]]:
    """Median r with the average map, overall and per class, of the lesion masks at ``grid`` and at full size."""
    import tensorflow as tf

    from convert.dataset import load_folder
    from convert.explain_metrics import r_with_average

    d = load_folder(images, size, 1, "mri-crop-v1", cache_dir=cache_dir, mask_root=masks)
    keep = d.has_mask & (d.y != d.labels.index("notumor"))
    lesions = d.masks[keep].astype(np.float32) / 255.0
    y = d.y[keep]
    cells = tf.image.resize(lesions[..., None], (grid, grid), method="area")
    coarse = tf.image.resize(cells, (size, size), method="bilinear").numpy()[..., 0]
    out = {}
    for name, maps in ((f"lesion at {grid}x{grid}", coarse), ("lesion at full size", lesions)):
        r = r_with_average(maps)
        out[name] = {"all": float(np.nanmedian(r)), "n": int(r.size),
                     **{d.labels[c]: float(np.nanmedian(r[y == c])) for c in np.unique(y)}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", nargs="+", help="SIZE:GRID, e.g. 96:6 (custom-cnn) or 150:5 (xception)")
    parser.add_argument("--images", type=Path, default=SHARED / "brain-tumor-mri" / "Testing")
    parser.add_argument("--masks", type=Path, default=SHARED / "brain-tumor-mri-masks" / "Testing")
    parser.add_argument("--cache-dir", type=Path, default=Path("cache"))
    args = parser.parse_args()
    for spec in args.sizes:
        size, grid = (int(v) for v in spec.split(":"))
        for name, r in oracle_r(size, grid, args.images, args.masks, args.cache_dir).items():
            per = ", ".join(f"{k} {v:.3f}" for k, v in r.items() if k not in ("all", "n"))
            print(f"{size} px, {name}: median r with the average map {r['all']:.3f} ({per}; {r['n']} slices)")


if __name__ == "__main__":
    main()
