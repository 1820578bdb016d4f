"""Classify what a camera sees: a Raspberry Pi camera, a USB webcam, or a replay of captured frames.

The use case is a board next to a light box or a viewing monitor, photographing films or screens at a
steady pace. Every frame source only has to hand out RGB (or grayscale) numpy frames; the loop in
`run_camera` does the pacing, classification, overlays and reporting, so a new source is a few lines.

Camera libraries are imported lazily: picamera2 only exists on Raspberry Pi OS (from apt), OpenCV is a
large optional install, and the rest of the runtime must work without either.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .errors import CameraError, InputError, install_hint
from .quiet import native_stderr_silenced
from .records import error_record, ok_record, utc_now

PICAMERA2_MISSING = (f"picamera2 is not installed; on Raspberry Pi OS: sudo apt install python3-picamera2, in a venv "
                     f"made with --system-site-packages, then {install_hint('camera')}")
OPENCV_MISSING = f"OpenCV is not installed; {install_hint('webcam')} for USB webcams"
KINDS = "auto, picamera2, opencv, opencv:INDEX or a folder of captured frames"
#: Frame size asked of the Pi camera: 4:3 and well above any model input, yet cheap to capture and decode.
PI_FRAME_SIZE = (1280, 960)


@runtime_checkable
class FrameSource(Protocol):
    """Where frames come from. `read` returns None only when a finite source (a replay) has run out."""

    def read(self) -> np.ndarray | None: ...

    def close(self) -> None: ...


class PiCamera2Source:
    """The Raspberry Pi camera through picamera2 (libcamera), RGB frames of `size` (width, height)."""

    def __init__(self, size: tuple[int, int] = PI_FRAME_SIZE):
        try:
            from picamera2 import Picamera2
        except ImportError:
            raise CameraError(PICAMERA2_MISSING) from None
        try:
            self._camera = Picamera2()
            self._camera.configure(self._camera.create_still_configuration(main={"format": "RGB888", "size": size}))
        except Exception as exc:  # picamera2 raises IndexError/RuntimeError when no camera is attached or busy
            raise CameraError(f"no usable Raspberry Pi camera ({type(exc).__name__}: {exc}); "
                              "check the cable and `rpicam-hello --list-cameras`") from None
        self._started = False

    def start_preview(self) -> None:
        """Show the live camera on the attached display (a window on a desktop, full screen otherwise)."""
        if self._started:
            raise CameraError("the preview must be started before the first frame is read")
        self._camera.start(show_preview=True)
        self._started = True

    def read(self) -> np.ndarray:
        if not self._started:
            self._camera.start()
            self._started = True
        try:
            frame = self._camera.capture_array("main")
        except Exception as exc:
            raise CameraError(f"Raspberry Pi camera capture failed ({type(exc).__name__}: {exc})") from None
        # libcamera's "RGB888" is B, G, R in memory; reorder so every source hands out RGB.
        return np.ascontiguousarray(frame[..., 2::-1])

    def close(self) -> None:
        if self._started:
            self._camera.stop()
        self._camera.close()


class OpenCVSource:
    """A USB (UVC) webcam through OpenCV; `index` is the /dev/videoN number."""

    def __init__(self, index: int = 0):
        # OpenCV logs its probing ("[ WARN:0@0.03] ... can't open camera by index") on stderr; the outcome
        # is reported here as one CameraError instead. The variable only works before cv2 is imported.
        os.environ.setdefault("OPENCV_LOG_LEVEL", "SILENT")
        try:
            import cv2
        except ImportError:
            raise CameraError(OPENCV_MISSING) from None
        self._cv2 = cv2
        with native_stderr_silenced():
            self._capture = cv2.VideoCapture(index)
            opened = self._capture.isOpened()
        if not opened:
            self._capture.release()
            raise CameraError(f"webcam {index} cannot be opened (absent, busy, or no permission on /dev/video{index})")
        # Keep one buffered frame at most: at one frame per second a deeper queue hands out stale pictures.
        self._capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        self.index = index

    def read(self) -> np.ndarray:
        with native_stderr_silenced():
            self._capture.grab()  # drop the frame that waited in the buffer since the last read
            ok, frame = self._capture.read()
        if not ok or frame is None:
            raise CameraError(f"webcam {self.index} returned no frame (unplugged?)")
        return self._cv2.cvtColor(frame, self._cv2.COLOR_BGR2RGB)

    def close(self) -> None:
        self._capture.release()


class FileSequenceSource:
    """Replays image files (or DICOM) as camera frames, in the given order: for reproducing a session
    from saved captures, and for testing everything downstream of a camera without one."""

    def __init__(self, paths: Iterable[Path]):
        self._paths = [Path(p) for p in paths]
        self._next = 0

    @classmethod
    def from_folder(cls, folder: Path) -> FileSequenceSource:
        """Every image file in `folder`, by name (captures named by time or number replay in order)."""
        from .decode import IMAGE_SUFFIXES

        paths = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise CameraError(f"{folder}: no image files to replay")
        return cls(paths)

    def read(self) -> np.ndarray | None:
        from .decode import decode

        if self._next >= len(self._paths):
            return None
        path = self._paths[self._next]
        self._next += 1
        return decode(path)

    def close(self) -> None:
        self._next = len(self._paths)


def open_source(kind: str = "auto") -> FrameSource:
    """Open a frame source by name: 'auto' (Pi camera, else webcam 0), 'picamera2', 'opencv',
    'opencv:INDEX', or the path of a folder of captured frames to replay."""
    if kind == "picamera2":
        return PiCamera2Source()
    if kind == "opencv" or kind.startswith("opencv:"):
        index = kind.partition(":")[2] or "0"
        if not index.isdigit():
            raise CameraError(f"webcam index must be a number, got {index!r}")
        return OpenCVSource(int(index))
    if kind == "auto":
        try:
            return PiCamera2Source()
        except CameraError as pi_error:
            try:
                return OpenCVSource(0)
            except CameraError as cv_error:
                raise CameraError(f"no camera found: {pi_error}; {cv_error}") from None
    if Path(kind).is_dir():
        return FileSequenceSource.from_folder(Path(kind))
    raise CameraError(f"unknown camera source {kind!r}; use {KINDS}")


def run_camera(
    classifier: Any,
    *,
    interval: float,
    count: int | None,
    preview: bool,
    heatmap_dir: Path | None,
    emit: Callable[[dict], None],
    source: FrameSource | None = None,
    top_k: int = 1,
) -> int:
    """Capture a frame every `interval` seconds, classify it, and `emit` one record per frame.

    Stops after `count` frames (None: until the source runs out or Ctrl-C) and returns how many frames were
    processed. Each record is an `edge.records` record (docs/RECORDS.md): `source` is 'camera:frame-0001'
    (numbered from 1), `time` the UTC capture time and, with `heatmap_dir`, `overlay` the PNG written
    there. A frame the classifier rejects is an error record and the loop goes on. The source (opened
    with `open_source('auto')` when None) is closed on the way out.
    """
    from .overlay import save_overlay

    source = open_source("auto") if source is None else source
    processed = 0
    try:
        if preview:
            start_preview = getattr(source, "start_preview", None)
            if start_preview is None:
                raise CameraError("a live preview needs the Raspberry Pi camera (picamera2)")
            start_preview()
        if heatmap_dir is not None:
            heatmap_dir.mkdir(parents=True, exist_ok=True)
        # Overlays of different sessions must not overwrite each other: name them by the session's start.
        session = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        next_at = time.monotonic()
        while count is None or processed < count:
            time.sleep(max(0.0, next_at - time.monotonic()))
            next_at = time.monotonic() + interval
            failure: InputError | None = None
            try:
                image = source.read()
            except InputError as exc:  # a replayed file that does not decode is one bad frame, not the end
                image, failure = None, exc
            else:
                if image is None:
                    break
            processed += 1
            name = f"frame-{processed:04d}"
            stamp = utc_now()
            if failure is None:
                try:
                    result = classifier.classify(image)
                except InputError as exc:
                    failure = exc
            if failure is not None:
                emit(error_record(f"camera:{name}", f"camera:{name}: {failure}", time=stamp))
                continue
            overlay = None
            if heatmap_dir is not None:
                overlay = str(save_overlay(result, heatmap_dir / f"camera-{session}-{name}.png"))
            emit(ok_record(result, top_k=top_k, source=f"camera:{name}", overlay=overlay, time=stamp))
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a live session ends; what was emitted stands
    finally:
        source.close()
    return processed
