"""Which input of which op is a weight, and along which axis its output channels lie."""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from ptqconv.graph.ops import is_onnx


@dataclass(frozen=True)
class WeightSlot:
    """A constant weight feeding `node` at input `index`, with channels along `axis`."""

    node: ir.Node
    index: int
    axis: int
    channels: int  # output channels, for the quantWeightChannel rule (0 when not a conv)


def _attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def weight_slot(node: ir.Node) -> WeightSlot | None:
    """The quantizable weight slot of `node`, or None when the op has none or it is not constant.

    Conv weights are [M, C/g, k...] (channels on axis 0); ConvTranspose [C, M/g, k...] (axis 1);
    Gemm B is [K, N], or [N, K] with transB; MatMul's constant B is [..., K, N]; a Gather table
    is [rows, D] and gets a scale per row, since embedding rows differ widely in norm.
    """
    if not is_onnx(node):
        return None
    op = node.op_type
    index = 0 if op == "Gather" else 1
    if op not in ("Conv", "ConvTranspose", "Gemm", "MatMul", "Gather"):
        return None
    if len(node.inputs) <= index or node.inputs[index] is None:
        return None
    value = node.inputs[index]
    if value.const_value is None:
        return None
    shape = value.const_value.shape
    rank = len(shape)
    if rank < 2:
        return WeightSlot(node, index, 0, 0)
    if op == "Conv":
        return WeightSlot(node, index, 0, shape[0])
    if op == "ConvTranspose":
        return WeightSlot(node, index, 1, shape[1] * _attr_int(node, "group", 1))
    if op == "Gemm":
        return WeightSlot(node, index, 0 if _attr_int(node, "transB", 0) else 1, 0)
    if op == "Gather":
        return WeightSlot(node, index, 0, 0)
    return WeightSlot(node, index, rank - 1, 0)
