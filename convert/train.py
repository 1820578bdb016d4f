"""Training recipes for the shipped models, written for a 2-core CPU box (a GPU only makes them faster).

The custom CNN trains end to end on in-memory prepared images. Xception trains in up to three phases:
(1) the ImageNet base frozen, only the head learns; (2) block 14 unfrozen at a low learning rate -- both,
under TensorFlow, on cached activations of the frozen layers below block 14, computed once (with TFLite's
XNNPACK kernels) for a few augmented copies of every training image, which turns hours of CPU into
minutes; (3) optionally the whole base unfrozen on live-augmented images, the step that takes a
transferred network from ~86% to the high nineties on this data, and the expensive one (about 19 min per
epoch at 150 px on 2 CPU cores). Under another Keras backend (``KERAS_BACKEND=jax`` on a GPU machine,
which has no TensorFlow) there is no TFLite to cache with, and no need: every phase trains on live
images, augmented inside the model so the accelerator does that work too.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from convert import augment, training_sources
from convert.dataset import FolderData, class_weights, load_folder, stratified_split
from convert.keras_io import save_model
from convert.normalisation import apply as normalise, parse as parse_norm

PIPELINE = "mri-crop-v1"
PREPROCESS = "tf"


@dataclass
class TrainConfig:
    arch: str
    data: Path
    out: Path
    input_size: int
    epochs: int
    batch_size: int = 32
    lr: float = 1e-3
    val_fraction: float = 0.1
    patience: int = 6
    seed: int = 0
    weights: str | None = None
    fine_tune_epochs: int = 4
    full_epochs: int = 0
    feature_copies: int = 2
    limit: int | None = None
    cache_dir: Path | None = None
    init: Path | None = None
    stride: int = 16
    last_width: int | None = None
    masks: Path | None = None
    extra_healthy: tuple[Path, ...] = ()
    healthy_per_epoch: int | None = None
    paste_fraction: float = 0.0
    mask_weight: float = 0.0
    contrast_curves: float = 0.0
    anchor_weight: float = 0.0
    paste_into_main: bool = True
    freeze_batchnorm: bool = False

    @property
    def guided(self) -> bool:
        """True for the generalising custom-CNN recipe (masks, other sources, pastes, mask-guided loss)."""
        return self.masks is not None or bool(self.extra_healthy)


def _channels(arch: str) -> int:
    return 1 if arch == "custom-cnn" else 3


def _limit(d: FolderData, limit: int | None, seed: int) -> FolderData:
    """A class-balanced subset of at most ``limit`` images (tests and smoke runs)."""
    if not limit or limit >= d.y.size:
        return d
    rng = np.random.default_rng(seed)
    per = max(1, limit // len(d.labels))
    idx = np.concatenate([rng.permutation(np.flatnonzero(d.y == c))[:per] for c in range(len(d.labels))])
    return d.take(np.sort(idx))


def _augmented_batches(x: np.ndarray, y: np.ndarray, batch: int, seed: int, num_classes: int):
    """tf.data pipeline: shuffle, augment geometry and intensity, normalise, one-hot labels."""
    import tensorflow as tf

    geo = augment.build(seed)
    norm = parse_norm(PREPROCESS, x.shape[-1])

    def aug(xb, yb):
        xb = tf.cast(xb, tf.float32)
        xb = augment.intensity(geo(xb, training=True), tf.random.uniform, tf.random.normal)
        return normalise(xb, norm), tf.one_hot(yb, num_classes)

    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(x.shape[0], seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch).map(aug, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)


def _plain_batches(x: np.ndarray, y: np.ndarray, batch: int, num_classes: int):
    import tensorflow as tf

    norm = parse_norm(PREPROCESS, x.shape[-1])
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)
    return ds.map(lambda a, b: (normalise(tf.cast(a, tf.float32), norm), tf.one_hot(b, num_classes))).prefetch(2)


def predict(model, x: np.ndarray, preprocess: str = PREPROCESS, batch_size: int = 64) -> np.ndarray:
    """Class probabilities of a Keras model on prepared uint8 inputs [N, S, S, C], normalised as it was
    trained (``preprocess``); gray inputs (the generalising recipe's) are repeated into a three-channel
    network's channels, as `edge.preprocess.prepare` does for the device. Every script that scores a
    run's held-out images goes through here."""
    xf = normalise(x.astype(np.float32), parse_norm(preprocess, x.shape[-1]))
    if xf.shape[-1] != model.input_shape[-1]:
        xf = np.repeat(xf, model.input_shape[-1], axis=-1)
    return np.asarray(model.predict(xf, batch_size=batch_size, verbose=0))


def _val_accuracy(model, val: FolderData) -> float:
    """Accuracy on the clean (un-augmented) validation images, the figure models are chosen by."""
    return float(np.mean(np.argmax(predict(model, val.x), axis=1) == val.y))


def _one_hot(y: np.ndarray, num_classes: int) -> np.ndarray:
    return np.eye(num_classes, dtype=np.float32)[y]


class _EpochBar:
    """A click progress bar over epochs (Keras's own per-step bar is noise in a log file)."""

    def __new__(cls, total: int, label: str):
        import keras

        class Bar(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                self.bar = click.progressbar(length=total, label=label, file=sys.stderr,
                                             show_pos=True)
                self.bar.__enter__()

            def on_epoch_end(self, epoch, logs=None):
                self.bar.update(1)
                keys = ("loss", "accuracy", "probabilities_accuracy", "outside_loss", "val_loss", "val_accuracy",
                        "val_probabilities_accuracy", "val_outside_loss")
                click.echo("  " + " ".join(f"{k}={logs[k]:.4f}" for k in keys if k in (logs or {})), err=True)

            def on_train_end(self, logs=None):
                self.bar.__exit__(None, None, None)

        return Bar()


class _BestWeights:
    """Save ``inner``'s weights whenever validation loss improves.

    Keras's ModelCheckpoint saves the model being fitted; here that is often a wrapper (augmentation
    layers around the real model), and the checkpoint must load back into the real model (``--init``).
    """

    def __new__(cls, inner, path: Path):
        import keras

        class Saver(keras.callbacks.Callback):
            best = float("inf")

            def on_epoch_end(self, epoch, logs=None):
                loss = (logs or {}).get("val_loss", float("inf"))
                if loss < self.best:
                    self.best = loss
                    _ = self.model  # under JAX this property syncs the trained state into the variables
                    inner.save_weights(str(path))

        return Saver()


def _callbacks(cfg: TrainConfig, run_dir: Path, label: str, epochs: int, prefix: str, inner):
    import keras

    return [
        keras.callbacks.EarlyStopping("val_loss", patience=cfg.patience, restore_best_weights=True),
        _BestWeights(inner, run_dir / f"{prefix}best.weights.h5"),
        keras.callbacks.CSVLogger(str(run_dir / f"{prefix}log.csv")),
        _EpochBar(epochs, label),
    ]


def _merge(histories: list[dict]) -> dict:
    out: dict[str, list] = {}
    for h in histories:
        for k, v in h.items():
            out.setdefault(k, []).extend(float(a) for a in v)
    return out


def _compile(model, lr: float, steps: int, epochs: int) -> None:
    import keras

    sched = keras.optimizers.schedules.CosineDecay(lr, decay_steps=max(1, steps * epochs), alpha=0.05)
    model.compile(optimizer=keras.optimizers.AdamW(sched, weight_decay=1e-4),
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=0.05), metrics=["accuracy"],
                  # TensorFlow: XLA on CPU trained 2x slower than the oneDNN kernels (measured). JAX has
                  # no other way to run fast than compiled.
                  jit_compile=keras.backend.backend() != "tensorflow")


def train_custom(cfg: TrainConfig, train: FolderData, val: FolderData, run_dir: Path):
    """End-to-end training of the custom CNN with on-the-fly augmentation."""
    model = _custom_start(cfg, train.labels)
    steps = int(np.ceil(train.y.size / cfg.batch_size))
    _compile(model, cfg.lr, steps, cfg.epochs)
    hist = model.fit(
        _augmented_batches(train.x, train.y, cfg.batch_size, cfg.seed, len(train.labels)),
        validation_data=_plain_batches(val.x, val.y, 64, len(train.labels)),
        epochs=cfg.epochs, class_weight=class_weights(train.y, len(train.labels)), verbose=0,
        callbacks=_callbacks(cfg, run_dir, "custom-cnn epochs", cfg.epochs, "", model),
    )
    return model, hist.history, _val_accuracy(model, val)


def _guided_start(cfg: TrainConfig, labels: list[str]):
    """(network, the layer its heatmap is taken at) for the generalising recipe.

    custom-cnn: as `_custom_start` builds it, the map at ``b3_out``. xception: the edge-train model given as
    ``--init`` (the recipe is a fine-tune of a trained classifier, not a start from ImageNet), every batch
    norm frozen as in its phase 3, the map at the nested base's output (what `edge-convert` explains).
    """
    if cfg.arch == "custom-cnn":
        return _custom_start(cfg, labels), "b3_out"
    from convert.architectures import xception

    model, base = xception(cfg.input_size, len(labels), None)
    _load_start(model, cfg, labels)
    freeze_batchnorm(model)
    return model, base.name


def train_guided(cfg: TrainConfig, pools, val_pools, run_dir: Path):
    """The generalising recipe: class folders + other healthy sources + fresh tumour pastes every epoch,
    site-style augmentation, and the mask-guided CAM loss (:mod:`convert.guided`).

    Validation is the held-out part of every pool plus pastes made only from held-out images (fixed seed),
    so the checkpoint chosen is the one that also finds pasted tumours in other sources' brains.
    """
    import keras

    from convert import guided

    labels = pools.main.labels
    num = len(labels)
    net, feature_layer = _guided_start(cfg, labels)
    n_tumour = int(np.sum(pools.main.y != labels.index(training_sources.HEALTHY)))
    paste_n = int(round(cfg.paste_fraction * n_tumour)) if pools.main.masks is not None else 0
    n_val_tumour = int(np.sum(val_pools.main.y != labels.index(training_sources.HEALTHY)))
    val = training_sources.compose(val_pools, np.random.default_rng(cfg.seed + 1000), None,
                                   int(round(cfg.paste_fraction * n_val_tumour)) if paste_n else 0)
    teacher = None
    if cfg.anchor_weight:
        teacher = keras.models.clone_model(net)
        teacher.set_weights(net.get_weights())
    anchored = teacher is not None
    model = guided.wrapper(net, feature_layer, cfg.seed, cfg.contrast_curves, teacher)
    batches = guided.EpochBatches(training_sources.epochs(pools, cfg.seed, cfg.healthy_per_epoch, paste_n),
                                  cfg.batch_size, num, anchored)
    sched = keras.optimizers.schedules.CosineDecay(cfg.lr, decay_steps=max(1, len(batches) * cfg.epochs),
                                                   alpha=0.05)
    guided.compile_wrapper(model, keras.optimizers.AdamW(sched, weight_decay=1e-4), cfg.mask_weight,
                           cfg.anchor_weight)
    hist = model.fit(batches, validation_data=guided.as_batch(val.x, val.masks, val.y, val.has_mask, val.weight, num,
                                                              val.is_main if anchored else None),
                     epochs=cfg.epochs, verbose=0,
                     callbacks=_callbacks(cfg, run_dir, f"{cfg.arch} epochs (guided)", cfg.epochs, "", net))
    healthy_n = 0 if pools.healthy is None else (cfg.healthy_per_epoch or len(pools.healthy.y))
    clean = FolderData(val.x, val.y, labels, [], [])
    last = guided.feature_model(net, feature_layer).outputs[0].shape
    recipe = {"stride": cfg.input_size // int(last[1]), "last_width": int(last[-1]), "grid": int(last[1]),
              "pastes_per_epoch": paste_n, "healthy_per_epoch": healthy_n, "val_images": int(val.y.size),
              "val_pastes": int(val.has_mask.sum() - val_pools.main.has_mask.sum()),
              "contrast_curves": cfg.contrast_curves, "anchor_weight": cfg.anchor_weight,
              "paste_into_main": cfg.paste_into_main}
    return net, hist.history, _val_accuracy(net, clean), recipe


#: Xception is cut where block 14 starts: everything below is frozen (features cached), block 14 and the
#: head are what phase 2 fine-tunes.
XCEPTION_CUT = "block14_sepconv1"


def _tflite_runner(submodel, channels: int):
    """Compile a frozen Keras sub-model (+ folded normalisation) to fp32 TFLite and return a batch function.

    TensorFlow's CPU depthwise-convolution kernels ran the frozen Xception at ~1 image/s on our 2-core
    box; the same graph under TFLite's XNNPACK delegate is an order of magnitude faster, and it is the
    runtime the model is built for anyway.
    """
    import tempfile

    import tensorflow as tf

    from convert.converter import export_saved_model, to_float32
    from edge.backend import load_interpreter

    size = submodel.input_shape[1]
    norm = parse_norm(PREPROCESS, channels)

    class Lower(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, size, size, channels], tf.float32)])
        def serve(self, x):
            return submodel(normalise(x, norm), training=False)

    # Through Keras's ExportArchive: a concrete function of a Keras 3 model converted directly leaves the
    # variables unfrozen, and the interpreter then returns NaN features.
    with tempfile.TemporaryDirectory() as tmp:
        tflite = to_float32(export_saved_model(Lower(), submodel, Path(tmp) / "lower"))
    interp = load_interpreter(tflite, threads=2)[0]
    inp, out = interp.get_input_details()[0]["index"], interp.get_output_details()[0]["index"]

    def run_batch(xb: np.ndarray) -> np.ndarray:
        feats = []
        for img in xb:
            interp.set_tensor(inp, img[None].astype(np.float32))
            interp.invoke()
            feats.append(interp.get_tensor(out)[0].astype(np.float16))
        batch = np.stack(feats)
        if not np.isfinite(batch).all():  # fail in minutes, not after hours of training on NaN
            raise click.ClickException("frozen-base features are not finite; the base model did not convert")
        return batch

    return run_batch


