"""ReduceMean over every spatial axis of a feature map written as GlobalAveragePool.

Squeeze-and-excitation blocks exported from PyTorch (`x.mean((2, 3), keepdim=True)`) and
classifier heads (`x.mean((2, 3))`) arrive as ReduceMean. onnxruntime runs GlobalAveragePool
inside its blocked (NCHWc) conv layout and, quantized, as QLinearGlobalAveragePool on the
integer conv's NHWC output; a ReduceMean makes it reorder the feature map first, and
quantized, dequantize it and reduce over strided axes. Same mean, same output shape (a
Flatten restores keepdims=0) (docs/decisions.md, spatial means as GlobalAveragePool).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ptqconv.graph.naming import NameAllocator, take_place
from ptqconv.graph.ops import is_onnx

FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE})
# Ops whose output has their first input's rank, walked through to find a feature map's rank.
SAME_RANK = frozenset({"Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu",
                       "Tanh", "Identity", "BatchNormalization"})
# Ops whose output has the highest rank of their inputs (broadcasting).
BROADCAST = frozenset({"Mul", "Add", "Div", "Sub", "PRelu"})
SEARCH_DEPTH = 8


@dataclass
class SpatialMeanResult(ir.passes.PassResult):
    rewritten: int = 0


def _axes(node: ir.Node) -> list[int] | None:
    """A ReduceMean's axes: its attribute (before opset 18) or its constant second input."""
    found = node.attributes.get_ints("axes")
    if found is not None:
        return list(found)
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        tensor = node.inputs[1].const_value
        return None if tensor is None else [int(v) for v in np.asarray(tensor.numpy()).ravel()]
    return None


def _conv_rank(node: ir.Node) -> int | None:
    """The rank of a Conv's or ConvTranspose's input and output: its weight's."""
    if node.op_type not in ("Conv", "ConvTranspose") or len(node.inputs) < 2:
        return None
    weight = node.inputs[1]
    if weight is not None and weight.const_value is not None:
        return len(weight.const_value.shape)
    return len(weight.shape) if weight is not None and weight.shape is not None else None


def _rank(value: ir.Value, depth: int = 0) -> int | None:
    """`value`'s rank: its shape's, or that of the feature map a conv writes or reads, a few
    same-rank ops away (simplified models carry no intermediate shapes)."""
    if value.shape is not None:
        return len(value.shape)
    if depth > SEARCH_DEPTH:
        return None
    producer = value.producer()
    if producer is not None:
        found = _conv_rank(producer)
        if found is not None:
            return found
        if producer.op_type in SAME_RANK and producer.inputs and producer.inputs[0] is not None:
            found = _rank(producer.inputs[0], depth + 1)
            if found is not None:
                return found
        if producer.op_type in BROADCAST:
            ranks = [_rank(v, depth + 1) if v.const_value is None else len(v.const_value.shape)
                     for v in producer.inputs if v is not None]
            if ranks and None not in ranks:  # a lower rank broadcasts up: every one is needed
                return max(ranks)
    return next((rank for user, index in value.uses()
                 if index == 0 and (rank := _conv_rank(user)) is not None), None)


def _spatial_mean(node: ir.Node) -> tuple[bool, int] | None:
    """(keepdims, the map's rank) when `node` is a ReduceMean of a float feature map over all
    its spatial axes (rank 3 or more), else None."""
    if not is_onnx(node) or node.op_type != "ReduceMean" or not node.inputs or (
            node.inputs[0] is None):
        return None
    x = node.inputs[0]
    if x.dtype is not None and x.dtype not in FLOAT_TYPES:
        return None
    axes = _axes(node)
    rank = _rank(x)
    if not axes or rank is None or rank < 3:
        return None
    if sorted(a % rank for a in axes) != list(range(2, rank)):
        return None
    return node.attributes.get_int("keepdims", 1) != 0, rank


class SpatialMeanPass(ir.passes.InPlacePass):
    """Rewrite ReduceMean over every spatial axis as GlobalAveragePool (plus Flatten for
    keepdims=0 on a 4-D map: [N, C, 1, 1] -> [N, C])."""

    def call(self, model: ir.Model) -> SpatialMeanResult:
        result = SpatialMeanResult(model, False)
        names = NameAllocator(model.graph)  # every graph's names: bodies see the outer scope
        for graph in model.graphs():
            for node in list(graph):
                found = _spatial_mean(node)
                if found is None:
                    continue
                keep, rank = found
                if not keep and rank != 4:
                    continue  # Flatten would keep [N, C, 1] of a 3-D map
                stem = node.outputs[0].name or "mean"
                pool = ir.node("GlobalAveragePool", [node.inputs[0]],
                               name=names.new(f"{stem}_GlobalAveragePool"))
                added = [pool]
                if not keep:
                    pool.outputs[0].name = names.new(f"{stem}_pooled")
                    added.append(ir.node("Flatten", [pool.outputs[0]], {"axis": 1},
                                         name=names.new(f"{stem}_Flatten")))
                graph.insert_after(node, added)
                take_place(node.outputs[0], added[-1].outputs[0])
                graph.remove(node, safe=True)
                result.rewritten += 1
        result.modified = bool(result.rewritten)
        return result
