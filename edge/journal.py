"""The watch folder's results file: an append-only JSONL journal that is also the watch's memory.

On open it is read back (what is done), a torn last line left by a crash is cut off, and every later
line is written with one `write` and fsync'ed before the next file is touched, so a line that exists is
complete and durable. It must be a regular file: /dev/null cannot be fsync'ed, a FIFO not read back, and
/dev/zero never ends.
"""
from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

from .errors import OutputError

log = logging.getLogger(__name__)

#: One file version: (absolute path, size, mtime_ns).
Key = tuple[str, int, int]


class Journal:
    """The append-only JSONL results file: loads what is done, repairs a torn tail, appends durably."""

    def __init__(self, path: Path):
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{path.parent}: cannot create the folder of the results file "
                              f"({exc.strerror or exc})") from None
        created = not path.exists()
        try:
            # Non-blocking only for the open itself, so that a FIFO given by mistake cannot hang it.
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK, 0o640)
        except OSError as exc:
            raise OutputError(f"{path}: cannot open the results file ({exc.strerror or exc})") from None
        try:
            mode = os.fstat(self._fd).st_mode
            if not stat.S_ISREG(mode):
                # /dev/null cannot be fsync'ed, a FIFO not read back, /dev/zero never ends: the results file
                # is the watch's memory, so it must be a file that keeps what is written.
                raise OutputError(f"{path}: the results file must be a regular file, not {_kind(mode)}")
            os.set_blocking(self._fd, True)
            _lock(self._fd, path)
            if created:
                _fsync_dir(path.parent)
            self.done = self._load()
        except OSError as exc:
            os.close(self._fd)
            raise OutputError(f"{path}: cannot read the results file ({exc.strerror or exc})") from None
        except BaseException:
            os.close(self._fd)
            raise

    def _load(self) -> set[Key]:
        chunks, offset = [], 0
        while chunk := os.pread(self._fd, 1 << 20, offset):
            chunks.append(chunk)
            offset += len(chunk)
        data = b"".join(chunks)
        end = data.rfind(b"\n") + 1
        if end < len(data):
            # A crash mid-write left part of a line: drop it, so the file it described is classified again
            # and the next line does not start glued to the fragment.
            log.warning("%s: cutting a torn last line (%d bytes) left by an interrupted run", self.path,
                        len(data) - end)
            os.ftruncate(self._fd, end)
            os.fsync(self._fd)
        done: set[Key] = set()
        for number, line in enumerate(data[:end].splitlines(), 1):
            try:
                record = json.loads(line)
                # `file` is where results files written before the record schema name the scan.
                source = record["source"] if "source" in record else record["file"]
                done.add((source, int(record["size"]), int(record["mtime_ns"])))
            except (ValueError, KeyError, TypeError):
                if line.strip():
                    log.warning("%s:%d: not a result line, ignored", self.path, number)
        return done

    def append(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        try:
            write_durably(self._fd, line)
        except OSError as exc:  # disk full, file too large, I/O error: a part line is cut on the next start
            raise OutputError(f"{self.path}: cannot write the results file ({exc.strerror or exc})") from None
        self.done.add((record["source"], record["size"], record["mtime_ns"]))

    def close(self) -> None:
        os.close(self._fd)


def write_durably(fd: int, data: bytes) -> None:
    """Write all of ``data`` (os.write may take less than asked) and fsync it, so that what exists afterwards
    is complete and on disk: the watch journal's lines and edge-serve's kept uploads and records."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def _lock(fd: int, path: Path) -> None:
    try:
        import fcntl
    except ImportError:  # not POSIX (Windows): no advisory locks, one watcher per results file is on the user
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OutputError(f"{path}: another watch process is writing these results") from None


def _fsync_dir(directory: Path) -> None:
    """Make a newly created results file's directory entry durable too (POSIX; a no-op elsewhere)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
