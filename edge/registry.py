"""Models bundled with the runtime: ``edge/models/NAME.tflite``, each with a ``NAME.md`` model card beside it.

A device is usually given a model by name (``--model custom-cnn``) rather than by path, so the registry turns
names into files and says what exists when a name is wrong. Everything a listing shows (labels, input size)
comes from the metadata embedded in the file itself, so a card can never disagree with the model it ships.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import ModelError
from .model_file import read_spec

MODELS_DIR = Path(__file__).resolve().parent / "models"
DEFAULT_MODEL = "custom-cnn"


@dataclass(frozen=True)
class ModelInfo:
    """One bundled model as a listing shows it."""

    name: str
    path: Path
    size_bytes: int
    sha256: str
    labels: tuple[str, ...]
    input_size: int
    channels: int
    card: Path | None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "labels": list(self.labels),
            "input_size": self.input_size,
            "channels": self.channels,
            "card": str(self.card) if self.card else None,
        }


def bundled_names(directory: Path = MODELS_DIR) -> list[str]:
    """Names of the .tflite files in ``directory``, sorted."""
    return sorted(p.stem for p in directory.glob("*.tflite")) if directory.is_dir() else []


def list_models(directory: Path = MODELS_DIR) -> list[ModelInfo]:
    """Describe every bundled model from its embedded metadata (a corrupt file raises :class:`ModelError`)."""
    infos = []
    for name in bundled_names(directory):
        path = directory / f"{name}.tflite"
        data = path.read_bytes()
        try:
            spec = read_spec(data, path)
        except ModelError as exc:
            raise ModelError(f"{path}: {exc}") from None
        card = path.with_suffix(".md")
        infos.append(ModelInfo(name, path, len(data), spec.sha256, spec.labels, spec.input_size, spec.channels,
                               card if card.is_file() else None))
    return infos


def resolve(name_or_path: str | Path | None = None, directory: Path = MODELS_DIR) -> Path:
    """Turn a bundled model name, or a path to a .tflite file, into the file's path.

    None means the default model. A string that names an existing file is taken as a path; anything with a
    directory separator or a ``.tflite`` suffix must be one.
    """
    asked = DEFAULT_MODEL if name_or_path is None else name_or_path
    if isinstance(asked, str) and not asked.strip():
        raise ModelError(f"{asked!r}: empty model name or path (an unset variable?)")
    path = Path(asked)
    if path.is_file():
        return path
    if path.is_dir():
        raise ModelError(f"{asked}: is a directory, not a .tflite model file")
    if path.exists():  # a FIFO would block the read, /dev/zero would never end it
        raise ModelError(f"{asked}: not a regular file (a pipe, socket or device), not a .tflite model file")
    text = str(asked)
    if isinstance(asked, Path) or "/" in text or "\\" in text or text.endswith(".tflite"):
        raise ModelError(f"{asked}: no such model file")
    bundled = directory / f"{text}.tflite"
    if bundled.is_file():
        return bundled
    names = bundled_names(directory)
    known = ", ".join(names) if names else f"none bundled in {directory}"
    raise ModelError(f"{asked}: no such model (known: {known}); give a bundled name or a path to a .tflite file")
