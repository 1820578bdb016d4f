"""`edge-convert`: a Keras classifier in, the runtime's int8 TFLite model (with Grad-CAM) out."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from convert import repair
from edge.cli_common import MissingExtra, NonEmptyPath, OneLineCommand, error, require_extra, version_option

PROG = "edge-convert"
EXIT_OK, EXIT_CONVERSION, EXIT_USAGE, EXIT_INPUT = 0, 1, 2, 3

HELP = """Convert MODEL (.keras, legacy .h5 or a SavedModel folder) into one .tflite file the edge runtime
runs: uint8 pixels in, int8 arithmetic, and three outputs, `probabilities`, a Grad-CAM `heatmap` of the
predicted class computed inside the same graph (only TFLite builtin ops), and the `features` the device's
input gate scores. The gate is calibrated on the calibration folder (and --gate-data) and embedded, so
the device refers scans unlike the training data; it needs at least 500 scans, else the model is written
without one (edge-gate calibrate can add it later).

\b
The input normalisation is folded into the graph, so the device feeds the uint8 image that
edge.preprocess.prepare returns. Models trained with edge-train carry their labels, size, pipeline
and normalisation; for other models pass --preprocess (and --labels unless the calibration folder's
class subfolders name the classes in the model's order).

\b
Examples:
  edge-convert runs/custom-cnn.keras --calibration data/Training --out custom-cnn.tflite
  edge-convert xception.h5 --calibration data/Training --out xception.tflite \\
      --preprocess xception --labels glioma,meningioma,notumor,pituitary --report report/
  edge-convert model.keras --calibration calib/ --out m.tflite --also-fp32 --json

\b
Every conversion ends with a check: top-1 agreement of the int8 file with the Keras model on held-out
images (--heldout DIR, default: up to 1,000 calibration-folder images not used for calibration; never
the calibration images), each with a seeded scanner-style change of gain, contrast, gamma, blur and
noise: images the model was trained on, as read, overstate agreement on new scans. At or above
--agreement (default 99.5%) nothing changes. Below it the file is repaired: parts of the graph are kept
in float (builtin kernels), the ones that measurably matter, as few as show the target with 95%
confidence, within --size-budget and --latency-budget (ratios over the all-int8 file; invoke time
measured here, one thread). --agreement 0 skips the check.

\b
--report DIR compares the int8 (and fp32) file with the Keras model on the first 200 held-out images:
top-1 agreement, accuracy, probability differences, heatmap correlation with a GradientTape Grad-CAM
(parity.json, parity.txt, heatmaps.png); and ranks the ops by the int8 error each adds, with what keeping
it in float costs in size and invoke time, and what the repair did (quantization.json, .md, .png).

\b
Exit codes:
  0  converted
  1  the model cannot be converted as asked (unsupported head layer, bad --target-layer, --labels
     count differs from the model's outputs, non-builtin op)
  2  bad command line (unknown option or normalisation, empty label, ...), or the `convert` extra
     (TensorFlow) is not installed
  3  an input is missing or unreadable (model file, calibration folder, no readable images)
"""


def _fail(message: str, code: int, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"ok": False, "error": message, "exit_code": code}))
    error(PROG, message)
    sys.exit(code)


def _summary(result) -> list[str]:
    s = result.settings
    lines = [f"wrote {result.out} ({result.out.stat().st_size / 1024:.0f} KiB, int8): {s.name}, "
             f"{s.input_size}x{s.input_size}x{s.channels} {s.pipeline}, normalisation {s.preprocess}",
             f"labels: {', '.join(s.labels)}"]
    if result.target_layer:
        h, w, k = result.feature_shape
        lines.append(f"Grad-CAM target layer {result.target_layer!r} ({h}x{w}x{k})")
        if result.fine_layer:
            fine = result.metadata["gradcam"]["fine_shape"]
            lines.append(f"heatmap: LayerCAM of {result.fine_layer!r} ({fine[0]}x{fine[1]}x{fine[2]}) and the target")
    cal = result.calibration
    per_class = ", ".join(f"{k or '(unlabelled)'} {n}" for k, n in cal["per_class"].items())
    lines.append(f"calibration: {cal['images']} images ({per_class}), {cal['skipped']} skipped")
    equalised = result.metadata["converter"]["settings"].get("equalised")
    if equalised:
        lines.append(f"equalised {equalised['layers']} separable convolutions (intermediate channel spread, "
                     f"median max/median: {equalised['median_spread_before']:.1f} -> "
                     f"{equalised['median_spread_after']:.1f})")
    weights = result.metadata["weights"]
    lines.append(f"weights checksum: sha256 {weights['sha256'][:16]}... over {weights['buffers']} buffers "
                 f"({weights['bytes']:,} bytes), checked whenever the runtime loads the file")
    lines.append(f"ops: {', '.join(result.ops)}")
    lines.append(f"float ops: {', '.join(f'{k} x{n}' for k, n in result.float_ops.items()) or 'none'}")
    if result.fp32_out:
        lines.append(f"also wrote {result.fp32_out} ({result.fp32_out.stat().st_size / 1024:.0f} KiB, float32)")
    if result.repair:
        from convert.quant_debug import repair_lines

        lines += repair_lines(result.repair)[:3]
    if result.report:
        for name, v in result.report["variants"].items():
            r = v["heatmap_pearson"]
            lines.append(f"parity [{name}]: top-1 agreement {v['top1_agreement']:.1%}, heatmap r median "
                         f"{r['median']} (min {r['min']}) on {v['images']} images")
        lines.append(f"report: {', '.join(str(p) for p in result.report_files)}")
    return lines


@click.command(PROG, cls=OneLineCommand, help=HELP,
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@version_option(PROG)
@click.argument("model", type=NonEmptyPath(path_type=Path))
@click.option("--calibration", "calibration_dir", required=True, type=NonEmptyPath(path_type=Path),
              help="Folder of calibration images: class subfolders (balanced selection) or a flat folder.")
@click.option("--out", required=True, type=NonEmptyPath(dir_okay=False, path_type=Path),
              help="Output .tflite path.")
@click.option("--labels", help="Comma-separated class names in the model's output order.")
@click.option("--preprocess", help="Normalisation the model was trained with: xception/tf ([-1,1]), 0-1, caffe, "
                                   "torch, none, or mean=a,b,c;std=d,e,f.")
@click.option("--pipeline", type=click.Choice(["mri-crop-v1", "resize"]),
              help="Scan preparation on the device (default: carried by the model, else resize).")
@click.option("--input-size", type=click.IntRange(8, 4096), help="Input size S, for models that accept any size.")
@click.option("--target-layer", help="Grad-CAM layer (default: the last 4-D feature map before the head).")
@click.option("--fine-layer", help="An earlier layer (e.g. custom-cnn's b2_out, 12x12) whose map is fused with the "
              "target's (LayerCAM): a finer heatmap. Its gradient is derived through the layers in between "
              "(convolutions, batch norms, ReLUs, residual sums, max-pools), still builtin ops. Default: "
              "Grad-CAM at the target alone.")
@click.option("--num-calibration", default=200, show_default=True, type=click.IntRange(1, 100000),
              help="Calibration images in total, balanced over classes.")
@click.option("--also-fp32", is_flag=True, help="Also write OUT_fp32.tflite, the same graph in float32.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write a parity report (JSON, text, heatmap PNG) into this folder.")
@click.option("--heldout", "heldout_dir", type=click.Path(path_type=Path),
              help="Held-out images for the agreement check (up to 1,000) and the parity report (200) (default: "
                   "calibration-folder images not used for calibration).")
@click.option("--heatmap/--no-heatmap", "gradcam", default=True, show_default=True,
              help="Build the in-graph Grad-CAM head. --no-heatmap writes the same model with only "
                   "`probabilities`: the baseline that `edge-bench --reference nohead=...` uses to measure "
                   "what the head costs. It cannot be combined with --report.")
@click.option("--equalise/--no-equalise", default=True, show_default=True,
              help="Rescale the channels inside depthwise-separable convolutions (Xception) before int8 "
                   "quantization: same float function, less int8 rounding where channel ranges differ widely. No "
                   "effect on models without separable convolutions; --no-equalise measures what it buys.")
@click.option("--agreement", default=repair.TARGET, show_default=True, type=click.FloatRange(0, 1),
              help="Target top-1 agreement with the Keras model on held-out images; below it the worst ops are "
                   "kept in float. 0: no check.")
@click.option("--size-budget", default=repair.SIZE_BUDGET, show_default=True, type=click.FloatRange(1),
              help="Largest file size the repair may reach, as a multiple of the all-int8 file (4: up to all "
                   "float).")
@click.option("--latency-budget", default=repair.LATENCY_BUDGET, show_default=True, type=click.FloatRange(1),
              help="Largest invoke time the repair may reach, as a multiple of the all-int8 file's.")
@click.option("--gate-data", "gate_data", multiple=True, type=NonEmptyPath(file_okay=False, exists=True, path_type=Path),
              help="More training scans for the input gate besides the calibration folder, e.g. a second "
                   "source's healthy scans (repeatable; see edge-gate calibrate --help).")
@click.option("--name", help="Model name in the metadata (default: carried, else the file stem).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout (errors too).")
def main(model: Path, calibration_dir: Path, out: Path, labels: str | None, preprocess: str | None,
         pipeline: str | None, input_size: int | None, target_layer: str | None, fine_layer: str | None,
         num_calibration: int,
         also_fp32: bool, report_dir: Path | None, heldout_dir: Path | None, gradcam: bool, equalise: bool,
         agreement: float, size_budget: float, latency_budget: float, gate_data: tuple[Path, ...], name: str | None,
         as_json: bool) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        require_extra(["tensorflow", "keras"], "convert", "edge-convert")
    except MissingExtra as exc:
        _fail(exc.message, EXIT_USAGE, as_json)
    from convert import calibration, normalisation

    label_list = None
    if labels is not None:
        label_list = [x.strip() for x in labels.split(",")]
        if not all(label_list):
            _fail(f"--labels {labels!r}: empty class name", EXIT_USAGE, as_json)
    if preprocess is not None:
        try:
            normalisation.parse(preprocess)
        except ValueError as exc:
            _fail(f"--preprocess: {exc}", EXIT_USAGE, as_json)
    if report_dir is not None and not gradcam:
        _fail("--report compares heatmaps, so it needs the Grad-CAM head (drop --no-heatmap)", EXIT_USAGE, as_json)
    if not model.exists():
        _fail(f"{model}: no such model file or directory", EXIT_INPUT, as_json)
    for folder in (calibration_dir, heldout_dir):
        if folder is not None:
            try:
                calibration.list_images(folder)
            except OSError as exc:
                _fail(str(exc), EXIT_INPUT, as_json)

    from convert.converter import convert_model

    say = None if as_json else (lambda msg: click.echo(msg, err=True))
    try:
        result = convert_model(model, calibration_dir=calibration_dir, out=out, labels=label_list,
                               preprocess=preprocess, input_size=input_size, target_layer=target_layer,
                               num_calibration=num_calibration, also_fp32=also_fp32, report_dir=report_dir,
                               heldout_dir=heldout_dir, name=name, pipeline=pipeline, gradcam=gradcam, equalise=equalise,
                               agreement=agreement, size_budget=size_budget, latency_budget=latency_budget,
                               progress=not as_json, gate_data=gate_data, fine_layer=fine_layer, log=say)
    except OSError as exc:
        _fail(str(exc), EXIT_INPUT, as_json)
    except ValueError as exc:
        _fail(f"{model}: {exc}", EXIT_CONVERSION, as_json)
    if as_json:
        click.echo(json.dumps(dict(result.to_json(), ok=True), indent=1))
    else:
        for line in _summary(result):
            click.echo(line)
