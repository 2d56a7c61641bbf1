"""Piecewise parsing of big model files: the same message as onnx.load, or an error."""

from __future__ import annotations

import onnx
import pytest
from cf_models import loop_with_if_model
from hypothesis import given, settings
from hypothesis import strategies as st
from models import DIGITS, conv_net, embedding, mlp, residual_cnn, save

from ptqconv import modelio, piecewise_parse
from ptqconv.errors import PtqError

MODELS = {
    "mlp": lambda: mlp(),
    "residual_cnn": lambda: residual_cnn(),
    "constant_nodes": lambda: conv_net(constant_nodes=True),
    "embedding": lambda: embedding(),
    "loop_with_if": lambda: loop_with_if_model(8),
}


@pytest.mark.parametrize("batch", [1, piecewise_parse.BATCH_BYTES])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_pieces_merge_into_the_message_onnx_parses(tmp_path, monkeypatch, name, batch):
    monkeypatch.setattr(piecewise_parse, "BATCH_BYTES", batch)  # 1: every piece alone
    model = MODELS[name]()
    model.doc_string, model.producer_name = "doc", "tests"
    model.metadata_props.add(key="k", value="v")
    path = save(model, tmp_path / "m.onnx")
    parsed = piecewise_parse.parse_model(str(path))
    assert parsed.SerializeToString() == onnx.load(str(path)).SerializeToString()


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_a_damaged_file_fails_or_parses_as_onnx_parses_it(tmp_path_factory, data):
    """Whatever the damage (truncation, a changed byte), a piecewise parse that succeeds
    gives what protobuf itself makes of the bytes; where it fails, onnx.load decides."""
    raw = (DIGITS / "model.onnx").read_bytes()
    cut = data.draw(st.one_of(st.just(len(raw)), st.integers(0, len(raw))))  # whole, or cut
    at = data.draw(st.integers(0, max(cut - 1, 0)))
    damaged = bytearray(raw[:cut])
    if damaged:
        damaged[at] = data.draw(st.integers(0, 255))
    path = tmp_path_factory.mktemp("damaged") / "m.onnx"
    path.write_bytes(bytes(damaged))
    try:
        parsed = piecewise_parse.parse_model(str(path))
    except Exception:
        return
    reference = onnx.ModelProto()
    reference.ParseFromString(bytes(damaged))
    assert parsed.SerializeToString() == reference.SerializeToString()


def test_big_files_load_piecewise_and_damaged_ones_get_onnx_loads_message(tmp_path,
                                                                          monkeypatch):
    monkeypatch.setattr(modelio, "IN_MEMORY_BYTES", 0)  # every file counts as big
    calls = []
    parse = piecewise_parse.parse_model
    monkeypatch.setattr(piecewise_parse, "parse_model",
                        lambda p: calls.append(p) or parse(p))
    path = save(residual_cnn(), tmp_path / "m.onnx")
    model = modelio.load_model(path)
    assert calls and len(model.graph) == len(onnx.load(str(path)).graph.node)
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(PtqError, match=r"not (a valid )?(an )?ONNX model"):
        modelio.load_model(path)
