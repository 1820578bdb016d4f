"""Watch an inbox folder and classify every scan dropped into it, exactly once, surviving crashes.

The use case is a board beside a scanner or a PACS export: files arrive over the network at any pace, the
process may be killed at any moment (power cut, OOM killer, `systemctl restart`), and afterwards every
scan must still have exactly one result.

How that is achieved:

- The results file (JSONL, one `edge.records` record per file version) *is* the state. On start it is read back; a
  torn last line from a crash mid-write is cut off, so that file is simply classified again. Each line is
  written with one `write`, then flushed and fsync'ed before the next file is touched, so a line that
  exists is complete and durable, and a file without a line was never reported.
- A file is one version per (path, size, mtime): a scan replaced under the same name is classified again,
  an unchanged one never is. Files the classifier rejects get an error line and are not retried.
- Files still being written are not read: a file must keep the same size and mtime for `settle_seconds`
  of this process's own observation (not judged from its mtime, which a network share's clock may skew),
  and it must still be unchanged after classification, or the result is dropped and the file waits again.
  Dotfiles and `*.part` / `*.tmp` names (what rsync, browsers and careful copiers write before renaming)
  are ignored.
- Only the folder itself is watched, not subfolders, so results and overlays can live beside it safely.
- An exclusive lock on the results file keeps a second watcher (a manual run next to the service) from
  writing the same results twice.
"""
from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import EdgeError, InputError, OutputError, one_line
from .records import error_record, ok_record

log = logging.getLogger(__name__)

IGNORED_SUFFIXES = (".part", ".tmp")

Key = tuple[str, int, int]


def watch(
    classifier: Any,
    directory: Path,
    out_path: Path,
    *,
    poll_interval: float = 1.0,
    settle_seconds: float = 2.0,
    once: bool = False,
    top_k: int = 1,
    emit: Callable[[dict], None] | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Classify new files in `directory` with `classifier.classify(path)`, appending results to `out_path`.

    Each JSONL line is an `edge.records` record (docs/RECORDS.md) whose `source` is the file's absolute
    path, with the file version's `size` and `mtime_ns`. `emit` also receives each line's dict once it is
    durable. Runs until `stop` is set (or Ctrl-C); with `once=True` it returns as soon as
    every file present has been handled (waiting for files still being written to settle). Returns the
    number of lines written by this call. Model or backend failures propagate: they are not the file's
    fault, and the file is retried after a restart.
    """
    directory = Path(directory).resolve()
    if not directory.is_dir():
        raise InputError(f"{directory}: the watch folder does not exist or is not a folder")
    journal = _Journal(Path(out_path))
    skip = {journal.path.resolve()}
    stop = stop or threading.Event()
    pending: dict[str, tuple[int, int, float]] = {}
    written = 0
    try:
        while not stop.is_set():
            ready, waiting = _scan(directory, journal.done, pending, skip, settle_seconds)
            for path, size, mtime_ns in ready:
                if stop.is_set():
                    break
                record = _classify(classifier, path, size, mtime_ns, top_k)
                if record is None:  # the file changed or vanished while being read: let it settle again
                    pending.pop(str(path), None)
                    waiting += 1
                    continue
                journal.append(record)
                written += 1
                if emit is not None:
                    emit(record)
            if once and not waiting:
                break
            stop.wait(poll_interval)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how an interactive watch ends; every written line is already durable
    finally:
        journal.close()
    return written


def _scan(directory: Path, done: set[Key], pending: dict[str, tuple[int, int, float]], skip: set[Path],
          settle_seconds: float) -> tuple[list[tuple[Path, int, int]], int]:
    """Files ready to classify (oldest first) and how many are still settling; updates `pending`."""
    now = time.monotonic()
    ready: list[tuple[int, str, Path, int]] = []
    seen: set[str] = set()
    try:
        entries = list(os.scandir(directory))
    except OSError as exc:
        raise InputError(f"{directory}: cannot list the watch folder ({exc.strerror or exc})") from None
    for entry in entries:
        name = entry.name
        if name.startswith(".") or name.lower().endswith(IGNORED_SUFFIXES):
            continue
        try:
            if not entry.is_file():
                continue
            st = entry.stat()
        except OSError:  # vanished between listing and stat
            continue
        path = Path(entry.path)
        if path in skip:
            continue
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key in done:
            continue
        seen.add(key[0])
        previous = pending.get(key[0])
        if previous is None or previous[:2] != (st.st_size, st.st_mtime_ns):
            pending[key[0]] = previous = (st.st_size, st.st_mtime_ns, now)
        if now - previous[2] >= settle_seconds:
            ready.append((st.st_mtime_ns, key[0], path, st.st_size))
    for gone in set(pending) - seen:
        del pending[gone]
    ready.sort()
    for _, name, _, _ in ready:
        del pending[name]
    return [(path, size, mtime_ns) for mtime_ns, _, path, size in ready], len(pending)


def _classify(classifier: Any, path: Path, size: int, mtime_ns: int, top_k: int) -> dict | None:
    """One record for this file version, or None when the file changed or vanished meanwhile."""
    version = {"size": size, "mtime_ns": mtime_ns}
    try:
        result = classifier.classify(path)
        record = ok_record(result, top_k=top_k, source=str(path), **version)
    except InputError as exc:
        record = error_record(str(path), _named(path, exc), **version)
    except EdgeError:
        raise
    except Exception as exc:  # a decoder bug on one odd file must not stop the inbox (nor loop forever on it)
        log.warning("unexpected %s while classifying %s", type(exc).__name__, path)
        record = error_record(str(path), _named(path, f"unexpected {type(exc).__name__}: {exc}"), **version)
    try:
        st = path.stat()
    except OSError:
        return None
    if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
        return None
    return record


def _named(path: Path, problem: object) -> str:
    message = str(problem).strip()
    return one_line(message if message.startswith(f"{path}:") else f"{path}: {message}")


class _Journal:
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
        view = memoryview(line)
        try:
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        except OSError as exc:  # disk full, file too large, I/O error: a part line is cut on the next start
            raise OutputError(f"{self.path}: cannot write the results file ({exc.strerror or exc})") from None
        self.done.add((record["source"], record["size"], record["mtime_ns"]))

    def close(self) -> None:
        os.close(self._fd)


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