def _cache_features(run_batch, x: np.ndarray, copies: int, augmented: bool, seed: int, label: str) -> np.ndarray:
    """Frozen-base activations for ``copies`` augmented passes over ``x`` (float16, [copies, N, ...])."""
    import tensorflow as tf

    geo = augment.build(seed)
    out = []
    total = copies * int(np.ceil(x.shape[0] / 32))
    with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
        for c in range(copies):
            tf.random.set_seed(seed + c)
            feats = []
            for i in range(0, x.shape[0], 32):
                xb = tf.cast(x[i:i + 32], tf.float32)
                if augmented:
                    xb = augment.intensity(geo(xb, training=True), tf.random.uniform, tf.random.normal)
                feats.append(run_batch(xb.numpy()))
                bar.update(1)
            out.append(np.concatenate(feats))
    return np.stack(out)


def train_xception(cfg: TrainConfig, train: FolderData, val: FolderData, run_dir: Path):
    """Transfer learning in up to three phases; returns model, history and validation accuracy.

    Phase 1 trains only the head with the whole base frozen; phase 2 unfreezes block 14 (BatchNorm
    frozen) at lr/20; phase 3 (``full_epochs``) the whole base at lr/10. ``--init`` resumes phase 3.
    """
    import keras

    from convert.architectures import xception

    model, base = xception(cfg.input_size, len(train.labels), cfg.weights)
    histories = []
    if cfg.init is not None:
        _load_start(model, cfg, train.labels)
    elif keras.backend.backend() == "tensorflow":
        histories.extend(_cached_phases(cfg, model, base, train, val, run_dir))
    else:
        histories.extend(_live_phases(cfg, model, base, train, val, run_dir))
    if cfg.full_epochs > 0:
        histories.append(_fine_tune_whole(cfg, model, base, train, val, run_dir))
    return model, _merge(histories), _val_accuracy(model, val)


