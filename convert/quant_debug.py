"""Per-layer int8 error of a conversion, measured by TensorFlow's quantization debugger, and what float costs.

Why: when int8 changes a model's answers, the user needs to see which layers lose the most and what keeping
each of them in float would cost. `tf.lite.experimental.QuantizationDebugger` runs a debug build of the int8
model (``mlir_quantize(..., enable_numeric_verify=True)``) in which every quantized op is paired with the same
op in float on the same dequantized inputs, so its statistics are the error each op adds by itself, not the
error it inherits. Per op this module reports the debugger's RMSE and the output tensor's scale (RMSE/scale
is TensorFlow's own yardstick: plain rounding gives 1/sqrt(12) = 0.29), the noise-to-signal ratio (RMSE
over the RMS of the float output), and the same ratio channel by channel, averaged over the channels: the
share of each channel's signal that int8 loses. The ops are ranked by the last one, because an output
range stretched by one outlier channel (a coarse scale over channels whose values are mostly small) rounds
the other channels away while RMSE/scale and the tensor-wide ratio, both dominated by the outlier, look
normal.

The unit the repair keeps in float is a tensor: the op that produces it and the ops that read it, since an
int8 reader would quantize the float tensor again with the same stretched range. Its cost: the file-size
growth follows from the weights of those ops (int8 -> float32); the invoke-time growth is measured for the
top-ranked units by quantizing once more with that unit alone in float and timing both files side by side
(`convert.invoke_time`).
"""
from __future__ import annotations

import csv
import io
import json
import re
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

#: Calibration images the debugger runs (each runs the int8 and the float op side by side).
DEBUG_IMAGES = 32
#: Top-ranked ops whose invoke-time cost the report measures (each is one more quantization).
TIMED_LAYERS = 5
#: Ops listed in the markdown report.
LISTED_LAYERS = 25


@dataclass(frozen=True)
class LayerError:
    """One quantized op: what the debugger measured, and what keeping it in float would cost."""

    tensor: str  #: output tensor name: what the selective-quantization denylist names
    op: str  #: TFLite op type
    layer: str | None  #: the Keras layer it was converted from, where its name says
    order: int  #: position in the graph (the debugger's order)
    rmse: float
    scale: float
    rmse_over_scale: float
    noise_to_signal: float  #: RMSE over the RMS of the float output
    channel_noise_to_signal: float  #: the same per output channel, averaged over live channels (the rank)
    max_abs_error: float
    mean_error: float  #: the bias int8 adds (mean of int8 minus float)
    readers: tuple[str, ...]  #: output tensors of the quantized ops that read this tensor
    weights: int  #: weight elements of the op and its readers
    float_extra_bytes: int  #: file-size growth when the unit stays float (int8 weights become float32)
    invoke_ms_delta: float | None = None  #: measured invoke-time growth, top-ranked units only

    @property
    def nodes(self) -> tuple[str, ...]:
        """What to denylist to keep this tensor float: its producer and its quantized readers."""
        return (self.tensor, *self.readers)

    @property
    def name(self) -> str:
        """How people should read the op: its Keras layer and op type, else its tensor."""
        return f"{self.layer} ({self.op})" if self.layer else f"{self.tensor} ({self.op})"


def debug_model(calibrated: bytes, float_nodes: Sequence[str], float_ops: Sequence[str] = ()) -> bytes:
    """The int8 model with a NumericVerify op after every quantized op (what the debugger runs), the same
    ops kept float as in the conversion."""
    import tensorflow as tf
    from tensorflow.lite.python.convert import mlir_quantize

    return mlir_quantize(calibrated, disable_per_channel=False, fully_quantize=False, enable_numeric_verify=True,
                         input_data_type=tf.uint8, output_data_type=tf.float32, denylisted_ops=list(float_ops),
                         denylisted_nodes=list(float_nodes))


#: Fewer values per channel than this (a dense layer's output for one image) and the per-channel ratio is
#: noise: the tensor-wide ratio stands in.
MIN_CHANNEL_VALUES = 4


def _float_rms(float_values: np.ndarray, _quantized: Any, _scale: float, _zero_point: int) -> float:
    return float(np.sqrt(np.mean(np.square(np.asarray(float_values, np.float64)))))


