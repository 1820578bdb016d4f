"""edge.camera: the capture loop end to end with a real model, fed by replayed frames (no camera here)."""
from __future__ import annotations

import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from PIL import Image

from edge.camera import (
    OPENCV_MISSING,
    PICAMERA2_MISSING,
    FileSequenceSource,
    FrameSource,
    OpenCVSource,
    PiCamera2Source,
    open_source,
    run_camera,
)
from edge.classifier import Classifier
from edge.errors import CameraError

LABELS = {"glioma", "meningioma", "notumor", "pituitary"}


@pytest.fixture(scope="module")
def classifier(tiny_model_path):
    return Classifier(tiny_model_path)


def test_replayed_frames_are_classified_end_to_end(classifier, sample_scans, tmp_path):
    emitted = []
    source = FileSequenceSource(sample_scans)
    assert isinstance(source, FrameSource)
    before = datetime.now(timezone.utc)
    n = run_camera(classifier, interval=0, count=None, preview=False, heatmap_dir=tmp_path / "overlays",
                   emit=emitted.append, source=source)
    assert n == len(sample_scans) == len(emitted)
    assert [r["source"] for r in emitted] == [f"camera:frame-{i:04d}" for i in range(1, n + 1)]
    for record, scan in zip(emitted, sample_scans):
        assert record["status"] == "ok"
        assert record["label"] in LABELS
        stamp = datetime.fromisoformat(record["time"].replace("Z", "+00:00"))
        assert stamp.utcoffset().total_seconds() == 0 and stamp >= before.replace(microsecond=0)
        overlay = Path(record["overlay"])
        assert overlay.parent == tmp_path / "overlays" and overlay.name.endswith(record["source"][7:] + ".png")
        with Image.open(overlay) as picture:
            assert picture.format == "PNG" and picture.width >= 224
        # the same scan classified directly gives the same verdict: the loop passes frames through untouched
        assert classifier.classify(scan).label == record["label"]
    assert source.read() is None, "run_camera closes the source it was given"


def test_count_stops_the_loop(classifier, sample_scans):
    emitted = []
    n = run_camera(classifier, interval=0, count=3, preview=False, heatmap_dir=None, emit=emitted.append,
                   source=FileSequenceSource(sample_scans))
    assert n == 3 and len(emitted) == 3
    assert all(r["overlay"] is None for r in emitted)


def test_a_bad_frame_is_reported_and_the_loop_goes_on(classifier, sample_scans, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(sample_scans[0].read_bytes()[:200])
    emitted = []
    n = run_camera(classifier, interval=0, count=None, preview=False, heatmap_dir=None, emit=emitted.append,
                   source=FileSequenceSource([sample_scans[0], broken, sample_scans[1]]))
    assert n == 3
    assert [r["status"] for r in emitted] == ["ok", "error", "ok"]
    assert emitted[1]["source"] == "camera:frame-0002" and "broken.jpg" in emitted[1]["error"]


def test_interval_paces_the_captures(classifier, sample_scans):
    start = time.monotonic()
    run_camera(classifier, interval=0.2, count=4, preview=False, heatmap_dir=None, emit=lambda r: None,
               source=FileSequenceSource(sample_scans))
    assert time.monotonic() - start >= 0.6, "4 frames 0.2 s apart span at least 3 intervals"


def test_ctrl_c_ends_the_session_cleanly(classifier, sample_scans):
    emitted = []

    def emit(record):
        emitted.append(record)
        if len(emitted) == 2:
            raise KeyboardInterrupt

    source = FileSequenceSource(sample_scans)
    assert run_camera(classifier, interval=0, count=None, preview=False, heatmap_dir=None, emit=emit,
                      source=source) == 2
    assert source.read() is None


def test_preview_needs_a_live_camera(classifier, sample_scans):
    with pytest.raises(CameraError, match="preview"):
        run_camera(classifier, interval=0, count=1, preview=True, heatmap_dir=None, emit=lambda r: None,
                   source=FileSequenceSource(sample_scans))


def test_missing_picamera2_is_a_clear_camera_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "picamera2", None)  # as on a machine without it: import fails
    with pytest.raises(CameraError) as info:
        PiCamera2Source()
    assert str(info.value) == PICAMERA2_MISSING
    assert 'pip install "edge-mri[camera]"' in PICAMERA2_MISSING
    with pytest.raises(CameraError, match="picamera2 is not installed"):
        open_source("picamera2")


def test_missing_opencv_is_a_clear_camera_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(CameraError) as info:
        OpenCVSource(0)
    assert str(info.value) == OPENCV_MISSING


def test_auto_without_any_camera_names_both_reasons(monkeypatch):
    monkeypatch.setitem(sys.modules, "picamera2", None)
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(CameraError) as info:
        open_source("auto")
    assert "picamera2 is not installed" in str(info.value) and "OpenCV is not installed" in str(info.value)


def test_open_source_names(sample_scans, tmp_path):
    replay = open_source(str(sample_scans[0].parent))
    assert isinstance(replay, FileSequenceSource)
    frame = replay.read()
    assert frame is not None and frame.shape[:2] == (224, 224)
    replay.close()
    with pytest.raises(CameraError, match="no image files"):
        open_source(str(tmp_path))
    with pytest.raises(CameraError, match="unknown camera source"):
        open_source("kinect")
    with pytest.raises(CameraError, match="index must be a number"):
        open_source("opencv:front")