def _cached_phases(cfg: TrainConfig, model, base, train: FolderData, val: FolderData, run_dir: Path) -> list[dict]:
    """Phases 1-2 on cached activations of the frozen layers below block 14 (the 2-core CPU economy).

    Augmentation is limited to ``feature_copies`` augmented passes whose activations are cached.
    The top shares its layers with ``model``, so training it trains the model.
    """
    import keras
    import tensorflow as tf

    cut = base.get_layer(XCEPTION_CUT).input
    run_batch = _tflite_runner(keras.Model(base.input, cut, name="xception_lower"), 3)
    upper_base = keras.Model(cut, base.output, name="xception_upper")
    top_in = keras.Input(cut.shape[1:], name="block13_features")
    y = upper_base(top_in, training=False)
    for name in ("gap", "dropout", "predictions"):
        y = model.get_layer(name)(y)
    top = keras.Model(top_in, y, name="xception_top")

    f_train = _cache_features(run_batch, train.x, cfg.feature_copies, True, cfg.seed, "caching train features")
    f_val = _cache_features(run_batch, val.x, 1, False, cfg.seed, "caching val features")[0]
    ftr = f_train.reshape((-1,) + f_train.shape[2:])
    ytr = np.tile(train.y, cfg.feature_copies)
    num = len(train.labels)

    def ds(f, yv, shuffle):
        d = tf.data.Dataset.from_tensor_slices((f, yv))
        if shuffle:
            d = d.shuffle(f.shape[0], seed=cfg.seed)
        return d.batch(cfg.batch_size).map(lambda a, b: (tf.cast(a, tf.float32), tf.one_hot(b, num))).prefetch(2)

    cw = class_weights(train.y, num)
    histories = []
    for layer in upper_base.layers:
        layer.trainable = False
    steps = int(np.ceil(ftr.shape[0] / cfg.batch_size))
    _compile(top, cfg.lr, steps, cfg.epochs)
    h1 = top.fit(ds(ftr, ytr, True), validation_data=ds(f_val, val.y, False), epochs=cfg.epochs,
                 class_weight=cw, verbose=0,
                 callbacks=_callbacks(cfg, run_dir, "xception phase 1 (frozen base)", cfg.epochs, "phase1_", top))
    histories.append(h1.history)
    if cfg.fine_tune_epochs > 0:
        _unfreeze(upper_base)
        _compile(top, cfg.lr / 20, steps, cfg.fine_tune_epochs)
        h2 = top.fit(ds(ftr, ytr, True), validation_data=ds(f_val, val.y, False), epochs=cfg.fine_tune_epochs,
                     class_weight=cw, verbose=0,
                     callbacks=_callbacks(cfg, run_dir, "xception phase 2 (block 14)", cfg.fine_tune_epochs,
                                          "phase2_", top))
        histories.append(h2.history)
    return histories


