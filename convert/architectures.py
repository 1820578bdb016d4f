"""The two networks we ship.

Both end in GlobalAveragePooling -> Dropout -> Dense(softmax) on the last feature map, the head for which
Grad-CAM is exact (the gradient of a class score is the same at every position of the feature map, so
Grad-CAM equals the class activation map) and cheap to build in-graph.
"""
from __future__ import annotations

from pathlib import Path


def custom_cnn(input_size: int, channels: int, num_classes: int, width: int = 32, stride: int = 16,
               last_width: int | None = None):
    """A ~1.2M-parameter residual CNN for edge CPUs: four 3x3-conv stages (32-64-128-256) and a GAP head.

    Plain 3x3 convolutions rather than depthwise-separable ones: at these widths the int8 network is
    already a few milliseconds on a Raspberry Pi, while depthwise back-propagation trained 2.3x slower
    per step on our 2-core CPU (measured: 1.08 vs 0.48 s per batch of 32 at 96 px), and the training
    budget decided how many epochs and augmentations the model could see. Residual 1x1 shortcuts keep
    it trainable from scratch in a few epochs.

    ``stride`` is the total stride of the last feature map, the Grad-CAM grid: 16 (a 6x6 grid at 96 px,
    the first releases) or 8 (12x12: the last stage runs unpooled). Stride 8 is what lets a heatmap cell be
    the size of a small lesion; on our 2-core CPU it trained no slower per batch (measured 1.03 vs 1.03 s),
    the early full-resolution stages dominate that cost, but int8 inference pays for the 4x larger last
    stage (invoke +65% at one x86 thread, measured with edge-bench; see the custom-cnn model card).

    ``last_width`` narrows (or widens) that last stage, 8x ``width`` by default. A stride-8 network with a
    128-channel last stage does about the stride-16 network's arithmetic (its last stage has 4x the
    positions and a quarter of the channel pairs): int8 invoke measured +6% over stride 16 at one x86
    thread, against +72% for 256 channels, in one edge-bench run of random-weight conversions.
    """
    if stride not in (8, 16):
        raise ValueError(f"stride must be 8 or 16, got {stride}")
    import keras
    from keras import layers

    inp = keras.Input((input_size, input_size, channels), name="image")
    x = layers.Conv2D(width // 2, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inp)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    widths = (width, width * 2, width * 4, last_width or width * 8)
    for i, w in enumerate(widths):
        shortcut = x
        for j in range(2):
            x = layers.Conv2D(w, 3, padding="same", use_bias=False, name=f"b{i}_conv{j}")(x)
            x = layers.BatchNormalization(name=f"b{i}_bn{j}")(x)
            if j == 0:
                x = layers.ReLU(name=f"b{i}_relu{j}")(x)
        shortcut = layers.Conv2D(w, 1, padding="same", use_bias=False, name=f"b{i}_short")(shortcut)
        shortcut = layers.BatchNormalization(name=f"b{i}_short_bn")(shortcut)
        x = layers.Add(name=f"b{i}_add")([x, shortcut])
        x = layers.ReLU(name=f"b{i}_out")(x)
        if i < (len(widths) - 1 if stride == 16 else len(widths) - 2):
            x = layers.MaxPooling2D(2, name=f"b{i}_pool")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(0.3, name="dropout")(x)
    out = layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    return keras.Model(inp, out, name="custom_cnn")


def xception(input_size: int, num_classes: int, weights: str | Path | None):
    """ImageNet Xception as a nested base with a GAP + Dropout + Dense head; returns (model, base).

    ``weights`` is ``"imagenet"`` (Keras downloads; not on our machines), a path to the no-top weights
    file, or None for random initialisation (tests).
    """
    import keras
    from keras import layers

    base = keras.applications.Xception(include_top=False, weights=str(weights) if weights else None,
                                       input_shape=(input_size, input_size, 3))
    inp = keras.Input((input_size, input_size, 3), name="image")
    x = base(inp, training=False)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(0.3, name="dropout")(x)
    out = layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    return keras.Model(inp, out, name="xception_mri"), base
