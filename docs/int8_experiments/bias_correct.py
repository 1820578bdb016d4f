"""Experiment (issue 16): empirical bias correction of an int8 TFLite file against its fp32 twin.

For each int8 CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED op in graph order, the per-channel mean of its
(dequantized) output over correction images is compared with the fp32 file's same tensor, and the int32 bias
is shifted by the difference (in bias units, s_in * s_w[c]); ops one after another, each with the upstream
corrections already in (Nagel et al. 2019, empirical bias correction). Fused-ReLU outputs: post-activation
means, an approximation (--skip-fused leaves those ops alone).
"""
import sys, json, time
from pathlib import Path
import numpy as np
import tensorflow as tf
from tensorflow.lite.python import schema_py_generated as schema
from convert import flatbuffer

OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"}
names = {v: k for k, v in schema.BuiltinOperator.__dict__.items() if not k.startswith("_")}


def interp(b):
    it = tf.lite.Interpreter(model_content=b, experimental_preserve_all_tensors=True, num_threads=2)
    it.allocate_tensors()
    return it


def run_means(b, images, tensors):
    """Per-channel mean of each named tensor (dequantized) over images."""
    it = interp(b)
    inp = it.get_input_details()[0]["index"]
    det = {d["name"]: d for d in it.get_tensor_details()}
    sums = {t: 0.0 for t in tensors}
    for img in images:
        it.set_tensor(inp, img[None])
        it.invoke()
        for t in tensors:
            d = det[t]
            v = it.get_tensor(d["index"]).astype(np.float64)
            q = d["quantization_parameters"]
            if q["scales"].size:
                v = (v - q["zero_points"][0]) * q["scales"][0]
            sums[t] = sums[t] + v.reshape(-1, v.shape[-1]).mean(0)
    return {t: s / len(images) for t, s in sums.items()}


def candidates(model8):
    m = flatbuffer.load(model8)
    g = m.subgraphs[0]
    out = []
    for i, op in enumerate(g.operators):
        code = m.operatorCodes[op.opcodeIndex]
        name = names.get(max(code.builtinCode, code.deprecatedBuiltinCode))
        if name not in OPS or len(op.inputs) < 3 or op.inputs[2] < 0:
            continue
        t_out, t_in, t_w, t_b = (g.tensors[k] for k in (op.outputs[0], op.inputs[0], op.inputs[1], op.inputs[2]))
        if t_out.type != schema.TensorType.INT8 or t_b.type != schema.TensorType.INT32:
            continue
        fused = 0
        opts = op.builtinOptions
        if opts is not None and hasattr(opts, "fusedActivationFunction"):
            fused = opts.fusedActivationFunction
        out.append({"op": i, "type": name, "out": t_out.name.decode(), "bias_tensor": op.inputs[2], "fused": fused})
    return out


def shift_bias(model8, tensor_index, delta_float):
    m = flatbuffer.load(model8)
    g = m.subgraphs[0]
    t = g.tensors[tensor_index]
    scales = np.asarray(t.quantization.scale, np.float64)
    buf = m.buffers[t.buffer]
    b = np.frombuffer(bytes(bytearray(buf.data)), np.int32).copy()
    step = np.round(delta_float / scales).astype(np.int64)
    b = np.clip(b.astype(np.int64) + step, -2**31, 2**31 - 1).astype(np.int32)
    fresh = schema.BufferT()  # biases may share one buffer (the converter dedups equal constants)
    fresh.data = np.frombuffer(b.tobytes(), np.uint8)
    m.buffers.append(fresh)
    t.buffer = len(m.buffers) - 1
    return flatbuffer.dump(m)


def correct(model8, model32, images, skip_fused=False, say=print):
    cands = candidates(model8)
    it32 = interp(model32)
    names32 = {d["name"] for d in it32.get_tensor_details()}
    cands = [c for c in cands if c["out"] in names32 and (not skip_fused or c["fused"] == 0)]
    say(f"{len(cands)} ops to correct")
    ref = run_means(model32, images, [c["out"] for c in cands])
    cur = model8
    for k, c in enumerate(cands):
        q = run_means(cur, images, [c["out"]])[c["out"]]
        delta = ref[c["out"]] - q
        cur = shift_bias(cur, c["bias_tensor"], delta)
        if k % 10 == 0:
            say(f"{k} {c['type']} {c['out'][:60]} fused={c['fused']} |mean shift| {np.abs(delta).mean():.4f}")
    return cur


if __name__ == "__main__":
    src8, src32, out = sys.argv[1:4]
    skip = "--skip-fused" in sys.argv
    from convert import calibration
    n = int(next((a.split("=")[1] for a in sys.argv if a.startswith("--n=")), "200"))
    calib = calibration.load_calibration(Path("../shared/data/brain-tumor-mri/Training"), size=150, channels=3,
                                         pipeline="resize", count=n, seed=0)
    t0 = time.time()
    b = correct(Path(src8).read_bytes(), Path(src32).read_bytes(), calib.images, skip)
    Path(out).write_bytes(b)
    print(f"wrote {out} in {time.time()-t0:.0f} s")
