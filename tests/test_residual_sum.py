"""Residual Adds before LayerNormalization written as Sum when onnxruntime's fused
SkipLayerNormalization measures slower here: the same numbers, no fusion, the choice reported."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import run_model
from harness import optimized_ops
from models import save, write_samples
from onnx import TensorProto, helper, numpy_helper

import ptqconv
from ptqconv import runtime
from ptqconv.passes.residual_sum import DEFAULT_TOKENS, ResidualSum, ResidualSumPass
from ptqconv.runtime import Latency

TOKENS, HIDDEN = 8, 32


def block(seed: int = 0) -> onnx.ModelProto:
    """x -> MatMul -> residual Add -> LayerNormalization -> MatMul; and three Adds the fusion
    would not take: one read twice, one feeding LayerNormalization's scale, one an output."""
    rng = np.random.default_rng(seed)
    w = [(rng.standard_normal((HIDDEN, HIDDEN)) / 6).astype(np.float32) for _ in range(2)]
    ones, zeros = np.ones(HIDDEN, np.float32), np.zeros(HIDDEN, np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h"], name="proj"),
        helper.make_node("Add", ["x", "h"], ["res"], name="residual"),
        helper.make_node("LayerNormalization", ["res", "g", "b"], ["n"], name="ln", axis=-1),
        helper.make_node("MatMul", ["n", "w1"], ["m"], name="out"),
        helper.make_node("Add", ["m", "h"], ["twice"], name="read_twice"),
        helper.make_node("LayerNormalization", ["twice", "g", "b"], ["n2"], name="ln2",
                         axis=-1),
        helper.make_node("Add", ["n2", "twice"], ["y"], name="output_add"),
        helper.make_node("Add", ["g", "g"], ["g2"], name="scale_add"),
        helper.make_node("LayerNormalization", ["y", "g2", "b"], ["z"], name="ln3", axis=-1),
    ]
    shape = [1, TOKENS, HIDDEN]
    graph = helper.make_graph(
        nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, shape),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(w[0], "w0"), numpy_helper.from_array(w[1], "w1"),
         numpy_helper.from_array(ones, "g"), numpy_helper.from_array(zeros, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_only_the_adds_onnxruntime_would_fuse_become_sum_with_the_same_outputs(tmp_path):
    src = save(block(), tmp_path / "float.onnx")
    model = ir.load(src)
    assert ResidualSumPass()(model).rewritten == ["residual"]
    out = tmp_path / "sum.onnx"
    ir.save(model, out)
    x = np.random.default_rng(1).standard_normal((1, TOKENS, HIDDEN)).astype(np.float32)
    unfused = run_model(src, {"x": x}, level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    for got, want, fused in zip(run_model(out, {"x": x}), unfused, run_model(src, {"x": x}),
                                strict=True):
        np.testing.assert_array_equal(got, want)  # the model's own ops, bit for bit
        np.testing.assert_allclose(got, fused, atol=1e-5)  # the fused kernel rounds otherwise
    assert optimized_ops(src, tmp_path)["SkipLayerNormalization"] == 1
    assert optimized_ops(out, tmp_path)["SkipLayerNormalization"] == 0


def _timed(monkeypatch, fused: float, unfused: float) -> list[tuple[int, int]]:
    """onnxruntime's fusion 'measured' at these figures; the [tokens, hidden] asked for."""
    asked = []

    def timing(hidden, tokens, threads=0):
        asked.append((tokens, hidden))
        return Latency({"fused": fused, "unfused": unfused}, 10, 2, "test CPU")

    monkeypatch.setattr(runtime, "skip_layer_norm_ms", timing)
    return asked


def test_margin_keeps_noise_from_flipping_the_choice():
    def timed(fused: float, unfused: float) -> bool:
        return ResidualSum(1, (8, 32), fused, unfused, "cpu").applied

    # Transformer shapes measure 3-6x; a tiny block 0.025 against 0.022 ms, run to run.
    assert timed(0.57, 0.11) and timed(1.0, 0.66)
    assert not timed(1.0, 0.7) and not timed(0.025, 0.022) and not timed(0.014, 0.013)


@pytest.mark.parametrize(("fused", "unfused", "written"), [(0.6, 0.1, "Sum"), (0.1, 0.1, "Add")])
def test_conversion_measures_and_reports_the_choice(tmp_path, monkeypatch, fused, unfused,
                                                    written):
    asked = _timed(monkeypatch, fused, unfused)
    src = save(block(), tmp_path / "float.onnx")
    rng = np.random.default_rng(2)
    data = write_samples(tmp_path / "x", (rng.standard_normal((1, TOKENS, HIDDEN))
                                          .astype(np.float32) for _ in range(6)))
    config = tmp_path / "c.ini"
    config.write_text(f"[data_preprocess_param]\ncalibrate_path=x:{data}\n[full_quant_param]\n"
                      "activation_quant_method=MAX_MIN\nlatency_aware=false\n"
                      "measure_latency=false\n")
    out = tmp_path / "q.onnx"
    report = ptqconv.convert(src, out, "PostTraining", config_file=config)
    # The hidden size comes from the LayerNormalization's scale; onnxruntime's simplified
    # graph carries no intermediate shapes, so the tokens are the default.
    assert asked == [(DEFAULT_TOKENS, HIDDEN)]
    summary = report.post_training.residual_sum
    assert summary is not None and summary.adds == 1
    verb = "written as Sum" if written == "Sum" else "kept"
    assert (f"residual Adds before LayerNormalization: 1 {verb} (onnxruntime's "
            f"SkipLayerNormalization fusion {fused:.3f} ms, unfused {unfused:.3f} ms at "
            f"[{DEFAULT_TOKENS}, {HIDDEN}] on test CPU)") in report.format()
    ops = {n.name: n.op_type for n in onnx.load(str(out)).graph.node}
    assert ops["residual"] == written


def test_dynamic_quant_outputs_get_the_same_measured_rewrite(tmp_path, monkeypatch):
    _timed(monkeypatch, 0.6, 0.1)
    src = save(block(), tmp_path / "float.onnx")
    out = tmp_path / "dyn.onnx"
    report = ptqconv.convert(src, out, "DynamicQuant")
    assert report.dynamic.residual_sum is not None and report.dynamic.residual_sum.applied
    assert "residual Adds before LayerNormalization: 1 written as Sum" in report.format()
    assert {n.name: n.op_type for n in onnx.load(str(out)).graph.node}["residual"] == "Sum"
    x = np.random.default_rng(3).standard_normal((1, TOKENS, HIDDEN)).astype(np.float32)
    got, want = run_model(out, {"x": x})[0], run_model(src, {"x": x})[0]
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_weight_only_outputs_get_the_same_measured_rewrite(tmp_path, monkeypatch):
    _timed(monkeypatch, 0.6, 0.1)
    src = save(block(), tmp_path / "float.onnx")
    out = tmp_path / "w8.onnx"
    report = ptqconv.convert(src, out, "WeightQuant", bit_num=8, quant_weight_channel=0)
    assert report.weight_quant.residual_sum is not None
    assert "residual Adds before LayerNormalization: 1 written as Sum" in report.format()
    assert {n.name: n.op_type for n in onnx.load(str(out)).graph.node}["residual"] == "Sum"
