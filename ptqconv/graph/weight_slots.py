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
    if op == "Gather":
        return WeightSlot(node, index, 0, 0)
    return WeightSlot(node, index, _dense_axis(node, rank), 0)


def _dense_axis(node: ir.Node, rank: int) -> int:
    """The output-channel axis of a Gemm's or MatMul's B of rank `rank`."""
    if node.op_type == "Gemm":
        return 0 if _attr_int(node, "transB", 0) else 1
    return rank - 1


# Recurrent ops: W [directions, gates x hidden, input] and R [directions, gates x hidden,
# hidden], each row one gate unit's weights.
RECURRENT_OPS = ("LSTM", "GRU", "RNN")


def recurrent_weight_slots(node: ir.Node) -> list[WeightSlot]:
    """The constant W and R of an LSTM, GRU or RNN node, channels along their gate rows."""
    if not is_onnx(node) or node.op_type not in RECURRENT_OPS:
        return []
    return [WeightSlot(node, index, 1, 0) for index in (1, 2)
            if len(node.inputs) > index and node.inputs[index] is not None
            and node.inputs[index].const_value is not None
            and len(node.inputs[index].const_value.shape) == 3]


def transposed_weight_slot(node: ir.Node) -> WeightSlot | None:
    """A 2-D constant that `node`, a Transpose, hands only to MatMul/Gemm as their B: a tied
    embedding table read again as the output projection (exporters write `x @ E.T` so), whose
    output channels are the table's rows. None for any other node."""
    if not is_onnx(node) or node.op_type != "Transpose" or not node.inputs:
        return None
    value, out = node.inputs[0], node.outputs[0]
    if value is None or value.const_value is None or len(value.const_value.shape) != 2:
        return None
    perm = node.attributes.get("perm")
    if perm is not None and list(perm.as_ints()) != [1, 0]:
        return None
    uses = list(out.uses())
    if not uses or out.is_graph_output() or any(
            not (is_onnx(user) and user.op_type in ("MatMul", "Gemm") and index == 1)
            for user, index in uses):
        return None
    axes = {_dense_axis(user, 2) for user, _ in uses}
    return WeightSlot(node, 0, 1 - axes.pop(), 0) if len(axes) == 1 else None
