"""ReduceMean over every spatial axis written as GlobalAveragePool (passes.spatial_mean): the
same outputs, and a squeeze-and-excitation block that runs wholly as integer kernels."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from harness import optimized_ops, quantize_every_unit
from models import save
from onnx import TensorProto, helper, numpy_helper

from ptqconv.passes.spatial_mean import SpatialMeanPass

C = 8


def _weights(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)


def _se_block(opset: int = 13, axes: tuple[int, ...] = (2, 3), keepdims: int = 1,
              dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """Conv -> Relu -> squeeze-excite (ReduceMean, Conv, Relu, Conv, Sigmoid, Mul) -> Conv,
    or with keepdims=0 a classifier head (Conv -> Relu -> ReduceMean -> Gemm)."""
    rng = np.random.default_rng(0)
    inits = {"w1": _weights(rng, C, 3, 3, 3), "s1": _weights(rng, 4, C, 1, 1),
             "s2": _weights(rng, C, 4, 1, 1), "w2": _weights(rng, C, C, 1, 1),
             "fc": _weights(rng, C, 5)}
    reduce_inputs = ["a"]
    attrs = {"keepdims": keepdims}
    if opset >= 18:
        inits["axes"] = np.asarray(axes, np.int64)
        reduce_inputs.append("axes")
    else:
        attrs["axes"] = list(axes)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["a"]),
             helper.make_node("ReduceMean", reduce_inputs, ["m"], **attrs)]
    if keepdims:
        nodes += [helper.make_node("Conv", ["m", "s1"], ["e"]),
                  helper.make_node("Relu", ["e"], ["er"]),
                  helper.make_node("Conv", ["er", "s2"], ["f"]),
                  helper.make_node("Sigmoid", ["f"], ["g"]),
                  helper.make_node("Mul", ["a", "g"], ["se"]),
                  helper.make_node("Conv", ["se", "w2"], ["y"])]
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, 16, 16])
    else:
        nodes.append(helper.make_node("Gemm", ["m", "fc"], ["y"]))
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])
    if dtype != TensorProto.FLOAT:  # the mean of an integer tensor: not a pooling
        nodes[2].input[0] = "ai"
        nodes.insert(2, helper.make_node("Cast", ["a"], ["ai"], to=dtype))
        nodes.insert(4, helper.make_node("Cast", ["m"], ["mf"], to=TensorProto.FLOAT))
        for node in nodes[5:]:
            node.input[:] = ["mf" if i == "m" else i for i in node.input]
    graph = helper.make_graph(
        nodes, "se", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [out], [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _without_shapes(proto: onnx.ModelProto) -> ir.Model:
    """As ptqconv loads a simplified model: no intermediate shapes."""
    model = ir.from_proto(proto)
    for node in model.graph:
        for value in node.outputs:
            if not value.is_graph_output():
                value.shape = value.type = None
    return model


@pytest.mark.parametrize(("opset", "axes", "keepdims"), [
    (13, (2, 3), 1), (13, (-1, -2), 1), (18, (2, 3), 1), (13, (2, 3), 0), (18, (-2, -1), 0)])
def test_spatial_means_become_global_average_pools_with_the_same_outputs(opset, axes,
                                                                           keepdims):
    proto = _se_block(opset, axes, keepdims)
    model = _without_shapes(proto)
    assert SpatialMeanPass()(model).rewritten == 1
    ops = [n.op_type for n in model.graph]
    assert "ReduceMean" not in ops and ops.count("GlobalAveragePool") == 1
    assert ops.count("Flatten") == (0 if keepdims else 1)
    rewritten = ir.to_proto(model)
    onnx.checker.check_model(rewritten, full_check=True)
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(_run(rewritten, x), _run(proto, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", [
    {"axes": (1,)},  # over channels
    {"axes": (3,)},  # one spatial axis of two
    {"axes": (1, 2, 3)},
    {"dtype": TensorProto.INT32},
])
def test_other_means_are_left_alone(case):
    model = _without_shapes(_se_block(**case))
    assert not SpatialMeanPass()(model).modified
    assert "ReduceMean" in [n.op_type for n in model.graph]


def test_a_mean_whose_rank_cannot_be_told_is_left_alone():
    """A ReduceMean over axes 2 and 3 of a graph input of unknown rank (4-D or 5-D?)."""
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    assert not SpatialMeanPass()(model).modified


def test_a_squeeze_excite_block_runs_as_integer_kernels(tmp_path):
    """Quantized, the squeeze is a QLinearGlobalAveragePool on the integer conv's output:
    no DequantizeLinear, no float ReduceMean between the convs."""
    src = save(_se_block(), tmp_path / "float.onnx")
    out, data = quantize_every_unit(src, tmp_path)
    ops = optimized_ops(out, tmp_path)
    assert ops["QLinearGlobalAveragePool"] == 1 and ops["QLinearConv"] == 4, ops
    assert "ReduceMean" not in ops
    assert ops["DequantizeLinear"] == 1, ops  # the model's output only
    x = np.fromfile(next(iter(sorted(data.iterdir()))), np.float32).reshape(1, 3, 16, 16)
    expected, got = _run(onnx.load(src), x), _run(onnx.load(out), x)
    cosine = float((expected * got).sum() / np.linalg.norm(expected) / np.linalg.norm(got))
    assert cosine > 0.99


def test_a_broadcast_from_a_lower_rank_does_not_fool_the_rank():
    """Mul(constant [C, H, W], conv output [1, C, H, W]) is 4-D: a mean over axis 2 alone
    (H) is no global pool, though axis 2 is the last spatial axis of the constant's rank."""
    rng = np.random.default_rng(0)
    inits = {"w": _weights(rng, C, 3, 3, 3), "k": rng.standard_normal((C, 16, 16)).astype(
        np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 4),
             helper.make_node("Mul", ["k", "c"], ["b"]),
             helper.make_node("ReduceMean", ["b"], ["y"], axes=[2])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, 1, 16])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = _without_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    assert not SpatialMeanPass()(model).modified


