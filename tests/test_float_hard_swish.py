"""Float hard-swish after a quantized tensor written as one HardSwish op
(passes.float_hard_swish): the same outputs, one DequantizeLinear where onnxruntime ran two."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from harness import optimized_ops
from onnx import TensorProto, helper, numpy_helper

from ptqconv.graph.naming import node_key
from ptqconv.passes.body_plan import plan_model
from ptqconv.passes.float_hard_swish import FloatHardSwishPass
from ptqconv.passes.qdq import QDQPass

SHAPE = [1, 4, 8, 8]


def _model(producer: str = "DequantizeLinear", alpha: float = 1 / 6, gate_output: bool = False,
           batch_norm_outputs: int = 0, opset: int = 13) -> onnx.ModelProto:
    """x -> Q -> DQ (or Relu) -> HardSigmoid(alpha, 0.5) * it -> y, as the QDQ pass leaves a
    hard-swish the plan keeps float."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"])]
    if producer == "DequantizeLinear":
        nodes.append(helper.make_node("DequantizeLinear", ["q", "s", "z"], ["f"]))
    else:
        nodes += [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
                  helper.make_node(producer, ["d"], ["f"])]
    nodes += [helper.make_node("HardSigmoid", ["f"], ["g"], alpha=alpha, beta=0.5),
              helper.make_node("Mul", ["f", "g"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, SHAPE)]
    if gate_output:
        outputs.append(helper.make_tensor_value_info("g", TensorProto.FLOAT, SHAPE))
    inits = {"s": np.float32(0.05), "z": np.uint8(128)}
    if batch_norm_outputs:
        channels = SHAPE[1]
        inits.update({k: np.ones(channels, np.float32) for k in ("bs", "bb", "bm", "bv")})
        extra = [f"b{i}" for i in range(batch_norm_outputs)]
        nodes.append(helper.make_node("BatchNormalization", ["y", "bs", "bb", "bm", "bv"],
                                      ["bn", *extra]))
        outputs = [helper.make_tensor_value_info("bn", TensorProto.FLOAT, SHAPE)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)], outputs,
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _outputs(proto: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def test_one_hard_swish_op_reads_the_dequantized_tensor_once(tmp_path):
    proto = _model()
    model = ir.from_proto(proto)
    result = FloatHardSwishPass()(model)
    assert result.rewritten == 1 and result.modified
    rewritten = ir.to_proto(model)
    assert [n.op_type for n in rewritten.graph.node] == [
        "QuantizeLinear", "DequantizeLinear", "HardSwish"]
    assert model.opset_imports[""] == 14
    assert [o.name for o in rewritten.graph.output] == ["y"]
    onnx.checker.check_model(rewritten, full_check=True)
    x = np.random.default_rng(0).uniform(-6, 6, SHAPE).astype(np.float32)
    np.testing.assert_allclose(_outputs(rewritten, x)[0], _outputs(proto, x)[0],
                               rtol=1e-6, atol=1e-6)
    # onnxruntime gives each reader of a DequantizeLinear its own copy: two before, one after.
    before, after = tmp_path / "before.onnx", tmp_path / "after.onnx"
    onnx.save(proto, before)
    onnx.save(rewritten, after)
    assert optimized_ops(before, tmp_path)["DequantizeLinear"] == 2
    # onnxruntime 1.32 expands the HardSwish function again (HardSigmoid, Mul), after
    # handing out the copies: the two read one DequantizeLinear.
    assert optimized_ops(after, tmp_path)["DequantizeLinear"] == 1


@pytest.mark.parametrize("case", [
    {"producer": "Relu"},  # a float producer (a float Conv fuses the pair instead)
    {"alpha": 0.2},  # a plain HardSigmoid gate, not hard-swish
    {"gate_output": True},  # the gate is read elsewhere too
    {"batch_norm_outputs": 2},  # opset 14 would change what this BatchNormalization means
])
def test_other_shapes_are_left_alone(case):
    model = ir.from_proto(_model(**case))
    before = [n.op_type for n in model.graph]
    assert not FloatHardSwishPass()(model).modified
    assert [n.op_type for n in model.graph] == before
    assert model.opset_imports[""] == 13


def test_newer_models_keep_their_opset():
    model = ir.from_proto(_model(opset=17))
    assert FloatHardSwishPass()(model).rewritten == 1
    assert model.opset_imports[""] == 17


def test_a_hard_swish_the_latency_plan_keeps_float_between_quantized_convs(tmp_path):
    """Conv -> hard-swish -> Conv with the hard-swish kept float for speed (the latency
    plan's float units read dequantized tensors): both convs still run as QLinearConv, the
    conv's output is dequantized once for the hard-swish, the outputs match the pair's."""
    rng = np.random.default_rng(5)
    inits = {"w1": rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * np.float32(0.3),
             "w2": rng.standard_normal((8, 8, 1, 1)).astype(np.float32) * np.float32(0.3)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1] * 4, name="conv1"),
             helper.make_node("HardSigmoid", ["a"], ["g"], alpha=1 / 6, beta=0.5, name="gate"),
             helper.make_node("Mul", ["a", "g"], ["h"], name="act"),
             helper.make_node("Conv", ["h", "w2"], ["y"], name="conv2")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    source = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    x = rng.standard_normal((1, 3, 16, 16)).astype(np.float32)
    session = ort.InferenceSession(source.SerializeToString(), providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": x})[0]
    ranges = {"x": (float(x.min()), float(x.max())), "a": (-4.0, 4.0), "h": (-0.5, 4.0),
              "y": (float(y.min()), float(y.max()))}
    model = ir.from_proto(source)
    kept = frozenset(node_key(n) for n in model.graph if n.name in ("gate", "act"))
    plan = plan_model(model.graph, float_units=kept)
    QDQPass(plan, ranges, 8)(model)
    pair = tmp_path / "pair.onnx"
    onnx.save(ir.to_proto(model), pair)
    assert FloatHardSwishPass()(model).rewritten == 1
    swish = tmp_path / "swish.onnx"
    onnx.save(ir.to_proto(model), swish)
    before, after = optimized_ops(pair, tmp_path), optimized_ops(swish, tmp_path)
    assert before["QLinearConv"] == after["QLinearConv"] == 2, after
    # conv1's output: one DequantizeLinear for each half of the pair before, one after.
    assert before["DequantizeLinear"] - after["DequantizeLinear"] == 1, (before, after)
    np.testing.assert_allclose(_outputs(onnx.load(swish), x)[0], _outputs(onnx.load(pair), x)[0],
                               rtol=1e-5, atol=1e-5)
