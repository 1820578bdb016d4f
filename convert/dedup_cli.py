"""`edge-dedup`: list test images that have a copy in the training set, and write the de-duplicated test list."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterable, Sequence

import click

from edge.cli_common import NonEmptyPath, OneLineCommand, require_extra, version_option, warning

from . import dedup

PROG = "edge-dedup"


def _bar(paths: Sequence[Path]) -> Iterable[Path]:
    with click.progressbar(paths, label="Hashing images", file=sys.stderr) as bar:
        yield from bar


def _summary(report: dict) -> str:
    c = report["counts"]
    lines = [
        f"{report['train_dir']}: {c['train']} images, {report['test_dir']}: {c['test']} images"
        f" ({c['unreadable']} unreadable)",
        f"threshold: {report['threshold']} bits (pHash and dHash)",
        f"test images with a copy in {report['train_dir']}: {report['test_with_duplicate']} of {report['test_total']}"
        f" ({c['test_with_exact']} byte-identical, {c['test_with_near_only']} near-identical only)",
        f"left after de-duplication: {len(report['dedup_test'])}",
    ]
    lines += [f"  {name:<12} {v['dedup']:>5} of {v['test']:>5}" for name, v in report["per_class"].items()]
    lines.append(f"copies inside {report['train_dir']}: {c['train_groups']} groups ({c['train_grouped_images']} images);"
                 f" inside {report['test_dir']}: {c['test_groups']} groups ({c['test_grouped_images']} images)")
    return "\n".join(lines)


@click.command(PROG, cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@version_option(PROG)
@click.argument("train_dir", type=NonEmptyPath(path_type=Path))
@click.argument("test_dir", type=NonEmptyPath(path_type=Path))
@click.option("--out", "out", type=NonEmptyPath(dir_okay=False, path_type=Path),
              help="Write the report here (JSON): pairs, groups and `dedup_test`, the test images without a copy.")
@click.option("--threshold", default=dedup.DEFAULT_THRESHOLD, show_default=True, type=click.IntRange(0, 64),
              help="Largest pHash and dHash distance (bits) that still counts as a copy. 4 was chosen by looking at "
                   "real pairs (see convert/dedup.py); 0 keeps only re-encodings, 6+ also catches other patients.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON instead of a summary.")
def main(train_dir: Path, test_dir: Path, out: Path | None, threshold: int, as_json: bool) -> None:
    """Find test images in TEST_DIR with a byte-identical or near-identical copy in TRAIN_DIR.

    Every image (any depth below each folder; hidden folders skipped) gets a SHA-256 of its bytes and a
    pHash and dHash of its grayscale pixels, re-centred so shifted copies still match. A test image is a
    copy when it has the same bytes as a training image, or both hashes within --threshold bits. Copies
    inside each set are listed too, for information. Paths in the report are relative to each folder's
    parent, e.g. Testing/glioma/Te-gl_0001.jpg; give the report to `edge-evaluate --dedup`.

    \b
    Examples:
      edge-dedup data/Training data/Testing --out data/dedup/brain-tumor-mri.json
      edge-dedup data/Training data/Testing --threshold 0 --json > exact.json

    \b
    Exit codes: 0 done (whether or not copies were found); 1 a folder is missing or holds no images;
    2 bad usage, or the `convert` extra is not installed. Unreadable images are reported on stderr and in the report, and do not stop the run.
    """
    require_extra(["imagehash"], "convert", "edge-dedup")
    try:
        report = dedup.check_leakage(train_dir, test_dir, threshold, progress=_bar)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    for item in report["unreadable"]:
        warning(PROG, item["error"])
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    if as_json:
        click.echo(json.dumps(report, indent=1))
    else:
        click.echo(_summary(report))
        if out is not None:
            click.echo(f"wrote {out}")
