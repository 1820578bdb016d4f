"""Edge runtime for explainable brain-MRI classification: one TFLite invoke gives class and Grad-CAM heatmap."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Classifier", "Result", "__version__"]


def __getattr__(name: str):
    # Lazy so `import edge` stays cheap for tools that only need preprocessing or metadata.
    if name in ("Classifier", "Result"):
        from . import classifier

        return getattr(classifier, name)
    raise AttributeError(name)
