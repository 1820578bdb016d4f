"""A third-party-style model to test `edge-convert` on: an ImageNet base, frozen, with a small dense head on top.

Why: this is how most published Keras classifiers are made (a `keras.applications` base with its ImageNet
weights, frozen, GAP, Dense(128, relu), Dropout, Dense(N) logits, inputs scaled to [-1, 1]), and such models
lose more top-1 agreement in int8 than our fully fine-tuned ones (issue 16): the conversion has to keep
their answers without the user knowing which layers to protect. The model here is that construction, at
150 px, trained on the training split of the brain-MRI data set. It carries no edge-mri metadata, so it is
converted exactly as a hospital's own model would be: `--preprocess xception`, labels from the calibration
folder's class names, the default `resize` pipeline (the images it was trained on went through that same
device pipeline, `edge.preprocess.prepare`).

The base is frozen, so its pooled features are computed once and cached (``--cache-dir``): the head then
trains in seconds. ``--base mobilenetv2-random`` builds the same construction on a MobileNetV2 with random
weights (no weights file): a second architecture for the builtin-op checks, not a useful classifier.

    python -m convert.third_party_example train ../shared/data/brain-tumor-mri \\
        --weights ../shared/weights/xception_imagenet_notop.weights.h5 --out runs/xception-frozen.keras --cache-dir cache
    python -m convert.third_party_example parity runs/xception-frozen.keras artifacts/xception-frozen.tflite \\
        ../shared/data/brain-tumor-mri/Testing --out reports/xception-frozen-test

``parity`` is `edge-convert --report` (`convert.parity`) over a whole folder instead of 200 images:
top-1 agreement and heatmap Pearson r of each .tflite file against the Keras model and its GradientTape
Grad-CAM.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import click

from edge.cli_common import NonEmptyPath, OneLineCommand, error

PROG = "third_party_example"
#: Input size and pipeline of the example model (the shipped xception's size).
SIZE = 150
PIPELINE = "resize"
BASES = ("xception", "mobilenetv2-random")
#: Images per batch through the frozen base while caching its features.
FEATURE_BATCH = 32


def build_base(base: str, size: int, weights: Path | None):
    """The frozen `keras.applications` base: ImageNet Xception from ``weights``, or a random MobileNetV2."""
    import keras

    if base == "xception":
        if weights is None:
            raise click.UsageError("--base xception needs --weights (the no-top ImageNet weights file)")
        model = keras.applications.Xception(include_top=False, weights=str(weights), input_shape=(size, size, 3))
    else:
        model = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(size, size, 3))
    model.trainable = False
    return model


def build_head(features: int, num_classes: int, seed: int):
    """GAP features in, logits out: Dense(128, relu), Dropout(0.3), Dense(num_classes) with no softmax."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((features,), name="pooled")
    x = keras.layers.Dense(128, activation="relu", name="head_dense")(inputs)
    x = keras.layers.Dropout(0.3, name="head_dropout")(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes, name="logits")(x), name="head")


def assemble(base, head, size: int):
    """The whole classifier a user would publish: inputs in [-1, 1] -> frozen base -> GAP -> the head's layers."""
    import keras

    inputs = keras.Input((size, size, 3), name="image")
    x = keras.layers.GlobalAveragePooling2D(name="gap")(base(inputs, training=False))
    for layer in head.layers[1:]:
        x = layer(x)
    return keras.Model(inputs, x, name=f"{base.name}_frozen_head")


def _feature_cache(cache_dir: Path, base: str, weights: Path | None, paths: list[str], size: int) -> Path:
    digest = hashlib.sha256(json.dumps([base, size, PIPELINE, "[-1,1]"]).encode())
    if weights is not None:
        stat = weights.stat()
        digest.update(f"{weights.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    for p in paths:
        digest.update(p.encode())
    return cache_dir / f"features-{base}-{digest.hexdigest()[:16]}.npy"


def pooled_features(base_model, images, cache: Path | None):
    """GAP features of the frozen base for uint8 images, cached as .npy (the base never changes)."""
    import numpy as np

    from convert import normalisation

    if cache is not None and cache.exists():
        return np.load(cache)
    norm = normalisation.parse("xception", 3)
    out = []
    with click.progressbar(range(0, len(images), FEATURE_BATCH), label="frozen-base features", file=sys.stderr) as bar:
        for start in bar:
            x = normalisation.apply(images[start:start + FEATURE_BATCH].astype(np.float32), norm)
            out.append(np.asarray(base_model(x, training=False)).mean(axis=(1, 2)))
    features = np.concatenate(out).astype(np.float32)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, features)
    return features