def _augmenting(model, seed: int):
    """``model`` behind augmentation and normalisation layers: what phases on live images fit.

    The random layers act only in training, so validation through the wrapper sees clean images; the
    wrapper shares ``model``'s variables and is never saved.
    """
    import keras

    inp = keras.Input(model.input_shape[1:], name="pixels")
    x = augment.Intensity(seed + 4, name="intensity")(augment.build(seed)(inp))
    return keras.Model(inp, model(normalise(x, parse_norm(PREPROCESS, model.input_shape[-1]))), name="augmenting")


def _fit_live(cfg: TrainConfig, model, train: FolderData, val: FolderData, run_dir: Path, lr: float,
              epochs: int, label: str, prefix: str) -> dict:
    """Fit ``model`` on live-augmented images for ``epochs`` at peak ``lr``; returns the history."""
    num = len(train.labels)
    wrapper = _augmenting(model, cfg.seed)
    _compile(wrapper, lr, int(np.ceil(train.y.size / cfg.batch_size)), epochs)
    hist = wrapper.fit(train.x, _one_hot(train.y, num), batch_size=cfg.batch_size, epochs=epochs, shuffle=True,
                       validation_data=(val.x, _one_hot(val.y, num)), class_weight=class_weights(train.y, num),
                       verbose=0, callbacks=_callbacks(cfg, run_dir, label, epochs, prefix, model))
    return hist.history


