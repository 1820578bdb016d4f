"""`edge-evaluate`: accuracy, F1, kappa, AUC and calibration of a model on a test folder, whole and de-duplicated."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import click

from edge.cli_common import (THREADS, NonEmptyPath, OneLineCommand, bundled_or_path, require_extra,
                             version_option, warning)
from edge.errors import EdgeError

PROG = "edge-evaluate"


def _bar(paths: Sequence[Path]) -> Iterable[Path]:
    with click.progressbar(paths, label="Classifying", file=sys.stderr) as bar:
        yield from bar


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def summary_text(result: dict[str, Any]) -> str:
    """The human-readable report: one line per subset, then per-class figures of each subset."""
    from convert.evaluate import SUBSETS

    m, images = result["model"], result["images"]
    lines = [
        f"model: {m['name']} ({m['format']}, {m['input_size']}px x {m['channels']}, {m['pipeline']}"
        + (f", {m['backend']}" if m.get("backend") else "") + ")",
        f"data:  {result['data_dir']}: {images['evaluated']} images evaluated, {images['unreadable']} unreadable"
        + (f" (at most {result['limit']} per class)" if result["limit"] else "")
        + f", {result['ms_per_image']:.1f} ms/image",
    ]
    if "dedup" in result:
        d = result["dedup"]
        lines.append(f"dedup: {d['file']} (threshold {d['threshold']}): {d['found']} of its {d['listed']} "
                     "de-duplicated images are in this folder")
    lines += ["", f"{'subset':<15}{'n':>6}{'accuracy':>10}{'macro-F1':>10}{'kappa':>8}{'macro-AUC':>11}{'ECE':>7}"]
    for subset, s in result["subsets"].items():
        lines.append(f"{SUBSETS[subset]:<15}{s['n']:>6}{_num(s['accuracy']):>10}{_num(s['macro_f1']):>10}"
                     f"{_num(s['kappa']):>8}{_num(s['macro_auc']):>11}{_num(s['ece']):>7}")
    for subset, s in result["subsets"].items():
        lines += ["", f"{SUBSETS[subset]}: {'class':<12}{'precision':>10}{'recall':>8}{'specif.':>9}{'F1':>7}"
                      f"{'support':>9}"]
        pad = " " * (len(SUBSETS[subset]) + 2)
        for label, c in s["per_class"].items():
            lines.append(f"{pad}{label:<12}{c['precision']:>10.3f}{c['recall']:>8.3f}{c['specificity']:>9.3f}"
                         f"{c['f1']:>7.3f}{c['support']:>9}")
    return "\n".join(lines)


@click.command(PROG, cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@version_option(PROG)
@click.argument("model", metavar="MODEL", callback=bundled_or_path)
@click.argument("data_dir", metavar="[DIR]", type=NonEmptyPath(path_type=Path), required=False)
@click.option("--dedup", type=click.Path(dir_okay=False, path_type=Path),
              help="An edge-dedup report: also give metrics on the test images that have no copy in training.")
@click.option("--out", "out", type=NonEmptyPath(file_okay=False, path_type=Path),
              help="Write metrics.json and confusion_<subset>.png/.json into this folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON instead of the text summary.")
@click.option("--limit", type=click.IntRange(min=1),
              help="At most N images per class, and per folder of external sets (quick checks).")
@click.option("--threads", type=THREADS,
              help="Interpreter threads (TFLite) or TensorFlow threads (Keras). Default: the backend's choice.")
@click.option("--sets", type=click.Path(dir_okay=False, path_type=Path),
              help="External validation: a set spec (data/external_sets.json); DIR becomes optional.")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path),
              help="Folder the --sets paths are relative to. Default: the spec's own 'root'.")
@click.option("--folder", "folders", multiple=True, metavar="PATH=EXPECT",
              help="External validation of one folder; EXPECT: tumour, healthy or a class (repeatable).")
@click.option("--masks", type=click.Path(path_type=Path),
              help="Explanation quality instead: lesion masks (0/255 PNG) mirroring DIR's paths, a.jpg -> a.png.")
@click.option("--deletion-limit", type=click.IntRange(min=0),
              help="With --masks: deletion/insertion on at most N scans (seeded choice; 0: none). Default: all.")
def main(model: Path, data_dir: Path | None, dedup: Path | None, out: Path | None, as_json: bool, limit: int | None,
         threads: int | None, sets: Path | None, root: Path | None, folders: tuple[str, ...], masks: Path | None,
         deletion_limit: int | None) -> None:
    """Evaluate MODEL (a bundled name such as custom-cnn, or a .tflite, .keras or .h5) on DIR, a folder with
    one sub-folder per label.

    A .tflite model runs through edge.Classifier, exactly as on a device. A Keras model must carry its
    metadata (saved by edge-train) and gets the same decoding, preprocessing and normalisation. Reported
    per subset: accuracy, macro F1, Cohen's kappa, macro one-vs-rest ROC AUC, expected calibration error
    (15 bins), and per class precision, recall, specificity and F1. With --dedup, the same metrics on the
    test images without a copy in the training set (see edge-dedup); this is the number to quote.

    With --sets or --folder (scans from elsewhere, not sorted by our labels): tumour found, healthy spared
    and right class, with Wilson 95% intervals, per set, source and variant, plus DIR's accuracy if given;
    and, at any border, the ROC AUC of tumours against healthy slices for every pair of groups and within
    one variant (e.g. T2 tumours against T2 normals); --out gets external.json, external.md (the model
    card section) and external.png.

    With --masks (a .tflite model; DIR a class-folder set or a flat folder): how well the heatmaps mark the
    lesion: pointing game, heatmap mass inside the mask and its ratio to the mask's share of the head (also
    for the set's average map), Pearson r with the average map, deletion/insertion AUC against a random
    order; per true class (or predicted class outside class folders). --out gets explanations.json,
    explanations.md (the model card table) and overlays_<class>.png (best and worst, mask outlined).

    \b
    Examples:
      edge-evaluate models/custom-cnn.tflite data/Testing --dedup data/dedup/brain-tumor-mri.json
      edge-evaluate runs/xception.keras data/Testing --dedup data/dedup/brain-tumor-mri.json --out reports/xception
      edge-evaluate edge/models/custom-cnn.tflite data/Testing --limit 20 --json
      edge-evaluate edge/models/custom-cnn.tflite data/Testing --dedup data/dedup/brain-tumor-mri.json \\
          --sets data/external_sets.json --out reports/ext-custom-cnn
      edge-evaluate edge/models/custom-cnn.tflite --folder clinic/tumours=tumour --folder clinic/normal=healthy
      edge-evaluate edge/models/xception.tflite data/Testing --masks data/masks/Testing --deletion-limit 200 \\
          --threads 1 --out reports/xception-explain

    \b
    Exit codes: 0 evaluated (unreadable images are warned about on stderr and listed, not fatal);
    1 the model, folder or de-duplication report cannot be used; 2 bad usage, or an extra it needs is not
    installed (`convert`: Keras for a Keras model, matplotlib for --out).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if model.suffix.lower() in (".keras", ".h5") or model.is_dir():
        require_extra(["keras"], "convert", "edge-evaluate on a Keras model")
    if out is not None:
        require_extra(["matplotlib"], "convert", "edge-evaluate --out (its plots)")
    if root is not None and sets is None:
        raise click.UsageError("--root needs --sets")
    if deletion_limit is not None and masks is None:
        raise click.UsageError("--deletion-limit needs --masks")
    if masks is not None:
        if data_dir is None or dedup is not None or sets is not None or folders:
            raise click.UsageError("--masks needs DIR and takes no --dedup, --sets or --folder")
        from convert.explain_cli import evaluate_masks

        return evaluate_masks(model, data_dir, masks, out=out, as_json=as_json, limit=limit, threads=threads,
                              deletion_limit=deletion_limit)
    if sets is not None or folders:
        from convert.external_cli import run

        return run(model, data_dir, dedup=dedup, sets=sets, root=root, folders=folders, out=out, as_json=as_json,
                   limit=limit, threads=threads)
    if data_dir is None:
        raise click.UsageError("give DIR (a test folder), or external sets with --sets or --folder")
    from convert.evaluate import evaluate, write_outputs

    try:
        result = evaluate(model, data_dir, dedup=dedup, limit=limit, threads=threads, progress=_bar)
    except (ValueError, OSError, EdgeError) as exc:
        raise click.ClickException(str(exc)) from None
    for item in result["unreadable"]:
        warning(PROG, item["error"])
    written = write_outputs(result, out) if out is not None else []
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    click.echo(summary_text(result))
    if written:
        click.echo(f"\nwrote {', '.join(p.name for p in written)} to {out}")
