"""`edge-classify`: classify scans on the device, one line (or one JSON object) per scan.

Library code raises typed errors; this module is the one place they become one-line messages and exit
codes. A bad scan never stops a batch: it is reported on stderr and the rest are still classified.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from .backend import BACKENDS
from .cli_common import (THREADS, NonEmptyPath, OneLineCommand, error, notice, reject_empty,
                         route_logs_and_warnings, version_option)
from .decode import IMAGE_SUFFIXES
from .errors import BackendError, EdgeError, InputError, ModelError, one_line
from .records import error_record, ok_record

PROG = "edge-classify"
EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_NO_VERDICT = 0, 1, 2, 3
#: A batch longer than this gets a progress bar (when stderr is a terminal and stdout is not).
PROGRESS_MIN_ITEMS = 10
OVERLAY_SUFFIX = ".heatmap.png"

HELP = f"""Classify brain-MRI scans on this device and show where the model looked (Grad-CAM heatmaps).

PATH may be image files (JPEG, PNG, BMP, TIFF, DICOM), directories (searched recursively; hidden files and
our own *{OVERLAY_SUFFIX} overlays are skipped) or glob patterns ('scans/**/*.png'). Each scan prints one
line: path, label, confidence and time. Errors print one line each on stderr, and the batch goes on.

Before any verdict the input gate checks each scan. One that cannot be a brain-MRI slice (blank, almost
no contrast, far too elongated, colour, no head) is REFUSED; one whose network features are unlike the
training scans' (a photo, a plot, a CT, a text page) is REFERRED to a person. Neither gets a label: the
line says why ("Not like the brain MRI this model was trained on: referred, no verdict"), and so does
its overlay.

With --json every scan, watched file or camera frame is one JSON record per line, the same shape in
every mode (schema edge-classify/2, docs/RECORDS.md): schema, status ('ok', 'refer', 'refused' or
'error'), source, frame (multi-frame DICOM only), time; then label, confidence, top_k, probabilities
(null or empty without status ok), ood_score (above 1 is referred), reason and message (why there is no
verdict), timings_ms, model, backend, has_heatmap, overlay (null without --heatmap) and sop_instance_uid
(with --keep-uids); or error. --watch writes the same records to its --out file, with each file's size
and mtime_ns.

\b
Examples:
  edge-classify scan.png
  edge-classify edge/samples/ --heatmap overlays/
  edge-classify 'scans/**/*.dcm' --frame all --json > results.jsonl
  edge-classify --model my-model.tflite --threads 4 --top-k 3 scan.jpg
  edge-classify --list-models
  edge-classify --watch incoming/ --out results.jsonl
  edge-classify --camera --interval 2 --count 10 --heatmap shots/

\b
Exit codes:
  0  every input was classified and got a verdict
  1  some inputs failed (each reported on stderr; all others were classified)
  2  usage error, or the model or backend could not be loaded
  3  none failed, but some were refused or referred by the input gate (no verdict for them)
  141  the reader of stdout went away (| head -1), as for any other command cut off by a pipe