def _unfreeze(base, first: str | None = None) -> None:
    """Make ``base``'s layers trainable from the layer named ``first`` on (all when None), BatchNorm excepted.

    BatchNorm stays frozen (its ImageNet statistics beat what small batches would estimate). The container
    flag is set first because its setter reaches every sub-layer.
    """
    import keras

    base.trainable = True
    start = [layer.name for layer in base.layers].index(first) if first else 0
    for i, layer in enumerate(base.layers):
        layer.trainable = i >= start and not isinstance(layer, keras.layers.BatchNormalization)


def _live_phases(cfg: TrainConfig, model, base, train: FolderData, val: FolderData, run_dir: Path) -> list[dict]:
    """Phases 1-2 on live images (backends without TFLite to cache features with, e.g. JAX on a GPU)."""
    base.trainable = False
    histories = [_fit_live(cfg, model, train, val, run_dir, cfg.lr, cfg.epochs, "xception phase 1 (frozen base)",
                           "phase1_")]
    if cfg.fine_tune_epochs > 0:
        _unfreeze(base, XCEPTION_CUT)
        histories.append(_fit_live(cfg, model, train, val, run_dir, cfg.lr / 20, cfg.fine_tune_epochs,
                                   "xception phase 2 (block 14)", "phase2_"))
    return histories


