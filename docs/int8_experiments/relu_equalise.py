"""Experiment (issue 16): equalise the activation ranges of every conv -> BN -> ReLU -> depthwise pair.

ReLU commutes with a positive per-channel scale, and a depthwise kernel is per channel: multiplying the BN's
gamma and beta of channel c by a_c and the next depthwise kernel's channel c by 1/a_c leaves the float
function unchanged, while the int8 tensor between them (one scale for all channels) sees every channel
at a range (R / r_c)^alpha closer to the largest one's R.
"""
import sys
from pathlib import Path
import numpy as np
import keras
from convert import calibration, normalisation
from convert.keras_io import load_model

src, out, alpha = sys.argv[1], sys.argv[2], float(sys.argv[3])
cap = float(sys.argv[4]) if len(sys.argv) > 4 else np.inf
model, _ = load_model(src)
base = next(l for l in model.layers if isinstance(l, keras.Model))


def producer(layer):
    parents = layer._inbound_nodes[0].parent_nodes
    return parents[0].operation if len(parents) == 1 else None


pairs = []
for s in base.layers:
    if not isinstance(s, keras.layers.SeparableConv2D):
        continue
    a = producer(s)
    if not (isinstance(a, keras.layers.Activation) and a.get_config()["activation"] == "relu") and not isinstance(a, keras.layers.ReLU):
        continue
    b = producer(a)
    if not isinstance(b, keras.layers.BatchNormalization) or len(a._outbound_nodes) != 1 or len(b._outbound_nodes) != 1:
        continue
    pairs.append((b, a, s))
print(len(pairs), "pairs:", ", ".join(s.name for _, _, s in pairs))
calib = calibration.load_calibration(Path("../shared/data/brain-tumor-mri/Training"), size=150, channels=3,
                                     pipeline="resize", count=200, seed=0)
x = normalisation.apply(calib.images.astype(np.float32), normalisation.parse("xception", 3))
probe = keras.Model(base.inputs, [a.output for _, a, _ in pairs])
ranges = [np.zeros(a.output.shape[-1]) for _, a, _ in pairs]
for i in range(0, len(x), 16):
    for k, v in enumerate(probe(x[i:i + 16], training=False)):
        ranges[k] = np.maximum(ranges[k], np.asarray(v).max(axis=(0, 1, 2)))
ref = np.asarray(model(x[:32], training=False))
spreads = []
for (b, a, s), r in zip(pairs, ranges):
    live = r > 1e-6
    R = r.max()
    f = np.ones_like(r)
    f[live] = np.minimum((R / r[live]) ** alpha, cap)
    spreads.append((np.median(R / r[live]), np.median(R / (r[live] * f[live]))))
    b.gamma.assign(b.gamma.numpy() * f.astype(np.float32))
    b.beta.assign(b.beta.numpy() * f.astype(np.float32))
    k = s.depthwise_kernel.numpy()
    s.depthwise_kernel.assign((k / f.reshape(1, 1, -1, 1)).astype(np.float32))
print("median max/channel range before -> after (median over pairs): %.1f -> %.1f" % (
    np.median([p[0] for p in spreads]), np.median([p[1] for p in spreads])))
new = np.asarray(model(x[:32], training=False))
print("float change: max |logit diff| %.2e, top-1 same %d/32" % (np.abs(new - ref).max(), (new.argmax(1) == ref.argmax(1)).sum()))
model.save(out)
print("wrote", out)
