"""Watch an inbox folder and classify every scan dropped into it, exactly once, surviving crashes.

The use case is a board beside a scanner or a PACS export: files arrive over the network at any pace, the
process may be killed at any moment (power cut, OOM killer, `systemctl restart`), and afterwards every
scan must still have exactly one result.

How that is achieved:

- The results file (`edge.journal`: JSONL, one `edge.records` record per file version) *is* the state.
  On start it is read back; a torn last line from a crash mid-write is cut off, so that file is simply
  classified again. A line that exists is complete and durable; a file without a line was never reported.
- A file is one version per (path, size, mtime): a scan replaced under the same name is classified again,
  an unchanged one never is.
- Only failures that are the file's own fault (not an image, truncated, corrupt) are final: they get an
  error line and that version is not read again. A failure that may pass (permission denied, an I/O
  error, a DICOM decoder or pydicom not installed yet) is reported but not recorded, so the file is
  tried again when it changes, every `RETRY_SECONDS`, and on every start. A model or backend that fails
  stops the watch (nothing is recorded for the file at hand).
- Files still being written are not read: a file must keep the same size and mtime for `settle_seconds`
  of this process's own observation (not judged from its mtime, which a network share's clock may skew),
  and it must still be unchanged after classification, or the result is dropped and the file waits again.
  An error is written only once the file has stayed unchanged for another `settle_seconds` after the
  failed read: a writer that paused mid-file and then goes on gets one ok line, not an error line and
  then an ok line. (A writer pausing longer than that needs a longer settle time.)
  Dotfiles and `*.part` / `*.tmp` names (what rsync, browsers and careful copiers write before renaming)
  are ignored.
- Only the folder itself is watched, not subfolders, so results and overlays can live beside it safely.
- An exclusive lock on the results file keeps a second watcher (a manual run next to the service) from
  writing the same results twice.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EdgeError, InputError, TransientInputError, one_line
from .journal import Journal, Key
from .records import error_record, ok_record

log = logging.getLogger(__name__)

IGNORED_SUFFIXES = (".part", ".tmp")
#: How long a file whose read failed for a reason that may pass waits before it is tried again.
RETRY_SECONDS = 30.0

#: What identifies a file's state for holding it back: size, mtime and ctime (chmod changes only ctime).
Stamp = tuple[int, int, int]


@dataclass
class _Held:
    """A file version not to classify again for now: a transient failure until `until`, or a final-looking
    error (`record`) that is written once the file has stayed unchanged until `until`."""

    stamp: Stamp
    until: float
    record: dict | None = None


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
    path, with the file version's `size` and `mtime_ns`. `emit` receives each line's dict once it is
    durable, and also each failure that may pass (`retry: true`), which is not written. Runs until `stop`
    is set (or Ctrl-C); with `once=True` it returns as soon as every file present has been handled
    (waiting for files still being written to settle). Returns the number of lines written by this call.
    Model, backend and results-file failures propagate as their :class:`EdgeError`.
    """
    directory = Path(directory).resolve()
    if not directory.is_dir():
        raise InputError(f"{directory}: the watch folder does not exist or is not a folder")
    journal = Journal(Path(out_path))
    skip = {journal.path.resolve()}
    stop = stop or threading.Event()
    pending: dict[str, tuple[int, int, float]] = {}
    held: dict[str, _Held] = {}
    written = 0

    def write(record: dict) -> None:
        nonlocal written
        journal.append(record)
        written += 1
        if emit is not None:
            emit(record)

    try:
        while not stop.is_set():
            ready, waiting = _scan(directory, journal.done, pending, skip, settle_seconds, held)
            for path, stamp in ready:
                if stop.is_set():
                    break
                outcome, record = _classify(classifier, path, stamp, top_k)
                name = str(path)
                if outcome == "changed":  # the file changed or vanished while being read: let it settle again
                    pending.pop(name, None)
                    waiting += 1
                elif outcome == "ok":
                    held.pop(name, None)
                    write(record)
                elif outcome == "transient":
                    previous = held.get(name)
                    if emit is not None and (previous is None or previous.stamp != stamp):
                        emit(record)  # once per file state, however often it is retried
                    held[name] = _Held(stamp, time.monotonic() + RETRY_SECONDS)
                else:
                    held[name] = _Held(stamp, time.monotonic() + settle_seconds, record)
            waiting += _confirm(held, write)
            if once and not waiting:
                break
            stop.wait(poll_interval)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how an interactive watch ends; every written line is already durable
    finally:
        journal.close()
    return written


def _stamp(st: os.stat_result) -> Stamp:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _scan(directory: Path, done: set[Key], pending: dict[str, tuple[int, int, float]], skip: set[Path],
          settle_seconds: float, held: dict[str, _Held]) -> tuple[list[tuple[Path, Stamp]], int]:
    """Files ready to classify (oldest first) and how many are still settling; updates `pending`."""
    now = time.monotonic()
    ready: list[tuple[int, str, Path, Stamp]] = []
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
        hold = held.get(key[0])
        if hold is not None and hold.stamp == _stamp(st) and (hold.record is not None or now < hold.until):
            continue  # a final-looking error awaiting confirmation (counted there), or a retry not yet due
        seen.add(key[0])
        previous = pending.get(key[0])
        if previous is None or previous[:2] != (st.st_size, st.st_mtime_ns):
            pending[key[0]] = previous = (st.st_size, st.st_mtime_ns, now)
        if now - previous[2] >= settle_seconds:
            ready.append((st.st_mtime_ns, key[0], path, _stamp(st)))
    for gone in set(pending) - seen:
        del pending[gone]
    ready.sort()
    for _, name, _, _ in ready:
        del pending[name]
    return [(path, stamp) for _, _, path, stamp in ready], len(pending)


def _confirm(held: dict[str, _Held], write: Callable[[dict], None]) -> int:
    """Write the error lines of files unchanged since their failed read for the settle time; drop those
    that changed (the new version is classified instead). Returns how many still wait."""
    waiting = 0
    for name, hold in list(held.items()):
        if hold.record is None:
            continue
        try:
            changed = _stamp(os.stat(name)) != hold.stamp
        except OSError:  # gone: nothing to report
            del held[name]
            continue
        if changed:  # its new version is the one to classify, once it settles
            del held[name]
            waiting += 1
        elif time.monotonic() >= hold.until:
            del held[name]
            write(hold.record)
        else:
            waiting += 1
    return waiting


def _classify(classifier: Any, path: Path, stamp: Stamp, top_k: int) -> tuple[str, dict | None]:
    """('ok' | 'final' | 'transient', record) for this file version, or ('changed', None) when the file
    changed or vanished meanwhile."""
    size, mtime_ns, _ = stamp
    version = {"size": size, "mtime_ns": mtime_ns}
    outcome = "final"
    try:
        result = classifier.classify(path)
        outcome, record = "ok", ok_record(result, top_k=top_k, source=str(path), **version)
    except TransientInputError as exc:
        outcome = "transient"
        record = error_record(str(path), _named(path, f"{exc} (not recorded; tried again later)"), **version,
                              retry=True)
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
        return "changed", None
    if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
        return "changed", None
    return outcome, record


def _named(path: Path, problem: object) -> str:
    message = str(problem).strip()
    return one_line(message if message.startswith(f"{path}:") else f"{path}: {message}")
