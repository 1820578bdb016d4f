"""Pick and prepare the images that calibrate int8 quantization (and the held-out images that check it).

Quantization ranges come from the activations these images produce, so the set should look like what
the device will see: the images go through the device's own `edge.decode` and `edge.preprocess.prepare`, and the
selection is class-balanced, so no class's activations are under-represented. The selection is seeded,
so converting the same model twice gives the same file. An unreadable image is skipped and counted,
never fatal: one bad file in a folder of hundreds should not stop a conversion.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from edge.decode import decode
from edge.errors import InputError
from edge.preprocess import prepare

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp")
#: The group name of images that sit directly in the folder rather than in a class subfolder.
UNLABELLED = ""


@dataclass
class ImageSet:
    """Prepared uint8 images [N, S, S, C] with their files and class folders ("" when unlabelled)."""

    images: np.ndarray
    paths: list[Path]
    classes: list[str]
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def per_class(self) -> dict[str, int]:
        return dict(sorted(Counter(self.classes).items()))

    def summary(self) -> dict:
        """The counts that go into the model metadata and the report."""
        return {"images": len(self.paths), "skipped": len(self.skipped), "per_class": self.per_class,
                "skipped_files": [f"{p.name}: {why}" for p, why in self.skipped]}


def list_images(directory: str | Path) -> dict[str, list[Path]]:
    """Image files of ``directory`` grouped by class subfolder (recursively), sorted; loose files go to "".

    Raises FileNotFoundError when the folder is missing or holds no image files at all.
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image folder not found")
    groups: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        groups.setdefault(rel.parts[0] if len(rel.parts) > 1 else UNLABELLED, []).append(path)
    if not groups:
        raise FileNotFoundError(f"{root}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    return dict(sorted(groups.items()))


def _round_robin(groups: dict[str, list[Path]], seed: int, exclude: set[Path]) -> Iterable[tuple[str, Path]]:
    """Yield (class, file) alternating between classes, each class in its own seeded random order.

    Alternating is what makes the selection balanced: every class contributes one image per round
    until it runs out, and the rounds continue with the classes that still have images.
    """
    rng = np.random.default_rng(seed)
    queues = []
    for name, paths in groups.items():
        pool = [p for p in paths if p not in exclude]
        queues.append((name, [pool[i] for i in rng.permutation(len(pool))]))
    position = 0
    while any(position < len(q) for _, q in queues):
        for name, queue in queues:
            if position < len(queue):
                yield name, queue[position]
        position += 1


def load_images(directory: str | Path, *, size: int, channels: int, pipeline: str, count: int,
                seed: int = 0, exclude: Iterable[Path] = (),
                progress: Callable[[int], None] | None = None) -> ImageSet:
    """Select up to ``count`` images class-balanced from ``directory`` and prepare them for the model.

    Unreadable files are skipped (with the reason) and replaced by the next file of the same round.
    ``exclude`` removes files (e.g. the calibration set, when drawing held-out images from the same
    folder). ``progress`` is called with 1 after each image is prepared (e.g. a click progress bar's
    ``update``), so a bar of length ``count`` fills as the set is built.
    """
    groups = list_images(directory)
    images: list[np.ndarray] = []
    paths: list[Path] = []
    classes: list[str] = []
    skipped: list[tuple[Path, str]] = []
    for name, path in _round_robin(groups, seed, set(exclude)):
        if len(images) >= count:
            break
        try:
            images.append(prepare(decode(path), size, channels, pipeline))
        except InputError as exc:  # the device decoder names the file first: keep only the reason
            skipped.append((path, str(exc).split(": ", 1)[-1]))
            continue
        paths.append(path)
        classes.append(name)
        if progress:
            progress(1)
    stack = np.stack(images) if images else np.zeros((0, size, size, channels), np.uint8)
    return ImageSet(stack, paths, classes, skipped)


def load_calibration(directory: str | Path, *, size: int, channels: int, pipeline: str, count: int = 200,
                     seed: int = 0, progress: Callable[[int], None] | None = None) -> ImageSet:
    """The calibration set: like :func:`load_images`, but an empty result is an error (OSError)."""
    if count < 1:
        raise ValueError(f"--num-calibration must be at least 1, got {count}")
    found = load_images(directory, size=size, channels=channels, pipeline=pipeline, count=count, seed=seed,
                        progress=progress)
    if not found.paths:
        raise OSError(f"{directory}: none of the {len(found.skipped)} image files could be read "
                         f"(first: {found.skipped[0][0].name}: {found.skipped[0][1]})")
    return found
