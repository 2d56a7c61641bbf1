"""Embedding tables in int8: per row in PostTraining (Gather of the rows and of their scales),
per table in DynamicQuant; the gathered values within half a step of the float table."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import run_model
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from models import embedding, save, write_samples
from onnx import TensorProto, helper, numpy_helper

import ptqconv
from ptqconv import qparams
from ptqconv.passes.gather_quant import STORAGE_PER_ROW, GatherQuantConfig, GatherQuantPass

PER_ROW = GatherQuantConfig(qparams.fused_weight_grid(8, reduce_range=False), per_row=True)


def gather_model(table: np.ndarray, axis: int = 0) -> onnx.ModelProto:
    ids_shape = [2, 3]
    out = list(table.shape)
    out[axis:axis + 1] = ids_shape
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"], name="embed", axis=axis)], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ids_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)],
        [numpy_helper.from_array(table, "table")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@settings(max_examples=60, deadline=None)
@given(table=hnp.arrays(np.float32, st.tuples(st.integers(2, 12), st.integers(1, 9)),
                        elements=st.floats(-1e4, 1e4, width=32)),
       seed=st.integers(0, 2**31 - 1))
def test_rows_gathered_per_row_are_within_half_a_step_of_the_table(tmp_path_factory, table,
                                                                   seed):
    model = ir.serde.deserialize_model(gather_model(table))
    records = GatherQuantPass(PER_ROW)(model).records
    assert [r.storage for r in records] == [STORAGE_PER_ROW]
    path = tmp_path_factory.mktemp("g") / "q.onnx"
    ir.save(model, path)
    ids = np.random.default_rng(seed).integers(0, table.shape[0], (2, 3))
    (got,) = run_model(path, {"ids": ids})
    want = table[ids]
    # Symmetric int8 per row; qparams floors every range at MIN_RANGE.
    step = np.maximum(np.abs(table).max(axis=1), qparams.MIN_RANGE / 2) / 127
    bound = step[ids][..., None] / 2 * (1 + 1e-5)
    assert np.all(np.abs(got - want) <= bound)
    assert np.all(got[want == 0] == 0)  # exact zeros stay exact (zero point 0)


def test_tables_gathered_along_another_axis_stay_float():
    table = np.arange(24, dtype=np.float32).reshape(4, 6)
    model = ir.serde.deserialize_model(gather_model(table, axis=1))
    (record,) = GatherQuantPass(PER_ROW)(model).records
    assert not record.quantized and record.reason == "gathers along an axis other than the rows"


def convert_embedding(tmp_path, extra: str = "") -> tuple[ptqconv.ConversionReport, object]:
    src = save(embedding(vocab=1000, dim=64), tmp_path / "float.onnx")
    rng = np.random.default_rng(3)
    ids = write_samples(tmp_path / "ids", (rng.integers(0, 1000, (1, 8)) for _ in range(8)))
    config = tmp_path / "c.ini"
    config.write_text(f"[data_preprocess_param]\ncalibrate_path=ids:{ids}\n"
                      "[full_quant_param]\nactivation_quant_method=MAX_MIN\n"
                      f"latency_aware=false\nmeasure_latency=false\n{extra}")
    out = tmp_path / f"q{len(extra)}.onnx"
    return ptqconv.convert(src, out, "PostTraining", config_file=config), (src, out)


def test_post_training_gathers_embedding_rows_in_int8(tmp_path):
    report, (src, out) = convert_embedding(tmp_path)
    assert [t.name for t in report.post_training.embedding_tables] == ["table"]
    assert "embedding tables: 1 in int8 per row (0.26 MB -> 68.0 kB" in report.format()
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    assert inits["table_quantized"].dtype == np.int8
    assert inits["table_quantized"].shape == (1000, 64)
    assert inits["table_row_scale"].shape == (1000, 1)
    assert "table" not in inits
    ids = np.random.default_rng(4).integers(0, 1000, (1, 8))
    (got,), (want,) = run_model(out, {"ids": ids}), run_model(src, {"ids": ids})
    assert got.ravel() @ want.ravel() / np.linalg.norm(got) / np.linalg.norm(want) > 0.999

    kept, (_, float_out) = convert_embedding(tmp_path, "embedding_quant=false\n")
    assert kept.post_training.embedding_tables == []
    names = {t.name for t in onnx.load(str(float_out)).graph.initializer}
    assert "table" in names and "table_quantized" not in names
    assert report.size_after < kept.size_after - 150_000


@pytest.mark.parametrize("skip", ["embed", "Gather"])
def test_skip_quant_node_keeps_a_table_float(tmp_path, skip):
    extra = f"[common_quant_param]\nskip_quant_node={skip}\n"
    report, (_, out) = convert_embedding(tmp_path, extra)
    assert report.post_training.embedding_tables == []
    assert "table" in {t.name for t in onnx.load(str(out)).graph.initializer}


def bag_model(table: np.ndarray, bags: int) -> onnx.ModelProto:
    """An EmbeddingBag as TorchScript exports it: a Loop whose body gathers one bag's rows
    of the main graph's table (one row per bag here) and reduces them (negates it)."""
    body = helper.make_graph(
        [helper.make_node("Gather", ["ids", "i"], ["id"]),
         helper.make_node("Gather", ["table", "id"], ["row"], name="bag_rows"),
         helper.make_node("Neg", ["row"], ["bag"]),
         helper.make_node("Identity", ["cond"], ["cond_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("bag", TensorProto.FLOAT, [table.shape[1]])])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "yes"], ["bags"], body=body)], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [bags])],
        [helper.make_tensor_value_info("bags", TensorProto.FLOAT, [bags, table.shape[1]])],
        [numpy_helper.from_array(table, "table"),
         numpy_helper.from_array(np.array(bags, np.int64), "trips"),
         numpy_helper.from_array(np.array(True), "yes")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_table_gathered_inside_a_loop_body_is_quantized(tmp_path):
    """The rows a Loop body gathers from the main graph's table are read as integers there
    and dequantized per row, like a main-graph Gather's."""
    table = np.random.default_rng(0).standard_normal((100, 16)).astype(np.float32)
    model = ir.serde.deserialize_model(bag_model(table, 5))
    (record,) = GatherQuantPass(PER_ROW)(model).records
    assert record.quantized and record.nodes == ("bag_rows",)
    assert "table" not in model.graph.initializers
    # Unnamed values get names per graph when saved, which could repeat across graphs.
    assert all(v.name for node in ir.traversal.RecursiveGraphIterator(model.graph)
               for v in node.outputs)
    path = tmp_path / "q.onnx"
    ir.save(model, path)
    ids = np.array([3, 97, 0, 41, 3])
    (got,) = run_model(path, {"ids": ids})
    step = np.abs(table).max(axis=1) / 127
    assert np.all(np.abs(-got - table[ids]) <= step[ids][:, None] / 2 * 1.00001)


@pytest.mark.parametrize(("bits", "config"), [(8, ""), (4, "block_size=0\n")])
def test_weight_quant_quantizes_a_table_a_loop_body_gathers(tmp_path, bits, config):
    """At 8 bits the body gathers integer rows; in an int4 table (which Gather cannot read)
    the main graph dequantizes the table once, before the Loop."""
    table = np.random.default_rng(1).standard_normal((100, 16)).astype(np.float32)
    src = save(bag_model(table, 5), tmp_path / "m.onnx")
    (tmp_path / "c.ini").write_text(f"[weight_quant_param]\nmeasure_latency=false\n{config}")
    out = tmp_path / "q.onnx"
    report = ptqconv.convert(src, out, "WeightQuant", bit_num=bits,
                             config_file=tmp_path / "c.ini")
    (record,) = report.weights
    assert record.quantized and record.nodes == ("bag_rows",)
    ids = np.array([3, 97, 0, 41, 3])
    (got,) = run_model(out, {"ids": ids})
    levels = 2 ** bits - 1
    step = (table.max(axis=1) - table.min(axis=1)) / levels
    assert np.all(np.abs(-got - table[ids]) <= step[ids][:, None] * 0.5001)
