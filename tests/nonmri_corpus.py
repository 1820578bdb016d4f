"""A corpus of inputs that are not brain-MRI slices, none of which may get a plain verdict (issue 13).

Built from what this machine already holds, nothing downloaded: images drawn here with numpy and Pillow
(blank, flat, noise, solid colours, transparency, checkerboards, gradients, text pages, geometric
shapes), the project's own plot PNGs in docs/, the photographs and maps that matplotlib ships as sample
data, and pydicom's test files that are not MR (CT, ultrasound, secondary captures, a mask). It is never
used for calibration: the gate's threshold comes from training scans only (convert/gate_calibration.py).
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parent.parent
#: The project's own figures that hold no scan (the overlay figures show MRI and are left out).
PLOTS = ("latency.png", "learning_curves_custom-cnn.png", "learning_curves_xception.png",
         "confusion_custom-cnn_dedup.png", "confusion_xception_dedup.png")
#: pydicom test files that are not MR: CT (spine, abdomen, head), ultrasound, secondary captures, a liver mask.
DICOM = ("CT_small.dcm", "examples_overlay.dcm", "examples_palette.dcm", "examples_rgb_color.dcm",
         "JPGExtended.dcm", "JPEG2000.dcm", "image_dfl.dcm", "liver_1frame.dcm", "SC_rgb_jpeg.dcm",
         "693_J2KI.dcm")
#: Photographs and rasters in matplotlib's sample data.
MPL_SAMPLES = ("grace_hopper.jpg", "logo2.png", "Minduka_Present_Blue_Pack.png")


def _text_page(size: tuple[int, int], ink: int, paper: int) -> Image.Image:
    page = Image.new("L", size, paper)
    draw = ImageDraw.Draw(page)
    font = ImageFont.load_default(size=14)
    words = "Patient report. Findings: no acute intracranial abnormality. Impression: normal study. ".split()
    rng = np.random.default_rng(5)
    for y in range(12, size[1] - 16, 20):
        line = " ".join(rng.choice(words, 8))
        draw.text((12, y), line, fill=ink, font=font)
    return page


def drawn(directory: Path) -> list[Path]:
    """Synthetic non-scans written to ``directory``: one file each."""
    rng = np.random.default_rng(13)
    yy, xx = np.mgrid[:224, :224]
    images: dict[str, Image.Image] = {
        "black.png": Image.new("L", (224, 224), 0),
        "white.png": Image.new("L", (224, 224), 255),
        "flat-grey-16.png": Image.new("L", (16, 16), 128),
        "flat-grey.jpg": Image.new("L", (512, 512), 100),
        "transparent.png": Image.new("RGBA", (224, 224), (255, 255, 255, 0)),
        "red.png": Image.new("RGB", (224, 224), (255, 0, 0)),
        "green.jpg": Image.new("RGB", (300, 200), (0, 160, 0)),
        "blue.png": Image.new("RGB", (224, 224), (0, 0, 255)),
        "near-flat.png": Image.fromarray((120 + rng.integers(0, 3, (224, 224))).astype(np.uint8)),
        "uniform-noise.png": Image.fromarray(rng.integers(0, 256, (224, 224), dtype=np.uint8)),
        "colour-noise.png": Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)),
        "gaussian-noise-16bit.png": Image.fromarray(
            np.clip(rng.normal(30000, 8000, (256, 256)), 0, 65535).astype(np.uint16)),
        "salt-pepper.png": Image.fromarray(((rng.random((224, 224)) < 0.1) * 255).astype(np.uint8)),
        "checkerboard-8.png": Image.fromarray((((yy // 8 + xx // 8) % 2) * 255).astype(np.uint8)),
        "checkerboard-32.png": Image.fromarray((((yy // 32 + xx // 32) % 2) * 255).astype(np.uint8)),
        "gradient.png": Image.fromarray((xx * 255 / 223).astype(np.uint8)),
        "stripes.png": Image.fromarray((127.5 + 127.5 * np.sin(xx / 4.0)).astype(np.uint8)),
        "bright-disc.png": Image.fromarray((((yy - 112) ** 2 + (xx - 112) ** 2 < 90 ** 2) * 200).astype(np.uint8)),
        "radial-blob.png": Image.fromarray(
            (255 * np.exp(-((yy - 112) ** 2 + (xx - 112) ** 2) / (2 * 45.0 ** 2))).astype(np.uint8)),
        "rectangles.png": Image.fromarray(((((yy > 40) & (yy < 180) & (xx > 30) & (xx < 90))
                                            | ((yy > 60) & (yy < 120) & (xx > 120) & (xx < 200))) * 230
                                           ).astype(np.uint8)),
        "text-page.png": _text_page((420, 560), ink=0, paper=255),
        "text-on-black.png": _text_page((400, 300), ink=230, paper=0),
        "float-ramp.tif": Image.fromarray(np.linspace(0, 1, 256 * 256, dtype=np.float32).reshape(256, 256)),
    }
    paths = []
    for name, image in images.items():
        path = directory / name
        image.save(path, quality=90) if name.endswith(".jpg") else image.save(path)
        paths.append(path)
    return paths


def shipped(directory: Path) -> list[Path]:
    """Non-scans this machine already holds: docs/ plots, matplotlib's sample data, pydicom's non-MR files."""
    import matplotlib

    samples = Path(matplotlib.get_data_path()) / "sample_data"
    paths = [REPO / "docs" / name for name in PLOTS]
    paths += [samples / name for name in MPL_SAMPLES]
    for name in ("jacksboro_fault_dem.npz", "topobathy.npz"):  # elevation maps, as a 16-bit PNG each
        with np.load(samples / name) as data:
            z = np.asarray(data[data.files[0]], np.float64)
        z = (z - z.min()) / max(np.ptp(z), 1e-9) * 65535
        path = directory / (Path(name).stem + ".png")
        Image.fromarray(z.astype(np.uint16)).save(path)
        paths.append(path)
    try:
        from pydicom.data import get_testdata_file
    except ImportError:
        return paths
    paths += [Path(get_testdata_file(name)) for name in DICOM]
    return paths


def zero_dicom(path: Path) -> Path:
    """A valid DICOM (MR modality) whose pixels are all zero: a blank export."""
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.PixelData = np.zeros_like(ds.pixel_array).tobytes()
    ds.save_as(path)
    return path


def build(directory: Path) -> list[Path]:
    """Every corpus input, written or found; at least 30."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = drawn(directory) + shipped(directory)
    try:
        paths.append(zero_dicom(directory / "zero.dcm"))
    except ImportError:
        pass
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"corpus inputs missing: {', '.join(map(str, missing))}")
    return paths


def mri_sagittal(path: Path) -> Path:
    """matplotlib's sample brain MRI (s1045.ima: a 256x256 16-bit sagittal slice) as a PNG: a real scan,
    not part of the corpus, that the gate should answer like the training data."""
    import matplotlib

    raw = gzip.open(Path(matplotlib.get_data_path()) / "sample_data" / "s1045.ima.gz").read()
    Image.fromarray(np.frombuffer(raw, "<u2").reshape(256, 256).copy()).save(path)
    return path


if __name__ == "__main__":  # python tests/nonmri_corpus.py DIR: the whole corpus in one folder, for edge-gate measure
    import shutil
    import sys

    target = Path(sys.argv[1])
    for source in build(target / ".drawn"):
        shutil.copy(source, target / source.name)
    shutil.rmtree(target / ".drawn")
    print(f"{len(list(target.iterdir()))} inputs in {target}")
