"""Read the self-describing metadata that `edge-convert` embeds in every .tflite file.

The metadata is JSON stored in the flatbuffer's standard ``metadata`` table under :data:`METADATA_KEY`.
It is read with a ~40-line flatbuffer walker instead of TensorFlow or the ``tflite`` schema package, so a
device needs nothing beyond the interpreter to know a model's labels, input size, preprocessing and
output roles.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelError

METADATA_KEY = "edge_mri_metadata"
SCHEMA_VERSION = 1
_MODEL_BUFFERS, _MODEL_METADATA = 4, 6  # field indices in tflite's schema.fbs `table Model`


@dataclass(frozen=True)
class ModelSpec:
    """What the runtime must know about a model, parsed from its embedded metadata."""

    name: str
    labels: tuple[str, ...]
    input_size: int
    channels: int
    pipeline: str
    output_names: dict[str, str]
    heatmap_class: str
    sha256: str
    path: Path | None
    metadata: dict[str, Any] = field(repr=False)
    #: True when the metadata records a weight checksum and the weights match it; False when it records
    #: none (models converted before the checksum existed), which callers should report as a notice.
    weights_verified: bool = False


def _u32(buf: bytes, pos: int) -> int:
    return struct.unpack_from("<I", buf, pos)[0]


def _field(buf: bytes, table: int, index: int) -> int | None:
    """Absolute position of field ``index`` of the table at ``table``, or None when absent."""
    vtable = table - struct.unpack_from("<i", buf, table)[0]
    vt_size = struct.unpack_from("<H", buf, vtable)[0]
    slot = 4 + 2 * index
    if slot >= vt_size:
        return None
    off = struct.unpack_from("<H", buf, vtable + slot)[0]
    return table + off if off else None


def _vector(buf: bytes, pos: int) -> tuple[int, int]:
    """(start, length) of the vector referenced at ``pos``."""
    start = pos + _u32(buf, pos)
    return start + 4, _u32(buf, start)


def _table_at(buf: bytes, elem_pos: int) -> int:
    return elem_pos + _u32(buf, elem_pos)


def _buffer_bytes(buf: bytes, buffer: int) -> bytes:
    """The payload of one `Buffer` table: its inline data vector, or the (offset, size) region of the file."""
    data_pos = _field(buf, buffer, 0)
    if data_pos is not None:
        ds, dn = _vector(buf, data_pos)
        if ds + dn > len(buf):
            raise ModelError("corrupt or truncated TFLite flatbuffer (a buffer runs past the end)")
        return bytes(buf[ds:ds + dn])
    off_pos, size_pos = _field(buf, buffer, 1), _field(buf, buffer, 2)
    if off_pos is not None and size_pos is not None:
        off = struct.unpack_from("<Q", buf, off_pos)[0]
        size = struct.unpack_from("<Q", buf, size_pos)[0]
        return bytes(buf[off:off + size])
    return b""


def weights_digest(buf: bytes) -> dict[str, Any]:
    """Checksum of every buffer except the metadata ones: ``{"sha256", "buffers", "bytes"}``.

    Each buffer contributes its length (8 bytes, little-endian) and its bytes, in buffer order, so moving
    bytes between buffers changes the digest too. Metadata buffers are left out: they hold the digest.
    `convert.metadata.embed_metadata` computes the same digest from its model object and records it.
    """
    if len(buf) < 8 or buf[4:8] != b"TFL3":
        raise ModelError("not a TFLite flatbuffer (missing the TFL3 identifier)")
    try:
        root = _u32(buf, 0)
        skip = set(_metadata_buffers(buf, root).values())
        buffers_pos = _field(buf, root, _MODEL_BUFFERS)
        digest, count, total = hashlib.sha256(), 0, 0
        if buffers_pos is not None:
            start, length = _vector(buf, buffers_pos)
            for index in range(length):
                if index in skip:
                    continue
                data = _buffer_bytes(buf, _table_at(buf, start + 4 * index))
                digest.update(struct.pack("<Q", len(data)))
                digest.update(data)
                count, total = count + 1, total + len(data)
    except (struct.error, IndexError) as exc:
        raise ModelError(f"corrupt or truncated TFLite flatbuffer ({exc})") from None
    return {"sha256": digest.hexdigest(), "buffers": count, "bytes": total}


def _metadata_buffers(buf: bytes, root: int) -> dict[str, int]:
    """Metadata entry name -> the index of the buffer holding its value."""
    meta_pos = _field(buf, root, _MODEL_METADATA)
    if meta_pos is None:
        return {}
    found = {}
    meta_start, meta_len = _vector(buf, meta_pos)
    for i in range(meta_len):
        entry = _table_at(buf, meta_start + 4 * i)
        name_pos = _field(buf, entry, 0)
        index_pos = _field(buf, entry, 1)
        name = ""
        if name_pos is not None:
            s, n = _vector(buf, name_pos)
            name = buf[s:s + n].decode("utf-8", "replace")
        found[name] = _u32(buf, index_pos) if index_pos is not None else 0
    return found


def embedded_metadata(buf: bytes, key: str = METADATA_KEY) -> bytes | None:
    """Return the raw bytes stored under ``key`` in a TFLite flatbuffer's metadata, or None."""
    if len(buf) < 8 or buf[4:8] != b"TFL3":
        raise ModelError("not a TFLite flatbuffer (missing the TFL3 identifier)")
    try:
        root = _u32(buf, 0)
        index = _metadata_buffers(buf, root).get(key)
        buffers_pos = _field(buf, root, _MODEL_BUFFERS)
        if index is None or buffers_pos is None:
            return None
        buf_start, buf_len = _vector(buf, buffers_pos)
        if index >= buf_len:
            raise ModelError(f"metadata {key!r} points at buffer {index} of {buf_len}")
        return _buffer_bytes(buf, _table_at(buf, buf_start + 4 * index))
    except (struct.error, IndexError) as exc:
        raise ModelError(f"corrupt or truncated TFLite flatbuffer ({exc})") from None


