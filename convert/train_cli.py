"""`edge-train`: train one of the shipped architectures on a class-folder data set."""
from __future__ import annotations

import os
from pathlib import Path

import click

from edge.cli_common import NonEmptyPath, OneLineCommand, require_extra, version_option

PROG = "edge-train"


@click.command(PROG, cls=OneLineCommand,
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@version_option(PROG)
@click.argument("data", type=NonEmptyPath(exists=True, file_okay=False, path_type=Path))
@click.option("--arch", type=click.Choice(["custom-cnn", "xception"]), default="custom-cnn", show_default=True,
              help="custom-cnn: ~1.2M-parameter residual CNN, grayscale. xception: ImageNet "
                   "Xception, two-phase fine-tuning.")
@click.option("--out", type=NonEmptyPath(dir_okay=False, path_type=Path), required=True,
              help="Where to write the trained model (.keras). Logs, checkpoints and learning curves go to "
                   "OUT_run/ beside it.")
@click.option("--input-size", type=int, default=None, help="Square input size [default: 96 custom-cnn, 160 xception].")
@click.option("--epochs", type=int, default=30, show_default=True, help="Epochs (phase 1 for xception).")
@click.option("--fine-tune-epochs", type=int, default=4, show_default=True,
              help="xception only: epochs with the exit flow unfrozen at lr/20.")
@click.option("--full-epochs", type=int, default=0, show_default=True,
              help="xception only: then epochs with the whole base unfrozen (BatchNorm frozen) on live-augmented "
                   "images at lr/10. What reaches high accuracy; per epoch at 150 px: about 19 min on 2 CPU cores, "
                   "15 s on one H100 under KERAS_BACKEND=jax.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Peak learning rate (AdamW, cosine decay).")
@click.option("--val-fraction", type=float, default=0.1, show_default=True,
              help="Stratified share of the training images held out for early stopping.")
@click.option("--patience", type=int, default=6, show_default=True, help="Early-stopping patience (epochs).")
@click.option("--weights", default=None,
              help="xception only: 'imagenet', a path to the no-top weights .h5, or 'none'.")
@click.option("--feature-copies", type=int, default=2, show_default=True,
              help="xception on TensorFlow only: augmented copies of each training image whose frozen-base "
                   "activations are cached for phases 1-2 (other backends train those phases on live images).")
@click.option("--limit", type=int, default=None, help="Use at most N training images, class-balanced (smoke tests).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Cache prepared images here (.npz) to skip decoding on the next run.")
@click.option("--init", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Start from this edge-train model (.keras) or an earlier run's checkpoint (.weights.h5) of "
                   "the same architecture and size: a second stage when validation accuracy was still rising. "
                   "xception: skips phases 1-2 and continues phase 3 (needs --full-epochs), or, with --masks or "
                   "--extra-healthy, is the model the generalising recipe fine-tunes.")
@click.option("--stride", type=click.Choice(["8", "16"]), default="16", show_default=True,
              help="custom-cnn only: total stride of the last feature map, i.e. the heatmap grid (8: 12x12 at "
                   "96 px, fine enough to mark a lesion; 16: 6x6, the first releases).")
@click.option("--last-width", type=click.IntRange(min=8), default=None,
              help="custom-cnn only: channels of the last stage [default: 8x the first stage, 256]. With "
                   "--stride 8, 128 keeps int8 invoke near the stride-16 network's (measured +6%; 256: +72%).")
@click.option("--masks", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Lesion masks mirroring DATA (Training/<class>/ or <class>/; a .png per image where known). "
                   "Turns on tumour copy-paste and the mask-guided heatmap loss (the generalising recipe; "
                   "xception: a fine-tune of --init for --epochs, batch norms frozen).")
@click.option("--extra-healthy", type=click.Path(exists=True, file_okay=False, path_type=Path), multiple=True,
              help="Repeatable: a folder of healthy slices of another source, trained as "
                   "'notumor' (split by subject: the file name up to its first '_'). Validation-only folders "
                   "(external-dev, IXI dev) are refused.")
@click.option("--healthy-per-epoch", type=click.IntRange(min=1), default=None,
              help="Draw this many extra healthy slices afresh every epoch [default: all of them].")
@click.option("--paste-fraction", type=click.FloatRange(0, 5), default=0.0, show_default=True,
              help="With --masks: tumour copy-paste samples per epoch, as a fraction of the real tumour slices "
                   "(real lesions pasted into healthy slices of every source, new ones every epoch).")
@click.option("--mask-weight", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="With --masks: weight of the loss on the true class's CAM energy outside the lesion mask.")
@click.option("--contrast-curves", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="With --masks or --extra-healthy: share of training images whose intensities go through a "
                   "random curve that reorders tissue brightness (as between T1, T2 and FLAIR), so lesions are "
                   "found by shape and local contrast rather than by one sequence's grey levels.")
@click.option("--anchor-weight", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="With --init and the generalising recipe: weight of a loss that keeps the --init model's "
                   "answers on the class folders' own images (KL divergence from a frozen copy; other sources' "
                   "slices and pastes are free to move), so a fine-tune keeps in-distribution accuracy.")
@click.option("--paste-into-main/--paste-into-other-only", default=True, show_default=True,
              help="With --masks and --extra-healthy: paste tumours into DATA's own healthy slices too, or only "
                   "into the other sources' (DATA's healthy slices then always stay healthy).")
@click.option("--freeze-batchnorm", is_flag=True,
              help="custom-cnn only: keep the batch norms' statistics fixed (inference mode). Needed with --init "
                   "from a model recovered from its .tflite file (python -m convert.from_tflite), whose batch "
                   "norms are folded into the convolutions.")
@click.option("--seed", type=int, default=0, show_default=True)
def main(data: Path, arch: str, out: Path, input_size: int | None, epochs: int, fine_tune_epochs: int,
         full_epochs: int, batch_size: int, lr: float, val_fraction: float, patience: int, weights: str | None,
         feature_copies: int, limit: int | None, cache_dir: Path | None, init: Path | None, stride: str,
         last_width: int | None,
         masks: Path | None, extra_healthy: tuple[Path, ...], healthy_per_epoch: int | None, paste_fraction: float,
         mask_weight: float, contrast_curves: float, anchor_weight: float, paste_into_main: bool,
         freeze_batchnorm: bool, seed: int) -> None:
    """Train a classifier on DATA (a folder with class sub-folders, or with Training/<class>/).

    Every image is prepared exactly as the device will prepare it (grayscale, crop to the head, contrast
    stretch, square resize), then augmented (rotation, shift, zoom, flip, brightness, contrast, gamma,
    blur, noise). Classes are weighted by inverse frequency. The saved .keras file carries its labels and
    preprocessing, so `edge-convert OUT --calibration DIR --out model.tflite` needs no other flags.

    Keras runs on TensorFlow unless KERAS_BACKEND says otherwise. On a GPU machine with JAX (and no
    TensorFlow) set KERAS_BACKEND=jax: augmentation then runs inside the model on the GPU, and the
    xception phases train on live images instead of TFLite-cached features.

    \b
    Examples:
      edge-train ../shared/data/brain-tumor-mri --out runs/custom-cnn.keras --cache-dir cache
      edge-train ../shared/data/brain-tumor-mri --arch xception \\
          --weights ../shared/weights/xception_imagenet_notop.weights.h5 --out runs/xception.keras
      KERAS_BACKEND=jax edge-train ../shared/data/brain-tumor-mri --arch xception \\
          --weights ../shared/weights/xception_imagenet_notop.weights.h5 --out runs/xception.keras \\
          --input-size 150 --epochs 3 --fine-tune-epochs 0 --full-epochs 14 --batch-size 32
      # the generalising recipe as a fine-tune of that model:
      KERAS_BACKEND=jax edge-train ../shared/data/brain-tumor-mri --arch xception --init runs/xception.keras \\
          --out runs/xception-g.keras --input-size 150 --epochs 8 --lr 1e-4 \\
          --masks ../shared/data/brain-tumor-mri-masks --extra-healthy ../shared/data/ixi-healthy/train \\
          --healthy-per-epoch 1200 --paste-fraction 0.35 --mask-weight 0.25 --contrast-curves 0.3

    Exit codes: 0 trained and saved; 1 bad data or options; 2 usage error, or the `convert` extra (Keras
    and its backend) is not installed.
    """
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    require_extra(["keras", backend], "convert", f"edge-train (Keras on {backend})")
    from convert import train

    guided = masks is not None or bool(extra_healthy)
    if weights is not None and arch != "xception":
        raise click.UsageError("--weights applies to --arch xception only")
    if arch == "xception" and weights is None and not guided:
        raise click.UsageError("--arch xception needs --weights imagenet|PATH|none")
    if full_epochs and arch != "xception":
        raise click.UsageError("--full-epochs applies to --arch xception only")
    if init is not None and arch == "xception" and not full_epochs and not guided:
        raise click.UsageError("--init with --arch xception continues phase 3: give --full-epochs")
    if arch != "custom-cnn" and (stride != "16" or last_width or freeze_batchnorm):
        raise click.UsageError("--stride, --last-width and --freeze-batchnorm apply to --arch custom-cnn only")
    if arch == "xception" and guided and (init is None or full_epochs):
        raise click.UsageError("the generalising recipe (--masks, --extra-healthy) fine-tunes a trained xception: "
                               "give its edge-train model as --init, and --epochs (not --full-epochs)")
    if masks is None and (paste_fraction or mask_weight):
        raise click.UsageError("--paste-fraction and --mask-weight need --masks")
    if contrast_curves and not guided:
        raise click.UsageError("--contrast-curves needs --masks or --extra-healthy (the generalising recipe)")
    if anchor_weight and (not guided or init is None):
        raise click.UsageError("--anchor-weight needs --init and --masks or --extra-healthy")
    if not paste_into_main and (masks is None or not extra_healthy):
        raise click.UsageError("--paste-into-other-only needs --masks and --extra-healthy")
    if healthy_per_epoch and not extra_healthy:
        raise click.UsageError("--healthy-per-epoch needs --extra-healthy")
    w = None if weights in (None, "none") else weights
    if w not in (None, "imagenet") and not Path(w).is_file():
        raise click.BadParameter(f"{w}: no such weights file", param_hint="--weights")
    cfg = train.TrainConfig(
        arch=arch, data=data, out=out, input_size=input_size or (96 if arch == "custom-cnn" else 160),
        epochs=epochs, batch_size=batch_size, lr=lr, val_fraction=val_fraction, patience=patience, seed=seed,
        weights=w, fine_tune_epochs=fine_tune_epochs, full_epochs=full_epochs, feature_copies=feature_copies,
        limit=limit, cache_dir=cache_dir, init=init, stride=int(stride), last_width=last_width, masks=masks,
        extra_healthy=tuple(extra_healthy), healthy_per_epoch=healthy_per_epoch, paste_fraction=paste_fraction,
        mask_weight=mask_weight, contrast_curves=contrast_curves, anchor_weight=anchor_weight,
        paste_into_main=paste_into_main,
        freeze_batchnorm=freeze_batchnorm,
    )
    carried = train.run(cfg)
    t = carried["training"]
    click.echo(f"{out}: {t['params']:,} parameters, {t['epochs_run']} epochs in {t['seconds']:.0f} s, "
               f"validation accuracy {t['val_accuracy']:.4f}")
