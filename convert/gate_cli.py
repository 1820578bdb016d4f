"""`edge-gate`: calibrate a model file's input gate on training data, and measure its rates per set."""
from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Iterable, Sequence

import click

from edge.cli_common import (THREADS, MissingExtra, NonEmptyPath, OneLineGroup, bundled_or_path, error,
                             require_extra, version_option)

PROG = "edge-gate"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INPUT = 0, 1, 2, 3


def _bar(paths: Sequence[Path], label: str) -> Iterable[Path]:
    with click.progressbar(paths, label=f"{label:<24.24}", file=sys.stderr) as bar:
        yield from bar


def _fail(message: str, code: int) -> None:
    error(PROG, message)
    sys.exit(code)


@click.group(PROG, cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@version_option(PROG)
def main() -> None:
    """The input gate of a model file: `calibrate` fits it on training scans and writes it into the file,
    `measure` counts per set how many scans it refuses, refers or answers.

    The gate (edge/gate.py) runs on the device in the same invoke as the verdict: a scan whose network
    features lie far from every training reference (each class, each extra healthy source) is referred,
    with no verdict. Each training scan counts as read and as one export-style variant (reduced to one
    or two model inputs; gain, contrast, gamma, blur, noise, edge enhancement), so that real MRI from
    another site is not referred for those differences. `calibrate` adds the features output to a model
    that lacks it (the bundled models, whose Keras sources are not kept) by editing the flatbuffer,
    without touching a weight, and checks that probabilities and heatmaps stay bit-identical.

    \b
    Examples:
      edge-gate calibrate custom-cnn --data ../shared/data/brain-tumor-mri/Training \\
          --data ../shared/data/ixi-healthy/train --dedup data/dedup/brain-tumor-mri.json \\
          --layer b2_out --out artifacts/custom-cnn.tflite
      edge-gate measure artifacts/custom-cnn.tflite --test ../shared/data/brain-tumor-mri/Testing \\
          --sets data/external_sets.json --not-mri corpus/ --out reports/gate-custom-cnn

    \b
    Exit codes:
      0  done
      1  the gate cannot be calibrated as asked (too few scans, no logit layer or --layer found, outputs
         not bit-identical after the edit)
      2  bad command line, or the `convert` extra (TensorFlow) is not installed
      3  an input is missing or unreadable (model, folder, set file)
    """


@main.command()
@click.argument("model", callback=bundled_or_path, metavar="NAME|PATH")
@click.option("--data", "folders", multiple=True, required=True, type=NonEmptyPath(file_okay=False, path_type=Path),
              help="Training scans: a folder of class sub-folders (one reference each) or a flat folder of extra "
                   "healthy scans (one reference; held out by subject). Repeatable. Validation-only data is refused.")
@click.option("--out", required=True, type=NonEmptyPath(dir_okay=False, path_type=Path), help="Output .tflite path.")
@click.option("--layer", help="Keras layer whose feature map (averaged over positions) is scored, instead of the "
                              "logit layer's input, e.g. b2_out. To choose one, calibrate with each candidate and "
                              "keep the layer whose 'variants referred by a gate fitted without them' is lowest "
                              "(a steady layer) among those that still refer every non-MRI input "
                              "(edge-gate measure --not-mri).")
@click.option("--dedup", type=NonEmptyPath(dir_okay=False, exists=True, path_type=Path),
              help="edge-dedup report: near-duplicate training scans are held out together.")
@click.option("--components", default=16, show_default=True, type=click.IntRange(1, 512),
              help="Principal directions of the shared covariance kept (the rest is one variance).")
@click.option("--quantile", default=99.0, show_default=True, type=click.FloatRange(50, 100),
              help="Every reference keeps this percentage of its held-out training scans (as read and as variants) "
                   "below the threshold "
                   "(the threshold is the largest of the references' percentiles).")
@click.option("--cache-dir", type=NonEmptyPath(file_okay=False, path_type=Path), default=Path("cache"),
              show_default=True, help="Where the training scans' features are cached.")
@click.option("-t", "--threads", type=THREADS, help="Interpreter threads.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def calibrate(model: Path, folders: tuple[Path, ...], out: Path, layer: str | None, dedup: Path | None,
              components: int, quantile: float, cache_dir: Path, threads: int | None, as_json: bool) -> None:
    """Fit the gate of MODEL on --data and write the model with it to --out."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        require_extra(["tensorflow"], "convert", PROG)
    except MissingExtra as exc:
        _fail(exc.message, EXIT_USAGE)
    from convert.gate_retrofit import retrofit
    from edge.errors import EdgeError

    try:
        summary = retrofit(model, folders, out, layer=layer, dedup=dedup, components=components,
                           quantile=quantile, cache_dir=cache_dir, threads=threads,
                           progress=None if as_json else _bar)
    except (OSError, EdgeError) as exc:
        _fail(str(exc), EXIT_INPUT)
    except ValueError as exc:
        _fail(f"{model}: {exc}", EXIT_FAILED)
    if as_json:
        click.echo(json.dumps(summary, indent=1))
        return
    cal = summary["gate"]["calibration"]
    click.echo(f"wrote {out} ({summary['size_bytes']:,} bytes, sha256 {summary['sha256'][:16]}...)")
    click.echo(f"features: {summary['features']['layer']}, {summary['features']['shape']}; weights unchanged "
               f"(sha256 {summary['weights']['sha256'][:16]}...)")
    click.echo(f"gate: {cal['components']} components, threshold {summary['gate']['threshold']:.4g} (every reference "
               f"keeps {cal['quantile']}% of its held-out scans and their variants below it); held out "
               f"referred: {100 * cal['held_out_referred']:.2f}% as read, "
               f"{100 * cal['held_out_variants_referred']:.2f}% as export-style variants")
    click.echo(f"layer steadiness: {100 * cal['variants_referred_unseen']:.1f}% of the held-out variants referred by a "
               f"gate fitted without them (lower: a scanner change moves this layer's features less)")
    for ref in cal["per_reference"]:
        click.echo(f"  {ref['reference']}: fit {ref['fit']}, held out {ref['held_out']}, referred "
                   f"{ref['held_out_referred']} as read and {ref['held_out_variants_referred']} as variants, "
                   f"unreadable {ref['unreadable']}")
    check = summary["identical"]
    click.echo(f"probabilities and heatmaps bit-identical to {model.name} on {check['images']} scans")


@main.command()
@click.argument("model", callback=bundled_or_path, metavar="NAME|PATH")
@click.option("--test", "test_dir", type=NonEmptyPath(file_okay=False, exists=True, path_type=Path),
              help="The test split (class sub-folders): real MRI.")
@click.option("--sets", type=NonEmptyPath(dir_okay=False, exists=True, path_type=Path),
              help="External set spec (data/external_sets.json): each set is real MRI.")
@click.option("--mri", "mri", multiple=True, metavar="DIR", type=NonEmptyPath(file_okay=False, exists=True, path_type=Path),
              help="Another folder of real brain MRI (repeatable).")
@click.option("--not-mri", "not_mri", multiple=True, metavar="DIR",
              type=NonEmptyPath(file_okay=False, exists=True, path_type=Path),
              help="A folder of inputs that are not brain MRI (repeatable): every verdict is the gate's miss.")
@click.option("--out", type=NonEmptyPath(file_okay=False, path_type=Path), help="Write gate.json and gate.md here.")
@click.option("-t", "--threads", type=THREADS, help="Interpreter threads.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of the markdown table.")
def measure(model: Path, test_dir: Path | None, sets: Path | None, mri: tuple[Path, ...],
            not_mri: tuple[Path, ...], out: Path | None, threads: int | None, as_json: bool) -> None:
    """Run MODEL over each set and count what its gate did; print the model card's table."""
    from convert.external_sets import list_set, load_spec
    from convert.gate_measure import MRI, NOT_MRI, GateSet, folder_set, markdown, measure as run
    from edge.errors import EdgeError

    try:
        chosen = [folder_set("Kaggle test split", test_dir, MRI)] if test_dir else []
        for spec in load_spec(sets) if sets else []:
            chosen.append(GateSet(spec.name, tuple(it.path for it in list_set(spec)), MRI))
        chosen += [folder_set(str(d), d, MRI) for d in mri] + [folder_set(str(d), d, NOT_MRI) for d in not_mri]
        if not chosen:
            raise click.UsageError("give at least one set: --test, --sets, --mri or --not-mri")
        report = run(model, chosen, threads=threads, progress=None if as_json else _bar,
                     command=shlex.join([PROG, *sys.argv[1:]]))
    except (OSError, ValueError, EdgeError) as exc:
        _fail(str(exc), EXIT_INPUT)
    table = markdown(report)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "gate.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        (out / "gate.md").write_text(table, encoding="utf-8")
    click.echo(json.dumps(report, indent=1) if as_json else table, nl=as_json)


if __name__ == "__main__":
    main(prog_name=PROG)
