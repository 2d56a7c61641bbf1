"""Small ONNX models built in the tests with onnx.helper."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "examples" / "digits"


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def _model(nodes, inputs, outputs, initializers, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def mlp(widths=(256, 512, 512, 64), seed: int = 0, gemm: bool = False) -> onnx.ModelProto:
    """A weight-dominated MLP: MatMul (or Gemm with transB) + Add + Relu layers."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i, (k, n) in enumerate(itertools.pairwise(widths)):
        w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        b = (0.1 * rng.standard_normal(n)).astype(np.float32)
        if gemm:
            inits += [
                numpy_helper.from_array(w.T.copy(), f"w{i}"),
                numpy_helper.from_array(b, f"b{i}"),
            ]
            nodes.append(
                helper.make_node(
                    "Gemm", [prev, f"w{i}", f"b{i}"], [f"h{i}"], name=f"fc{i}", transB=1
                )
            )
        else:
            inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
            nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"], name=f"fc{i}"))
            nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [f"h{i}"], name=f"add{i}"))
        prev = f"h{i}"
        if i < len(widths) - 2:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"], name=f"relu{i}"))
            prev = f"r{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", widths[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", widths[-1]])],
        inits,
    )


def conv_net(
    opset: int = 17, constant_nodes: bool = False, channels: int = 32, seed: int = 0
) -> onnx.ModelProto:
    """Conv -> Relu -> ConvTranspose -> Relu -> Conv(3 channels), weights as initializers or as
    Constant nodes (like PaddleOCR exports)."""
    rng = np.random.default_rng(seed)
    c = channels
    weights = {
        "conv0_w": rng.standard_normal((c, 3, 3, 3)).astype(np.float32) * 0.2,
        "conv0_b": rng.standard_normal(c).astype(np.float32) * 0.1,
        "deconv_w": rng.standard_normal((c, c, 2, 2)).astype(np.float32) * 0.1,
        "conv1_w": rng.standard_normal((3, c, 3, 3)).astype(np.float32) * 0.1,
    }
    nodes, inits = [], []
    for name, array in weights.items():
        if constant_nodes:
            nodes.append(
                helper.make_node(
                    "Constant",
                    [],
                    [name],
                    name=f"const_{name}",
                    value=numpy_helper.from_array(array, name),
                )
            )
        else:
            inits.append(numpy_helper.from_array(array, name))
    nodes += [
        helper.make_node("Conv", ["x", "conv0_w", "conv0_b"], ["c0"], name="conv0", pads=[1] * 4),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node(
            "ConvTranspose", ["r0", "deconv_w"], ["d0"], name="deconv", strides=[2, 2]
        ),
        helper.make_node("Relu", ["d0"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "conv1_w"], ["y"], name="conv1", pads=[1] * 4),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 32, 32])],
        inits,
        opset,
    )


def embedding(vocab: int = 1000, dim: int = 64, seed: int = 0) -> onnx.ModelProto:
    """Gather over an embedding table followed by a MatMul projection."""
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((vocab, dim)).astype(np.float32)
    proj = rng.standard_normal((dim, 32)).astype(np.float32) / 8
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
        helper.make_node("MatMul", ["e", "proj"], ["y"], name="proj"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 32])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(proj, "proj")],
    )


def digits_eval(limit: int | None = None) -> np.ndarray:
    files = sorted((DIGITS / "eval" / "input").glob("*.bin"))[:limit]
    return np.stack([np.fromfile(f, np.float32).reshape(1, 8, 8) for f in files])
