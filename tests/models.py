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


def tied_embedding(vocab: int = 500, dim: int = 32) -> onnx.ModelProto:
    """An embedding table read again, transposed, as the output projection (tied weights)."""
    table = np.random.default_rng(3).standard_normal((vocab, dim)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
        helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0], name="head_t"),
        helper.make_node("MatMul", ["e", "table_t"], ["logits"], name="head"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 6, vocab])],
        [numpy_helper.from_array(table, "table")],
    )

def lstm(hidden: int = 32, features: int = 16, steps: int = 10,
         gates_sliced: bool = False) -> onnx.ModelProto:
    """One LSTM layer (W, R and B constant) over [steps, 1, features], its last hidden state.
    `gates_sliced`: W and R computed as torch.onnx's dynamo exporter writes them, from
    PyTorch-ordered parameters (gates i, f, g, o) by Slice, Concat into ONNX's order (i, o,
    f, c) and Unsqueeze; the same function."""
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((1, 4 * hidden, features)) / np.sqrt(features)).astype(np.float32)
    r = (rng.standard_normal((1, 4 * hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)
    b = (rng.standard_normal((1, 8 * hidden)) * 0.1).astype(np.float32)
    nodes = [helper.make_node("LSTM", ["x", "W", "R", "B"], ["", "h"], hidden_size=hidden,
                              name="lstm")]
    inits = {"W": w, "R": r, "B": b}
    if gates_sliced:
        torch_order = (0, 2, 3, 1)  # i, f, g (ONNX's c), o as blocks of ONNX's i, o, f, c
        for name in ("W", "R"):
            blocks = np.split(inits.pop(name)[0], 4)
            inits[f"{name}_param"] = np.concatenate([blocks[k] for k in torch_order])
            parts = []
            for k in range(4):  # ONNX gate k sits at block torch_order.index(k) in PyTorch's
                at = torch_order.index(k) * hidden
                inits[f"{name}_{k}_from"] = np.array([at])
                inits[f"{name}_{k}_to"] = np.array([at + hidden])
                nodes.insert(0, helper.make_node(
                    "Slice", [f"{name}_param", f"{name}_{k}_from", f"{name}_{k}_to"],
                    [f"{name}_{k}"]))
                parts.append(f"{name}_{k}")
            inits["zero"] = np.array([0])
            nodes[4:4] = [helper.make_node("Concat", parts, [f"{name}_2d"], axis=0),
                          helper.make_node("Unsqueeze", [f"{name}_2d", "zero"], [name])]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [steps, 1, features])],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 1, hidden])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )


def digits_eval(limit: int | None = None) -> np.ndarray:
    files = sorted((DIGITS / "eval" / "input").glob("*.bin"))[:limit]
    return np.stack([np.fromfile(f, np.float32).reshape(1, 8, 8) for f in files])


