"""Relu and Clip after a Gemm whose weight onnxruntime fuses into MatMulNBits, written as
Max / Min.

onnxruntime (1.32, CPU) fuses DequantizeLinear(2-, 4- or 8-bit weights [K, N] in blocks
along K, per column or per tensor) -> Gemm or MatMul into its MatMulNBits kernel, except
where a Relu or Clip reads the Gemm (or the Add of a MatMul's
bias, which it makes a Gemm first): its QDQ selector takes the Relu or Clip for part of the
group and declines, and the weight is dequantized on every inference, into a FusedGemm. Max
with 0 is Relu, and Max / Min with Clip's bounds are Clip, to the bit on finite values; no
rule fuses them, so the weight's DequantizeLinear becomes MatMulNBits and the activation runs
on its own (the digits CNN at 4 bits, its 1024 x 128 hidden layer: 0.275 ms -> 0.110 ms,
float 0.048 ms; docs/decisions.md, MatMulNBits before Relu).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ptqconv.graph.folded_dequantize import dequantize_layout
from ptqconv.graph.initializers import add_initializer
from ptqconv.graph.naming import NameAllocator
from ptqconv.graph.ops import is_onnx

ACTIVATIONS = frozenset({"Relu", "Clip"})


# The weight containers MatMulNBits takes.
NBITS = frozenset({ir.DataType.INT2, ir.DataType.UINT2, ir.DataType.INT4, ir.DataType.UINT4,
                   ir.DataType.INT8, ir.DataType.UINT8})


def nbits_layout(storage: ir.DataType, shape: tuple[int, ...], axis: int | None,
                 block_size: int) -> bool:
    """Whether a DequantizeLinear of a constant weight so stored feeds MatMulNBits when it
    is a MatMul's (or transB=0 Gemm's) B: [K, N] in blocks along K, per column or per
    tensor."""
    if storage not in NBITS or len(shape) != 2:
        return False
    return axis == 0 if block_size else axis in (None, 1)


def _nbits_weight(node: ir.Node) -> ir.DataType | None:
    """The float type of `node`'s B input where that is a DequantizeLinear MatMulNBits
    takes, else None."""
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    producer = node.inputs[1].producer()
    if producer is None or not is_onnx(producer) or producer.op_type != "DequantizeLinear":
        return None
    weight, scale = producer.inputs[0], producer.inputs[1]
    if weight is None or weight.const_value is None or scale is None \
            or scale.const_value is None:
        return None
    axis, block_size = dequantize_layout(producer)
    fused = nbits_layout(weight.const_value.dtype, tuple(weight.const_value.shape), axis,
                         block_size)
    return scale.const_value.dtype if fused else None


def _only_reader(value: ir.Value, outputs: set[ir.Value]) -> ir.Node | None:
    uses = list(value.uses())
    if value in outputs or len(uses) != 1 or uses[0][1] != 0:
        return None
    return uses[0][0]


def _constant(value: ir.Value | None) -> bool:
    return value is None or value.const_value is not None


def activations(graph: ir.Graph) -> list[tuple[ir.Node, ir.DataType]]:
    """The Relu / Clip nodes (constant bounds) that alone read a Gemm whose weight
    MatMulNBits takes, or the bias Add alone reading such a MatMul; each with the float type
    it computes in."""
    outputs = set(graph.outputs)
    found = []
    for node in graph:
        if not is_onnx(node) or node.op_type not in ("Gemm", "MatMul"):
            continue
        dtype = _nbits_weight(node)
        if dtype is None:
            continue
        reader = _only_reader(node.outputs[0], outputs)
        if node.op_type == "MatMul":
            if reader is None or not is_onnx(reader) or reader.op_type != "Add" \
                    or not all(_constant(v) for v in reader.inputs[1:]):
                continue
            reader = _only_reader(reader.outputs[0], outputs)
        if reader is None or not is_onnx(reader) or reader.op_type not in ACTIVATIONS:
            continue
        bounds = [v for v in reader.inputs[1:] if v is not None]
        if reader.op_type == "Clip" and (reader.attributes or not bounds or not all(
                _constant(v) for v in bounds)):
            continue  # no bounds, bounds computed at run time, or opset < 11 attributes
        found.append((reader, dtype))
    return found


@dataclass
class MatMulNBitsReluResult(ir.passes.PassResult):
    rewritten: list[str] = field(default_factory=list)  # node names


class MatMulNBitsReluPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> MatMulNBitsReluResult:
        result = MatMulNBitsReluResult(model, False)
        for graph in model.graphs():
            names = NameAllocator(graph)
            for node, dtype in activations(graph):
                _rewrite(graph, names, node, dtype)
                result.rewritten.append(node.name or "")
                result.modified = True
        return result


def _rewrite(graph: ir.Graph, names: NameAllocator, node: ir.Node,
             dtype: ir.DataType) -> None:
    """`node` in place (its output keeps its name): Relu -> Max(x, 0); Clip -> Max(x, low),
    Min(x, high), or Min(Max(x, low), high)."""
    x = node.inputs[0]
    assert x is not None
    base = node.name or x.name or "relu"
    if node.op_type == "Relu":
        zero = add_initializer(graph, names.new(f"{base}_zero"),
                               np.zeros((), dtype.numpy()))
        node.op_type = "Max"
        node.resize_inputs(2)
        node.replace_input_with(1, zero)
        return
    low, high = (node.inputs[i] if len(node.inputs) > i else None for i in (1, 2))
    if low is not None and high is not None:
        floor = ir.node("Max", [x, low], name=names.new(f"{base}_max"), num_outputs=1)
        floor.outputs[0].name = names.new(f"{base}_max_output")
        floor.outputs[0].dtype, floor.outputs[0].shape = dtype, x.shape
        graph.insert_before(node, floor)
        node.op_type = "Min"
        node.replace_input_with(0, floor.outputs[0])
        node.replace_input_with(1, high)
        node.resize_inputs(2)
    else:
        node.op_type = "Max" if low is not None else "Min"
        node.replace_input_with(1, low if low is not None else high)
        node.resize_inputs(2)
