"""The options that name a training run's held-out split, for the commands that score it after the run.

`edge-train` holds out ``--val-fraction`` of DATA's class folders (stratified, ``--seed``) and, by subject,
of each ``--extra-healthy`` folder; `convert.validation_probes` and `convert.operating_point` must see
exactly those images, so they take the run's own values under the same names (`convert.train.split_data`
makes the split).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, TypeVar

import click

from edge.cli_common import NonEmptyPath

F = TypeVar("F", bound=Callable)


def run_split_options(func: F) -> F:
    """Add ``--data``, ``--extra-healthy``, ``--val-fraction``, ``--seed`` and ``--cache-dir`` to a command."""
    options = [
        click.option("--data", required=True, type=NonEmptyPath(file_okay=False, exists=True, path_type=Path),
                     help="The training data the run trained on (edge-train's DATA)."),
        click.option("--extra-healthy", multiple=True,
                     type=NonEmptyPath(file_okay=False, exists=True, path_type=Path),
                     help="Healthy folders of other sources, as given to edge-train (their held-out subjects "
                          "are used)."),
        click.option("--val-fraction", type=click.FloatRange(0.01, 0.9), default=0.1, show_default=True,
                     help="edge-train's --val-fraction of the run: the same held-out images."),
        click.option("--seed", type=int, default=0, show_default=True, help="edge-train's --seed of the run."),
        click.option("--cache-dir", type=NonEmptyPath(file_okay=False, path_type=Path), default=None,
                     help="edge-train's image cache."),
    ]
    for option in reversed(options):
        func = option(func)
    return func