@click.group(PROG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main() -> None:
    """The frozen-base third-party-style example model of issue 16: train it, and measure its conversions."""


@main.command("train", cls=OneLineCommand)
@click.argument("data", type=NonEmptyPath(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=NonEmptyPath(dir_okay=False, path_type=Path), help="The .keras to write.")
@click.option("--base", type=click.Choice(BASES), default="xception", show_default=True)
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="No-top ImageNet weights of the base (xception).")
@click.option("--input-size", type=click.IntRange(32, 512), default=SIZE, show_default=True)
@click.option("--epochs", type=click.IntRange(1, 500), default=30, show_default=True, help="Head training epochs.")
@click.option("--limit", type=click.IntRange(1), help="At most N training images per class (quick runs).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Cache prepared images and frozen-base features here.")
def train(data: Path, out: Path, base: str, weights: Path | None, input_size: int, epochs: int,
          limit: int | None, seed: int, cache_dir: Path | None) -> None:
    """Train the head on DATA/Training (10% stratified validation), report DATA/Testing accuracy, save OUT."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np

    from convert import dataset

    base_model = build_base(base, input_size, weights)
    splits = {}
    for name in ("Training", "Testing"):
        files, ys, labels = dataset.list_images(data / name)
        if limit is not None:
            keep = [i for c in range(len(labels)) for i in [j for j, y in enumerate(ys) if y == c][:limit]]
            files, ys = [files[i] for i in keep], [ys[i] for i in keep]
        folder = dataset.load_files(files, ys, labels, input_size, 3, PIPELINE, data / name, cache_dir)
        cache = _feature_cache(cache_dir, base, weights, folder.paths, input_size) if cache_dir else None
        splits[name] = (pooled_features(base_model, folder.x, cache), folder.y, labels)
    x, y, labels = splits["Training"]
    train_idx, val_idx = dataset.stratified_split(y, 0.1, seed)
    head = build_head(x.shape[1], len(labels), seed)
    head.compile(optimizer=keras.optimizers.Adam(1e-3),
                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    history = head.fit(x[train_idx], y[train_idx], validation_data=(x[val_idx], y[val_idx]), epochs=epochs,
                       batch_size=64, verbose=0)
    xt, yt, _ = splits["Testing"]
    test_accuracy = float(np.mean(np.argmax(head.predict(xt, verbose=0), axis=1) == yt))
    model = assemble(base_model, head, input_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(str(out))
    summary = {"out": str(out), "base": base, "labels": labels, "input_size": input_size, "epochs": epochs,
               "train_images": int(train_idx.size), "val_accuracy": round(history.history["val_accuracy"][-1], 4),
               "test_accuracy": round(test_accuracy, 4), "test_images": int(yt.size)}
    click.echo(json.dumps(summary, indent=1))


@main.command("parity", cls=OneLineCommand)
@click.argument("model", type=NonEmptyPath(exists=True, path_type=Path))
@click.argument("tflite", nargs=-1, required=True, type=NonEmptyPath(exists=True, dir_okay=False, path_type=Path))
@click.argument("images", type=NonEmptyPath(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for parity.json, parity.txt and heatmaps.png.")
@click.option("--limit", type=click.IntRange(1), help="At most N images in all (default: every image).")
def parity(model: Path, tflite: tuple[Path, ...], images: Path, out: Path, limit: int | None) -> None:
    """Top-1 agreement and heatmap fidelity of each TFLITE file against MODEL on every image of IMAGES."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from convert import calibration, keras_io, normalisation, parity as parity_report
    from edge.model_file import read_spec

    keras_model, _ = keras_io.load_model(model)
    spec = read_spec(tflite[0].read_bytes())
    meta = spec.metadata
    size, channels = meta["input"]["size"], meta["input"]["channels"]
    count = limit or sum(len(v) for v in calibration.list_images(images).values())
    with click.progressbar(length=count, label="test images", file=sys.stderr) as bar:
        heldout = calibration.load_images(images, size=size, channels=channels, pipeline=meta["input"]["pipeline"],
                                          count=count, seed=1, progress=bar.update)
    norm = normalisation.parse(meta["converter"]["settings"]["preprocess"], channels)
    variants = {path.stem: path.read_bytes() for path in tflite}
    report, files = parity_report.run_report(keras_model, variants, heldout, labels=meta["labels"], norm=norm,
                                             target_layer=meta["gradcam"]["target_layer"], report_dir=out,
                                             heldout_source=str(images), name=model.stem, progress=True)
    for name, v in report["variants"].items():
        r = v["heatmap_pearson"]
        click.echo(f"{name}: top-1 agreement {v['top1_agreement']:.2%} on {v['images']} images, heatmap r median "
                   f"{r['median']} (min {r['min']}), {v['size_bytes']:,} bytes")
    click.echo(f"report: {', '.join(map(str, files))}")


if __name__ == "__main__":
    try:
        main()
    except FileNotFoundError as exc:
        error(PROG, exc)
        sys.exit(3)
