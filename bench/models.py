"""Generated models for cost benchmarks (random weights: for time and memory, not accuracy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def resnet18(path: Path, seed: int = 0) -> Path:
    """ResNet-18 topology (BN folded into conv biases), 224x224 input, 1000 classes."""
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

    x = conv("input", 3, 64, 7, 2, True)
    nodes.append(helper.make_node("MaxPool", [x], ["pool"], name="pool", kernel_shape=[3, 3],
                                  strides=[2, 2], pads=[1] * 4))
    x, cin = "pool", 64
    for stage, cout in enumerate((64, 128, 256, 512)):
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
        rng.standard_normal((1000, 512), dtype=np.float32) * np.float32(0.04), "fc_w"))
    inits.append(numpy_helper.from_array(np.zeros(1000, np.float32), "fc_b"))
    nodes.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc",
                                  transB=1))
    graph = helper.make_graph(
        nodes, "resnet18",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 224, 224])],
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
