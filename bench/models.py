"""Generated models for cost benchmarks (random weights: for time and memory, not accuracy)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def resnet18(path: Path, seed: int = 0, size: int = 224, width: int = 64) -> Path:
    """ResNet-18 topology (BN folded into conv biases), `size`x`size` input, 1000 classes.

    `width` scales the channels (64 is ResNet-18; --quick uses a narrower one)."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    count = [0]

    def conv(x: str, cin: int, cout: int, k: int, stride: int, relu: bool) -> str:
        i = count[0] = count[0] + 1
        w = rng.standard_normal((cout, cin, k, k), dtype=np.float32) * np.float32(
            np.sqrt(2.0 / (cin * k * k)))
        inits.append(numpy_helper.from_array(w, f"conv{i}_w"))
        inits.append(numpy_helper.from_array(
            rng.standard_normal(cout, dtype=np.float32) * np.float32(0.01), f"conv{i}_b"))
        pad = k // 2
        nodes.append(helper.make_node("Conv", [x, f"conv{i}_w", f"conv{i}_b"], [f"c{i}"],
                                      name=f"conv{i}", strides=[stride] * 2, pads=[pad] * 4))
        if not relu:
            return f"c{i}"
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        return f"r{i}"

    x = conv("input", 3, width, 7, 2, True)
    nodes.append(helper.make_node("MaxPool", [x], ["pool"], name="pool", kernel_shape=[3, 3],
                                  strides=[2, 2], pads=[1] * 4))
    x, cin = "pool", width
    for stage, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
        for block in range(2):
            stride = 2 if stage and block == 0 else 1
            h = conv(x, cin, cout, 3, stride, True)
            h = conv(h, cout, cout, 3, 1, False)
            skip = conv(x, cin, cout, 1, stride, False) if (stride != 1 or cin != cout) else x
            name = f"s{stage}b{block}"
            nodes.append(helper.make_node("Add", [h, skip], [f"{name}_sum"], name=f"{name}_add"))
            nodes.append(helper.make_node("Relu", [f"{name}_sum"], [f"{name}_out"],
                                          name=f"{name}_relu"))
            x, cin = f"{name}_out", cout
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"))
    inits.append(numpy_helper.from_array(
        rng.standard_normal((1000, cin), dtype=np.float32) * np.float32(0.04), "fc_w"))
    inits.append(numpy_helper.from_array(np.zeros(1000, np.float32), "fc_b"))
    nodes.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc",
                                  transB=1))
    graph = helper.make_graph(
        nodes, "resnet18",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1000])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def image_samples(directory: Path, count: int, shape=(1, 3, 224, 224), seed: int = 0) -> Path:
    """`count` smooth random images (low-frequency noise, like natural image statistics)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        coarse = rng.standard_normal((*shape[:2], shape[2] // 16, shape[3] // 16))
        image = np.kron(coarse, np.ones((1, 1, 16, 16))) + 0.3 * rng.standard_normal(shape)
        image.astype(np.float32).tofile(directory / f"{i:06d}.bin")
    return directory


def normal_samples(directory: Path, count: int, shape: tuple[int, ...], seed: int = 0) -> Path:
    """`count` standard-normal float32 tensors of `shape` (hidden states for the encoder)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        rng.standard_normal(shape, dtype=np.float32).tofile(directory / f"{i:06d}.bin")
    return directory


