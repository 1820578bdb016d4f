"""Invoke time of model variants, measured side by side in this process: what a float layer costs.

Why in-process and interleaved: the converter needs the *ratio* of two conversions of the same model
(all-int8 and a variant with some ops kept float) quickly, on a host that is busy with other work. Timing
both in alternating rounds shares slow-downs between them; each round's median drops single outliers, and
the fastest round of each model is its figure, the one least disturbed by other work (a busy 2-core host
moved a median-of-all ratio by 0.2 between two runs). The absolute figures belong to this machine; a
device's are measured with ``edge-bench``.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

#: Alternating rounds, and invokes per model per round.
ROUNDS = 5
RUNS = 8
#: Interpreter threads: one, the most stable measure and what a loaded board gives a model.
THREADS = 1


def _interpreter(model: bytes) -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        from tensorflow.lite import Interpreter  # type: ignore[no-redef]
    interpreter = Interpreter(model_content=model, num_threads=THREADS)
    interpreter.allocate_tensors()
    return interpreter


def interleaved_ms(models: dict[str, bytes], image: np.ndarray, rounds: int = ROUNDS,
                   runs: int = RUNS) -> dict[str, float]:
    """Invoke time (ms) of each model on ``image`` (uint8 [S, S, C]): the fastest of ``rounds`` alternating
    rounds, each the median of ``runs`` invokes."""
    interpreters = {}
    for name, blob in models.items():
        interpreter = _interpreter(blob)
        detail = interpreter.get_input_details()[0]
        interpreter.set_tensor(detail["index"], np.asarray(image, detail["dtype"])[None])
        interpreter.invoke()  # first inference: allocation and packing, not part of the measure
        interpreters[name] = interpreter
    rounds_ms: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, interpreter in interpreters.items():
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                interpreter.invoke()
                times.append((time.perf_counter() - start) * 1000.0)
            rounds_ms[name].append(float(np.median(times)))
    return {name: min(values) for name, values in rounds_ms.items()}