def _channel_nsr(float_values: np.ndarray, quantized: np.ndarray, scale: float, zero_point: int) -> float:
    """Per output channel (last axis), RMSE of the dequantized int8 values over the channel's float RMS,
    averaged over channels that carry a signal; NaN where a channel has too few values to say."""
    f = np.asarray(float_values, np.float64)
    if f.ndim == 0 or f.size // max(f.shape[-1], 1) < MIN_CHANNEL_VALUES:
        return float("nan")
    q = (np.asarray(quantized).astype(np.int32) - zero_point) * float(scale)
    f, q = f.reshape(-1, f.shape[-1]), q.reshape(-1, f.shape[-1])
    rms = np.sqrt(np.mean(f * f, axis=0))
    live = rms > 1e-12
    if not live.any():
        return float("nan")
    return float(np.mean(np.sqrt(np.mean((q - f) ** 2, axis=0))[live] / rms[live]))


def _debugger_rows(debug: bytes, images: np.ndarray) -> list[dict[str, str]]:
    """The debugger's per-layer statistics, read back from its own CSV dump."""
    import tensorflow as tf

    options = tf.lite.experimental.QuantizationDebugOptions(
        layer_direct_compare_metrics={"float_rms": _float_rms, "channel_nsr": _channel_nsr})
    batch = np.asarray(images, np.uint8)
    with warnings.catch_warnings():  # the debugger runs tf.lite.Interpreter, which says it is deprecated
        warnings.filterwarnings("ignore", message=r"(?s).*tf\.lite\.Interpreter is deprecated")
        warnings.filterwarnings("ignore", message="Mean of empty slice")  # a metric NaN on every image
        debugger = tf.lite.experimental.QuantizationDebugger(
            quant_debug_model_content=debug, debug_dataset=lambda: ([image[None]] for image in batch),
            debug_options=options)
        debugger.run()
    dump = io.StringIO()
    debugger.layer_statistics_dump(dump)
    return list(csv.DictReader(io.StringIO(dump.getvalue())))


@dataclass(frozen=True)
class _Op:
    op: str
    weights: int  #: constant input elements
    grow: int  #: bytes those constants would grow by in float32
    readers: tuple[str, ...]  #: output tensors of quantized ops that read this op's output


def op_graph(tflite_model: bytes) -> dict[str, _Op]:
    """Per output tensor name of an int8 model: its op type, weights, and the quantized ops reading it."""
    from tensorflow.lite.python import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    model = schema.Model.GetRootAsModel(tflite_model, 0)
    codes = [names.get(max(model.OperatorCodes(i).BuiltinCode(), model.OperatorCodes(i).DeprecatedBuiltinCode()), "?")
             for i in range(model.OperatorCodesLength())]
    widths = {schema.TensorType.INT8: 1, schema.TensorType.UINT8: 1, schema.TensorType.INT16: 2,
              schema.TensorType.INT32: 4, schema.TensorType.FLOAT32: 4}
    graph = model.Subgraphs(0)
    tensor_name = lambda i: graph.Tensors(i).Name().decode("utf-8", "replace")
    ops = []
    for o in range(graph.OperatorsLength()):
        op = graph.Operators(o)
        elements = grow = 0
        inputs = []
        for j in range(op.InputsLength()):
            index = op.Inputs(j)
            if index < 0:
                continue
            tensor = graph.Tensors(index)
            if model.Buffers(tensor.Buffer()).DataLength() == 0:
                inputs.append(tensor_name(index))
                continue
            count = int(np.prod(tensor.ShapeAsNumpy())) if tensor.ShapeLength() else 1
            elements += count
            grow += count * (4 - widths.get(tensor.Type(), 4))
        outputs = [tensor_name(op.Outputs(j)) for j in range(op.OutputsLength()) if op.Outputs(j) >= 0]
        quantized = all(graph.Tensors(op.Outputs(j)).Type() != schema.TensorType.FLOAT32
                        for j in range(op.OutputsLength()) if op.Outputs(j) >= 0)
        ops.append((codes[op.OpcodeIndex()], elements, grow, inputs, outputs, quantized))
    readers: dict[str, list[str]] = {}
    for _, _, _, inputs, outputs, quantized in ops:
        if quantized:
            for name in inputs:
                readers.setdefault(name, []).extend(outputs)
    return {name: _Op(code, elements, grow, tuple(readers.get(name, ())))
            for code, elements, grow, _, outputs, _ in ops for name in outputs}


def keras_layer(tensor: str, layer_names: set[str]) -> str | None:
    """The Keras layer a TFLite tensor came from: the first path component of its first fused name that names
    a layer, read without the ``_N`` suffix Keras adds to a layer's call scope (``add_1/Add`` is layer
    ``add``, ``add_1_2/Add`` layer ``add_1``), else as written."""
    for part in tensor.split(";")[0].split("/"):
        base = re.sub(r"_\d+$", "", part)
        if base in layer_names:
            return base
        if part in layer_names:
            return part
    return None


