"""Edge runtime for explainable brain-MRI classification (int8 TFLite + in-graph Grad-CAM)."""
import atexit
import shutil
import tempfile
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
# setuptools builds in ./build and ./edge_mri.egg-info and leaves both in the checkout, and the next build
# reuses a stale build/lib: a file since removed from the source (a model, a module) would still ship. Each
# build step gets a fresh scratch folder instead, removed when the step ends (pip runs every PEP 517 hook
# in its own process, and the wheel itself is written to pip's folder, not here).
SCRATCH = tempfile.mkdtemp(prefix="edge-mri-build-")
atexit.register(shutil.rmtree, SCRATCH, ignore_errors=True)

# LiteRT publishes wheels for Linux x86_64/aarch64 and macOS arm64; 32-bit Arm boards get tflite-runtime.
RUNTIME = [
    "numpy>=1.23",
    "pillow>=10.0",
    "click>=8.1",
    "psutil>=5.9",
    "ai-edge-litert>=1.2; platform_machine in 'x86_64 aarch64 arm64 AMD64'",
    "tflite-runtime>=2.13; platform_machine == 'armv7l'",
]
CONVERT = [
    "tensorflow-cpu>=2.16; platform_machine == 'x86_64'",
    "tensorflow>=2.16; platform_machine != 'x86_64'",
    "matplotlib>=3.7",
    "imagehash>=4.3",
]
# pylibjpeg-libjpeg decodes JPEG Lossless, JPEG-LS and 12-bit JPEG (Pillow, pydicom's default, does not);
# it has wheels for Linux x86_64 and aarch64 on Python 3.10-3.12, so a Pi installs it without compiling.
DICOM = ["pydicom>=3.0", "pylibjpeg>=2.0", "pylibjpeg-libjpeg>=2.1"]
# edge-serve: all pure Python (uvicorn without its optional C speed-ups), so any board installs it.
SERVE = ["starlette>=0.40", "uvicorn>=0.30", "python-multipart>=0.0.18"]

setup(
    name="edge-mri",
    version="0.1.0",
    description=__doc__,
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["edge", "edge.*", "convert", "convert.*", "benchmarks", "benchmarks.*"]),
    package_data={
        "edge": ["models/*.tflite", "models/*.md", "samples/*", "serve_page/*"],
        "benchmarks": ["baselines/*.json", "baselines/*.md"],
    },
    install_requires=RUNTIME,
    extras_require={
        "convert": CONVERT,
        "dicom": DICOM,
        # The Raspberry Pi camera, on Raspberry Pi OS only: picamera2 needs apt's libcamera bindings, so it
        # comes from apt (python3-picamera2, venv made with --system-site-packages). Elsewhere: "webcam".
        "camera": ["picamera2>=0.3; platform_system == 'Linux' and platform_machine in 'aarch64 armv7l'"],
        "webcam": ["opencv-python-headless>=4.8"],
        "serve": SERVE,
        # selenium drives the system's Chromium (Debian: chromium, chromium-driver) for the page's browser test.
        "test": ["pytest>=7.4", "selenium>=4.15"] + CONVERT + DICOM + SERVE,
    },
    options={"build": {"build_base": f"{SCRATCH}/build"}, "egg_info": {"egg_base": SCRATCH}},
    entry_points={
        "console_scripts": [
            "edge-classify=edge.cli:main",
            "edge-serve=edge.serve_cli:main",
            "edge-convert=convert.convert_cli:main",
            "edge-train=convert.train_cli:main",
            "edge-evaluate=convert.evaluate_cli:main",
            "edge-dedup=convert.dedup_cli:main",
            "edge-bench=benchmarks.cli:main",
            "edge-gate=convert.gate_cli:main",
        ]
    },
)
