"""DynamicQuant: int8 weights behind onnxruntime's DynamicQuantizeMatMul (bias folded in),
embedding tables gathered in int8; activations quantized at run time."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from conftest import run_model
from harness import optimized_ops
from models import DIGITS, conv_net, embedding, lstm, mlp, save, tied_embedding
from onnx import numpy_helper

import ptqconv
from ptqconv.cli import main


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel(), b.ravel()
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("gemm", [False, True])
def test_matmul_and_gemm_become_dynamic_int8_with_the_bias_folded(tmp_path, gemm):
    src = save(mlp(gemm=gemm), tmp_path / "float.onnx")
    out = tmp_path / "dyn.onnx"
    report = ptqconv.convert(src, out, "DynamicQuant")
    assert len(report.quantized) == 3 and not report.skipped
    found = ops(out)
    assert found["DynamicQuantizeMatMul"] == 3
    assert found["MatMul"] == found["Gemm"] == found["Add"] == 0  # bias inside the op
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    float_inits = {t.name: numpy_helper.to_array(t)
                   for t in onnx.load(str(src)).graph.initializer}
    levels = 63 if report.dynamic.reduce_range else 127
    for node in onnx.load(str(out)).graph.node:
        if node.op_type != "DynamicQuantizeMatMul":
            continue
        weights, scale = inits[node.input[1]], inits[node.input[2]]
        assert weights.dtype == np.int8 and scale.shape == (weights.shape[1],)  # per column
        assert np.abs(weights).max() == levels
        original = float_inits[node.input[1].removesuffix("_quantized")]
        original = original.T if gemm else original
        assert np.abs(weights * scale - original).max() <= scale.max() / 2 * (1 + 1e-5)
    x = np.random.default_rng(0).standard_normal((5, 256)).astype(np.float32)
    assert cosine(run_model(out, {"x": x})[0], run_model(src, {"x": x})[0]) > 0.995
    assert optimized_ops(out, tmp_path)["DynamicQuantizeMatMul"] == 3


def test_embedding_tables_are_gathered_in_int8(tmp_path):
    src = save(embedding(), tmp_path / "float.onnx")
    out = tmp_path / "dyn.onnx"
    report = ptqconv.convert(src, out, "DynamicQuant")
    assert {w.op_type: w.storage for w in report.quantized} == {
        "MatMul": "int8 (DynamicQuantizeMatMul)",
        "Gather": "int8 (Gather, then DequantizeLinear)"}
    graph = onnx.load(str(out)).graph
    assert [n.op_type for n in graph.node] == ["Gather", "DequantizeLinear",
                                               "DynamicQuantizeMatMul"]
    ids = np.arange(8, dtype=np.int64).reshape(1, 8) * 7
    got, want = run_model(out, {"ids": ids})[0], run_model(src, {"ids": ids})[0]
    assert got.shape == want.shape and cosine(got, want) > 0.99
    assert report.size_after < report.size_before / 3


def test_skip_and_mindspore_config_and_acwl(tmp_path, capsys):
    src = save(mlp(), tmp_path / "float.onnx")
    out = tmp_path / "dyn.onnx"
    report = ptqconv.convert(src, out, "DynamicQuant", skip_quant_node="fc1")
    assert [w.reason for w in report.skipped] == ["skip_quant_node (fc1)"]
    assert ops(out)["MatMul"] == 1
    config = tmp_path / "d.cfg"
    config.write_text("[common_quant_param]\nquant_type=DYNAMIC_QUANT\nbit_num=8\n"
                      "[dynamic_quant_param]\nquant_strategy=ACWL\n")
    status = main([f"--modelFile={src}", f"--outputFile={tmp_path / 'a.onnx'}",
                   f"--configFile={config}"])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "quant_strategy=ACWL (activations per channel) is not supported" in err
    assert not (tmp_path / "a.onnx").exists()
    status = main([f"--modelFile={DIGITS / 'model.onnx'}", f"--outputFile={out}",
                   "--quantType=DynamicQuant", "--bitNum=4"])
    assert status == 2 and "allowed: 8 for DynamicQuant" in capsys.readouterr().err


def test_dynamic_quant_output_is_timed_against_float_unless_switched_off(tmp_path):
    src = save(mlp(), tmp_path / "float.onnx")
    report = ptqconv.convert(src, tmp_path / "dyn.onnx", "DynamicQuant")
    assert report.latency is not None and set(report.latency.ms) == {"float", "quantized"}
    assert "  latency: " in report.format()
    config = tmp_path / "d.cfg"
    config.write_text("[common_quant_param]\nquant_type=DYNAMIC_QUANT\n"
                      "[dynamic_quant_param]\nmeasure_latency=false\n")
    report = ptqconv.convert(src, tmp_path / "dyn.onnx", config_file=config)
    assert report.latency is None and "  latency" not in report.format()


def test_nodes_sharing_a_weight_share_its_integers(tmp_path):
    # PyTorch writes a weight two modules share once, read again through Identity; a weight
    # also read by anything but a MatMul/Gemm weight input keeps its float values.
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((64, 64)) / 8).astype(np.float32), "w")
    v = numpy_helper.from_array((rng.standard_normal((64, 64)) / 8).astype(np.float32), "v")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["h"], name="first"),
         onnx.helper.make_node("Identity", ["w"], ["w_again"]),
         onnx.helper.make_node("Relu", ["h"], ["r"]),
         onnx.helper.make_node("Gemm", ["r", "w_again"], ["g"], name="second"),
         onnx.helper.make_node("MatMul", ["g", "v"], ["m"], name="third"),
         onnx.helper.make_node("Add", ["m", "v"], ["y"], name="reads_v")], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [64, 64])], [w, v])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    src = save(model, tmp_path / "float.onnx")
    out = tmp_path / "dyn.onnx"
    report = ptqconv.convert(src, out, "DynamicQuant")
    assert [r.nodes for r in report.quantized] == [("first",), ("second",)]
    assert [(r.name, r.reason) for r in report.skipped] == [("v", "also read by Add reads_v")]
    written = onnx.load(str(out)).graph
    fused = [n for n in written.node if n.op_type == "DynamicQuantizeMatMul"]
    assert len(fused) == 2 and fused[0].input[1:4] == fused[1].input[1:4]
    assert {t.name for t in written.initializer if t.data_type == onnx.TensorProto.FLOAT
            and len(t.dims) == 2} == {"v"}
    x = rng.standard_normal((1, 64)).astype(np.float32)
    assert cosine(run_model(out, {"x": x})[0], run_model(src, {"x": x})[0]) > 0.999


def test_a_tied_table_is_gathered_and_projected_in_int8(tmp_path):
    src = save(tied_embedding(), tmp_path / "float.onnx")
    out = tmp_path / "dyn.onnx"
    report = ptqconv.convert(src, out, "DynamicQuant")
    # The transposed read is folded into a weight of its own: both uses run in int8.
    assert not report.skipped
    assert {w.op_type for w in report.quantized} == {"MatMul", "Gather"}
    assert ops(out)["DynamicQuantizeMatMul"] == 1 and "Transpose" not in ops(out)
    graph = onnx.load(str(out)).graph
    assert not [t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT
                and np.prod(t.dims) >= 500 * 32]
    ids = np.array([[1, 2, 3, 499, 250, 2]], np.int64)
    got, want = run_model(out, {"ids": ids})[0], run_model(src, {"ids": ids})[0]
    assert cosine(got, want) > 0.999
    assert report.size_after < report.size_before * 0.6


def test_lstm_becomes_dynamic_int8_per_gate_row(tmp_path):
    src = save(lstm(), tmp_path / "float.onnx")
    out = tmp_path / "dyn.onnx"
    report = ptqconv.convert(src, out, "DynamicQuant")
    assert {(w.name, w.storage) for w in report.quantized} == {
        ("W", "int8 (DynamicQuantizeLSTM)"), ("R", "int8 (DynamicQuantizeLSTM)")}
    assert ops(out)["DynamicQuantizeLSTM"] == 1 and "LSTM" not in ops(out)
    x = np.random.default_rng(5).standard_normal((10, 1, 16)).astype(np.float32)
    got, want = run_model(out, {"x": x})[0], run_model(src, {"x": x})[0]
    assert got.shape == want.shape and cosine(got, want) > 0.999
    assert report.size_after < report.size_before * 0.45



def test_a_model_with_nothing_to_quantize_is_written_unchanged_not_bigger(tmp_path):
    src = save(conv_net(), tmp_path / "float.onnx")  # convs only: they stay float here
    out = tmp_path / "dyn.onnx"
    report = ptqconv.convert(src, out, "DynamicQuant")
    assert not report.quantized
    assert out.read_bytes() == src.read_bytes()
    assert "written float: the rewritten model took" in report.format()
    assert "the float model was written unchanged" in report.format()
    # Why nothing was quantized: the convs, which DynamicQuant leaves float, are counted.
    convs = sum(1 for n in onnx.load(str(src)).graph.node if n.op_type.startswith("Conv"))
    assert report.dynamic.float_weights == {"Conv": convs} and convs > 0
    assert f"Conv weights kept float: {convs} (" in report.format()


def test_recurrent_weights_an_exporter_computes_from_constants_are_quantized(tmp_path):
    # torch.onnx's dynamo exporter reorders the gates with Slice / Concat / Unsqueeze: W and R
    # are not initializers, and stayed float (the summary listed nothing skipped).
    src = save(lstm(gates_sliced=True), tmp_path / "float.onnx")
    x = np.random.default_rng(5).standard_normal((10, 1, 16)).astype(np.float32)
    want = run_model(src, {"x": x})[0]
    out = tmp_path / "dyn.onnx"
    report = ptqconv.convert(src, out, "DynamicQuant")
    assert len(report.quantized) == 2 and ops(out)["DynamicQuantizeLSTM"] == 1
    assert "Slice" not in ops(out) and cosine(run_model(out, {"x": x})[0], want) > 0.999
    out = tmp_path / "w8.onnx"
    report = ptqconv.convert(src, out, "WeightQuant", bit_num=8)
    assert sorted(w.op_type for w in report.quantized) == ["LSTM", "LSTM"]
    assert "Slice" not in ops(out) and cosine(run_model(out, {"x": x})[0], want) > 0.999
    assert report.size_after < report.size_before * 0.45


def test_gru_weights_left_float_are_counted(tmp_path):
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("W", (1, 48, 8)), ("R", (1, 48, 16)))]
    graph = helper.make_graph(
        [helper.make_node("GRU", ["x", "W", "R"], ["", "h"], hidden_size=16)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 1, 8])],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 1, 16])], inits)
    src = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
               tmp_path / "gru.onnx")
    report = ptqconv.convert(src, tmp_path / "dyn.onnx", "DynamicQuant")
    # onnxruntime has no dynamic int8 GRU: its W and R stay float, and the summary says so.
    assert not report.quantized and report.dynamic.float_weights == {"GRU/RNN": 2}
    assert "GRU/RNN weights kept float: 2 (onnxruntime has no dynamic int8 GRU" in (
        report.format())


def test_recurrent_weights_that_cannot_be_folded_stay_float_without_failing(
        tmp_path, monkeypatch):
    import ptqconv.passes.fold_recurrent_weights as fold

    def broken(*args):
        raise ValueError("no reference implementation")

    # An exporter's gate shuffle onnx's evaluator cannot run: the weights stay as they were
    # (float, listed), and the conversion goes on, as before the fold existed.
    monkeypatch.setattr(fold, "_evaluate", broken)
    src = save(lstm(gates_sliced=True), tmp_path / "float.onnx")
    out = tmp_path / "w8.onnx"
    report = ptqconv.convert(src, out, "WeightQuant", bit_num=8)
    assert not any(w.op_type == "LSTM" for w in report.quantized)
    assert ops(out)["Slice"] == 8 and ops(out)["LSTM"] == 1
