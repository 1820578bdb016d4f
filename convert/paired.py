"""Two models on the same test images, image by image: which answers changed, and is the change real?

Why: a new version of a model is judged against the one it replaces, and two accuracies on 1,311 images
that differ by a few tenths of a point say nothing by themselves. On the same images the question is which
images changed, and whether the changes lean one way more than chance allows: the exact McNemar test of
the images only one model gets right (`convert.metrics.mcnemar_exact`). With an `edge-dedup` report it
also splits each model's errors by whether the image has a near-copy in training, since errors there
measure memory of the training images more than generalisation.

It reads what `edge-evaluate MODEL DIR --out OUT` wrote (``OUT/metrics.json``, with every image's
prediction), so the comparison is of the very runs a model card quotes.

    python -m convert.paired reports/was/metrics.json reports/int8/metrics.json \\
        --dedup data/dedup/brain-tumor-mri.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from convert.evaluate import load_dedup, match_key
from convert.metrics import mcnemar_exact
from edge.cli_common import NonEmptyPath, OneLineCommand, error

PROG = "paired"


def load_predictions(path: Path) -> dict[str, tuple[str, str]]:
    """{image key: (true label, predicted label)} of an `edge-evaluate` metrics.json (or its folder)."""
    file = path / "metrics.json" if path.is_dir() else path
    try:
        report = json.loads(file.read_text(encoding="utf-8"))
        rows = report["predictions"]
        return {match_key(r["path"]): (str(r["true"]), str(r["predicted"])) for r in rows}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{file}: not an edge-evaluate metrics.json with per-image predictions ({exc})") from None


def compare(a: dict[str, tuple[str, str]], b: dict[str, tuple[str, str]],
            with_copy: set[str] | None = None) -> dict[str, Any]:
    """The paired figures of A and B on their common images (which must be the same images, same labels)."""
    if set(a) != set(b):
        raise ValueError(f"the two runs are not of the same images ({len(set(a) ^ set(b))} differ)")
    if any(a[k][0] != b[k][0] for k in a):
        raise ValueError("the two runs give the same image different true labels")
    right_a = {k for k, (t, p) in a.items() if t == p}
    right_b = {k for k, (t, p) in b.items() if t == p}
    only_a, only_b = sorted(right_a - right_b), sorted(right_b - right_a)
    result: dict[str, Any] = {
        "images": len(a), "right_a": len(right_a), "right_b": len(right_b),
        "only_a": len(only_a), "only_b": len(only_b), "mcnemar_p": mcnemar_exact(len(only_a), len(only_b)),
        "right_only_a": only_a, "right_only_b": only_b}
    if with_copy is not None:
        for name, right in (("a", right_a), ("b", right_b)):
            wrong = set(a) - right
            result[f"errors_{name}"] = {"with_copy": len(wrong & with_copy), "without_copy": len(wrong - with_copy)}
    return result


@click.command(PROG, cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_a", metavar="A", type=NonEmptyPath(exists=True, path_type=Path))
@click.argument("run_b", metavar="B", type=NonEmptyPath(exists=True, path_type=Path))
@click.option("--dedup", type=NonEmptyPath(dir_okay=False, exists=True, path_type=Path), default=None,
              help="An edge-dedup report of the test split: split each model's errors by whether the image has "
                   "a near-copy in training.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures (and the changed images) as JSON.")
def main(run_a: Path, run_b: Path, dedup: Path | None, as_json: bool) -> None:
    """Compare two edge-evaluate runs (OUT folders or their metrics.json) of two models on the same images:
    images only A gets right, only B, the exact McNemar p-value of that split, and with --dedup the errors
    on images with and without a near-copy in training.

    \b
    Example (the model before and after a change, on the test split):
      edge-evaluate OLD.tflite DATA/Testing --dedup DEDUP.json --out reports/old
      edge-evaluate NEW.tflite DATA/Testing --dedup DEDUP.json --out reports/new
      python -m convert.paired reports/old reports/new --dedup DEDUP.json

    Exit codes: 0 compared; 1 a run cannot be read, the runs are not of the same images, or the report is not
    an edge-dedup report; 2 usage error.
    """
    try:
        a, b = load_predictions(run_a), load_predictions(run_b)
        with_copy = None
        if dedup is not None:
            with_copy = set(a) - {match_key(p) for p in load_dedup(dedup)["dedup_test"]}
        result = compare(a, b, with_copy)
    except ValueError as exc:
        error(PROG, str(exc))
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(result))
        return
    n = result["images"]
    click.echo(f"{n} images: A right {result['right_a']} ({result['right_a'] / n:.2%}), B right {result['right_b']} "
               f"({result['right_b'] / n:.2%}); right only by A {result['only_a']}, only by B {result['only_b']}; "
               f"exact McNemar p = {result['mcnemar_p']:.3g}")
    if with_copy is not None:
        for name in ("a", "b"):
            e = result[f"errors_{name}"]
            click.echo(f"{name.upper()} errors: {e['with_copy']} on the {len(with_copy)} images with a near-copy in "
                       f"training, {e['without_copy']} on the {n - len(with_copy)} without")


if __name__ == "__main__":
    main()
