"""`edge-serve --keep DIR`: keep each classified upload and its record, for a clinic's audit trail.

Nothing is written anywhere unless this is asked for. Kept files are named by time and content hash
(``20260101T120000.123Z-3f2a9c0d1e2b4a5c.dcm``), never by the client's file name, which may hold a patient's
name; the records appended to ``DIR/results.jsonl`` (the same record shape as `edge-classify --watch --out`)
name the kept file as their ``source`` and carry no overlay picture. Each line is written with one write
and fsync'ed, like the watch folder's journal, so a line that exists is complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import OutputError
from .journal import write_durably

RESULTS = "results.jsonl"


class Keeper:
    """Writes kept uploads and their records into one folder; safe to call from several worker threads."""

    def __init__(self, directory: Path):
        self.directory = directory
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{directory}: cannot create the folder ({exc.strerror or exc})") from None
        if not os.access(directory, os.W_OK):
            raise OutputError(f"{directory}: the folder is not writable")
        self._lock = threading.Lock()

    def keep(self, data: bytes, suffix: str, record: dict[str, Any]) -> str:
        """Write ``data`` and append ``record`` (its source set to the kept file's name); return that name."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%f")[:-3] + "Z"
        name = f"{stamp}-{hashlib.sha256(data).hexdigest()[:16]}{suffix}"
        kept = {key: value for key, value in record.items() if key != "overlay_png"}
        client = str(record.get("source", ""))
        if "error" in kept and str(kept["error"]).startswith(f"{client}: "):  # an error names its input
            kept["error"] = f"{name}: {str(kept['error'])[len(client) + 2:]}"
        kept["source"] = name
        line = (json.dumps(kept, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        with self._lock:
            try:
                _write_new(self.directory / name, data)
                _append(self.directory / RESULTS, line)
            except OSError as exc:
                raise OutputError(f"{self.directory}: cannot write ({exc.strerror or exc})") from None
        return name


def _write_new(path: Path, data: bytes) -> None:
    """Write a file that must not exist yet (the same bytes twice in one millisecond are kept once)."""
    try:
        _write(path, data, os.O_EXCL)
    except FileExistsError:
        return


def _append(path: Path, line: bytes) -> None:
    _write(path, line, os.O_APPEND)


def _write(path: Path, data: bytes, flag: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flag, 0o640)
    try:
        write_durably(fd, data)
    finally:
        os.close(fd)
