"""The QDQ planner on tiny graphs: which nodes become integer units, which tensors get Q/DQ."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from ptqconv.passes.qdq_plan import PlannedBias, PlannedWeight, plan_quantization


def _graph(nodes, inputs, outputs, weights) -> ir.Graph:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in weights.items()]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.from_proto(model).graph


def _node(graph: ir.Graph, name: str) -> ir.Node:
    return next(n for n in graph if n.name == name)


def conv_relu_conv() -> ir.Graph:
    return _graph(
        [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1"),
         helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
         helper.make_node("MaxPool", ["r1"], ["p1"], name="pool", kernel_shape=[2, 2]),
         helper.make_node("Conv", ["p1", "w2"], ["y"], name="conv2")],
        {"x": [1, 3, 8, 8]}, ["y"], {"w1": (4, 3, 3, 3), "b1": (4,), "w2": (2, 4, 1, 1)})


def test_convs_fold_their_relu_share_through_data_movement_and_quantize_weights():
    graph = conv_relu_conv()
    plan = plan_quantization(graph)
    conv1, conv2 = _node(graph, "conv1"), _node(graph, "conv2")
    assert plan.units == [conv1, conv2]
    # The Relu output is quantized in place of the conv output (zp = qmin absorbs the Relu),
    # the MaxPool output reuses its input's grid, and a conv output is always quantized.
    assert plan.folded == {"c1": "r1"}
    assert plan.observe == ["x", "r1", "y"]
    assert plan.shared == {"p1": "r1"}
    assert plan.weights == [PlannedWeight(conv1, 1, 0), PlannedWeight(conv2, 1, 0)]
    assert plan.biases == [PlannedBias(conv1, 2, conv1)]
    assert plan.quantized_tensors() == ["x", "r1", "y", "p1"]


def test_skipped_nodes_and_float_tensors_stay_float():
    graph = conv_relu_conv()
    plan = plan_quantization(graph, skip=frozenset({"conv2"}))
    assert [n.name for n in plan.units] == ["conv1"]
    assert _node(graph, "conv2") in plan.skipped
    assert "y" not in plan.observe  # nothing integer reads or writes it any more
    plan = plan_quantization(graph, float_tensors=frozenset({"p1"}))
    # conv2 reads a tensor that must stay float, so it cannot be an integer unit.
    assert [n.name for n in plan.units] == ["conv1"] and "p1" not in plan.observe
    plan = plan_quantization(graph, float_tensors=frozenset({"r1"}))
    # The pooled tensor no longer shares a float source's grid: it needs its own range.
    assert "r1" not in plan.observe and "p1" in plan.observe and plan.shared == {}


def transformer_block() -> ir.Graph:
    return _graph(
        [helper.make_node("MatMul", ["x", "wq"], ["q"], name="proj"),
         helper.make_node("Add", ["q", "bq"], ["qb"], name="bias"),
         helper.make_node("LayerNormalization", ["qb", "gamma"], ["n"], name="norm", axis=-1),
         helper.make_node("MatMul", ["n", "wk"], ["k"], name="proj2"),
         helper.make_node("Softmax", ["k"], ["s"], name="softmax", axis=-1),
         helper.make_node("MatMul", ["s", "wv"], ["y"], name="proj3")],
        {"x": [1, 4, 8]}, ["y"],
        {"wq": (8, 8), "bq": (8,), "gamma": (8,), "wk": (8, 8), "wv": (8, 6)})


def test_matmuls_before_float_ops_keep_a_float_output_and_an_int32_bias():
    graph = transformer_block()
    plan = plan_quantization(graph)
    proj, bias = _node(graph, "proj"), _node(graph, "bias")
    assert [n.name for n in plan.units] == ["proj", "proj2", "softmax", "proj3"]
    # proj's output feeds only float ops (Add, LayerNorm): MatMulIntegerToFloat / QGemm, with
    # the constant bias of the Add through int32 so onnxruntime's MatMul + Add is a QGemm.
    assert "q" not in plan.observe and "qb" not in plan.observe
    assert PlannedBias(bias, 1, proj) in plan.biases
    # Softmax output has the fixed grid onnxruntime's QLinearSoftmax wants.
    assert plan.fixed == {"s": (0.0, 1.0)}
    # The last MatMul writes a model output: a float output, nothing to observe there.
    assert plan.observe == ["x", "n", "k"]


def test_elementwise_units_need_quantized_inputs_and_an_integer_reader():
    graph = _graph(
        [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1"),
         helper.make_node("Conv", ["x", "w2"], ["b"], name="conv2"),
         helper.make_node("Add", ["a", "b"], ["s"], name="add"),
         helper.make_node("Conv", ["s", "w3"], ["c"], name="conv3"),
         helper.make_node("Add", ["c", "x"], ["t"], name="residual"),
         helper.make_node("Sub", ["t", "x"], ["y"], name="sub")],
        {"x": [1, 2, 4, 4]}, ["y"],
        {"w1": (2, 2, 1, 1), "w2": (2, 2, 1, 1), "w3": (2, 2, 1, 1)})
    plan = plan_quantization(graph)
    names = [n.name for n in plan.units]
    # `add` sums two quantized conv outputs for a conv: QLinearAdd. `residual` feeds only a
    # float Sub, so Q/DQ there would only add noise.
    assert names == ["conv1", "conv2", "add", "conv3"]
    assert "t" not in plan.observe


def test_a_matmul_summed_with_a_computed_tensor_gets_a_quantized_output():
    # onnxruntime would fuse MatMul + Add(computed) into a float Gemm on dequantized weights;
    # a quantized output puts Q between them. A constant bias keeps the float output (QGemm).
    graph = _graph(
        [helper.make_node("MatMul", ["x", "wa"], ["a"], name="mm_a"),
         helper.make_node("MatMul", ["h", "wb"], ["b"], name="mm_b"),
         helper.make_node("Add", ["a", "b"], ["s"], name="sum"),
         helper.make_node("Tanh", ["s"], ["y"], name="tanh"),
         helper.make_node("MatMul", ["x", "wc"], ["c"], name="mm_c"),
         helper.make_node("Add", ["c", "bias"], ["z"], name="bias_add")],
        {"x": [1, 8], "h": [1, 8]}, ["y", "z"],
        {"wa": (8, 8), "wb": (8, 8), "wc": (8, 8), "bias": (8,)})
    plan = plan_quantization(graph)
    assert {"a", "b"} <= set(plan.observe) and "c" not in plan.observe
    assert _node(graph, "sum") not in plan.units  # no integer op reads the sum
    assert PlannedBias(_node(graph, "bias_add"), 1, _node(graph, "mm_c")) in plan.biases


def test_body_weight_ops_below_the_gate_stay_float():
    from cf_models import loop_model

    from ptqconv.passes.body_plan import BODY_MIN_MACS, plan_model

    for hidden, quantized in ((64, False), (256, True)):
        graph = ir.from_proto(loop_model(hidden)).graph
        plan = plan_model(graph)
        assert plan.units == []  # nothing in the main graph
        (body,) = plan.bodies
        assert body.body.label == "Loop time_loop.body"
        weight_ops = [n for n in body.plan.units if n.op_type == "MatMul"]
        assert len(weight_ops) == (6 if quantized else 0)
        assert (hidden * hidden >= BODY_MIN_MACS) == quantized
        if not quantized:
            assert len(body.kept_float) == 6 and body.reason
            assert body.plan.observe == []
        else:
            # The carried state and the step's input are quantized inside the body.
            assert {"h_in", "x_t"} <= set(body.plan.observe)


def test_activations_between_units_are_units_and_tanh_gets_its_fixed_grid():
    graph = _graph(
        [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1"),
         helper.make_node("HardSigmoid", ["a"], ["g"], name="gate", alpha=0.2, beta=0.5),
         helper.make_node("Mul", ["a", "g"], ["h"], name="swish"),
         helper.make_node("Conv", ["h", "w2"], ["b"], name="conv2"),
         helper.make_node("Tanh", ["b"], ["t"], name="tanh"),
         helper.make_node("Conv", ["t", "w3"], ["c"], name="conv3"),
         helper.make_node("HardSigmoid", ["c"], ["y"], name="last", alpha=0.2, beta=0.5)],
        {"x": [1, 2, 4, 4]}, ["y"],
        {"w1": (2, 2, 1, 1), "w2": (2, 2, 1, 1), "w3": (2, 2, 1, 1)})
    plan = plan_quantization(graph)
    # The last HardSigmoid writes a model output: no integer op reads it, so it stays float.
    assert [n.name for n in plan.units] == ["conv1", "gate", "swish", "conv2", "tanh", "conv3"]
    assert plan.fixed == {"t": (-1.0, 1.0)}
    assert "g" in plan.observe and "t" not in plan.observe


def test_an_add_of_a_scalar_is_no_unit_but_a_mul_by_one_is():
    graph = _graph(
        [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1"),
         helper.make_node("Add", ["a", "shift"], ["b"], name="shift"),
         helper.make_node("Conv", ["b", "w2"], ["c"], name="conv2"),
         helper.make_node("Mul", ["c", "scale"], ["d"], name="scale"),
         helper.make_node("Conv", ["d", "w3"], ["y"], name="conv3")],
        {"x": [1, 2, 4, 4]}, ["y"],
        {"w1": (2, 2, 1, 1), "w2": (2, 2, 1, 1), "w3": (2, 2, 1, 1), "shift": (1,),
         "scale": (1,)})
    # QLinearAdd would round b once more; the shift stays float, between DQ and Q.
    assert [n.name for n in plan_quantization(graph).units] == [
        "conv1", "conv2", "scale", "conv3"]


def test_every_part_of_a_split_shares_its_input_grid():
    graph = _graph(
        [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
         helper.make_node("Split", ["c1"], ["h0", "h1"], name="split", axis=1),
         helper.make_node("Conv", ["h1", "w2"], ["c2"], name="conv2"),
         helper.make_node("Concat", ["h0", "c2"], ["cat"], name="concat", axis=1),
         helper.make_node("Conv", ["cat", "w3"], ["y"], name="conv3")],
        {"x": [1, 3, 8, 8]}, ["y"], {"w1": (4, 3, 1, 1), "w2": (2, 2, 1, 1), "w3": (2, 4, 1, 1)})
    plan = plan_quantization(graph)
    # A Split read only by units: conv1's output is quantized and both halves reuse its grid.
    assert [n.name for n in plan.units] == ["conv1", "conv2", "concat", "conv3"]
    assert plan.shared == {"h0": "c1", "h1": "c1"}
    assert plan.observe == ["x", "c1", "c2", "cat", "y"]


def test_a_unit_kept_float_for_speed_still_feeds_integer_units():
    from ptqconv.graph.naming import node_key

    graph = _graph(
        [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
         helper.make_node("Conv", ["x", "w2"], ["c2"], name="conv2"),
         helper.make_node("Concat", ["c1", "c2"], ["cat"], name="concat", axis=1),
         helper.make_node("Conv", ["cat", "w3"], ["y"], name="conv3")],
        {"x": [1, 3, 8, 8]}, ["y"], {"w1": (2, 3, 1, 1), "w2": (2, 3, 1, 1), "w3": (2, 4, 1, 1)})
    plan = plan_quantization(graph, float_units=frozenset({node_key(_node(graph, "conv1"))}))
    # The latency plan costed conv1 float with its output quantized for the Concat: the
    # Concat stays integer (before, it went float with it, and the Concat's other input too).
    assert [n.name for n in plan.units] == ["conv2", "concat", "conv3"]
    assert plan.observe == ["x", "c2", "c1", "cat", "y"]