def _custom_start(cfg: TrainConfig, labels: list[str]):
    """The custom CNN both custom recipes train: built to ``cfg``'s size, stride and width, started from
    ``cfg.init`` when given, batch norms frozen with ``--freeze-batchnorm``.

    Why frozen: a model recovered from its int8 file (`convert.from_tflite`) has the batch norms folded into
    the convolutions and identities in their place; training them on batch statistics would renormalise
    every layer and throw the learnt function away. A short fine-tune of a converged model under new, strong
    augmentation is also better off with the statistics it converged with.
    """
    import keras

    from convert.architectures import custom_cnn

    model = custom_cnn(cfg.input_size, 1, len(labels), stride=cfg.stride, last_width=cfg.last_width)
    if cfg.init is not None:
        _load_start(model, cfg, labels)
    if cfg.freeze_batchnorm:
        freeze_batchnorm(model)
    return model


def freeze_batchnorm(model) -> None:
    """Keep every batch norm of ``model`` in inference mode with its current statistics (see `_custom_start`)."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
        elif isinstance(layer, keras.Model):  # a nested base (Xception)
            freeze_batchnorm(layer)


def _load_start(model, cfg: TrainConfig, labels: list[str]) -> None:
    """Start from ``cfg.init``: an edge-train model of the same architecture, size and labels, or the
    ``phase3_best.weights.h5`` checkpoint of an interrupted run (a long CPU run can span sessions)."""
    from convert.keras_io import load_model

    hint = f"{cfg.init}: not an edge-train {cfg.arch} model (or its checkpoint) with input size {cfg.input_size}"
    if cfg.init.suffix == ".keras":
        start, carried = load_model(cfg.init)
        if carried is None or carried.get("input_size") != cfg.input_size or carried.get("labels") != labels:
            raise click.BadParameter(f"{hint} and labels {labels}", param_hint="--init")
        if len(start.get_weights()) != len(model.get_weights()):
            raise click.BadParameter(hint, param_hint="--init")
        model.set_weights(start.get_weights())
        return
    try:
        model.load_weights(str(cfg.init))
    except (ValueError, OSError) as exc:
        raise click.BadParameter(f"{hint} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
                                 param_hint="--init") from None


def _fine_tune_whole(cfg: TrainConfig, model, base, train: FolderData, val: FolderData, run_dir: Path) -> dict:
    """Phase 3: every base layer trainable except BatchNorm, live augmentation, lr/10, cosine decay.

    BatchNorm stays frozen (and in inference mode: the base is called with ``training=False``) because
    its ImageNet statistics are better than what small CPU batches would estimate. Starts from the head
    that phases 1-2 trained, so the first large gradients do not wreck the pretrained filters.
    """
    _unfreeze(base)
    return _fit_live(cfg, model, train, val, run_dir, cfg.lr / 10, cfg.full_epochs, "xception phase 3 (whole base)",
                     "phase3_")


def _jsonable(value):
    """Config values as JSON: paths as strings, tuples of paths as lists of strings."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def guided_pools(cfg: TrainConfig, train: FolderData, val: FolderData):
    """(training pools, validation pools): the class-folder split plus extra healthy slices split by subject."""
    healthy = training_sources.load_healthy(list(cfg.extra_healthy), train.labels, cfg.input_size, PIPELINE,
                                            cfg.cache_dir)
    if train.masks is None:  # no masks: no pastes and no mask loss, but the other sources still count
        for d in (train, val):
            d.masks = np.zeros(d.x.shape[:3], np.uint8)
            d.has_mask = np.zeros(d.y.size, bool)
    if healthy is None:
        return training_sources.Pools(train, None), training_sources.Pools(val, None)
    tr, va = training_sources.subject_split(healthy.paths, cfg.val_fraction, cfg.seed)
    return (training_sources.Pools(train, healthy.take(tr), cfg.paste_into_main),
            training_sources.Pools(val, healthy.take(va), cfg.paste_into_main))


