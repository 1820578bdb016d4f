"""The external-validation branch of `edge-evaluate` (``--sets`` / ``--folder``): run, print, write.

Kept apart from convert/evaluate_cli.py so that the command there only wires options; the work is in
convert/external.py and convert/external_report.py.
"""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Iterable, Sequence

import click

from edge.errors import EdgeError


def _bar(paths: Sequence[Path], label: str) -> Iterable[Path]:
    with click.progressbar(paths, label=f"{label:<28.28}", file=sys.stderr) as bar:
        yield from bar


def run(model: Path, data_dir: Path | None, *, dedup: Path | None, sets: Path | None, root: Path | None,
        folders: Sequence[str], out: Path | None, as_json: bool, limit: int | None, threads: int | None) -> None:
    """Evaluate ``model`` on the test split ``data_dir`` (optional) and the external sets; print the markdown
    table (or the JSON) and write external.json/.md/.png (and the test split's metrics) into ``out``."""
    from convert.external import run_external
    from convert.external_report import markdown, write_outputs
    from convert.external_sets import load_spec, parse_folder

    command = shlex.join(["edge-evaluate", *sys.argv[1:]])
    try:
        specs = (load_spec(sets, root) if sets is not None else []) + [parse_folder(f) for f in folders]
        result = run_external(model, specs, test_dir=data_dir, dedup=dedup, limit=limit, threads=threads,
                              progress=_bar, command=command)
        written = write_outputs(result, out) if out is not None else []
    except (ValueError, OSError, EdgeError) as exc:
        raise click.ClickException(str(exc)) from None
    for item in result["unreadable"]:
        click.echo(f"warning: {item['set']}: {item['error']}", err=True)
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    click.echo(markdown(result), nl=False)
    if written:
        click.echo(f"\nwrote {', '.join(p.name for p in written)} to {out}")