"""


#: True while a progress bar is drawn on stderr: a message must then first clear the bar's line.
_bar_shown = False


def _error(message: str) -> None:
    _clear_bar()
    error(PROG, message)


def _notice(message: str) -> None:
    _clear_bar()
    notice(PROG, message)


def _clear_bar() -> None:
    if _bar_shown:  # back to the start of the line and erase it; the bar redraws below the message
        click.echo("\r\x1b[K", nl=False, err=True)


def _parse_frame(ctx: click.Context, param: click.Parameter, value: str) -> int | None:
    if value.strip().lower() == "all":
        return None
    try:
        frame = int(value)
    except ValueError:
        frame = -1
    if frame < 0:
        raise click.BadParameter(f"expected a frame number (0, 1, ...) or 'all', got {value!r}")
    return frame


def _parse_window(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        centre, width = (float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected CENTRE,WIDTH such as 40,400, got {value!r}") from None
    if width <= 0:
        raise click.BadParameter(f"the window width must be positive, got {width:g}")
    return centre, width


def _backend_version() -> str:
    from .backend import find_backend

    try:
        return "backend {0.name} {0.version}".format(find_backend()[1])
    except BackendError:
        return "no backend installed"


@dataclass(frozen=True)
class Item:
    """One thing to classify, as the user will recognise it, or the reason it cannot be."""

    display: str
    path: Path | None = None
    problem: str | None = None


def expand(args: Iterable[str]) -> list[Item]:
    """Files, directories (recursively) and glob patterns -> items in a stable order, each file once."""
    items: list[Item] = []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            found = _walk(path)
            items.extend(found or [Item(arg, problem=f"no images found (looked for {', '.join(IMAGE_SUFFIXES)})")])
        elif path.exists() or path.is_symlink():
            items.append(Item(arg, path))
        elif any(c in arg for c in "*?["):
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                items.append(Item(arg, problem="no files match this pattern"))
            for match in matches:
                items.extend(_walk(Path(match)) if os.path.isdir(match) else [Item(match, Path(match))])
        else:
            items.append(Item(arg, problem="no such file or directory"))
    seen: set[str] = set()
    unique = []
    for item in items:
        key = os.path.realpath(item.path) if item.path is not None else None
        if key is None or key not in seen:
            unique.append(item)
            if key is not None:
                seen.add(key)
    return unique


def _walk(directory: Path) -> list[Item]:
    items: list[Item] = []

    def unreadable(exc: OSError) -> None:
        items.append(Item(str(exc.filename or directory), problem=f"cannot list directory ({exc.strerror})"))

    for root, dirs, files in os.walk(directory, onerror=unreadable):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or name.endswith(OVERLAY_SUFFIX):
                continue
            path = Path(root) / name
            suffix = path.suffix.lower()
            # Suffix-less files are DICOM only by their magic; only regular files are opened to look (a FIFO blocks).
            if suffix in IMAGE_SUFFIXES or (not suffix and path.is_file() and _is_dicom(path)):
                items.append(Item(str(path), path))
    return items


def _is_dicom(path: Path) -> bool:
    from .dicom import is_dicom

    return is_dicom(path)


class OverlayNames:
    """Overlay file names from input names: ``scan.png`` -> ``scan.png.heatmap.png``, never twice in one run.

    Two inputs with the same name (``a/scan.png``, ``b/scan.png``) get ``scan.png.heatmap.png`` and
    ``scan.png-2.heatmap.png``; a rerun over the same inputs rewrites the same files instead of piling up.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        self._used: set[str] = set()

    def __call__(self, source: str, frame: str = "") -> Path:
        base = Path(source).name or "scan"
        if frame:
            base += "." + re.sub(r"[^0-9A-Za-z]+", "", frame)
        name, n = base + OVERLAY_SUFFIX, 2
        while name.lower() in self._used:
            name, n = f"{base}-{n}{OVERLAY_SUFFIX}", n + 1
        self._used.add(name.lower())
        return self.directory / name


def format_line(record: dict[str, Any], top_k: int = 1) -> str:
    """The human line for one result record: ``scan.png  glioma  97.1%  12.3 ms`` (+ ``top_k - 1`` runners-up),
    or without a verdict ``photo.jpg  REFER  Not like the brain MRI ...: referred, no verdict  12.3 ms``."""
    source = one_line(f"{record.get('source', '?')}{record.get('frame', '')}")  # a newline in a name stays in
    total = record.get("timings_ms", {}).get("total", 0.0)
    if record.get("status", "ok") != "ok":
        return f"{source}  {str(record['status']).upper()}  {record.get('message')}  {total:.1f} ms"
    line = f"{source}  {record.get('label')}  {100.0 * record.get('confidence', 0.0):.1f}%  {total:.1f} ms"
    others = record.get("top_k", [])[1:top_k]
    if others:
        line += "  (" + ", ".join(f"{o['label']} {100.0 * o['probability']:.1f}%" for o in others) + ")"
    return line