def split_data(cfg: TrainConfig) -> tuple[Path, FolderData, FolderData, FolderData]:
    """(training folder, all its images, training part, held-out part): ``cfg.data/Training`` or ``cfg.data``,
    with masks when ``cfg.masks`` is given, split by class with ``cfg.val_fraction`` and ``cfg.seed``. One
    function, so that anything scoring a run's held-out images (`convert.validation_probes`,
    `convert.operating_point`) gets the same ones, and none of them can be pointed at validation-only data."""
    root = cfg.data / "Training" if (cfg.data / "Training").is_dir() else cfg.data
    training_sources.check_trainable(root)
    mask_root = None
    if cfg.masks is not None:
        training_sources.check_trainable(cfg.masks)
        mask_root = cfg.masks / root.name if root != cfg.data and (cfg.masks / root.name).is_dir() else cfg.masks
    # The generalising recipe composes class-folder slices, other sources' slices and pastes in gray, one
    # channel, whatever the network (a three-channel one gets them repeated, see `convert.guided.wrapper`).
    channels = 1 if cfg.guided else _channels(cfg.arch)
    data = _limit(load_folder(root, cfg.input_size, channels, PIPELINE, cache_dir=cfg.cache_dir,
                              mask_root=mask_root), cfg.limit, cfg.seed)
    tr_idx, va_idx = stratified_split(data.y, cfg.val_fraction, cfg.seed)
    return root, data, data.take(tr_idx), data.take(va_idx)


def run(cfg: TrainConfig) -> dict:
    """Train ``cfg.arch`` on ``cfg.data/Training`` (or ``cfg.data`` itself); save .keras + log + curves."""
    import keras

    keras.utils.set_random_seed(cfg.seed)
    root, data, train, val = split_data(cfg)
    run_dir = cfg.out.parent / (cfg.out.stem + "_run")
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    recipe: dict = {}
    files = {"train": train.paths, "val": val.paths}
    if cfg.guided:
        pools, val_pools = guided_pools(cfg, train, val)
        files["healthy_train"] = [] if pools.healthy is None else pools.healthy.paths
        files["healthy_val"] = [] if val_pools.healthy is None else val_pools.healthy.paths
        model, history, val_acc, recipe = train_guided(cfg, pools, val_pools, run_dir)
    elif cfg.arch == "custom-cnn":
        model, history, val_acc = train_custom(cfg, train, val, run_dir)
    elif cfg.arch == "xception":
        model, history, val_acc = train_xception(cfg, train, val, run_dir)
    else:
        raise click.BadParameter(f"unknown architecture {cfg.arch!r}")
    seconds = time.time() - t0
    carried = {
        "name": cfg.arch,
        "labels": data.labels,
        "input_size": cfg.input_size,
        "channels": _channels(cfg.arch),
        "pipeline": PIPELINE,
        "preprocess": PREPROCESS,
        "training": {
            "data": str(root), "images": int(data.y.size), "train": int(train.y.size), "val": int(val.y.size),
            "skipped": data.skipped, "epochs_run": len(history.get("loss", [])), "seconds": round(seconds, 1),
            "val_accuracy": val_acc, "params": int(model.count_params()), **({"recipe": recipe} if recipe else {}),
            "config": {k: _jsonable(v) for k, v in cfg.__dict__.items()},
        },
    }
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, cfg.out, carried)
    (run_dir / "history.json").write_text(json.dumps(history, indent=1))
    (run_dir / "files.json").write_text(json.dumps(files, indent=0))
    from convert import plots

    plots.learning_curves(history, run_dir / "learning_curves.png", f"{cfg.arch} ({cfg.input_size}px)")
    return carried
