"""What every command line of the project shares, so that all six CLIs behave alike at their edges.

Kept in `edge/` (importable without TensorFlow) because the host-side CLIs import it too, and a
runtime-only install must still be able to print their one-line errors.
"""
from __future__ import annotations

from typing import Any

import click


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