def all_layer_names(model: Any) -> set[str]:
    """Names of every layer of a Keras model, nested models included."""
    import keras

    names = set()
    for layer in model.layers:
        names.add(layer.name)
        if isinstance(layer, keras.Model):
            names |= all_layer_names(layer)
    return names


def layer_errors(calibrated: bytes, int8: bytes, images: np.ndarray, float_nodes: Sequence[str],
                 layer_names: set[str], float_ops: Sequence[str] = ()) -> list[LayerError]:
    """Every quantized op of the int8 conversion (``float_nodes`` and ``float_ops`` stay float), ranked by
    per-channel noise-to-signal, worst first."""
    graph = op_graph(int8)
    found = []
    for order, row in enumerate(_debugger_rows(debug_model(calibrated, float_nodes, float_ops), images[:DEBUG_IMAGES])):
        tensor = row["tensor_name"]
        if tensor not in graph:  # not an op output of the conversion (cannot be denylisted)
            continue
        rmse = float(np.sqrt(max(float(row["mean_squared_error"]), 0.0)))
        scale, rms = float(row["scale"]), float(row["float_rms"])
        nsr = rmse / rms if rms > 0 else 0.0
        channel = float(row["channel_nsr"]) if row["channel_nsr"] not in ("", "nan") else nsr
        op = graph[tensor]
        readers = tuple(r for r in op.readers if r in graph)
        found.append(LayerError(
            tensor=tensor, op=op.op, layer=keras_layer(tensor, layer_names), order=order, rmse=rmse, scale=scale,
            rmse_over_scale=rmse / scale if scale > 0 else float("nan"), noise_to_signal=nsr,
            channel_noise_to_signal=channel if np.isfinite(channel) else nsr,
            max_abs_error=float(row["max_abs_error"]), mean_error=float(row["mean_error"]), readers=readers,
            weights=op.weights + sum(graph[r].weights for r in readers),
            float_extra_bytes=op.grow + sum(graph[r].grow for r in readers)))
    return sorted(found, key=lambda e: -e.channel_noise_to_signal)


def with_timings(errors: list[LayerError], quantize: Callable[[Sequence[str]], bytes], baseline: bytes,
                 image: np.ndarray, top: int = TIMED_LAYERS) -> list[LayerError]:
    """``errors`` with the invoke-time growth measured for the ``top`` first ones (one at a time in float)."""
    from convert import invoke_time

    timed = list(errors)
    for i, error in enumerate(errors[:top]):
        candidate = quantize(list(error.nodes))
        ms = invoke_time.interleaved_ms({"int8": baseline, "float": candidate}, image)
        timed[i] = replace(error, invoke_ms_delta=round(ms["float"] - ms["int8"], 3),
                           float_extra_bytes=len(candidate) - len(baseline))
    return timed


def to_json(errors: Sequence[LayerError]) -> list[dict[str, Any]]:
    def clean(value: Any) -> Any:
        return round(value, 6) if isinstance(value, float) and np.isfinite(value) else value

    return [{k: clean(v) for k, v in asdict(e).items()} for e in errors]


