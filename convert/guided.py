"""Mask-guided training: the class evidence (the heatmap the device shows) is asked to lie on the lesion.

For a GAP -> Dense classifier the Grad-CAM the converter builds in-graph equals the class activation map
CAM_c = sum_k w_kc A_k (up to a positive factor), so the map can be trained directly: besides the
cross-entropy, every sample that has a lesion mask pays the share of its true class's positive CAM energy
that falls outside the mask (1 - energy-based pointing game, Wang et al. 2020). A network trained this way
cannot win by looking at where a slice came from or at a fixed place in the head, which is both what the
heatmap issue asks for and a lever on generalisation (Ross et al. 2017, "right for the right reasons").
Healthy slices and tumours without a mask pay only the cross-entropy.

Everything is Keras layers and ``keras.ops``, so one code path trains on TensorFlow (the CPU box) and on
JAX (a GPU machine without TensorFlow). Augmentation runs inside the wrapper model, where image and mask
can be moved by the same random geometry; the outside-mask energy is computed in the graph too and
leaves as an output whose loss is its own value.
"""
from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from convert import augment
from convert.normalisation import apply as normalise, parse as parse_norm

PROBABILITIES = "probabilities"
OUTSIDE = "outside"
ANCHOR = "anchor"
#: Label smoothing of the cross-entropy, as in the plain recipe.
LABEL_SMOOTHING = 0.05


def outside_energy(cam: Any, mask: Any, eps: float = 1e-6) -> Any:
    """Per sample, the share of ReLU(cam) outside ``mask`` (both [B, h, w]; mask in 0..1). 0 = all inside."""
    pos = ops.relu(cam)
    total = ops.sum(pos, axis=(1, 2))
    inside = ops.sum(pos * mask, axis=(1, 2))
    return 1.0 - inside / (total + eps)


