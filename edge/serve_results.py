"""One uploaded scan -> the HTTP status and JSON record edge-serve answers with (run on a worker thread).

The record is the one `edge-classify --json` prints (`edge.records`, docs/RECORDS.md) for the same scan,
with ``source`` the client's file name and one more key, ``overlay_png``: the overlay picture (scan, heat,
verdict or status, colour scale) as a PNG data URL, so a page or a clinic's software needs no second
request and nothing is kept on the server for it. A scan that cannot be classified gets the CLI's error
record with a 4xx code.

The scan is only ever bytes in memory. Errors name the client's file in the response, and the request
number in the server's log line (never the client's name, which may be a patient's); DICOM messages carry
no patient data (edge.dicom scrubs them).
"""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any

from .errors import BackendError, EdgeError, MissingDecoderError, ModelError, OutputError, one_line
from .records import error_record, ok_record
from .serve_keep import Keeper
from .serve_upload import Upload

#: What uploads may be, by content (not by name): the CLI's formats. Anything else is refused before any
#: decoder sees it, so no other Pillow plugin (one that runs an external program, say) is ever reached.
_MAGIC = (("PNG", (b"\x89PNG\r\n\x1a\n",)), ("JPEG", (b"\xff\xd8\xff",)), ("TIFF", (b"II*\x00", b"MM\x00*")),
          ("BMP", (b"BM",)))
_DICOM_OFFSET, _DICOM_MAGIC = 128, b"DICM"
#: A kept upload's suffix by its sniffed kind.
SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "TIFF": ".tif", "BMP": ".bmp", "DICOM": ".dcm"}
NOT_AN_IMAGE = "not a recognised image (expected JPEG, PNG, BMP, TIFF or DICOM)"
#: How in-memory data is named by the decoder's messages, replaced by the client's file name.
_BYTES_NAME = "<bytes>: "


@dataclass(frozen=True)
class Outcome:
    """What to answer: HTTP ``status``, the JSON ``record``, and ``note``, the log line's text."""

    status: int
    record: dict[str, Any]
    note: str


def sniff(data: bytes) -> str | None:
    """The upload's kind by its first bytes (DICOM: 'DICM' at byte 128), or None."""
    if data[_DICOM_OFFSET:_DICOM_OFFSET + len(_DICOM_MAGIC)] == _DICOM_MAGIC:
        return "DICOM"
    return next((kind for kind, heads in _MAGIC if data.startswith(heads)), None)


def overlay_data_url(result: Any, status: str) -> str:
    """The overlay of a result as a ``data:image/png;base64,...`` URL (edge.overlay draws it)."""
    from .overlay import PNG_LEVEL, overlay_image

    buffer = io.BytesIO()
    overlay_image(result, status).save(buffer, format="PNG", compress_level=PNG_LEVEL)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def classify_upload(classifier: Any, upload: Upload, *, top_k: int, keeper: Keeper | None) -> Outcome:
    """Classify one upload with this worker's classifier (DICOM: its first frame, its own window)."""
    kind = sniff(upload.data)
    name = upload.filename
    if upload.data and kind is None:
        outcome = Outcome(415, error_record(name, f"{name}: {NOT_AN_IMAGE}"), NOT_AN_IMAGE)
    else:
        outcome = _classify(classifier, upload, top_k)
    if keeper is not None:
        try:
            keeper.keep(upload.data, SUFFIXES.get(kind or "", ".bin"), outcome.record)
        except OutputError as exc:
            message = f"--keep: {exc}"
            return Outcome(500, error_record(name, f"{name}: the result was not kept, so it is not given "
                                                   f"({message})"), message)
    return outcome


def _classify(classifier: Any, upload: Upload, top_k: int) -> Outcome:
    name = upload.filename
    try:
        result = classifier.classify_frames(upload.data, frame=0)[0]
    except (ModelError, BackendError) as exc:  # the server's fault, not the scan's
        return Outcome(500, error_record(name, f"{name}: the model failed ({exc})"), f"the model failed ({exc})")
    except EdgeError as exc:
        problem = _problem(exc)
        status = 415 if isinstance(exc, MissingDecoderError) else 422
        return Outcome(status, error_record(name, f"{name}: {problem}"), problem)
    except Exception as exc:  # never a traceback or a dead worker for one scan
        problem = f"unexpected {type(exc).__name__}: {one_line(exc)}"
        return Outcome(500, error_record(name, f"{name}: {problem}"), problem)
    record = ok_record(result, top_k=top_k, source=name)
    status = str(record.get("status", "ok"))
    # the log line: the verdict, or for a scan without one (refer, refused) the reason code, never a label
    note = f"{status} {record.get('label') if status == 'ok' else record.get('reason')}"
    try:
        record["overlay_png"] = overlay_data_url(result, status) if result.image is not None else None
    except Exception as exc:  # the result stands without its picture; say so rather than fail the request
        record["overlay_png"] = None
        return Outcome(200, record, f"{note} (no overlay: {type(exc).__name__})")
    return Outcome(200, record, note)


def _problem(exc: Exception) -> str:
    """The decoder's message without its name for in-memory data."""
    message = one_line(exc)
    return message[len(_BYTES_NAME):] if message.startswith(_BYTES_NAME) else message
