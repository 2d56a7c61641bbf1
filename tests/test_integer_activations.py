"""Activations without an onnxruntime integer kernel, run as integer kernels: each form against
the exact table of the float function followed by quantization, on all 256 input codes."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from harness import optimized_ops, quantize_every_unit
from lut_reference import hard_sigmoid, hard_swish, lookup_table, silu
from models import save
from onnx import TensorProto, helper, numpy_helper

from ptqconv import qparams
from ptqconv.passes.hard_swish import HardSwishPass
from ptqconv.passes.integer_activations import IntegerActivationsPass

GRID = qparams.activation_grid(8)
SETTINGS = 24  # random input grids per function


def _params(lo: float, hi: float) -> tuple[float, int]:
    scale, zp = qparams.scale_zero_point(lo, hi, GRID)
    return float(scale), int(zp)


def _chain(op: str, si: float, zi: int, so: float, zo: int, **attrs) -> onnx.ModelProto:
    """uint8 codes -> DQ -> fn -> Q, laid out as the QDQ pass writes it. "HardSwish" is the
    planner's form: HardSigmoid on its own [0, 1] grid, then Mul(x, gate)."""
    const = {"si": np.float32(si), "zi": np.uint8(zi), "so": np.float32(so), "zo": np.uint8(zo),
             "sg": np.float32(1 / 255), "z0": np.uint8(0)}
    nodes = [helper.make_node("DequantizeLinear", ["x", "si", "zi"], ["f"])]
    if op == "HardSwish":
        nodes += [helper.make_node("HardSigmoid", ["f"], ["g"], alpha=1 / 6, beta=0.5),
                  helper.make_node("QuantizeLinear", ["g", "sg", "z0"], ["gq"]),
                  helper.make_node("DequantizeLinear", ["gq", "sg", "z0"], ["gd"]),
                  helper.make_node("Mul", ["f", "gd"], ["h"])]
    elif op == "SiLU":
        nodes += [helper.make_node("Sigmoid", ["f"], ["g"]),
                  helper.make_node("QuantizeLinear", ["g", "sg", "z0"], ["gq"]),
                  helper.make_node("DequantizeLinear", ["gq", "sg", "z0"], ["gd"]),
                  helper.make_node("Mul", ["f", "gd"], ["h"])]
    else:
        nodes.append(helper.make_node(op, ["f"], ["h"], **attrs))
    nodes.append(helper.make_node("QuantizeLinear", ["h", "so", "zo"], ["y"]))
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.UINT8, [256])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [256])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in const.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _run(proto: onnx.ModelProto, tmp_path) -> tuple[np.ndarray, collections.Counter]:
    """The codes onnxruntime computes after the pass, and the ops it runs them with."""
    model = ir.from_proto(proto)
    IntegerActivationsPass(GRID)(model)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    codes = session.run(None, {"x": np.arange(256, dtype=np.uint8)})[0]
    ops = collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath)
                              .graph.node)
    return codes, ops


CASES = {
    # name: (op, attrs, function, input range, output grid)
    "HardSigmoid": ("HardSigmoid", {"alpha": 1 / 6, "beta": 0.5}, hard_sigmoid(1 / 6, 0.5),
                    (-5, 5), "observed"),
    "HardSigmoid(0.2)": ("HardSigmoid", {"alpha": 0.2, "beta": 0.5}, hard_sigmoid(0.2, 0.5),
                         (-4, 4), "observed"),
    "HardSwish": ("HardSwish", {}, hard_swish, (-8, 8), "observed"),
    "Tanh": ("Tanh", {}, np.tanh, (-4, 4), "fixed"),
    "SiLU": ("SiLU", {}, silu, (-8, 8), "observed"),
}
# (kernels onnxruntime must run, at most this many codes off by one, largest difference)
EXPECTED = {
    "HardSigmoid": ({"QLinearAdd"}, 0.01, 1),
    "HardSigmoid(0.2)": ({"QLinearAdd"}, 0.01, 1),
    # The gate is rounded to 1/255 before the product: a second rounding.
    "HardSwish": ({"QLinearAdd", "QLinearMul"}, 0.05, 1),
    "Tanh": ({"QLinearSigmoid"}, 0.01, 1),
    "SiLU": ({"QLinearSigmoid", "QLinearMul"}, 0.15, 2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_form_runs_as_integer_kernels_and_matches_the_exact_table(tmp_path, name):
    op, attrs, fn, (lo, hi), grid = CASES[name]
    kernels, share, largest = EXPECTED[name]
    rng = np.random.default_rng(13)
    differ = worst = 0
    for _ in range(SETTINGS):
        si, zi = _params(lo * rng.uniform(0.3, 1.5), hi * rng.uniform(0.3, 1.5))
        xs = (np.arange(256) - zi).astype(np.float32).astype(np.float64) * np.float32(si)
        ys = fn(xs)
        if grid == "fixed":
            scale, zp = qparams.fixed_scale_zero_point(-1.0, 1.0, GRID)
            so, zo = float(scale), int(zp)
        else:  # the calibrated range of the output, as MAX_MIN gives it
            so, zo = _params(float(ys.min()), float(ys.max()))
        codes, ops = _run(_chain(op, si, zi, so, zo, **attrs), tmp_path)
        assert kernels <= set(ops) and not {"HardSigmoid", "Tanh", "Sigmoid"} & set(ops), ops
        exact = lookup_table(fn, si, zi, so, zo)
        diff = np.abs(codes.astype(int) - exact.astype(int))
        differ += int((diff > 0).sum())
        worst = max(worst, int(diff.max()))
    assert worst <= largest and differ <= share * 256 * SETTINGS, (differ, worst)


def test_grids_the_integer_forms_cannot_take_stay_float(tmp_path):
    # A HardSigmoid output with zp 5 would not be clipped at 0 by uint8 saturation; a Tanh
    # grid whose step is not 1/k cannot move the sigmoid's zero point by an integer.
    for proto in (_chain("HardSigmoid", 0.05, 128, 1 / 255, 5, alpha=0.2, beta=0.5),
                  _chain("Tanh", 0.05, 128, 2 / 255, 128)):
        model = ir.from_proto(proto)
        assert not IntegerActivationsPass(GRID)(model).modified
        assert {"HardSigmoid", "Tanh"} & {n.op_type for n in model.graph}


def _hard_swish_model(form: str) -> onnx.ModelProto:
    """x -> Conv -> hard-swish spelled as `form` -> Conv -> y."""
    rng = np.random.default_rng(0)
    k = {"c3": 3.0, "c0": 0.0, "c6": 6.0, "sixth": 1 / 6}
    inits = [numpy_helper.from_array(np.float32(v), name) for name, v in k.items()]
    inits += [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1"),
              numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1] * 4)]
    if form == "op":
        nodes.append(helper.make_node("HardSwish", ["a"], ["h"]))
    else:
        nodes += [helper.make_node("Add", ["c3", "a"], ["s"]),
                  helper.make_node("Clip", ["s", "c0", "c6"], ["r"])]
        if form == "x*clip/6":
            nodes += [helper.make_node("Mul", ["a", "r"], ["m"]),
                      helper.make_node("Div", ["m", "c6"], ["h"])]
        else:  # x * (clip * 1/6)
            nodes += [helper.make_node("Mul", ["r", "sixth"], ["m"]),
                      helper.make_node("Mul", ["a", "m"], ["h"])]
    nodes.append(helper.make_node("Conv", ["h", "w2"], ["y"]))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


