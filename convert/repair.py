"""Repair an int8 conversion whose answers differ from the Keras model's: keep the fewest ops in float.

Why: a model published as an ImageNet base with a small trained head can change several answers in 100 in
int8 (issue 16), and its user cannot tell which layers are to blame. The converter therefore checks every
conversion: top-1 agreement of the int8 file with the Keras model on held-out images (never the
calibration images), each with a scanner-style variation (`convert.agreement` says why). When it meets the
target nothing happens, so models that convert well are untouched.

When it falls short, parts of the graph are kept in float with builtin kernels, without a new calibration
(`convert.converter.quantize` with a denylist). The unit is a tensor: the op producing it and the quantized
ops reading it (`convert.quant_debug.LayerError.nodes`). Which parts matter is *measured*, not read off the
debugger's per-op errors: an op's own error says little about what it does to the answers (on the
frozen-base Xception of issue 16 the worst op by far, the last feature map, changes nothing when kept float,
while the first blocks, with small errors of their own, matter most, because everything after them
amplifies what they lose). So:

1. measure: the quantized ops, in graph order, are cut into `SEGMENTS` contiguous runs; each run is tried in
   float alone on the first `PROBE_IMAGES` held-out images: the mean probability difference from Keras (on
   a few hundred images a model that already agrees 99% of the time differs on one or two, too few to rank);
2. grow: runs are added in float, most useful first, until the target is met with 95% confidence (below);
   a run that would exceed a budget (file size or invoke time, as ratios over the all-int8 file) is left out;
3. shrink: each chosen run is cut back by bisection, from its end and then from its start, as far as the
   target still holds with confidence.

A repaired file has to *show* that it no longer loses agreement, so once a repair has started the target
counts as met only when the Wilson 95% lower bound of the held-out agreement reaches it: with 1,000
held-out images and a 99.5% target, no disagreement at all; fewer than 770 images can never show 99.5%.
Every try is measured (agreement, file size, invoke time side by side with the all-int8 file), at most
`MAX_TRIES` full tries; the outcome lists them and names what was kept in float. When the target is not
shown within the budgets, the best try within them is kept if it beats the all-int8 file, and the outcome
says so.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from convert.metrics import wilson_interval
from convert.quant_debug import LayerError

#: Default target: top-1 agreement of the int8 file with the Keras model on held-out images.
TARGET = 0.995
#: Default budgets, as ratios over the all-int8 conversion: file size (4: up to an all-float file, so by
#: default only invoke time limits the repair) and invoke time.
SIZE_BUDGET = 4.0
LATENCY_BUDGET = 1.3
#: Held-out images the check uses at most (the parity report uses the first `converter.HELDOUT_IMAGES`);
#: enough to show 99.5% with 95% confidence.
CHECK_IMAGES = 1000
#: Contiguous runs the quantized ops are cut into, and the held-out images each run is probed on.
SEGMENTS = 8
PROBE_IMAGES = 200
#: Full tries (quantize, time, check on every held-out image) at most, growing and shrinking together.
MAX_TRIES = 14
@dataclass(frozen=True)
class Check:
    """Top-1 agreement of one TFLite file with the Keras model on the held-out images."""

    agreement: float
    disagreements: int
    images: int
    #: Mean |probability difference|: finer than agreement, ranks tries that agree equally often.
    probability_diff: float

    @property
    def lower(self) -> float:
        """Wilson 95% lower bound of the agreement."""
        return wilson_interval(self.images - self.disagreements, self.images)[0]

    def to_json(self) -> dict[str, Any]:
        return {"agreement": round(self.agreement, 5), "lower_95": round(self.lower, 5),
                "disagreements": self.disagreements, "images": self.images,
                "probability_diff": round(self.probability_diff, 6)}


@dataclass(frozen=True)
class Step:
    """One try: these tensors kept float (with their readers), and what that measured."""

    tensors: tuple[str, ...]
    ops: int
    size_ratio: float
    invoke_ratio: float | None  #: None when the file was already over the size budget
    check: Check | None  #: None when a budget ruled the try out before its agreement was measured

    def to_json(self) -> dict[str, Any]:
        return {"tensors": len(self.tensors), "ops": self.ops, "size_ratio": round(self.size_ratio, 4),
                "invoke_ratio": None if self.invoke_ratio is None else round(self.invoke_ratio, 4),
                "check": self.check.to_json() if self.check else None}


@dataclass(frozen=True)
class Probe:
    """One run of the graph tried in float alone, on the probe images."""

    first: str
    last: str
    tensors: tuple[str, ...]
    size_ratio: float
    check: Check | None  #: None when the run alone is over the size budget

    def to_json(self) -> dict[str, Any]:
        return {"first": self.first, "last": self.last, "tensors": len(self.tensors),
                "size_ratio": round(self.size_ratio, 4), "check": self.check.to_json() if self.check else None}


@dataclass
class Outcome:
    """What the repair did: the file to write, and the record that goes into the metadata and the report."""

    model: bytes
    target: float
    before: Check
    after: Check
    heldout: str
    size_budget: float
    latency_budget: float
    kept: list[LayerError] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    size_ratio: float = 1.0
    invoke_ratio: float = 1.0
    reached: bool = True
    reason: str = "target met by the all-int8 conversion"

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "heldout": self.heldout, "before": self.before.to_json(),
                "after": self.after.to_json(), "reached": self.reached, "reason": self.reason,
                "size_budget": self.size_budget, "latency_budget": self.latency_budget,
                "size_ratio": round(self.size_ratio, 4), "invoke_ratio": round(self.invoke_ratio, 4),
                "kept_float": [{"tensor": k.tensor, "layer": k.layer, "op": k.op, "readers": list(k.readers)}
                               for k in self.kept],
                "probes": [p.to_json() for p in self.probes], "steps": [s.to_json() for s in self.steps]}


def probabilities(tflite_model: bytes, images: np.ndarray) -> np.ndarray:
    """The ``probabilities`` output of a converted file for every image (uint8 [N, S, S, C])."""
    from convert.gradcam_head import PROBABILITIES
    from convert.parity import make_interpreter

    interpreter = make_interpreter(tflite_model)
    runner = interpreter.get_signature_runner("serving_default")
    (input_name,) = interpreter.get_signature_list()["serving_default"]["inputs"]
    return np.stack([np.asarray(runner(**{input_name: image[None]})[PROBABILITIES][0]) for image in images])


def keras_probabilities(model: Any, images: np.ndarray, norm: Any, batch: int = 16) -> np.ndarray:
    """The float Keras model's probabilities (softmax applied to a logits model) on the same images."""
    import tensorflow as tf

    from convert import gradcam_head, normalisation

    logits = not gradcam_head._ends_in_softmax(model)
    out = []
    for start in range(0, len(images), batch):
        x = normalisation.apply(np.asarray(images[start:start + batch], np.float32), norm)
        y = model(x, training=False)
        out.append(np.asarray(tf.nn.softmax(y, axis=-1) if logits else y))
    return np.concatenate(out)


