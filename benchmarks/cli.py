"""`edge-bench`: measure the edge runtime on this device and catch regressions between builds."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

import edge
from edge.backend import MAX_THREADS
from edge.cli_common import NonEmptyPath, OneLineGroup, error, notice, version_option, warning

from . import compare as compare_mod
from . import report
from .keras_reference import STYLES as KERAS_STYLES
from .memory import memory_cmd
from .run import BenchError, Config, find_images, progress_length, rounds_plan, run_session
from .serve import serve_cmd
from .soak import parse_duration

PROG = "edge-bench"
SAMPLES_DIR = Path(edge.__file__).resolve().parent / "samples"
DEFAULT_THREADS = (1, 2, 4)


def _threads(text: str | None) -> list[int]:
    if text is None:
        cores = os.cpu_count() or 1
        return sorted({min(t, cores) for t in DEFAULT_THREADS})
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: give thread counts like 1,2,4", param_hint="--threads") from None
    if not values or any(not 1 <= v <= MAX_THREADS for v in values):
        raise click.BadParameter(f"{text!r}: thread counts must be integers from 1 to {MAX_THREADS}",
                                 param_hint="--threads")
    return sorted(set(values))


def _reference(text: str) -> tuple[str, Path]:
    label, sep, model = text.partition("=")
    if not sep or not label.strip() or not model.strip():
        raise click.BadParameter(f"{text!r}: expected LABEL=NAME|PATH, e.g. fp32=model_fp32.tflite or "
                                 "x=xception", param_hint="--reference")
    return label.strip(), _resolve(model.strip(), "--reference")


def _resolve(model: str | None, option: str = "--model") -> Path:
    """A bundled model name or a .tflite path, exactly as `edge-classify --model` takes it."""
    from edge.errors import ModelError
    from edge.registry import resolve

    try:
        return resolve(model)
    except ModelError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


def _tensorflow_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorflow") is not None


@click.group(PROG, cls=OneLineGroup,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@version_option(PROG)
def main() -> None:
    """Latency and memory benchmarks for the edge runtime: `run` measures, `compare` catches regressions.

    \b
    Examples:
      edge-bench run                                   # bundled default model, threads 1,2,4
      edge-bench run --model custom-cnn --threads 1,4 --runs 200 --out pi5.json --markdown pi5.md
      edge-bench run --model m_int8.tflite --reference fp32=m_fp32.tflite --keras m.keras
      edge-bench run --duration 30m --threads 4        # soak: latency and memory drift
      edge-bench compare benchmarks/baselines/pi5.json new.json --tolerance 10%
      edge-bench serve --clients 1,4,16                 # edge-serve over loopback: requests/s, p50/p99, RSS
      edge-bench memory                                # peak RSS and time of edge-classify on the worst inputs
    """


@main.command()
@click.option("--model", "models", multiple=True, metavar="NAME|PATH",
              help="Model under test: bundled name or .tflite path (repeatable; default: the bundled default).")
@click.option("--threads", "threads_text", metavar="N,N,...",
              help="Interpreter thread counts to measure (default: 1,2,4 capped at this machine's cores).")
@click.option("--runs", default=50, show_default=True, type=click.IntRange(1),
              help="Measured scans per model x threads.")
@click.option("--warmup", default=5, show_default=True, type=click.IntRange(0),
              help="Unmeasured scans after the first inference.")
@click.option("--rounds", default=5, show_default=True, type=click.IntRange(1),
              help="Interleaved rounds the runs are split into (compare judges the median of round medians).")
@click.option("--images", type=NonEmptyPath(file_okay=False, path_type=Path),
              help="Directory of scans to cycle through (recursive; default: edge/samples/).")
@click.option("--budget-ms", default=400.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Real-time budget: each model x threads PASSes when its end-to-end p99 is within it.")
@click.option("--cold-starts", default=3, show_default=True, type=click.IntRange(0),
              help="Fresh processes timed from spawn to first result (median reported; 0 skips).")
@click.option("--reference", "references", multiple=True, metavar="LABEL=NAME|PATH",
              help="Reference model (bundled name or .tflite) measured on the same scans and reported as a "
                   "ratio (repeatable), e.g. fp32=m_fp32.tflite, nohead=m_nohead.tflite or big=xception.")
@click.option("--keras", "keras_path", type=NonEmptyPath(dir_okay=False, path_type=Path),
              help="Also time the Keras fp32 + GradientTape Grad-CAM loop of this .keras (needs TensorFlow), "
                   "two ways: keras-compiled+tape (one compiled tf.function, the fastest Keras way) and "
                   "keras-predict+tape (model.predict, then an eager tape: how the published studies run it).")
@click.option("--duration", metavar="30s|10m|2h",
              help="Soak each model under test x threads for this long (one after another) after the rounds; "
                   "reports latency and RSS drift.")
@click.option("--sample-every", default="10s", show_default=True, metavar="DURATION",
              help="Soak sampling interval for RSS and progress.")
@click.option("--out", "out_path", type=NonEmptyPath(dir_okay=False, path_type=Path), metavar="FILE",
              help="Write the full results (JSON, schema edge-bench/1) here; the input of `compare`.")
@click.option("--json", "as_json", is_flag=True, help="Print the full results as JSON instead of the markdown report.")
@click.option("--markdown", "md_out", type=NonEmptyPath(dir_okay=False, path_type=Path),
              help="Write the markdown report here.")
@click.option("--histogram", "png_out", type=NonEmptyPath(dir_okay=False, path_type=Path),
              help="Write an end-to-end latency histogram PNG (skipped with a notice without matplotlib).")
def run(models: tuple[str, ...], threads_text: str | None, runs: int, warmup: int, rounds: int,
        images: Path | None, budget_ms: float, cold_starts: int, references: tuple[str, ...],
        keras_path: Path | None, duration: str | None, sample_every: str, out_path: Path | None, as_json: bool,
        md_out: Path | None, png_out: Path | None) -> None:
    """Measure every model x threads (and references) on the same scans; judge against the budget.

    Each configuration runs in its own child process (so peak RSS is the classifier's own, and TensorFlow
    never enters a measured TFLite process). The measured scans are split into --rounds interleaved
    rounds: every round, each configuration classifies the same slice of scans, round-robin, so slow
    drifts are shared rather than charged to whoever ran last. Reported per stage (decode, preprocess,
    invoke, postprocess, classifier total, end-to-end wall clock): min/p50/p90/p99/max/mean/std, plus
    load, first-inference and cold-start time, peak RSS and its growth, throughput, model size and a
    device fingerprint (CPU, governor, frequencies, temperatures, Pi throttling, Jetson power mode).

    \b
    Exit codes:
      0  every model under test met the budget (end-to-end p99 <= --budget-ms)
      1  at least one model x threads missed the budget (FAIL)
      2  bad usage or input: unknown model, no scans, unreadable reference, worker failure
    """
    threads = _threads(threads_text)
    refs = [_reference(r) for r in references]
    try:
        soak_s = parse_duration(duration) if duration else None
        sample_s = parse_duration(sample_every)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--duration/--sample-every") from None
    model_paths = list(dict.fromkeys(_resolve(m) for m in (models or (None,))))
    if keras_path is not None:
        if not keras_path.is_file():
            raise click.BadParameter(f"{keras_path}: no such .keras file", param_hint="--keras")
        if not _tensorflow_available():
            notice(PROG, f"TensorFlow is not installed; skipping the Keras reference {keras_path}")
            keras_path = None
    try:
        scans = find_images(images or SAMPLES_DIR)
    except BenchError as exc:
        raise click.UsageError(str(exc)) from None
    configs = [Config(None, "model", "tflite", p, t) for p in model_paths for t in threads]
    configs += [Config(label, "reference", "tflite", p, t) for label, p in refs for t in threads]
    if keras_path is not None:
        configs += [Config(f"keras-{style}+tape", "reference", "keras", keras_path, t, style)
                    for style in KERAS_STYLES for t in threads]
    n_rounds, _ = rounds_plan(runs, rounds)
    soak_samples = int(soak_s // sample_s) if soak_s else 0
    length = progress_length(configs, n_rounds, cold_starts, soak_samples)
    try:
        with click.progressbar(length=length, label=f"benchmarking {len(configs)} configuration(s)",
                               file=sys.stderr) as bar:
            session = run_session(configs, scans, runs=runs, warmup=warmup, rounds=rounds, cold_runs=cold_starts,
                                  budget_ms=budget_ms, soak_s=soak_s, sample_s=sample_s, advance=bar.update)
    except BenchError as exc:
        error(PROG, exc)
        sys.exit(2)
    text = report.markdown(session)
    click.echo(json.dumps(session, indent=1) if as_json else text)
    if out_path:
        out_path.write_text(json.dumps(session, indent=1), encoding="utf-8")
    if md_out:
        md_out.write_text(text, encoding="utf-8")
    if png_out:
        skipped = report.histogram(session, png_out)
        if skipped:
            notice(PROG, skipped)
    for res in session["results"]:
        for scan, why in res["skipped_scans"].items():
            warning(PROG, f"{res['label']} skipped {scan}: {why}")
    failed = [f"{r['label']} x{r['threads']}" for r in session["results"] if r.get("verdict") == "FAIL"]
    if failed:
        error(PROG, f"FAIL: end-to-end p99 over {budget_ms:g} ms for {', '.join(failed)}")
        sys.exit(1)


@main.command("compare")
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("new", type=click.Path(path_type=Path))
@click.option("--tolerance", default="10%", show_default=True,
              help="Allowed slow-down/growth per metric, as a percentage (10%) or fraction (0.1).")
@click.option("--floor-ms", default=compare_mod.FLOOR_MS, show_default=True, type=click.FloatRange(0),
              help="Latency increases up to this many ms never count as regressions.")
@click.option("--floor-mb", default=compare_mod.FLOOR_MB, show_default=True, type=click.FloatRange(0),
              help="Peak-RSS increases up to this many MB never count as regressions.")
@click.option("--out", "out_path", type=NonEmptyPath(dir_okay=False, path_type=Path), metavar="FILE",
              help="Write the comparison as JSON here.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON instead of the markdown table.")
def compare_cmd(base: Path, new: Path, tolerance: str, floor_ms: float, floor_mb: float, out_path: Path | None,
                as_json: bool) -> None:
    """Compare two `run --out` files and fail on a regression.

    Matches models under test by label and thread count, and judges invoke p50/p90, end-to-end p50/p90
    and peak RSS. Latency figures are the median over the run's interleaved rounds of each round's
    p50/p90, which one disturbed round cannot move. A metric regresses when
    new - base > max(tolerance x base, floor). Run both files on the same device (the fingerprints are
    checked and differences noted) with the same --runs/--rounds.

    \b
    Examples:
      edge-bench compare benchmarks/baselines/x86-dev.json new.json
      edge-bench compare base.json new.json --tolerance 20% --json
    \b
    Exit codes:
      0  no regression
      1  at least one metric regressed beyond the tolerance
      2  bad usage, an unreadable or non-edge-bench file, or no configuration in common
    """
    try:
        tol = compare_mod.parse_tolerance(tolerance)
        result = compare_mod.compare(compare_mod.load(base), compare_mod.load(new), tol, floor_ms, floor_mb)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--tolerance") from None
    except compare_mod.CompareError as exc:
        error(PROG, exc)
        sys.exit(2)
    payload = json.dumps(result, indent=1)
    if out_path is not None:
        out_path.write_text(payload, encoding="utf-8")
    click.echo(payload if as_json else compare_mod.markdown(result, str(base), str(new)))
    if result["matched"] == 0:
        error(PROG, f"{base} and {new} have no model x threads configuration in common")
        sys.exit(2)
    sys.exit(1 if result["regressions"] else 0)


main.add_command(serve_cmd)
main.add_command(memory_cmd)
