"""`edge-evaluate --masks`: explanation quality of a TFLite model against lesion masks, at the command line.

Kept apart from `convert/evaluate_cli.py`, which only wires the options here: this runs
`convert.explain_eval`, prints the markdown table (or the JSON) and turns typed errors into one line.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import click

from edge.errors import EdgeError


def _bar(items: Sequence[Any], label: str) -> Iterable[Any]:
    with click.progressbar(items, label=label, file=sys.stderr) as bar:
        yield from bar


def evaluate_masks(model: Path, data_dir: Path, masks: Path, out: Path | None, as_json: bool, limit: int | None,
                   threads: int | None, deletion_limit: int | None) -> None:
    """Run the explanation evaluation and report it; any unusable input becomes one ``Error:`` line (exit 1)."""
    from .explain_eval import evaluate_explanations, markdown_table, write_explanations

    try:
        explained = evaluate_explanations(model, data_dir, masks, limit=limit, threads=threads,
                                          deletion_limit=deletion_limit, progress=_bar)
    except (ValueError, OSError, EdgeError) as exc:
        raise click.ClickException(str(exc)) from None
    report = explained.report
    for item in report["unreadable"]:
        click.echo(f"warning: {item['error']}", err=True)
    written = write_explanations(explained, out) if out is not None else []
    if as_json:
        click.echo(json.dumps(report, indent=1))
        return
    im = report["images"]
    click.echo(f"model: {report['model']['name']} ({report['model']['backend']})\n"
               f"data:  {report['data_dir']}, masks {report['masks_dir']}: {im['evaluated']} scans evaluated, "
               f"{im['without_mask']} without a mask, {im['unreadable']} unreadable; deletion/insertion on "
               f"{im['deletion_evaluated']}\n")
    click.echo(markdown_table(report))
    if written:
        click.echo(f"\nwrote {', '.join(p.name for p in written)} to {out}")
