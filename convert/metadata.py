"""Embed the runtime's JSON metadata into a .tflite flatbuffer (the writer for `edge.model_file`)."""
from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import numpy as np

from edge.model_file import METADATA_KEY, read_spec


def embed_metadata(tflite_model: bytes, metadata: dict[str, Any]) -> bytes:
    """Return ``tflite_model`` with ``metadata`` stored as JSON under :data:`METADATA_KEY`.

    Uses TensorFlow's own flatbuffer object API so the result is a well-formed model that every
    TFLite runtime loads; an existing entry under the same key is replaced in place (its buffer is
    reused, so re-embedding leaves no orphan buffer behind). A checksum of the weight buffers is added
    under ``weights`` (the caller's dict is not changed): the device refuses a copy whose weights no
    longer match it. The result is read back with the device-side parser, which checks that checksum,
    before it is returned, so a file that converts is a file that loads.
    """
    from tensorflow.lite.python import schema_py_generated as schema

    from convert.flatbuffer import dump, load

    model = load(tflite_model)
    entries = list(model.metadata or [])
    ours = next((m for m in entries if m.name in (METADATA_KEY, METADATA_KEY.encode())), None)
    if ours is None:
        model.buffers.append(schema.BufferT())
        ours = schema.MetadataT()
        ours.name = METADATA_KEY
        ours.buffer = len(model.buffers) - 1
    model.metadata = [m for m in entries if m.name not in (METADATA_KEY, METADATA_KEY.encode())] + [ours]
    payload = dict(metadata, weights=weights_digest(model))
    model.buffers[ours.buffer].data = list(json.dumps(payload, sort_keys=True, indent=1).encode("utf-8"))
    out = dump(model)
    if not read_spec(out).weights_verified:
        raise ValueError("the written model lost its weights checksum")
    return out


def weights_digest(model: Any) -> dict[str, Any]:
    """`edge.model_file.weights_digest`, computed on a flatbuffer object model (`schema.ModelT`) instead of
    bytes: the same buffers (all but the metadata ones), each as its 8-byte length and its bytes."""
    skip = {m.buffer for m in model.metadata or []}
    digest, count, total = hashlib.sha256(), 0, 0
    for index, buffer in enumerate(model.buffers):
        if index in skip:
            continue
        if getattr(buffer, "offset", 0) > 1:
            raise ValueError("models with buffers outside the flatbuffer (over 2 GB) are not supported")
        data = b"" if buffer.data is None else np.asarray(buffer.data, dtype=np.uint8).tobytes()
        digest.update(struct.pack("<Q", len(data)))
        digest.update(data)
        count, total = count + 1, total + len(data)
    return {"sha256": digest.hexdigest(), "buffers": count, "bytes": total}
