"""Would a finer map of the same weights mark the lesion? LayerCAM at earlier layers of an edge-train Xception,
scored on the training split's held-out masked tumours (training data only), before anything is built in-graph.

    python docs/finer_map_candidates.py runs/xception-wise50g2-fa.keras add_10 block13_sepconv2_bn add_2

Every map is taken with a ``tf.GradientTape`` on the Keras file (the yardstick the in-graph head is checked
against), for the true class, on the held-out 10% of `edge-train`'s split (seed 0) at the model's input size:
Grad-CAM and LayerCAM at the base's output, and LayerCAM at each named layer of the nested ``xception`` base,
alone and fused with the output. Pointing game, median mass ratio and median Pearson r with the average map,
as `edge-evaluate --masks` defines them (`convert.explain_metrics`).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

SHARED = Path("../shared/data")


def candidate_maps(model_path: Path, layers: list[str], cache_dir: Path) -> dict[str, list[tuple]]:
    """Per candidate map: one (heatmap, pointing hit, mass ratio) per held-out masked tumour."""
    import keras
    import tensorflow as tf

    from convert import explain_metrics as em
    from convert import gradcam_head, normalisation
    from convert.keras_io import load_model
    from convert.run_split import held_out_pools

    model, carried = load_model(model_path)
    size = int(carried["input_size"])
    _, pools = held_out_pools(SHARED / "brain-tumor-mri", size, masks=SHARED / "brain-tumor-mri-masks",
                              cache_dir=cache_dir)
    x, masks, y = pools.donors()
    base = model.get_layer("xception")
    stages = keras.Model(base.inputs, [base.get_layer(name).output for name in layers] + [base.output])
    gap, dense = model.get_layer("gap"), model.get_layer("predictions")
    norm = normalisation.parse(carried["preprocess"], 3)

    @tf.function
    def run(image: tf.Tensor, cls: tf.Tensor) -> dict[str, tf.Tensor]:
        with tf.GradientTape() as tape:
            outs = stages(normalisation.apply(tf.cast(image, tf.float32), norm), training=False)
            logits = tf.matmul(gap(outs[-1]), dense.kernel) + dense.bias
            score = tf.reduce_sum(logits * tf.one_hot(cls, int(logits.shape[-1])))
        grads = tape.gradient(score, outs)
        maps = {"Grad-CAM at the output": gradcam_head.class_activation_map(outs[-1], grads[-1], size),
                "LayerCAM at the output": gradcam_head.layer_cam([outs[-1]], [grads[-1]], size)}
        for i, name in enumerate(layers):
            maps[f"LayerCAM at {name}"] = gradcam_head.layer_cam([outs[i]], [grads[i]], size)
            maps[f"LayerCAM at {name} + output"] = gradcam_head.layer_cam([outs[i], outs[-1]],
                                                                        [grads[i], grads[-1]], size)
        return maps

    scored: dict[str, list[tuple]] = {}
    for image, mask, label in zip(x, masks, y):
        maps = run(tf.constant(np.repeat(image[None], 3, axis=-1)), tf.constant(int(label)))
        lesion, head = mask > 127, image[..., 0] > 10
        for name, heat in maps.items():
            h = heat.numpy()[0]
            scored.setdefault(name, []).append((h, em.pointing_hit(h, lesion), em.mass_ratio(h, lesion, head)))
    return scored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("layers", nargs="+", help="layers of the nested xception base, e.g. add_10")
    parser.add_argument("--cache-dir", type=Path, default=Path("cache"))
    args = parser.parse_args()
    from convert.explain_metrics import r_with_average

    for name, rows in candidate_maps(args.model, args.layers, args.cache_dir).items():
        r = np.nanmedian(r_with_average([r_[0] for r_ in rows]))
        print(f"{name}: pointing {np.mean([r_[1] for r_ in rows]):.1%}, mass ratio "
              f"{np.nanmedian([r_[2] for r_ in rows]):.2f}x, r with the average map {r:.3f} ({len(rows)} slices)")


if __name__ == "__main__":
    main()