def test_a_mean_inside_an_if_branch_gets_names_the_outer_graph_does_not_use():
    """A classifier-head mean (keepdims=0) in a branch over the outer conv's output: its new
    names must not shadow an outer value (here one called "m_pooled")."""
    rng = np.random.default_rng(0)
    then_graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["c"], ["m"], axes=[2, 3], keepdims=0)], "then", [],
        [helper.make_tensor_value_info("m", TensorProto.FLOAT, [1, C])])
    else_graph = helper.make_graph(
        [helper.make_node("ReduceMax", ["c"], ["n"], axes=[2, 3], keepdims=0)], "else", [],
        [helper.make_tensor_value_info("n", TensorProto.FLOAT, [1, C])])
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 4),
             helper.make_node("Identity", ["x"], ["m_pooled"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_graph,
                              else_branch=else_graph)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16]),
                     helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C]),
         helper.make_tensor_value_info("m_pooled", TensorProto.FLOAT, [1, 3, 16, 16])],
        [numpy_helper.from_array(_weights(rng, C, 3, 3, 3), "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model = ir.from_proto(proto)
    assert SpatialMeanPass()(model).rewritten == 1
    rewritten = ir.to_proto(model)
    then_branch = next(a.g for a in rewritten.graph.node[2].attribute if a.name == "then_branch")
    assert [n.op_type for n in then_branch.node] == ["GlobalAveragePool", "Flatten"]
    assert "m_pooled" not in then_branch.node[0].output
    x = rng.standard_normal((1, 3, 16, 16)).astype(np.float32)
    feeds = {"x": x, "cond": np.array(True)}
    got = ort.InferenceSession(rewritten.SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, feeds)
    expected = ort.InferenceSession(proto.SerializeToString(),
                                    providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5, atol=1e-6)