def _markdown(errors: Sequence[LayerError], repair: dict[str, Any] | None, model_name: str, images: int,
              baseline_bytes: int, baseline_ms: float | None) -> str:
    lines = [f"# Per-layer int8 error: {model_name}", "",
             f"TensorFlow's quantization debugger on {images} calibration images: each op's error on its own "
             "(int8 against float on the same inputs). Ranked by channel noise/signal (per output channel, "
             "RMSE over the channel's float RMS, averaged); tensor noise/signal is the same over the whole "
             "tensor; RMSE/scale near 0.29 is plain rounding, range = 255 x scale. Keeping a tensor in float "
             "means its op and the quantized ops reading it (`readers`): the file grows by their weights x3 "
             f"(of {baseline_bytes:,} bytes)"
             + (f"; invoke time is measured for the first {sum(e.invoke_ms_delta is not None for e in errors)} "
                f"(all-int8 invoke {baseline_ms:.2f} ms, one thread, this machine)" if baseline_ms else "") + ".", "",
             "| rank | layer (op) | channel noise/signal | tensor noise/signal | RMSE/scale | range | "
             "mean error | readers | float: +bytes | float: +invoke ms |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for rank, e in enumerate(errors[:LISTED_LAYERS], 1):
        timed = f"{e.invoke_ms_delta:+.2f}" if e.invoke_ms_delta is not None else ""
        lines.append(f"| {rank} | {e.name} | {e.channel_noise_to_signal:.4f} | {e.noise_to_signal:.4f} | "
                     f"{e.rmse_over_scale:.3f} | {255 * e.scale:.4g} | {e.mean_error:+.3g} | {len(e.readers)} | "
                     f"{e.float_extra_bytes:+,} | {timed} |")
    if len(errors) > LISTED_LAYERS:
        lines.append(f"\n{len(errors) - LISTED_LAYERS} more ops in quantization.json.")
    lines += ["", "## Repair", ""] + (repair_lines(repair) if repair else ["Not run (no held-out images)."])
    return "\n".join(lines) + "\n"


def repair_lines(repair: dict[str, Any]) -> list[str]:
    """What the check found and the repair did, in words (the report's section; its first lines are the CLI's)."""
    before, after = repair["before"], repair["after"]
    lines = [f"Held-out top-1 agreement with Keras, all-int8: {before['agreement']:.2%} "
             f"({before['disagreements']} of {before['images']} images differ; target {repair['target']:.2%}; "
             f"held-out images: {repair['heldout']})."]
    if not repair["steps"] and not repair["probes"]:
        return lines + ["Target met: nothing was changed."]
    kept = repair["kept_float"]
    names = ", ".join(f"`{k['layer'] or k['tensor']}` ({k['op']})" for k in kept)
    plural = "s" if len(kept) != 1 else ""
    lines.append(f"Kept in float ({len(kept)} tensor{plural} with the ops reading them): {names}." if kept else
                 "Nothing kept in float: no try beat the all-int8 file within the budgets.")
    lines.append(f"Result: {after['agreement']:.2%} ({after['disagreements']} differ; 95% lower bound "
                 f"{after['lower_95']:.2%}), file x{repair['size_ratio']:.3f}, invoke x{repair['invoke_ratio']:.3f} "
                 f"of the all-int8 conversion (budgets x{repair['size_budget']} and x{repair['latency_budget']}); "
                 f"{repair['reason']}.")
    lines += ["", "Each run of the graph in float alone, on the first held-out images:", "",
              "| run | from | to | tensors | differ | mean prob. diff | size |", "|---:|---|---|---:|---:|---:|---:|"]
    for i, p in enumerate(repair["probes"], 1):
        c = p["check"]
        lines.append(f"| {i} | {p['first']} | {p['last']} | {p['tensors']} | "
                     + (f"{c['disagreements']} / {c['images']} | {c['probability_diff']:.4f}" if c else "over budget | ")
                     + f" | x{p['size_ratio']:.3f} |")
    lines += ["", "Tries on every held-out image:", "",
              "| try | float tensors (ops) | agreement | 95% lower bound | size | invoke |",
              "|---:|---:|---:|---:|---:|---:|"]
    for i, step in enumerate(repair["steps"], 1):
        c = step["check"]
        measured = f"{c['agreement']:.2%} | {c['lower_95']:.2%}" if c else "not measured: over budget | "
        timed = f"x{step['invoke_ratio']:.3f}" if step["invoke_ratio"] is not None else ""
        lines.append(f"| {i} | {step['tensors']} ({step['ops']}) | {measured} | x{step['size_ratio']:.3f} | {timed} |")
    return lines


def _plot(path: Path, errors: Sequence[LayerError]) -> Path:
    """Channel noise-to-signal of every op in graph order (as the debugger lists them), the worst labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = sorted(errors, key=lambda e: e.order)
    values = [e.channel_noise_to_signal for e in order]
    fig, ax = plt.subplots(figsize=(9, 3.2))
    ax.bar(range(len(values)), values, color="tab:blue")
    for e in errors[:5]:
        i = order.index(e)
        ax.annotate(e.layer or e.op, (i, e.channel_noise_to_signal), fontsize=7, rotation=30, ha="left",
                    va="bottom")
    ax.set_xlabel("quantized op, input to output")
    ax.set_ylabel("channel noise / signal")
    ax.set_title("int8 error added by each op (quantization debugger)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_report(report_dir: Path, errors: Sequence[LayerError], *, model_name: str, images: int,
                 baseline_bytes: int, baseline_ms: float | None,
                 repair: dict[str, Any] | None) -> list[Path]:
    """quantization.json, quantization.md and quantization.png in ``report_dir``."""
    report_dir.mkdir(parents=True, exist_ok=True)
    data = {"model": model_name, "debug_images": images, "baseline_bytes": baseline_bytes,
            "baseline_invoke_ms": baseline_ms, "layers": to_json(errors), "repair": repair}
    files = [report_dir / "quantization.json", report_dir / "quantization.md"]
    files[0].write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    files[1].write_text(_markdown(errors, repair, model_name, images, baseline_bytes, baseline_ms), encoding="utf-8")
    if errors:
        files.append(_plot(report_dir / "quantization.png", errors))
    return files