class Emitter:
    """Prints each record (`edge.records`) as it comes, from a file batch, the camera loop or the watch loop.

    Text: a result is one line on stdout. JSON: every record, errors included, is one line on stdout.
    Either way an error is also one line on stderr, so a person watching the terminal or a log sees it.
    ``failures`` counts errors and ``no_verdict`` refused or referred scans, for the exit code.
    """

    def __init__(self, as_json: bool, top_k: int = 1):
        self.as_json = as_json
        self.top_k = top_k
        self.failures = 0
        self.no_verdict = 0

    @property
    def exit_code(self) -> int:
        """1 when an input failed, else 3 when one got no verdict, else 0 (as --help documents)."""
        return EXIT_SOME_FAILED if self.failures else EXIT_NO_VERDICT if self.no_verdict else EXIT_OK

    def __call__(self, record: dict[str, Any]) -> None:
        failed = record.get("status") == "error"
        self.failures += failed
        self.no_verdict += record.get("status") in ("refer", "refused")
        if self.as_json:
            click.echo(json.dumps(record, ensure_ascii=False))
        if failed:
            _error(str(record.get("error", "unknown error")))
        elif not self.as_json:
            click.echo(format_line(record, self.top_k))


@click.command(PROG, cls=OneLineCommand, help=HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("paths", nargs=-1, metavar="[PATH]...")
@click.option("-m", "--model", metavar="NAME|PATH", help="Bundled model name or .tflite path [default: custom-cnn].")
@click.option("--backend", type=click.Choice(list(BACKENDS)), help="Force an interpreter backend.")
@click.option("-t", "--threads", type=THREADS, help="Interpreter threads [default: backend's].")
@click.option("-k", "--top-k", type=click.IntRange(min=1), default=1, show_default=True,
              help="Report the N most probable labels (text: runners-up after the verdict; JSON: top_k).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line instead of text.")
@click.option("--heatmap", "heatmap_dir", type=NonEmptyPath(file_okay=False, path_type=Path), metavar="DIR",
              help=f"Write overlay PNGs (scan + heatmap + verdict) to DIR as NAME{OVERLAY_SUFFIX}.")
@click.option("--frame", default="0", show_default=True, callback=_parse_frame, metavar="N|all",
              help="DICOM frame to classify, or 'all' for every frame of multi-frame files.")
@click.option("--window", callback=_parse_window, metavar="C,W",
              help="DICOM window centre,width (e.g. 40,400) instead of the file's own.")
@click.option("--keep-uids", is_flag=True, help="Add each DICOM file's SOP Instance UID to JSON output.")
@click.option("--camera", is_flag=True, help="Classify frames from the camera instead of files.")
@click.option("--interval", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              metavar="SEC", help="Seconds between camera frames.")
@click.option("--preview", is_flag=True, help="Show a camera preview window.")
@click.option("--count", type=click.IntRange(min=1), metavar="N", help="Stop after N camera frames.")
@click.option("--watch", "watch_dir", type=NonEmptyPath(exists=True, file_okay=False, path_type=Path),
              metavar="DIR", help="Classify files as they appear in DIR (until Ctrl-C).")
@click.option("--out", "out_path", type=NonEmptyPath(dir_okay=False, path_type=Path), metavar="FILE",
              help="With --watch: append results to this JSON-lines file [default: results.jsonl].")
@click.option("--once", is_flag=True, help="With --watch: classify what DIR holds now, then exit.")
@click.option("--settle", type=click.FloatRange(min=0), default=2.0, show_default=True, metavar="SEC",
              help="With --watch: a file is read once its size and time have not changed for SEC seconds "
                   "(longer than the longest pause of the slowest writer, e.g. a network copy).")
@click.option("--list-models", is_flag=True, help="List the bundled models and exit.")
@version_option(PROG, _backend_version)
@click.pass_context
def main(ctx: click.Context, paths: tuple[str, ...], model: str | None, backend: str | None, threads: int | None,
         top_k: int, as_json: bool, heatmap_dir: Path | None, frame: int | None,
         window: tuple[float, float] | None, keep_uids: bool, camera: bool, interval: float, preview: bool,
         count: int | None, watch_dir: Path | None, out_path: Path | None, once: bool, settle: float,
         list_models: bool) -> int:
    route_logs_and_warnings(PROG)
    _check_modes(ctx, paths, camera, watch_dir, list_models)
    if list_models:
        return _list_models(as_json)
    if heatmap_dir is not None:
        try:
            heatmap_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise click.BadParameter(f"cannot create {heatmap_dir} ({exc.strerror})", param_hint="--heatmap")
    from .classifier import Classifier

    try:
        classifier = Classifier(model, threads=threads, backend=backend)
    except EdgeError as exc:
        _error(str(exc))
        return EXIT_USAGE
    if not classifier.spec.weights_verified:
        _notice(f"{classifier.path}: the model records no weights checksum (converted before edge-convert "
                "wrote one), so a corrupted copy cannot be detected")
    if heatmap_dir is not None and not classifier.has_heatmap:
        _error(f"--heatmap: model {classifier.spec.name} has no heatmap output")
        return EXIT_USAGE
    emit = Emitter(as_json, top_k)
    try:
        if camera:
            from .camera import run_camera

            run_camera(classifier, interval=interval, count=count, preview=preview, heatmap_dir=heatmap_dir,
                       emit=emit, top_k=top_k)
            return emit.exit_code
        if watch_dir is not None:
            from .watch import watch

            watch(classifier, watch_dir, out_path or Path("results.jsonl"), once=once, settle_seconds=settle,
                  top_k=top_k, emit=emit)
            return emit.exit_code
        items = expand(paths)
        _note_dicom_only(items, [_option(ctx, name) for name in _PATHS_ONLY if _given(ctx, name)])
        return _classify_paths(classifier, items, as_json=as_json, top_k=top_k, heatmap_dir=heatmap_dir,
                               frame=frame, window=window, keep_uids=keep_uids, emit=emit)
    except EdgeError as exc:  # the model, backend or camera failed: not one input's fault, so the run stops
        _error(str(exc))
        return EXIT_USAGE


_CAMERA_ONLY = ("interval", "preview", "count")
_WATCH_ONLY = ("out_path", "once", "settle")
_PATHS_ONLY = ("frame", "window", "keep_uids")


def _check_modes(ctx: click.Context, paths: tuple[str, ...], camera: bool, watch_dir: Path | None,
                 list_models: bool) -> None:
    """One source of scans per run, and no option that would be silently ignored by it."""
    reject_empty(paths, "a PATH")
    if ctx.params.get("model") == "":
        raise click.UsageError("--model is an empty string (an unset shell variable?); give a name or a path")
    modes = [name for name, on in (("PATH", bool(paths)), ("--camera", camera), ("--watch", watch_dir is not None),
                                   ("--list-models", list_models)) if on]
    if not modes:
        raise click.UsageError("give at least one PATH (or --camera, --watch DIR, --list-models)")
    if len(modes) > 1:
        raise click.UsageError(f"{' and '.join(modes)} cannot be combined; choose one")

    rules = [(_CAMERA_ONLY, camera, "--camera"), (_WATCH_ONLY, watch_dir is not None, "--watch"),
             (_PATHS_ONLY, bool(paths), "PATH inputs")]
    for names, active, mode in rules:
        for name in names:
            if _given(ctx, name) and not active:
                raise click.UsageError(f"{_option(ctx, name)} only applies to {mode}")
    if watch_dir is not None and _given(ctx, "heatmap_dir"):
        raise click.UsageError("--heatmap does not apply to --watch")


def _given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT


def _option(ctx: click.Context, name: str) -> str:
    return next(p.opts[-1] for p in ctx.command.params if p.name == name)


def _note_dicom_only(items: list[Item], options: list[str]) -> None:
    """One notice when DICOM-only options meet inputs that are not DICOM (by content, not by name).

    A notice, not a usage error: a folder mixing DICOM and exported PNGs is ordinary, the option is right
    for its DICOM files, and the others are classified correctly without it. Silence, though, would let
    ``scan.png --window 40,80`` look windowed when it was not.
    """
    if not options:
        return
    others = [item.display for item in items if item.path is not None and not _is_dicom(item.path)]
    if others:
        named = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        _notice(f"{', '.join(options)} only apply to DICOM files; {len(others)} input(s) are not DICOM and are "
                f"classified without them: {named}")


def _list_models(as_json: bool) -> int:
    from .registry import MODELS_DIR, list_models

    try:
        models = list_models()
    except (EdgeError, OSError) as exc:
        _error(str(exc))
        return EXIT_USAGE
    if as_json:
        for info in models:
            click.echo(json.dumps(info.to_dict()))
        return EXIT_OK
    if not models:
        click.echo(f"no bundled models in {MODELS_DIR}")
        return EXIT_OK
    rows = [("NAME", "SIZE", "SHA256", "INPUT", "LABELS")] + [
        (m.name, f"{m.size_bytes / 1e6:.2f} MB", m.sha256[:12], f"{m.input_size}x{m.input_size}x{m.channels}",
         ", ".join(m.labels)) for m in models]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[4])
    return EXIT_OK


