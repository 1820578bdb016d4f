"""Repair an int8 conversion whose answers differ from the Keras model's: keep the fewest tensors in float.

Why: a model published as an ImageNet base with a small trained head can change several answers in 100 in
int8 (issue 16), and its user cannot tell which layers are to blame. The converter therefore checks every
conversion: top-1 agreement of the int8 file with the Keras model on held-out images (never the
calibration images). When it meets the target nothing happens, so models that convert well are untouched.
When it falls short, tensors are kept in float (the op producing each and the quantized ops reading it,
`convert.quant_debug.LayerError.nodes`) in the order the quantization debugger ranks them, worst
per-channel noise-to-signal first, with builtin float kernels and no new calibration
(`convert.converter.quantize` with a denylist):

1. grow: the first 1, 2, 4, 8, ... ranked tensors in float, until the agreement reaches the target or a
   budget (file size or invoke time, as ratios over the all-int8 file) would be exceeded;
2. shrink: the shortest prefix that still reaches the target (bisection), then each tensor of it put back
   in int8, last-ranked first, where the target holds without it.

Every try is measured (agreement on the held-out images, file size, invoke time side by side with the
all-int8 file), at most `MAX_TRIES` of them; the outcome lists them and names what was kept in float.
When the target is not reached within the budgets, the best try within them is kept if it beats the
all-int8 file, and the outcome says so.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from convert.quant_debug import LayerError

#: Default target: top-1 agreement of the int8 file with the Keras model on held-out images.
TARGET = 0.995
#: Default budgets, as ratios over the all-int8 conversion: file size and invoke time.
SIZE_BUDGET = 1.5
LATENCY_BUDGET = 1.3
#: Held-out images the check uses at most (the parity report uses the first `converter.HELDOUT_IMAGES`).
CHECK_IMAGES = 400
#: Quantize-and-measure tries at most, growing and shrinking together.
MAX_TRIES = 14


@dataclass(frozen=True)
class Check:
    """Top-1 agreement of one TFLite file with the Keras model on the held-out images."""

    agreement: float
    disagreements: int
    images: int
    #: Mean |probability difference|: finer than agreement, breaks ties between tries.
    probability_diff: float

    def to_json(self) -> dict[str, Any]:
        return {"agreement": round(self.agreement, 5), "disagreements": self.disagreements, "images": self.images,
                "probability_diff": round(self.probability_diff, 6)}


@dataclass(frozen=True)
class Step:
    """One try: these tensors kept float (with their readers), and what that measured."""

    nodes: tuple[str, ...]
    size_ratio: float
    invoke_ratio: float
    check: Check | None  #: None when a budget ruled the try out before its agreement was measured

    def to_json(self) -> dict[str, Any]:
        return {"nodes": list(self.nodes), "size_ratio": round(self.size_ratio, 4),
                "invoke_ratio": round(self.invoke_ratio, 4),
                "agreement": self.check.agreement if self.check else None,
                "disagreements": self.check.disagreements if self.check else None}


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
                "kept_float": [{"tensor": k.tensor, "layer": k.layer, "op": k.op, "readers": list(k.readers),
                                "channel_noise_to_signal": round(k.channel_noise_to_signal, 6)} for k in self.kept],
                "steps": [s.to_json() for s in self.steps]}


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


def repair(baseline: bytes, before: Check, ranked: Sequence[LayerError], *,
           quantize: Callable[[Sequence[str]], bytes], check: Callable[[bytes], Check],
           time_ms: Callable[[bytes, bytes], tuple[float, float]], target: float = TARGET,
           size_budget: float = SIZE_BUDGET, latency_budget: float = LATENCY_BUDGET, heldout: str = "",
           say: Callable[[str], None] = lambda _m: None) -> Outcome:
    """Keep the fewest ranked ops in float that bring the agreement to ``target`` within the budgets.

    ``quantize(nodes)`` quantizes the calibrated model with those output tensors float; ``check`` measures
    agreement; ``time_ms(a, b)`` times two files side by side. ``before`` is ``check(baseline)``.
    """
    outcome = Outcome(model=baseline, target=target, before=before, after=before, heldout=heldout,
                      size_budget=size_budget, latency_budget=latency_budget)
    if before.agreement >= target:
        return outcome
    candidates = [e for e in ranked if e.channel_noise_to_signal > 0]
    by_tensor = {e.tensor: e for e in candidates}
    tried: dict[tuple[str, ...], tuple[Step, bytes]] = {}

    def attempt(tensors: Sequence[str]) -> Step:
        key = tuple(sorted(tensors))
        if key not in tried:
            nodes = sorted({n for t in key for n in by_tensor[t].nodes})
            blob = quantize(nodes)
            size_ratio = len(blob) / len(baseline)
            base_ms, ms = time_ms(baseline, blob)
            invoke_ratio = ms / base_ms if base_ms > 0 else 1.0
            within = size_ratio <= size_budget and invoke_ratio <= latency_budget
            step = Step(key, size_ratio, invoke_ratio, check(blob) if within else None)
            tried[key] = (step, blob)
            outcome.steps.append(step)
            got = f"agreement {step.check.agreement:.2%}" if step.check else "over budget"
            say(f"repair: {len(key)} tensors ({len(nodes)} ops) in float: {got}, size x{size_ratio:.3f}, "
                f"invoke x{invoke_ratio:.3f}")
        return tried[key][0]

    def good(step: Step) -> bool:
        return step.check is not None and step.check.agreement >= target

    # 1. grow the prefix until the target is met or a budget is hit
    k, previous, found = 1, 0, None
    while k <= len(candidates) and len(tried) < MAX_TRIES:
        step = attempt([e.tensor for e in candidates[:k]])
        if step.check is None:
            outcome.reason = "a size or latency budget was reached before the target"
            break
        if good(step):
            found = k
            break
        previous, k = k, (k * 2 if k * 2 <= len(candidates) or k == len(candidates) else len(candidates))
        if k == previous:
            outcome.reason = "every quantized op was tried in float"
            break
    else:
        outcome.reason = "the try limit was reached" if len(tried) >= MAX_TRIES else "no op to keep in float"
    if found is not None:
        # 2a. the shortest good prefix between the last bad one and the first good one
        low, high = previous, found
        while high - low > 1 and len(tried) < MAX_TRIES:
            middle = (low + high) // 2
            if good(attempt([e.tensor for e in candidates[:middle]])):
                high = middle
            else:
                low = middle
        chosen = [e.tensor for e in candidates[:high]]
        # 2b. drop what the target does not need, last-ranked first
        for node in reversed(list(chosen)):
            if len(chosen) == 1 or len(tried) >= MAX_TRIES:
                break
            rest = [n for n in chosen if n != node]
            if good(attempt(rest)):
                chosen = rest
        best = tried[tuple(sorted(chosen))][0]
        outcome.reached, outcome.reason = True, "target reached"
    else:
        within = [s for s, _ in tried.values() if s.check is not None]
        best = max(within, key=lambda s: (s.check.agreement, -s.check.probability_diff, -len(s.nodes)),
                   default=None)
        outcome.reached = False
        if best is None or (best.check.agreement, -best.check.probability_diff) <= (before.agreement,
                                                                                   -before.probability_diff):
            return outcome
    outcome.model = tried[best.nodes][1]
    outcome.after = best.check
    outcome.kept = [by_tensor[n] for n in best.nodes]
    outcome.size_ratio, outcome.invoke_ratio = best.size_ratio, best.invoke_ratio
    return outcome