def make_check(reference: np.ndarray, images: np.ndarray) -> Callable[[bytes], Check]:
    """A function measuring a TFLite file against the Keras ``reference`` probabilities on ``images``."""
    truth = np.argmax(reference, axis=1)

    def check(tflite_model: bytes) -> Check:
        p = probabilities(tflite_model, images)
        same = np.argmax(p, axis=1) == truth
        return Check(agreement=float(same.mean()), disagreements=int((~same).sum()), images=int(same.size),
                     probability_diff=float(np.abs(p - reference).mean()))

    return check


def _score(check: Check) -> tuple[int, float]:
    """Lower is better: disagreements first, then the mean probability difference."""
    return check.disagreements, check.probability_diff


#: Ops that only convert between int8 and float: nothing to keep in float.
CONVERSIONS = ("QUANTIZE", "DEQUANTIZE")


def repair(baseline: bytes, before: Check, ranked: Sequence[LayerError], *,
           quantize: Callable[[Sequence[str]], bytes], check: Callable[[bytes], Check],
           probe: Callable[[bytes], Check], time_ms: Callable[[bytes, bytes], tuple[float, float]],
           target: float = TARGET, size_budget: float = SIZE_BUDGET, latency_budget: float = LATENCY_BUDGET,
           heldout: str = "", say: Callable[[str], None] = lambda _m: None) -> Outcome:
    """Keep the fewest tensors in float that show ``target`` agreement within the budgets.

    ``ranked`` are the quantized ops (`convert.quant_debug.layer_errors`); ``quantize(nodes)`` quantizes the
    calibrated model with those output tensors float; ``check`` measures agreement on every held-out image,
    ``probe`` on the first few; ``time_ms(a, b)`` times two files side by side. ``before`` is
    ``check(baseline)``.
    """
    outcome = Outcome(model=baseline, target=target, before=before, after=before, heldout=heldout,
                      size_budget=size_budget, latency_budget=latency_budget)
    if before.agreement >= target:
        return outcome
    units = sorted((e for e in ranked if e.op not in CONVERSIONS), key=lambda e: e.order)
    by_tensor = {e.tensor: e for e in units}
    order = {e.tensor: i for i, e in enumerate(units)}
    tried: dict[tuple[str, ...], tuple[Step, bytes]] = {}

    def nodes_of(tensors: Sequence[str]) -> list[str]:
        return sorted({n for t in tensors for n in by_tensor[t].nodes})

    def attempt(tensors: Sequence[str]) -> Step:
        key = tuple(sorted(set(tensors), key=order.__getitem__))
        if key not in tried:
            nodes = nodes_of(key)
            blob = quantize(nodes)
            size_ratio = len(blob) / len(baseline)
            invoke_ratio = None
            measured = None
            if size_ratio <= size_budget:
                base_ms, ms = time_ms(baseline, blob)
                invoke_ratio = ms / base_ms if base_ms > 0 else 1.0
                if invoke_ratio <= latency_budget:
                    measured = check(blob)
            step = Step(key, len(nodes), size_ratio, invoke_ratio, measured)
            tried[key] = (step, blob)
            outcome.steps.append(step)
            got = (f"agreement {measured.agreement:.2%} (95% lower bound {measured.lower:.2%})" if measured
                   else "over budget")
            timed = f", invoke x{invoke_ratio:.3f}" if invoke_ratio is not None else ""
            say(f"repair try {len(outcome.steps)}: {len(key)} tensors ({len(nodes)} ops) in float: {got}, "
                f"size x{size_ratio:.3f}{timed}")
        return tried[key][0]

    def shown(step: Step) -> bool:
        return step.check is not None and step.check.lower >= target

    def budget_left() -> bool:
        return len(tried) < MAX_TRIES

    # 1. measure each run of the graph in float alone
    runs = [list(run) for run in np.array_split(np.array([e.tensor for e in units], dtype=object),
                                                 min(SEGMENTS, len(units))) if len(run)]
    for run in runs:
        blob = quantize(nodes_of(run))
        size_ratio = len(blob) / len(baseline)
        probed = probe(blob) if size_ratio <= size_budget else None
        outcome.probes.append(Probe(by_tensor[run[0]].name, by_tensor[run[-1]].name, tuple(run), size_ratio, probed))
        say(f"repair probe {len(outcome.probes)}/{len(runs)}: {by_tensor[run[0]].name} .. {by_tensor[run[-1]].name} "
            f"in float: " + (f"mean probability difference {probed.probability_diff:.4f} on {probed.images} images"
                             if probed else "over the size budget"))
    useful = sorted((p for p in outcome.probes if p.check is not None), key=lambda p: p.check.probability_diff)
    if not useful:
        outcome.reached, outcome.reason = False, "every part of the graph alone is over the size budget"
        return outcome
    # 2. grow: the most useful runs first, until the target is shown or a budget stops it
    chosen: list[list[str]] = []
    found: Step | None = None
    left_out = len(outcome.probes) - len(useful)  # runs over the size budget on their own
    limited = False
    for p in useful:
        if not budget_left():
            limited = True
            break
        step = attempt([t for run in chosen for t in run] + list(p.tensors))
        if step.check is None:
            left_out += 1
            continue
        chosen.append(list(p.tensors))
        if shown(step):
            found = step
            break
    if limited:
        outcome.reason = "the try limit was reached before the target was shown"
    elif left_out:
        outcome.reason = (f"the target was not shown within the budgets ({left_out} of {len(outcome.probes)} "
                          f"parts of the graph left int8: in float they would exceed a budget)")
    else:
        outcome.reason = "the target was not shown even with every part of the graph in float"
    if found is not None:
        # 3. shrink every chosen run, from its end and then from its start, while the target stays shown
        for i in reversed(range(len(chosen))):
            for from_end in (True, False):
                run = chosen[i]
                low, high = 0, len(run)  # keep `high` tensors of the run; `low` is known too few
                while high - low > 1 and budget_left():
                    middle = (low + high) // 2
                    kept = run[:middle] if from_end else run[len(run) - middle:]
                    step = attempt([t for j, r in enumerate(chosen) if j != i for t in r] + kept)
                    if shown(step):
                        high, found = middle, step
                    else:
                        low = middle
                chosen[i] = run[:high] if from_end else run[len(run) - high:]
        best = found
        outcome.reached, outcome.reason = True, "target shown with 95% confidence"
    else:
        within = [s for s, _ in tried.values() if s.check is not None]
        best = min(within, key=lambda s: (*_score(s.check), s.ops), default=None)
        outcome.reached = False
        if best is None or _score(best.check) >= _score(before):
            return outcome
    outcome.model = tried[best.tensors][1]
    outcome.after = best.check
    outcome.kept = [by_tensor[t] for t in best.tensors]
    outcome.size_ratio, outcome.invoke_ratio = best.size_ratio, best.invoke_ratio
    return outcome
