"""The check every conversion ends with: does the int8 file still give the Keras model's answers?

Why here and not only in the parity report: a user converts once and ships the file, so a conversion that
changes answers must notice it by itself and, within stated budgets, repair it (`convert.repair`) before the
file is written. The check runs on held-out images, never on the calibration images: ``--heldout DIR`` when
given, else the calibration folder's images that calibration did not use (class-balanced, seeded, up to
`repair.CHECK_IMAGES`). The parity report uses the first `converter.HELDOUT_IMAGES` of that same set as
read, the check their variants (below).

The agreement the check counts is on a seeded scanner-style variant of each held-out image
(`convert.augment.scanner_variants`: gain, contrast, gamma, blur, noise), not on the image as read. Held-out
images of a training folder are mostly ones the model was fitted to, and int8 keeps their answers far more
often than a new scan's: on issue 16's frozen-base Xception, all int8 changed 1.3% of held-out `Training/`
answers but 3.4% of the test split's, and 3.3% of the variants'. A check on the images as read passed a
repaired file that still changed 0.9% of the test answers.

With ``--report`` the per-layer error report of `convert.quant_debug` is written too, whether or not a
repair was needed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from convert import augment, calibration, invoke_time, quant_debug, repair

#: What the check's images are, for the record that travels in the model file.
VARIANTS = "each with a seeded scanner-style intensity change"


@dataclass
class Checked:
    """What the check did: the file to write, its record for the metadata, the report files."""

    model: bytes
    outcome: repair.Outcome | None
    report_files: list[Path] = field(default_factory=list)

    def to_json(self) -> dict[str, Any] | None:
        return self.outcome.to_json() if self.outcome else None


def heldout_images(calib: calibration.ImageSet, *, calibration_dir: Path, heldout_dir: str | Path | None,
                   size: int, channels: int, pipeline: str, count: int, seed: int,
                   progress: Callable[[int], None] | None = None) -> tuple[calibration.ImageSet, str]:
    """(held-out images, where they came from): ``heldout_dir``, else the calibration folder minus the
    calibration images; a seed other than calibration's, so a folder given as both is split cleanly."""
    root = Path(heldout_dir) if heldout_dir is not None else calibration_dir
    exclude = calib.paths if root.resolve() == Path(calibration_dir).resolve() else []
    found = calibration.load_images(root, size=size, channels=channels, pipeline=pipeline, count=count,
                                    seed=seed + 1, exclude=exclude, progress=progress)
    # described, not named: the record travels inside the model file, a folder path would too
    source = "the --heldout folder" if heldout_dir is not None else "calibration-folder images not used for calibration"
    return found, source


def first(images: calibration.ImageSet, count: int) -> calibration.ImageSet:
    """The first ``count`` images of a set (a selection's prefix is the smaller selection)."""
    return calibration.ImageSet(images.images[:count], images.paths[:count], images.classes[:count],
                                images.skipped)


def _timer(image: np.ndarray) -> Callable[[bytes, bytes], tuple[float, float]]:
    def time_ms(baseline: bytes, candidate: bytes) -> tuple[float, float]:
        ms = invoke_time.interleaved_ms({"baseline": baseline, "candidate": candidate}, image)
        return ms["baseline"], ms["candidate"]

    return time_ms


def check_and_repair(model: Any, calibrated: bytes, int8: bytes, *, heldout: calibration.ImageSet,
                     heldout_source: str, calib: calibration.ImageSet, norm: Any,
                     quantize: Callable[[Sequence[str]], bytes], kept_float: Sequence[str],
                     float_ops: Sequence[str], target: float,
                     size_budget: float, latency_budget: float, report_dir: Path | None, name: str, seed: int,
                     say: Callable[[str], None]) -> Checked:
    """Measure agreement of ``int8`` on the held-out images' scanner-style variants (seeded by ``seed``);
    below ``target``, repair it; with ``report_dir``, write the per-layer report. ``quantize(nodes)``
    re-quantizes the calibrated model with those tensors in float; ``kept_float`` are the tensors already
    float (Grad-CAM combination, user's float layers)."""
    if not heldout.paths:
        say("note: no held-out images are left, so agreement with Keras was not checked (give --heldout)")
        return Checked(int8, None)
    images = augment.scanner_variants(heldout.images, seed)
    described = f"{heldout_source}, {VARIANTS}"
    reference = repair.keras_probabilities(model, images, norm)
    check = repair.make_check(reference, images)
    before = check(int8)
    say(f"held-out agreement with Keras (scanner-style variants): {before.agreement:.2%} ({before.disagreements} "
        f"of {before.images} differ; target {target:.2%})")
    needs_repair = before.agreement < target
    errors: list[quant_debug.LayerError] = []
    if needs_repair or report_dir is not None:
        say(f"per-layer int8 error: quantization debugger on {min(len(calib.images), quant_debug.DEBUG_IMAGES)} "
            f"calibration images")
        errors = quant_debug.layer_errors(calibrated, int8, calib.images, kept_float,
                                          quant_debug.all_layer_names(model), float_ops)
    time_ms = _timer(heldout.images[0])
    if needs_repair:
        probe = repair.make_check(reference[:repair.PROBE_IMAGES], images[:repair.PROBE_IMAGES])
        outcome = repair.repair(int8, before, errors, quantize=quantize, check=check, probe=probe, time_ms=time_ms,
                                target=target, size_budget=size_budget, latency_budget=latency_budget,
                                heldout=described, say=say)
    else:
        outcome = repair.Outcome(model=int8, target=target, before=before, after=before, heldout=described,
                                 size_budget=size_budget, latency_budget=latency_budget)
    files: list[Path] = []
    if report_dir is not None:
        baseline_ms = invoke_time.interleaved_ms({"int8": int8}, heldout.images[0])["int8"]
        timed = quant_debug.with_timings(errors, quantize, int8, heldout.images[0])
        files = quant_debug.write_report(report_dir, timed, model_name=name,
                                         images=min(len(calib.images), quant_debug.DEBUG_IMAGES),
                                         baseline_bytes=len(int8), baseline_ms=baseline_ms,
                                         repair=outcome.to_json())
    return Checked(outcome.model, outcome, files)