def _classify_paths(classifier: Any, items: list[Item], *, as_json: bool, top_k: int, heatmap_dir: Path | None,
                    frame: int | None, window: tuple[float, float] | None, keep_uids: bool,
                    emit: Emitter) -> int:
    global _bar_shown
    names = OverlayNames(heatmap_dir) if heatmap_dir is not None else None
    show_bar = (not as_json and len(items) > PROGRESS_MIN_ITEMS and sys.stderr.isatty()
                and not sys.stdout.isatty())
    progress = (click.progressbar(items, label="classifying", file=sys.stderr, show_pos=True) if show_bar
                else contextlib.nullcontext(items))
    _bar_shown = show_bar
    try:
        _run_items(classifier, progress, top_k=top_k, names=names, frame=frame, window=window,
                   keep_uids=keep_uids and as_json, emit=emit)
    finally:
        _bar_shown = False
    return emit.exit_code


def _run_items(classifier: Any, progress: Any, *, top_k: int, names: OverlayNames | None, frame: int | None,
               window: tuple[float, float] | None, keep_uids: bool, emit: Emitter) -> None:
    with progress as bar:
        for item in bar:
            if item.problem is not None:
                emit(error_record(item.display, _name_item(item.display, item.problem)))
                continue
            # records are emitted as they come, so the frames of a multi-frame file are never all held (a
            # frame that fails after others were emitted adds an error record for the file); emitting stays
            # outside the handlers, so a closed stdout is not taken for a bad scan
            records = _classify_item(classifier, item, top_k=top_k, names=names, frame=frame, window=window,
                                     keep_uids=keep_uids)
            while True:
                try:
                    record = next(records)
                except StopIteration:
                    break
                except (ModelError, BackendError):
                    raise
                except EdgeError as exc:
                    record = error_record(item.display, _name_item(item.display, exc))
                except Exception as exc:  # never lose the rest of a batch (or print a traceback) for one scan
                    record = error_record(item.display,
                                          _name_item(item.display, f"unexpected {type(exc).__name__}: {exc}"))
                emit(record)


