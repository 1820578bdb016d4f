"""A model file that is damaged but still loads must be refused as a model, once, before it mislabels scans.

Two ways a .tflite can load and still be wrong: a graph that fails at invoke (a tensor without its data),
and weights whose bytes changed in a copy (the interpreter cannot tell; the weights checksum can).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge import Classifier
from edge.errors import ModelError
from edge.model_file import METADATA_KEY, read_spec, weights_digest

schema = pytest.importorskip("tensorflow.lite.python.schema_py_generated")
flatbuffer_utils = pytest.importorskip("tensorflow.lite.tools.flatbuffer_utils")

PREFIX = "edge-classify: "


def rewrite(source: Path, target: Path, change) -> Path:
    """Edit a model with TensorFlow's flatbuffer object API (bypassing our converter) and write it."""
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(source.read_bytes(), 0))
    change(model)
    target.write_bytes(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))
    return target


def metadata_buffer(model) -> int:
    return next(m.buffer for m in model.metadata if m.name in (METADATA_KEY, METADATA_KEY.encode()))


@pytest.fixture()
def fails_at_invoke(tiny_model_path: Path, tmp_path: Path) -> Path:
    """The tiny model with one constant tensor pointed at the empty buffer: it loads, its invoke fails."""
    def drop_a_constant(model) -> None:
        skip = {m.buffer for m in model.metadata}
        for tensor in model.subgraphs[0].tensors:
            data = model.buffers[tensor.buffer].data
            if tensor.buffer not in skip and data is not None and len(data) > 16:
                tensor.buffer = 0
                return
        raise AssertionError("no constant tensor found")

    return rewrite(tiny_model_path, tmp_path / "fails-at-invoke.tflite", drop_a_constant)


@pytest.fixture()
def flipped_weights(tiny_model_path: Path, tmp_path: Path) -> Path:
    """The tiny model with every byte of its largest weight buffer flipped: structurally intact."""
    data = bytearray(tiny_model_path.read_bytes())
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(bytes(data), 0))
    skip = {m.buffer for m in model.metadata}
    largest = max((b for i, b in enumerate(model.buffers) if i not in skip and b.data is not None),
                  key=lambda b: len(b.data))
    payload = np.asarray(largest.data, np.uint8).tobytes()
    start = data.find(payload)
    assert start > 0 and data.find(payload, start + 1) == -1, "the weight buffer is found exactly once"
    for i in range(start, start + len(payload)):
        data[i] ^= 0x5A
    path = tmp_path / "flipped-weights.tflite"
    path.write_bytes(bytes(data))
    return path


def test_a_model_failing_at_invoke_is_one_model_error_exit_2(cli, fails_at_invoke: Path, scan_png: Path,
                                                             sample_scans: list[Path]):
    result = cli("--model", fails_at_invoke, scan_png, *sample_scans)
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{PREFIX}error: {fails_at_invoke}: the model loads but fails to run (")
    assert lines[0].count("lacks data") == 1, "the message is not repeated"


def test_the_api_raises_the_same_model_error_every_time(fails_at_invoke: Path, scan_png: Path):
    clf = Classifier(fails_at_invoke)
    messages = []
    for _ in range(3):
        with pytest.raises(ModelError) as info:
            clf.classify(scan_png)
        messages.append(str(info.value))
    assert len(set(messages)) == 1 and messages[0].count("lacks data") == 1


def test_watch_stops_on_a_model_that_fails_at_invoke(cli, fails_at_invoke: Path, scan_png: Path, tmp_path: Path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.png").write_bytes(scan_png.read_bytes())
    out = tmp_path / "results.jsonl"
    result = cli("--model", fails_at_invoke, "--watch", inbox, "--out", out, "--once")
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
    assert out.read_text() == "", "nothing is recorded, so the file is classified once a good model is given"


def test_converted_models_record_a_weights_checksum_that_is_checked(tiny_model_path: Path):
    data = tiny_model_path.read_bytes()
    spec = read_spec(data)
    assert spec.weights_verified
    recorded = spec.metadata["weights"]
    assert recorded == weights_digest(data)
    assert recorded["buffers"] > 3 and recorded["bytes"] > 1000


def test_re_embedding_replaces_the_metadata_without_an_orphan_buffer(tiny_model_path: Path):
    from convert.metadata import embed_metadata

    data = tiny_model_path.read_bytes()
    meta = dict(read_spec(data).metadata, name="renamed")
    again = embed_metadata(data, meta)
    count = lambda raw: schema.Model.GetRootAsModel(raw, 0).BuffersLength()  # noqa: E731
    assert count(again) == count(data)
    spec = read_spec(again)
    assert spec.name == "renamed" and spec.weights_verified and spec.metadata["weights"] == weights_digest(data)


def test_flipped_weight_bytes_are_refused_on_load(cli, flipped_weights: Path, scan_png: Path):
    with pytest.raises(ModelError, match="weights do not match the checksum"):
        Classifier(flipped_weights)
    result = cli("--model", flipped_weights, scan_png)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{PREFIX}error: {flipped_weights}: the weights do not match the checksum in the metadata "
        "(a corrupted copy?); copy the model again from its source"]


def test_a_model_without_a_checksum_loads_with_a_notice(cli, tiny_model_path: Path, scan_png: Path,
                                                        tmp_path: Path):
    """As the bundled models converted before the checksum existed: still usable, and says so."""
    def strip_checksum(model) -> None:
        buffer = model.buffers[metadata_buffer(model)]
        meta = json.loads(bytes(np.asarray(buffer.data, np.uint8)))
        del meta["weights"]
        buffer.data = list(json.dumps(meta).encode())

    legacy = rewrite(tiny_model_path, tmp_path / "legacy.tflite", strip_checksum)
    assert Classifier(legacy).spec.weights_verified is False
    result = cli("--model", legacy, scan_png)
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 1
    assert result.stderr.splitlines() == [f"{PREFIX}notice: {legacy}: the model records no weights checksum "
                                          "(converted before edge-convert wrote one), so a corrupted copy "
                                          "cannot be detected"]
    verified = cli("--model", tiny_model_path, scan_png)
    assert verified.exit_code == 0 and verified.stderr == ""


def test_every_bundled_model_loads_whether_or_not_it_records_a_checksum(bundled_model: Path, scan_png: Path):
    for path in sorted(bundled_model.parent.glob("*.tflite")):
        clf = Classifier(path)
        assert clf.spec.weights_verified == ("weights" in clf.spec.metadata)
        assert clf.classify(scan_png).label in clf.labels