def bert(path: Path, layers: int = 12, hidden: int = 768, heads: int = 12, ffn: int = 3072,
         seq: int = 128, seed: int = 0) -> Path:
    """A BERT-base-sized encoder stack on float hidden states [1, seq, hidden] (no embeddings).

    Per layer: Q/K/V MatMul+Add, Reshape/Transpose to heads, Q.K^T, scale, Softmax, .V, back to
    [1, seq, hidden], output projection, residual Add, LayerNormalization, FFN MatMul+Add, GELU in
    its Erf form (as exporters write it; onnxruntime fuses it), MatMul+Add, residual,
    LayerNormalization. Random weights at BERT's init scale (std 0.02).
    """
    rng = np.random.default_rng(seed)
    head = hidden // heads
    nodes, inits = [], []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def dense(x: str, name: str, cin: int, cout: int) -> str:
        w = const(f"{name}_w", rng.standard_normal((cin, cout), dtype=np.float32)
                  * np.float32(0.02))
        b = const(f"{name}_b", rng.standard_normal(cout, dtype=np.float32) * np.float32(0.02))
        return node("Add", [node("MatMul", [x, w], f"{name}_mm"), b], f"{name}_out")

    def layer_norm(x: str, name: str) -> str:
        g = const(f"{name}_g", np.ones(hidden, np.float32))
        b = const(f"{name}_beta", np.zeros(hidden, np.float32))
        return node("LayerNormalization", [x, g, b], name, axis=-1, epsilon=1e-12)

    heads_shape = const("heads_shape", np.array([1, seq, heads, head], np.int64))
    flat_shape = const("flat_shape", np.array([1, seq, hidden], np.int64))
    scale = const("scale", np.array(1 / np.sqrt(head), np.float32))
    half, one = const("half", np.array(0.5, np.float32)), const("one", np.array(1, np.float32))
    sqrt2 = const("sqrt2", np.array(np.sqrt(2), np.float32))
    x = "hidden"
    for i in range(layers):
        p = f"l{i}"
        q, k, v = (node("Reshape", [dense(x, f"{p}_{t}", hidden, hidden), heads_shape],
                        f"{p}_{t}_heads") for t in "qkv")
        q = node("Transpose", [q], f"{p}_qT", perm=[0, 2, 1, 3])
        k = node("Transpose", [k], f"{p}_kT", perm=[0, 2, 3, 1])
        v = node("Transpose", [v], f"{p}_vT", perm=[0, 2, 1, 3])
        scores = node("Mul", [node("MatMul", [q, k], f"{p}_qk"), scale], f"{p}_scores")
        probs = node("Softmax", [scores], f"{p}_probs", axis=-1)
        ctx = node("Transpose", [node("MatMul", [probs, v], f"{p}_ctx")], f"{p}_ctxT",
                   perm=[0, 2, 1, 3])
        ctx = node("Reshape", [ctx, flat_shape], f"{p}_ctx_flat")
        attn = node("Add", [dense(ctx, f"{p}_o", hidden, hidden), x], f"{p}_res1")
        h = layer_norm(attn, f"{p}_ln1")
        f = dense(h, f"{p}_ffn1", hidden, ffn)
        erf = node("Erf", [node("Div", [f, sqrt2], f"{p}_gelu_div")], f"{p}_gelu_erf")
        gelu = node("Mul", [node("Mul", [f, node("Add", [erf, one], f"{p}_gelu_add")],
                                 f"{p}_gelu_mul"), half], f"{p}_gelu")
        out = node("Add", [dense(gelu, f"{p}_ffn2", ffn, hidden), h], f"{p}_res2")
        x = layer_norm(out, f"{p}_ln2")
    graph = helper.make_graph(
        nodes, "bert_encoder",
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, seq, hidden])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, seq, hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def mlp(path: Path, megabytes: float, width: int = 2048, seed: int = 0) -> int:
    """A chain of width x width MatMuls holding `megabytes` of float32 weights; returns the
    bytes of weights written.

    Models over 1 GB keep their weights in `<path>.data` (external data), written one layer
    at a time, so a 3 GB model is built without 3 GB (let alone two copies) in memory.
    """
    rng = np.random.default_rng(seed)
    layer_bytes = width * width * 4
    layers = max(1, round(megabytes * 1e6 / layer_bytes))
    external = layers * layer_bytes > 1 << 30
    data_path = Path(str(path) + ".data")
    nodes, inits, prev = [], [], "x"
    with open(data_path, "wb") if external else contextlib.nullcontext() as data:
        for i in range(layers):
            w = rng.standard_normal((width, width), dtype=np.float32)
            w *= np.float32(1 / np.sqrt(width))
            if external:
                tensor = onnx.TensorProto(name=f"w{i}", dims=[width, width],
                                          data_type=TensorProto.FLOAT,
                                          data_location=TensorProto.EXTERNAL)
                for key, value in (("location", data_path.name),
                                   ("offset", str(i * layer_bytes)),
                                   ("length", str(layer_bytes))):
                    tensor.external_data.add(key=key, value=value)
                data.write(w.tobytes())
            else:
                tensor = numpy_helper.from_array(w, f"w{i}")
            inits.append(tensor)
            nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"], name=f"fc{i}"))
            prev = f"h{i}"
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return layers * layer_bytes
