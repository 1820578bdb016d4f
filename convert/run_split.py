"""The options that name a training run's held-out split, for the commands that score it after the run.

`edge-train` holds out ``--val-fraction`` of DATA's class folders (stratified, ``--seed``) and, by subject,
of each ``--extra-healthy`` folder; `convert.validation_probes` and `convert.operating_point` must see
exactly those images, so they take the run's own values under the same names, and get the images from
`held_out_pools` (`convert.train.split_data` makes the split).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, TypeVar

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


def held_out_pools(data: Path, size: int, *, extra_healthy: tuple[Path, ...] = (), masks: Path | None = None,
                   cache_dir: Path | None = None, val_fraction: float = 0.1, seed: int = 0) -> tuple[list[str], Any]:
    """(labels, held-out `convert.training_sources.Pools`) of the run these options name: the class folders'
    held-out images (``pools.main``, with masks when ``masks`` is given) and each extra healthy source's
    held-out subjects (``pools.healthy``, or None without one), at ``size`` px, as `edge-train` validates."""
    from convert import train as T

    cfg = T.TrainConfig(arch="custom-cnn", data=data, out=Path("held-out.keras"), input_size=size, epochs=1,
                        masks=masks, extra_healthy=extra_healthy, cache_dir=cache_dir, val_fraction=val_fraction,
                        seed=seed)
    _, loaded, train, val = T.split_data(cfg)
    return loaded.labels, T.guided_pools(cfg, train, val)[1]
