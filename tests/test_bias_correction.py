"""Bias correction from the mean input: equal to averaging the layer's weight error over the
calibration outputs, for every padding, stride, dilation and group."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from ptqconv.passes.bias_correction import InputMean, _conv_shift, _gemm_shift


def _layer(op: str, x_shape, w: np.ndarray, **attributes) -> tuple[ir.Node, bytes]:
    node = helper.make_node(op, ["x", "w"], ["y"], **attributes)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, list(x_shape))], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return ir.from_proto(model).graph.node(0), model.SerializeToString()


def _measured(model: bytes, samples: list[np.ndarray], axis: int) -> np.ndarray:
    """The mean over samples and positions of op(x, error), per output channel: what the
    twin nodes of a measuring pass computed."""
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    means = []
    for x in samples:
        (y,) = session.run(None, {"x": x})
        means.append(y.mean(axis=tuple(i for i in range(y.ndim) if i != axis % y.ndim),
                            dtype=np.float64))
    return np.mean(means, axis=0)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.sampled_from([1, 2, 3]), st.integers(1, 3), st.integers(1, 2),
       st.integers(0, 2), st.sampled_from(["NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]),
       st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_conv_shift_equals_the_mean_of_the_weight_error_applied(
        group, kernel, stride, dilation, pad, auto_pad, per_group, seed):
    assume(not (auto_pad.startswith("SAME") and dilation > 1))  # onnxruntime refuses these
    rng = np.random.default_rng(seed)
    channels = group * per_group
    outputs = group * 2
    error = (rng.standard_normal((outputs, per_group, kernel, kernel)) * 0.01).astype(np.float32)
    shape = (1, channels, 7, 6)
    attributes = {"group": group, "strides": [stride, stride],
                  "dilations": [dilation, dilation]}
    if auto_pad == "NOTSET":
        attributes["pads"] = [pad, pad + 1 if pad else 0, pad, pad]
    else:
        attributes["auto_pad"] = auto_pad
    node, model = _layer("Conv", shape, error, **attributes)
    offsets = rng.uniform(-1, 1, (1, channels, 1, 1)).astype(np.float32)
    samples = [rng.standard_normal(shape).astype(np.float32) + offsets for _ in range(5)]
    mean = InputMean()
    for x in samples:
        mean.update(x)
    expected = _measured(model, samples, 1)
    got = _conv_shift(node, error, mean.mean())
    assert got is not None
    assert np.allclose(got, expected, atol=1e-5 * (1 + np.abs(expected).max()))


@pytest.mark.parametrize(("trans_b", "alpha"), [(0, 1.0), (1, 0.5)])
def test_gemm_shift_equals_the_mean_of_the_weight_error_applied(trans_b, alpha):
    rng = np.random.default_rng(0)
    error = (rng.standard_normal((6, 4) if trans_b else (4, 6)) * 0.01).astype(np.float32)
    node, model = _layer("Gemm", (3, 4), error, transB=trans_b, alpha=alpha)
    samples = [rng.standard_normal((3, 4)).astype(np.float32) + 1 for _ in range(4)]
    mean = InputMean()
    for x in samples:
        mean.update(x)
    assert np.allclose(_gemm_shift(node, error, mean.mean()), _measured(model, samples, 1),
                       atol=1e-6)


def test_input_mean_merges_and_refuses_varying_shapes():
    a, b = InputMean(), InputMean()
    a.update(np.ones((2, 3), np.float32))
    b.update(np.full((1, 3), 4.0, np.float32))
    a.merge(b)
    assert np.allclose(a.mean(), 2.0) and a.count == 3
    a.update(np.ones((1, 5), np.float32))
    assert a.mean() is None
