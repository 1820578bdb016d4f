"""A .tflite file as TensorFlow's editable flatbuffer object model, and back to bytes.

The converter edits converted files in place rather than re-converting them (the metadata entry, a new
signature output) so that no weight changes; both edits go through these two functions.
"""
from __future__ import annotations

from typing import Any


def load(tflite_model: bytes) -> Any:
    """The flatbuffer as TensorFlow's object model (`schema.ModelT`), editable and writable again."""
    from tensorflow.lite.python import schema_py_generated as schema

    return schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(tflite_model, 0))


def dump(model: Any) -> bytes:
    """The object model written back as .tflite bytes."""
    from tensorflow.lite.tools import flatbuffer_utils

    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))