def _classify_item(classifier: Any, item: Item, *, top_k: int, names: OverlayNames | None, frame: int | None,
                   window: tuple[float, float] | None, keep_uids: bool) -> Iterator[dict[str, Any]]:
    # The display string is the path as the user wrote it, so library messages name the item the same way.
    extra: dict[str, Any] | None = None
    for result in classifier.classify_each(item.display, frame=frame, window=window):
        if extra is None:  # after the first frame decoded, so a broken file is reported as such
            extra = {}
            if keep_uids:
                from .dicom import sop_instance_uid

                extra["sop_instance_uid"] = sop_instance_uid(item.path) if _is_dicom(item.path) else None
        overlay = None
        if names is not None:
            from .overlay import save_overlay

            target = names(item.display, result.frame)
            try:
                save_overlay(result, target)
            except OSError as exc:
                raise InputError(f"cannot write the overlay {target} ({exc.strerror or exc})") from None
            overlay = str(target)
        yield ok_record(result, top_k=top_k, overlay=overlay, **extra)


def _name_item(display: str, problem: object) -> str:
    """``item: problem`` as one line, naming the item once whether or not the library already did."""
    message = str(problem).strip()
    return one_line(message if message.startswith(f"{display}:") else f"{display}: {message}")


if __name__ == "__main__":
    main(prog_name=PROG)
