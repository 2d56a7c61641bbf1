"""WeightQuant cost on a model with ~100 MB of float weights, against onnxruntime.quantization.

    python bench/weightquant.py [--mb 100] [--repeat 3]

Builds an MLP of 2048x2048 MatMul layers (random weights: this measures cost, not accuracy),
then times each tool in its own process and reports medians of wall time and peak RSS.
onnxruntime has no 8-bit weight-only mode: its nearest is quantize_dynamic (int8 per-channel
weights, activations quantized at run time); its 4-bit weight-only tool is MatMulNBitsQuantizer.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, now, run_child


def build(path: Path, megabytes: int, width: int = 2048) -> int:
    rng = np.random.default_rng(0)
    layers = max(1, round(megabytes * 1e6 / (width * width * 4)))
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        w = rng.standard_normal((width, width), dtype=np.float32) / np.float32(np.sqrt(width))
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"], name=f"fc{i}"))
        prev = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, width])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=100, help="float weights in MB")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "float.onnx"
        size_mb = build(src, args.mb) / 1e6
        cases = {
            "ptqconv WeightQuant 8-bit": (
                "from ptqconv.cli import main\n"
                f"assert main(['--modelFile={src}', '--outputFile={tmp}/p8.onnx', "
                "'--quantType=WeightQuant', '--bitNum=8', '--quiet']) == 0\n"
            ),
            "ptqconv WeightQuant 4-bit": (
                "from ptqconv.cli import main\n"
                f"assert main(['--modelFile={src}', '--outputFile={tmp}/p4.onnx', "
                "'--quantType=WeightQuant', '--bitNum=4', '--quiet']) == 0\n"
            ),
            "onnxruntime quantize_dynamic int8 per-channel": (
                "from onnxruntime.quantization import quantize_dynamic, QuantType\n"
                f"quantize_dynamic({str(src)!r}, {tmp + '/o8.onnx'!r}, per_channel=True, "
                "weight_type=QuantType.QInt8)\n"
            ),
            "onnxruntime MatMulNBitsQuantizer 4-bit": (
                "import onnx\n"
                "from onnxruntime.quantization.matmul_nbits_quantizer import "
                "MatMulNBitsQuantizer\n"
                f"q = MatMulNBitsQuantizer(onnx.load({str(src)!r}), bits=4)\n"
                f"q.process(); onnx.save(q.model.model, {tmp + '/o4.onnx'!r})\n"
            ),
        }
        results = {name: run_child(code, args.repeat) for name, code in cases.items()}
    print(f"WeightQuant bench, {now()}, {machine()}")
    print(f"model: {size_mb:.1f} MB of float32 MatMul weights; medians of {args.repeat} runs\n")
    print("| tool | time (s) | peak RSS (MB) | RSS / model size |")
    print("|---|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['seconds']:.2f} | {r['rss_mb']:.0f} | {r['rss_mb'] / size_mb:.2f} |")
    p8, o8 = (
        results["ptqconv WeightQuant 8-bit"],
        results["onnxruntime quantize_dynamic int8 per-channel"],
    )
    p4, o4 = results["ptqconv WeightQuant 4-bit"], results["onnxruntime MatMulNBitsQuantizer 4-bit"]
    print(
        f"\nratios ptqconv/onnxruntime: 8-bit time {p8['seconds'] / o8['seconds']:.2f}, "
        f"RSS {p8['rss_mb'] / o8['rss_mb']:.2f}; 4-bit time {p4['seconds'] / o4['seconds']:.2f},"
        f" RSS {p4['rss_mb'] / o4['rss_mb']:.2f}"
    )
    print(f"targets: ptqconv <= 3 s and peak RSS < 3x model ({3 * size_mb:.0f} MB)")


if __name__ == "__main__":
    main()
