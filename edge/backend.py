"""Pick the TFLite interpreter a device has, without ever importing full TensorFlow unless nothing else exists.

Order of preference: ``ai_edge_litert`` (LiteRT, the maintained successor), ``tflite_runtime`` (older boards,
32-bit Arm), then ``tensorflow.lite`` (a workstation that only has TensorFlow). TensorFlow is imported only
when the first two are missing, or when asked for by name, because importing it costs seconds and hundreds
of megabytes that a Raspberry Pi does not have.
"""
from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from .errors import BackendError, ModelError
from .quiet import native_stderr_silenced

#: Backend name -> (module path to the namespace holding ``Interpreter``, distributions that may provide it).
#: ``tensorflow:lite`` means the attribute ``lite`` of ``tensorflow``: the public ``tf.lite`` API namespace is
#: not importable as a module of its own.
BACKENDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "litert": ("ai_edge_litert.interpreter", ("ai-edge-litert", "ai-edge-litert-nightly")),
    "tflite_runtime": ("tflite_runtime.interpreter", ("tflite-runtime", "tflite_runtime")),
    "tensorflow": ("tensorflow:lite", ("tensorflow", "tensorflow-cpu", "tensorflow-aarch64", "tf-nightly")),
}

#: Most interpreter threads accepted anywhere (API and every CLI's --threads). The interpreter starts one
#: thread per count without asking how many cores exist, so a typo (999) would start a thousand; 64 is
#: above any board or workstation this runs on (a Pi has 4 cores, a Jetson Orin 12) and fixed, not
#: os.cpu_count()-relative, so one command line means the same on every machine (oversubscription can
#: still be measured on purpose).
MAX_THREADS = 64


@dataclass(frozen=True)
class BackendInfo:
    """Which interpreter runs the model, for results and bug reports."""

    name: str
    version: str


def _version(name: str, module: Any) -> str:
    for dist in BACKENDS[name][1]:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    root = importlib.import_module(BACKENDS[name][0].split(".")[0].split(":")[0])
    return str(getattr(root, "__version__", getattr(module, "__version__", "unknown")))


def _import(name: str) -> Any:
    module_path, _, attribute = BACKENDS[name][0].partition(":")
    module = importlib.import_module(module_path)
    if attribute:
        module = getattr(module, attribute, None)
    if not hasattr(module, "Interpreter"):
        raise ImportError(f"{BACKENDS[name][0].replace(':', '.')} has no Interpreter")
    return module


def find_backend(name: str | None = None) -> tuple[Any, BackendInfo]:
    """Return (the module providing ``Interpreter``, its :class:`BackendInfo`).

    ``name`` forces one backend (``litert``, ``tflite_runtime`` or ``tensorflow``); None takes the first
    one installed in preference order.
    """
    if name is not None:
        if name not in BACKENDS:
            raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
        try:
            module = _import(name)
        except ImportError as exc:
            raise BackendError(f"backend {name!r} is not installed ({exc})") from None
        return module, BackendInfo(name, _version(name, module))
    for candidate in BACKENDS:
        try:
            module = _import(candidate)
        except ImportError:
            continue
        return module, BackendInfo(candidate, _version(candidate, module))
    raise BackendError(
        "no TFLite interpreter installed; `pip install ai-edge-litert` (or tflite-runtime on 32-bit Arm)"
    )


def load_interpreter(
    model: bytes, threads: int | None = None, backend: str | None = None
) -> tuple[Any, BackendInfo]:
    """Create and allocate an interpreter for ``model`` (the .tflite bytes) on the chosen backend.

    ``threads`` is passed as ``num_threads``; None leaves the backend's own default. A model the runtime
    cannot load (corrupt graph, unsupported op) is a :class:`ModelError`, not a backend problem.
    """
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise BackendError(f"threads must be 1 to {MAX_THREADS}, got {threads}")
    module, info = find_backend(backend)
    try:
        with native_stderr_silenced(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tf.lite's deprecation notice: that is why it is the last resort
            interpreter = module.Interpreter(model_content=model, num_threads=threads)
            interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"the {info.name} interpreter cannot load the model ({reason})") from None
    return interpreter, info