@pytest.mark.parametrize("form", ["op", "x*clip/6", "x*(clip*1/6)"])
def test_every_spelling_of_hard_swish_becomes_hard_sigmoid_times_x(form, run):
    proto = _hard_swish_model(form)
    model = ir.from_proto(proto)
    assert HardSwishPass()(model).modified
    ops = [n.op_type for n in model.graph]
    assert ops == ["Conv", "HardSigmoid", "Mul", "Conv"]
    gate = model.graph.node(1)
    assert gate.attributes["alpha"].as_float() == pytest.approx(1 / 6)
    assert "h" in {v.name for n in model.graph for v in n.outputs}  # the user's name stays
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32) * 3
    before = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    after = ort.InferenceSession(ir.to_proto(model).SerializeToString(),
                                 providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(after.run(None, {"x": x})[0], before.run(None, {"x": x})[0],
                               rtol=1e-5, atol=1e-5)


def test_a_clip_that_is_not_hard_swish_is_left_alone():
    proto = _hard_swish_model("x*clip/6")
    for init in proto.graph.initializer:
        if init.name == "c6":  # Clip(x + 3, 0, 6) / 6 becomes Clip(x + 3, 0, 5) / 5
            init.CopyFrom(numpy_helper.from_array(np.float32(5.0), "c6"))
    model = ir.from_proto(proto)
    assert not HardSwishPass()(model).modified


def test_mobilenet_v3_blocks_run_without_going_back_to_float(tmp_path, capsys):
    """Conv -> hard-swish -> depthwise Conv -> squeeze-excite (GlobalAveragePool, Conv,
    Relu, Conv, HardSigmoid 0.2, Mul) -> Conv: every op an integer kernel."""
    rng = np.random.default_rng(3)
    c = 8

    def w(*shape):
        return rng.standard_normal(shape).astype(np.float32) * np.float32(1 / np.sqrt(
            np.prod(shape[1:])))

    inits = {"w1": w(c, 3, 3, 3), "w2": w(c, 1, 3, 3), "s1": w(4, c, 1, 1), "s2": w(c, 4, 1, 1),
             "w3": w(4, c, 1, 1), "c3": np.float32(3), "c0": np.float32(0), "c6": np.float32(6)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1] * 4),
             helper.make_node("Add", ["a", "c3"], ["a3"]),
             helper.make_node("Clip", ["a3", "c0", "c6"], ["ar"]),
             helper.make_node("Mul", ["a", "ar"], ["am"]),
             helper.make_node("Div", ["am", "c6"], ["h"]),
             helper.make_node("Conv", ["h", "w2"], ["d"], pads=[1] * 4, group=c),
             helper.make_node("Relu", ["d"], ["dr"]),
             helper.make_node("GlobalAveragePool", ["dr"], ["p"]),
             helper.make_node("Conv", ["p", "s1"], ["e"]),
             helper.make_node("Relu", ["e"], ["er"]),
             helper.make_node("Conv", ["er", "s2"], ["f"]),
             helper.make_node("HardSigmoid", ["f"], ["g"], alpha=0.2, beta=0.5),
             helper.make_node("Mul", ["dr", "g"], ["se"]),
             helper.make_node("Conv", ["se", "w3"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    src = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]),
               tmp_path / "float.onnx")
    # Small enough that float would be faster: quantize all of it anyway.
    out, _ = quantize_every_unit(src, tmp_path)
    assert "integer activations: 2 HardSigmoid as QLinearAdd" in capsys.readouterr().out
    ops = optimized_ops(out, tmp_path)
    assert ops["QLinearConv"] == 5 and ops["QLinearGlobalAveragePool"] == 1
    assert ops["QLinearAdd"] == 2 and ops["QLinearMul"] == 2
    # Only the model output goes back to float.
    assert ops["DequantizeLinear"] == 1
    assert not {"HardSigmoid", "Add", "Mul", "Clip", "Div", "Conv"} & set(ops), ops