def residual_cnn(seed: int = 0, opset: int = 17, constant_nodes: bool = False) -> onnx.ModelProto:
    """Conv-Relu, two residual blocks (Conv-Relu-Conv + Add + Relu), GlobalAveragePool, Gemm."""
    rng = np.random.default_rng(seed)
    c = 16
    weights: dict[str, np.ndarray] = {
        "stem_w": rng.standard_normal((c, 3, 3, 3)) * 0.3,
        "stem_b": rng.standard_normal(c) * 0.1,
    }
    nodes = [
        helper.make_node("Conv", ["x", "stem_w", "stem_b"], ["s"], name="stem", pads=[1] * 4),
        helper.make_node("Relu", ["s"], ["s_r"], name="stem_relu"),
    ]
    prev = "s_r"
    for b in range(2):
        for k in range(2):
            weights[f"b{b}c{k}_w"] = rng.standard_normal((c, c, 3, 3)) * (0.6 / np.sqrt(9 * c))
            weights[f"b{b}c{k}_b"] = rng.standard_normal(c) * 0.05
        nodes += [
            helper.make_node(
                "Conv",
                [prev, f"b{b}c0_w", f"b{b}c0_b"],
                [f"b{b}a"],
                name=f"block{b}_conv0",
                pads=[1] * 4,
            ),
            helper.make_node("Relu", [f"b{b}a"], [f"b{b}ar"], name=f"block{b}_relu0"),
            helper.make_node(
                "Conv",
                [f"b{b}ar", f"b{b}c1_w", f"b{b}c1_b"],
                [f"b{b}b"],
                name=f"block{b}_conv1",
                pads=[1] * 4,
            ),
            helper.make_node("Add", [f"b{b}b", prev], [f"b{b}sum"], name=f"block{b}_add"),
            helper.make_node("Relu", [f"b{b}sum"], [f"b{b}out"], name=f"block{b}_relu1"),
        ]
        prev = f"b{b}out"
    weights["fc_w"] = rng.standard_normal((10, c)) * 0.3
    weights["fc_b"] = rng.standard_normal(10) * 0.1
    nodes += [
        helper.make_node("GlobalAveragePool", [prev], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    inits = []
    for name, array in weights.items():
        tensor = numpy_helper.from_array(array.astype(np.float32), name)
        if constant_nodes:
            nodes.insert(
                0, helper.make_node("Constant", [], [name], name=f"const_{name}", value=tensor)
            )
        else:
            inits.append(tensor)
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        inits,
        opset,
    )


def split_concat_cnn(seed: int = 0) -> onnx.ModelProto:
    """YOLOv8's C2f pattern: Conv-Relu, Split in two halves, one half through Conv-Relu, all
    three concatenated, then a Conv."""
    rng = np.random.default_rng(seed)
    weights = {"w0": rng.standard_normal((8, 3, 3, 3)) * 0.3, "b0": rng.standard_normal(8) * 0.1,
               "w1": rng.standard_normal((4, 4, 3, 3)) * 0.3, "b1": rng.standard_normal(4) * 0.1,
               "w2": rng.standard_normal((4, 12, 1, 1)) * 0.3, "halves": np.array([4, 4])}
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="stem", pads=[1] * 4),
        helper.make_node("Relu", ["c0"], ["r0"], name="stem_relu"),
        helper.make_node("Split", ["r0", "halves"], ["h0", "h1"], name="split", axis=1),
        helper.make_node("Conv", ["h1", "w1", "b1"], ["c1"], name="inner", pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"], name="inner_relu"),
        helper.make_node("Concat", ["h0", "h1", "r1"], ["cat"], name="concat", axis=1),
        helper.make_node("Conv", ["cat", "w2"], ["y"], name="head"),
    ]
    inits = [numpy_helper.from_array(a.astype(np.int64 if k == "halves" else np.float32), k)
             for k, a in weights.items()]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])], inits)


def two_input_text_model(
    vocab: int = 50, dim: int = 32, seq: int = 8, seed: int = 0
) -> onnx.ModelProto:
    """int64 token ids -> Gather embedding, times a float mask input, MatMul, Softmax."""
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((vocab, dim)).astype(np.float32)
    w = (rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
        helper.make_node("Mul", ["emb", "scale"], ["scaled"], name="mask_mul"),
        helper.make_node("MatMul", ["scaled", "w"], ["proj"], name="proj"),
        helper.make_node("Softmax", ["proj"], ["y"], name="softmax", axis=-1),
    ]
    return _model(
        nodes,
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", seq]),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, ["batch", seq, 1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", seq, dim])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(w, "w")],
    )


def write_samples(directory: Path, arrays) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i, array in enumerate(arrays):
        np.ascontiguousarray(array).tofile(directory / f"{i:06d}.bin")
    return directory


def random_samples(
    directory: Path, count: int, seed: int, shape: tuple[int, ...] = (1, 3, 16, 16)
) -> Path:
    """`count` standard-normal float32 samples of `shape` as .bin files in `directory`."""
    rng = np.random.default_rng(seed)
    return write_samples(
        directory, (rng.standard_normal(shape).astype(np.float32) for _ in range(count))
    )
