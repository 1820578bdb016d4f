"""Agreement of TFLite files with the frozen Keras model: 1,000 held-out variants (the converter's check) and the whole test split."""
import sys
from pathlib import Path
import numpy as np
from convert import augment, calibration, normalisation, repair
from convert.keras_io import load_model

CACHE = Path("runs/bc/reference.npz")
D = Path("../shared/data/brain-tumor-mri")
if not CACHE.exists():
    model, _ = load_model("runs/xception-frozen.keras")
    norm = normalisation.parse("xception", 3)
    calib = calibration.load_calibration(D / "Training", size=150, channels=3, pipeline="resize", count=200, seed=0)
    held = calibration.load_images(D / "Training", size=150, channels=3, pipeline="resize", count=1000, seed=1,
                                   exclude=calib.paths)
    variants = augment.scanner_variants(held.images, 0)
    test = calibration.load_images(D / "Testing", size=150, channels=3, pipeline="resize", count=100000, seed=0)
    np.savez(CACHE, variants=variants, ref_v=repair.keras_probabilities(model, variants, norm),
             test=test.images, ref_t=repair.keras_probabilities(model, test.images, norm))
z = np.load(CACHE)
for f in sys.argv[1:]:
    b = Path(f).read_bytes()
    out = []
    for imgs, ref in ((z["variants"], z["ref_v"]), (z["test"], z["ref_t"])):
        p = repair.probabilities(b, imgs)
        same = p.argmax(1) == ref.argmax(1)
        out.append(f"{same.mean():.2%} ({(~same).sum()} of {same.size} differ, mean |dp| {np.abs(p-ref).mean():.4f})")
    print(f"{f}: held-out variants {out[0]}; test split {out[1]}")