def spec_from_metadata(meta: dict[str, Any], sha256: str, path: Path | None = None,
                       weights_verified: bool = False) -> ModelSpec:
    """Validate a metadata dict and turn it into a :class:`ModelSpec`."""
    try:
        if meta.get("schema") != SCHEMA_VERSION:
            raise ModelError(f"metadata schema {meta.get('schema')!r} is not {SCHEMA_VERSION}")
        inp, outs = meta["input"], meta["outputs"]
        return ModelSpec(
            name=str(meta["name"]),
            labels=tuple(str(x) for x in meta["labels"]),
            input_size=int(inp["size"]),
            channels=int(inp["channels"]),
            pipeline=str(inp["pipeline"]),
            output_names={role: str(o["name"]) for role, o in outs.items()},
            heatmap_class=str((outs.get("heatmap") or {}).get("class", "predicted")),
            sha256=sha256,
            path=path,
            metadata=meta,
            weights_verified=weights_verified,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"incomplete model metadata ({exc!r} missing or malformed)") from None


def read_spec(model: bytes, path: Path | None = None) -> ModelSpec:
    """Parse the metadata embedded in a .tflite file's bytes."""
    raw = embedded_metadata(model)
    if raw is None:
        raise ModelError("the model carries no edge metadata; convert it with `edge-convert`")
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"model metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ModelError("model metadata is not a JSON object")
    recorded = meta.get("weights")
    if recorded is not None:
        expected = recorded.get("sha256") if isinstance(recorded, dict) else None
        if not isinstance(expected, str):
            raise ModelError("model metadata has a malformed weights checksum")
        actual = weights_digest(model)["sha256"]
        if actual != expected:
            raise ModelError("the weights do not match the checksum in the metadata (a corrupted copy?); "
                             "copy the model again from its source")
    return spec_from_metadata(meta, hashlib.sha256(model).hexdigest(), path, weights_verified=recorded is not None)
