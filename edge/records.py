"""The one record shape every `edge-classify` mode emits: file batches, the watch folder and the camera.

A downstream consumer (a PACS bridge, a dashboard, a spreadsheet) reads the same keys whichever mode
wrote the line, and can tell a verdict from a scan the input gate refused or referred, or from an error,
and this version of the shape from a later one, by two fields. The shape is documented in docs/RECORDS.md;
a change to a key is a new :data:`SCHEMA`.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from .errors import one_line

SCHEMA = "edge-classify/2"


def utc_now() -> str:
    """UTC time with milliseconds, as every record's ``time`` is written: ``2026-01-01T12:00:00.000Z``."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def ok_record(result: Any, *, top_k: int = 1, source: str | None = None, overlay: str | None = None,
              time: str | None = None, **extra: Any) -> dict[str, Any]:
    """A result (:class:`edge.classifier.Result`) as a record, its status ``ok``, ``refer`` or ``refused``
    (the result's: only ``ok`` carries a label); ``extra`` holds mode-specific keys (watch: ``size``,
    ``mtime_ns``; ``--keep-uids``: ``sop_instance_uid``)."""
    summary = result.to_dict(top_k)
    record = _head(result.status, source if source is not None else summary.pop("source"), summary.pop("frame", ""),
                   time, extra)
    summary.pop("source", None)
    record.update(summary)
    record["overlay"] = overlay
    return record


def error_record(source: str, message: str, *, frame: str = "", time: str | None = None,
                 **extra: Any) -> dict[str, Any]:
    """An input that could not be classified, as a record: ``error`` is one line naming the problem."""
    record = _head("error", source, frame, time, extra)
    record["error"] = one_line(message)
    return record


def _head(status: str, source: str, frame: str, time: str | None, extra: dict[str, Any]) -> dict[str, Any]:
    record: dict[str, Any] = {"schema": SCHEMA, "status": status, "source": source}
    if frame:
        record["frame"] = frame
    record["time"] = time or utc_now()
    record.update(extra)
    return record
