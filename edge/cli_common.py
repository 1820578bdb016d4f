"""What every command line of the project shares, so that all six CLIs behave alike at their edges.

Kept in `edge/` (importable without TensorFlow) because the host-side CLIs import it too, and a
runtime-only install must still be able to print their one-line errors.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import platform
import stat
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from .backend import MAX_THREADS
from .errors import install_hint, one_line

#: The type of every CLI's --threads (edge-bench's list checks each count against the same bound).
THREADS = click.IntRange(1, MAX_THREADS)


class NonEmptyPath(click.Path):
    """A click path that refuses the empty string.

    `Path("")` is `Path(".")`, so an unset shell variable (`--heatmap "$OUT"`) would otherwise silently
    mean the current directory.
    """

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and value == "":
            self.fail("the path is empty (an unset shell variable?)", param, ctx)
        return super().convert(value, param, ctx)


def reject_empty(values: tuple[str, ...] | list[str], what: str) -> None:
    """Refuse an empty string among positional path arguments (click passes them through as text)."""
    if any(v == "" for v in values):
        raise click.UsageError(f"{what} is an empty string (an unset shell variable?); give a file or folder")


EXIT_USAGE, EXIT_INTERRUPTED = 2, 130
#: A reader that closed our stdout early (`edge-classify ... | head -1`): 128 + SIGPIPE, the status the
#: shell reports for any other producer cut off that way (`seq 1 1000 | head -1`).
EXIT_BROKEN_PIPE = 141


def say(prog: str, kind: str, message: object) -> None:
    """Print ``PROG: KIND: message`` (kind: error, warning or notice) as one line on stderr."""
    click.echo(f"{prog}: {kind}: {one_line(message)}", err=True)


def error(prog: str, message: object) -> None:
    say(prog, "error", message)


def warning(prog: str, message: object) -> None:
    say(prog, "warning", message)


def notice(prog: str, message: object) -> None:
    say(prog, "notice", message)


class _OneLineMain:
    """click's `main`, with every error it would print (usage errors, ClickException, Ctrl-C) as one line
    ``PROG: error: ...`` on stderr, the style of every other error of these tools; ``PROG`` is the
    command's name."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:  # the caller handles errors and exit codes itself
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)  # type: ignore[misc]
        prog = self.name or prog_name or "edge"
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)  # type: ignore[misc]
            if sys.stdout is not None:  # None when started with stdout closed (>&-)
                sys.stdout.flush()  # a pipe closed after our last write fails here, not at interpreter exit
        except BrokenPipeError:
            _quiet_broken_pipe()
        except click.exceptions.Abort:
            error(prog, "interrupted")
            sys.exit(EXIT_INTERRUPTED)
        except click.UsageError as exc:
            error(prog, f"{exc.format_message()} (see {_command_path(exc, prog)} --help)")
            sys.exit(EXIT_USAGE)
        except click.ClickException as exc:
            error(prog, exc.format_message())
            sys.exit(exc.exit_code)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        # click's own main turns EPIPE into a silent exit 1 ("some inputs failed"); caught here first.
        try:
            return super().invoke(ctx)  # type: ignore[misc]
        except BrokenPipeError:
            _quiet_broken_pipe()


def _quiet_broken_pipe() -> None:
    """The reader is gone, which is no error of ours: exit 141 with no message and no "Exception ignored"
    at shutdown (stdout and stderr, possibly the same pipe, point at /dev/null from here on)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            os.dup2(devnull, stream.fileno())
        except (AttributeError, OSError, ValueError):  # closed (None) or not a real file (a test's capture)
            pass
    os.close(devnull)
    sys.exit(EXIT_BROKEN_PIPE)


def _command_path(exc: click.UsageError, prog: str) -> str:
    return exc.ctx.command_path if exc.ctx is not None and exc.ctx.command_path else prog


class OneLineCommand(_OneLineMain, click.Command):
    """A click command whose errors are one line each (see `_OneLineMain`)."""


class OneLineGroup(_OneLineMain, click.Group):
    """A click group whose errors, its sub-commands' included, are one line each (see `_OneLineMain`)."""


def version_option(prog: str, details: Callable[[], str] | None = None) -> Callable[[Any], Any]:
    """``--version``: ``PROG VERSION (details; Python X.Y.Z)``, the same line format in every CLI."""

    def show(ctx: click.Context, param: click.Parameter, value: bool) -> None:
        if not value or ctx.resilient_parsing:
            return
        from . import __version__

        parts = ([details()] if details is not None else []) + [f"Python {platform.python_version()}"]
        click.echo(f"{prog} {__version__} ({'; '.join(parts)})")
        ctx.exit(0)

    return click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=show,
                        help="Show the version, then exit.")


class MissingExtra(click.ClickException):
    """A host-side step needs libraries of an extra this install lacks (a runtime-only `pip install .`)."""

    exit_code = EXIT_USAGE


def require_extra(modules: Sequence[str], extra: str, purpose: str) -> None:
    """Stop with one line naming the extra to install when any of ``modules`` cannot be imported.

    Checked by name (`importlib.util.find_spec`), without importing: TensorFlow takes seconds to import,
    and the step imports it right after anyway.
    """
    missing = [m for m in modules if not _importable(m)]
    if missing:
        raise MissingExtra(f"{purpose} needs {', '.join(missing)}, which this install lacks; {install_hint(extra)}")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or the module blocked (None in sys.modules)
        return False


class _OneLineLogHandler(logging.Handler):
    """Library log records (the watch's "cutting a torn last line") as ``PROG: warning: ...`` lines."""

    def __init__(self, prog: str):
        super().__init__(logging.WARNING)
        self.prog = prog

    def emit(self, record: logging.LogRecord) -> None:
        say(self.prog, "error" if record.levelno >= logging.ERROR else "warning", record.getMessage())


def route_logs_and_warnings(prog: str, loggers: Sequence[str] = ("edge",)) -> None:
    """Make the runtime's log records (and those of the other ``loggers``, e.g. a web server's) and any
    Python warning one prefixed line on stderr, like every other message of ``prog`` (Python's defaults
    print a bare message, or two lines with a source excerpt)."""
    for name in loggers:
        logger = logging.getLogger(name)
        if not any(isinstance(h, _OneLineLogHandler) for h in logger.handlers):
            logger.addHandler(_OneLineLogHandler(prog))

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: str | None = None) -> None:
        say(prog, "warning", f"{category.__name__}: {message}")

    warnings.showwarning = show


def bundled_or_path(ctx: click.Context, param: click.Parameter, value: str | None) -> Path | None:
    """click callback for a MODEL given as a bundled name (``custom-cnn``, as `edge-classify --model` takes
    it) or as a path (any model file a host tool reads: .tflite, .keras, a SavedModel folder)."""
    if value is None:
        return None
    if value == "":
        raise click.BadParameter("the path is empty (an unset shell variable?)", ctx, param)
    path = Path(value)
    if path.exists() or path.suffix or "/" in value or "\\" in value:
        if _special_file(path):
            raise click.BadParameter(f"{value}: not a regular file (a pipe, socket or device); give a model "
                                     "file or folder", ctx, param)
        return path
    from .errors import ModelError
    from .registry import resolve

    try:
        return resolve(value)
    except ModelError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def _special_file(path: Path) -> bool:
    """True for a FIFO, socket or device (reading one as a model would block or never end)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))
