"""Rebuild docs/overlays.png, the README's picture, from a bundled model and the sample scans.

    python docs/make_overlay_figure.py              # the default model -> docs/overlays.png
    python docs/make_overlay_figure.py xception     # -> docs/overlays_xception.png

It runs the real runtime (`edge-classify --heatmap`) and tiles the overlay PNGs it writes, so the
picture shows exactly what a clinic sees.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def main(model: str | None = None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        chosen = ["--model", model] if model else []
        subprocess.run([sys.executable, "-m", "edge.cli", str(ROOT / "edge" / "samples"), "--heatmap", tmp, *chosen],
                       check=True, cwd=ROOT)
        tiles = [Image.open(p).convert("RGB") for p in sorted(Path(tmp).glob("*.png"))]
    w, h = 240, int(240 * tiles[0].height / tiles[0].width)
    cols = 4
    rows = (len(tiles) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * w, rows * h), "black")
    for i, tile in enumerate(tiles):
        sheet.paste(tile.resize((w, h), Image.LANCZOS), ((i % cols) * w, (i // cols) * h))
    sheet.save(ROOT / "docs" / (f"overlays_{model}.png" if model else "overlays.png"), optimize=True)


if __name__ == "__main__":
    main(*sys.argv[1:2])