class OutsideEnergy(keras.layers.Layer):
    """[features, mask grid, selector] -> the selected class's outside-mask CAM energy per sample [B].

    ``selector`` is the one-hot true class times 1 where the sample has a mask (all zero otherwise, which
    makes the term 0); the class maps use the classifier's own Dense kernel, so the loss trains the very
    weights the in-graph Grad-CAM will use.
    """

    def __init__(self, dense: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dense = dense

    def call(self, feats: Any, grid: Any, selector: Any) -> Any:
        cam = ops.einsum("bhwk,kc,bc->bhw", feats, self.dense.kernel, selector)
        return outside_energy(cam, grid) * ops.max(selector, axis=1)


class AnchorDivergence(keras.layers.Layer):
    """[teacher probabilities, student probabilities, is-main flag] -> KL(teacher || student) per sample [B],
    0 where the flag is 0."""

    def call(self, teacher: Any, student: Any, is_main: Any) -> Any:
        t = ops.clip(teacher, 1e-7, 1.0)
        return ops.sum(t * (ops.log(t) - ops.log(ops.clip(student, 1e-7, 1.0))), axis=-1) * is_main


def feature_model(net: Any, feature_layer: str) -> Any:
    """``net``'s input -> [the feature map at ``feature_layer``, ``net``'s output], sharing its weights.

    A layer of the network's own graph (custom-cnn's ``b3_out``) is read off directly; a nested base model
    (Xception, whose inner graph Keras does not connect to the outer input) is called whole on a new input
    and the head layers after it (pooling, dropout, dense) are applied to its output in order.
    """
    layer = net.get_layer(feature_layer)
    if not isinstance(layer, keras.Model):
        return keras.Model(net.input, [layer.output, net.output], name="features")
    inp = keras.Input(net.input_shape[1:], name="features_in")
    fmap = x = layer(inp)
    for head in net.layers[net.layers.index(layer) + 1:]:
        x = head(x)
    return keras.Model(inp, [fmap, x], name="features")


def wrapper(net: Any, feature_layer: str, seed: int, contrast_curves: float = 0.0, teacher: Any = None) -> Any:
    """``net`` behind augmentation, with outputs ``probabilities`` and ``outside`` (never saved; shares weights).

    Inputs: ``pixels`` [B, S, S, 1] (0..255), ``mask`` [B, S, S, 1] (0..1), ``selector`` [B, classes].
    With a frozen ``teacher`` (the model the fine-tune started from) also ``is_main`` [B] and the output
    ``anchor``: how far the network's answer on the same augmented image has moved from the teacher's, on
    the class folders' own images only (Learning without Forgetting, Li and Hoiem 2017). Why: the fine-tune
    learns other sources and pasted tumours at the price of in-distribution accuracy; this keeps the
    start's answers where the start was right without holding back what is new (other sources, pastes).
    Geometry moves pixels and mask together (stacked as two channels); intensity and site-style changes
    touch the pixels only; the mask is then averaged onto the feature-map grid. The images are grayscale; a
    three-channel network (Xception) gets the gray image in all three, as `edge.preprocess.prepare` gives it.
    """
    size, classes = net.input_shape[1], net.output_shape[-1]
    pixels = keras.Input((size, size, 1), name="pixels")
    mask = keras.Input((size, size, 1), name="mask")
    selector = keras.Input((classes,), name="selector")
    both = augment.build(seed)(ops.concatenate([pixels, mask], axis=-1))
    image = both[..., :1]
    if contrast_curves:
        image = augment.ContrastCurves(contrast_curves, seed + 6, name="contrast_curves")(image)
    image = augment.SiteStyle(seed + 5, name="site_style")(augment.Intensity(seed + 4, name="intensity")(image))
    features = feature_model(net, feature_layer)
    model_input = normalise(image, parse_norm("tf", 1))
    if net.input_shape[-1] != 1:
        model_input = ops.repeat(model_input, net.input_shape[-1], axis=-1)
    feats, probs = features(model_input)
    stride = size // feats.shape[1]
    grid = keras.layers.AveragePooling2D(stride, name="mask_grid")(both[..., 1:])[..., 0]
    outside = OutsideEnergy(net.get_layer("predictions"), name=OUTSIDE)(feats, grid, selector)
    outputs = {PROBABILITIES: keras.layers.Identity(name=PROBABILITIES)(probs), OUTSIDE: outside}
    inputs = [pixels, mask, selector]
    if teacher is not None:
        teacher.trainable = False
        is_main = keras.Input((), name="is_main")
        inputs.append(is_main)
        outputs[ANCHOR] = AnchorDivergence(name=ANCHOR)(teacher(model_input), probs, is_main)
    return keras.Model(inputs, outputs, name="guided")


def own_value(y_true: Any, y_pred: Any) -> Any:
    """The loss of the ``outside`` output: the energy itself (its target is ignored)."""
    return y_pred


def compile_wrapper(model: Any, optimizer: Any, mask_weight: float, anchor_weight: float = 0.0) -> None:
    """Cross-entropy on the probabilities plus ``mask_weight`` x the outside-mask energy, plus ``anchor_weight``
    x the divergence from the teacher when the wrapper has one."""
    losses = {PROBABILITIES: keras.losses.CategoricalCrossentropy(label_smoothing=LABEL_SMOOTHING),
              OUTSIDE: own_value}
    weights = {PROBABILITIES: 1.0, OUTSIDE: float(mask_weight)}
    if ANCHOR in model.output_names:
        losses[ANCHOR], weights[ANCHOR] = own_value, float(anchor_weight)
    model.compile(optimizer=optimizer, loss=losses, loss_weights=weights,
                  metrics={PROBABILITIES: ["accuracy"]},
                  jit_compile=keras.backend.backend() != "tensorflow")


def as_batch(x: Any, masks: Any, y: Any, has_mask: Any, weight: Any, num_classes: int,
             is_main: Any = None) -> tuple:
    """Numpy samples -> (inputs, targets, sample weights) for :func:`wrapper` (``is_main`` for one with a teacher)."""
    onehot = np.eye(num_classes, dtype=np.float32)[y]
    inputs = {"pixels": x.astype(np.float32), "mask": (masks.astype(np.float32) / 255.0)[..., None],
              "selector": onehot * has_mask[:, None].astype(np.float32)}
    targets = {PROBABILITIES: onehot, OUTSIDE: np.zeros(y.size, np.float32)}
    if is_main is not None:
        inputs["is_main"] = is_main.astype(np.float32)
        targets[ANCHOR] = np.zeros(y.size, np.float32)
    return inputs, targets, weight.astype(np.float32)


class EpochBatches(keras.utils.PyDataset):
    """Batches of a stream of epochs (:func:`convert.training_sources.epochs`): a new composition each epoch.

    A ``PyDataset`` rather than tf.data so the same feeding works on every Keras backend.
    """

    def __init__(self, stream: Any, batch_size: int, num_classes: int, anchored: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stream, self.batch_size, self.num_classes, self.anchored = stream, batch_size, num_classes, anchored
        self.epoch = next(stream)

    def __len__(self) -> int:
        return -(-self.epoch.y.size // self.batch_size)

    def __getitem__(self, i: int) -> tuple:
        e, s = self.epoch, slice(i * self.batch_size, (i + 1) * self.batch_size)
        return as_batch(e.x[s], e.masks[s], e.y[s], e.has_mask[s], e.weight[s], self.num_classes,
                        e.is_main[s] if self.anchored else None)

    def on_epoch_end(self) -> None:
        self.epoch = next(self.stream)
