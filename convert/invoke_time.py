"""Invoke time of model variants, measured side by side in this process: what a float layer costs.

Why in-process and interleaved: the converter needs the *ratio* of two conversions of the same model
(all-int8 and a variant with some ops kept float) quickly, on a host that is busy with other work. Timing
both in alternating rounds shares every slow-down between them, and the median of each drops the
outliers. The absolute figures belong to this machine; a device's are measured with ``edge-bench``.
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
    """Median invoke time (ms) of each model on ``image`` (uint8 [S, S, C]), timed in alternating rounds."""
    interpreters = {}
    for name, blob in models.items():
        interpreter = _interpreter(blob)
        detail = interpreter.get_input_details()[0]
        interpreter.set_tensor(detail["index"], np.asarray(image, detail["dtype"])[None])
        interpreter.invoke()  # first inference: allocation and packing, not part of the measure
        interpreters[name] = interpreter
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, interpreter in interpreters.items():
            for _ in range(runs):
                start = time.perf_counter()
                interpreter.invoke()
                times[name].append((time.perf_counter() - start) * 1000.0)
    return {name: float(np.median(values)) for name, values in times.items()}
