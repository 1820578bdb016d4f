"""Embed the runtime's JSON metadata into a .tflite flatbuffer (the writer for `edge.model_file`)."""
from __future__ import annotations

import json
from typing import Any

from edge.model_file import METADATA_KEY, read_spec


def embed_metadata(tflite_model: bytes, metadata: dict[str, Any]) -> bytes:
    """Return ``tflite_model`` with ``metadata`` stored as JSON under :data:`METADATA_KEY`.

    Uses TensorFlow's own flatbuffer object API so the result is a well-formed model that every
    TFLite runtime loads; an existing entry under the same key is replaced. The result is read back
    with the device-side parser before it is returned, so a file that converts is a file that loads.
    """
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(tflite_model, 0))
    payload = json.dumps(metadata, sort_keys=True, indent=1).encode("utf-8")
    buffer = schema.BufferT()
    buffer.data = list(payload)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = METADATA_KEY
    entry.buffer = len(model.buffers) - 1
    model.metadata = [m for m in (model.metadata or []) if m.name not in (METADATA_KEY, METADATA_KEY.encode())]
    model.metadata.append(entry)
    out = bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    read_spec(out)
    return out
