"""Which kernels onnxruntime runs a model's Conv/MatMul/Gemm work with: the multiply-accumulates
of every such node of the optimized graph, integer or float, from one profiled run."""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ptqconv.runtime import session_options

# docs/reference.md §3. MatMulNBits computes with int8 activations at onnxruntime's default
# accuracy level for fused weight-only models (level 4).
INTEGER_CONV = frozenset({"QLinearConv", "ConvInteger"})
INTEGER_MATMUL = frozenset({"QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat",
                            "DynamicQuantizeMatMul", "QGemm", "MatMulNBits", "QAttention"})
FLOAT_CONV = frozenset({"Conv", "FusedConv", "ConvTranspose"})
FLOAT_MATMUL = frozenset({"MatMul", "FusedMatMul", "Gemm", "FusedGemm", "Attention"})


@dataclass
class KernelShare:
    """Multiply-accumulates per kernel of the optimized graph (op type -> MACs, nodes)."""

    macs: dict[str, float] = field(default_factory=dict)
    nodes: dict[str, int] = field(default_factory=dict)

    @property
    def integer_macs(self) -> float:
        return sum(v for k, v in self.macs.items() if k in INTEGER_CONV | INTEGER_MATMUL)

    @property
    def total_macs(self) -> float:
        return sum(self.macs.values())

    @property
    def integer_share(self) -> float:
        """Of the Conv/MatMul/Gemm work, the part integer kernels do (NaN: there is none)."""
        return self.integer_macs / self.total_macs if self.total_macs else math.nan

    def to_dict(self) -> dict[str, object]:
        return {"integer_share": self.integer_share, "macs": dict(self.macs),
                "nodes": dict(self.nodes)}


def kernel_share(model_file: Path, feeds: Mapping[str, np.ndarray], threads: int,
                 level: str = "all") -> KernelShare:
    """Run `feeds` once through `model_file` with profiling; size each Conv/MatMul/Gemm node
    of the optimized graph from its output shape and weight (or input) depth."""
    with tempfile.TemporaryDirectory(prefix="ptqconv-kernels-") as tmp:
        options = session_options(threads, level)
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(model_file), options,
                                       providers=["CPUExecutionProvider"])
        session.run(None, dict(feeds))
        events = json.loads(Path(session.end_profiling()).read_text())
        graph = onnx.load(options.optimized_model_filepath, load_external_data=False).graph
    shapes = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            args = event.get("args", {})
            shapes[event["name"][: -len("_kernel_time")]] = (
                [next(iter(s.values())) for s in args.get("input_type_shape", [])],
                [next(iter(s.values())) for s in args.get("output_type_shape", [])])
    weights = {i.name: list(i.dims) for i in graph.initializer}
    share = KernelShare()
    for node in graph.node:
        conv = node.op_type in INTEGER_CONV | FLOAT_CONV
        if not conv and node.op_type not in INTEGER_MATMUL | FLOAT_MATMUL:
            continue
        inputs, outputs = shapes.get(node.name, ([], []))
        if not outputs or not outputs[0]:
            continue
        depth = _depth(node, inputs, weights, conv)
        if depth is None:
            continue
        macs = float(math.prod(outputs[0])) * depth
        if node.op_type == "ConvTranspose" and inputs and inputs[0]:
            macs = float(math.prod(inputs[0])) * depth
        share.macs[node.op_type] = share.macs.get(node.op_type, 0.0) + macs
        share.nodes[node.op_type] = share.nodes.get(node.op_type, 0) + 1
    return share


def _depth(node: onnx.NodeProto, inputs: list[list[int]], weights: dict[str, list[int]],
           conv: bool) -> int | None:
    """Multiply-accumulates per output element."""
    if conv:
        index = 3 if node.op_type == "QLinearConv" else 1
        shape = weights.get(node.input[index]) if len(node.input) > index else None
        if shape is None and len(inputs) > 1 and node.op_type != "QLinearConv":
            shape = inputs[1]
        if not shape or len(shape) < 3:
            return None
        if node.op_type == "ConvTranspose":  # per input element: C_out/g x kernel
            return int(shape[1] * math.prod(shape[2:]))
        return int(math.prod(shape[1:]))
    if not inputs or not inputs[0]:
        return None
    transposed = any(a.name == "transA" and a.i for a in node.attribute)
    first = inputs[0]
    return int(first[-2] if transposed and len(first) >= 2 else first[-1])
