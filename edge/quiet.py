"""Keep stderr to the runtime's own one-line messages: mute native libraries and Python warnings that would
print their own (multi-line, unprefixed) text in the middle of a CLI's output."""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Mute what native code prints on file descriptor 2 inside the block.

    LiteRT announces "INFO: Created TensorFlow Lite XNNPACK delegate" on every load and OpenCV logs
    "[ WARN:0@0.03] ... can't open camera by index" when it probes a webcam; either would interleave with
    a CLI's one-line errors. Real failures still arrive as Python exceptions (or return values) that the
    caller turns into one typed error.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable stderr (daemon, pythonw): nothing to mute
        yield
        return
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def warnings_ignored() -> Iterator[None]:
    """Drop Python warnings inside the block, for libraries whose warnings are noise to the user: Pillow's
    "Corrupt EXIF data" only means the orientation hint is lost, which decoding already tolerates."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
