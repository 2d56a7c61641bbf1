"""Constant Mul/Add next to Convs folded into them: the same function, fewer ops."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from ptqconv.passes.fold_affine import FoldAffinePass


def _model(pads: int, per_channel: bool, channels: int = 4) -> onnx.ModelProto:
    """Paddle's learnable affine blocks: x -> Conv -> Mul(a) -> Add(b) -> Relu ->
    Mul(c) -> Add(d) -> Conv -> y, with the constants first as Paddle writes them."""
    rng = np.random.default_rng(0)
    a = rng.uniform(0.5, 2, (channels, 1, 1)) if per_channel else np.array([1.7])
    inits = {"w1": rng.standard_normal((channels, 3, 3, 3)), "b1": rng.standard_normal(channels),
             "w2": rng.standard_normal((2, channels, 3, 3)), "a": a, "b": np.array([0.3]),
             "c": np.array([0.8]), "d": np.array([-0.4])}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 4),
             helper.make_node("Mul", ["a", "c1"], ["m1"]),
             helper.make_node("Add", ["m1", "b"], ["a1"]),
             helper.make_node("Relu", ["a1"], ["r"]),
             helper.make_node("Mul", ["c", "r"], ["m2"]),
             helper.make_node("Add", ["m2", "d"], ["a2"]),
             helper.make_node("Conv", ["a2", "w2"], ["y"], pads=[pads] * 4)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize(("pads", "per_channel", "ops"), [
    (0, False, ["Conv", "Relu", "Conv"]),
    (0, True, ["Conv", "Relu", "Conv"]),
    # Zero padding would not see the shift d: it stays, as d / c before the second Conv.
    (1, False, ["Conv", "Relu", "Add", "Conv"]),
])
def test_affine_ops_fold_into_the_convs_exactly(pads, per_channel, ops):
    proto = _model(pads, per_channel)
    model = ir.from_proto(proto)
    assert FoldAffinePass()(model).modified
    assert [n.op_type for n in model.graph] == ops
    # The first Conv writes the name the Add had.
    assert model.graph.node(0).outputs[0].name == "a1"
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    before = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    after = ort.InferenceSession(ir.to_proto(model).SerializeToString(),
                                 providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(after.run(None, {"x": x})[0], before.run(None, {"x": x})[0],
                               rtol=1e-4, atol=1e-4)


def test_a_conv_output_read_twice_is_left_alone():
    proto = _model(0, False)
    # r also feeds the graph output: the Mul(c) -> Add(d) could still fold into conv2, but
    # c1 feeding two nodes cannot take a's scaling.
    proto.graph.node[1].input[1] = "x1"
    proto.graph.node.insert(1, helper.make_node("Identity", ["c1"], ["x1"]))
    proto.graph.output.append(helper.make_tensor_value_info("c1", TensorProto.FLOAT, None))
    model = ir.from_proto(proto)
    FoldAffinePass()(model)
    assert [n.op_type for n in model.graph][:4] == ["Conv", "Identity", "Mul", "Add"]


def test_the_folded_constants_are_not_left_in_the_output(tmp_path):
    from models import random_samples

    from ptqconv.cli import main

    src = tmp_path / "float.onnx"
    # Wide enough that the quantized model is the smaller one, and written.
    onnx.save(_model(0, False, channels=64), str(src))
    data = random_samples(tmp_path / "x", 4, seed=0, shape=(1, 3, 8, 8))
    (tmp_path / "c.ini").write_text(f"[data_preprocess_param]\ncalibrate_path=x:{data}\n"
                                    "[full_quant_param]\nlatency_aware=false\n")
    out = tmp_path / "q.onnx"
    assert main(["--quantType=PostTraining", "--quiet", f"--modelFile={src}",
                 f"--outputFile={out}", f"--configFile={tmp_path / 'c.ini'}"]) == 0
    # a, b, c, d live on in the convs' weights; unread initializers made onnxruntime warn
    # about each one on every load (99 in PP-OCRv4's detector).
    model = onnx.load(str(out))
    read = {i for node in model.graph.node for i in node.input}
    assert [t.name for t in model.graph.initializer if t.name not in read] == []
