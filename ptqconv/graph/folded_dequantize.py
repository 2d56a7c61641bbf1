"""A constant weight's dequantization as Cast -> Sub -> Mul, which onnxruntime folds into a
float weight when the session loads.

onnxruntime's constant folding skips DequantizeLinear (so that QDQ groups stay recognisable)
and runs it on every inference, but folds Cast, Sub and Mul of initializers: a Conv weight
so written takes the integers' size on disk and runs at float speed, with no session option
(docs/decisions.md, conv weights dequantized at load). The arithmetic is DequantizeLinear's:
(q - zero point) is exact in float, times the same float32 scale.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ptqconv.graph.initializers import add_initializer
from ptqconv.graph.naming import NameAllocator
from ptqconv.weights.layout import IntegerWeight

# Marks (in `ir.Value.meta`) the scales of a folded dequantization: float32 quantization
# parameters, as DequantizeLinear's are, which --fp16 must leave alone.
PARAMETER = "ptqconv.quantization_parameter"


def _node(names: NameAllocator, op: str, inputs: list[ir.Value], base: str,
          float_type: ir.DataType,
          shape: tuple[int, ...], attributes: dict | None = None) -> ir.Node:
    name = names.new(base)
    node = ir.node(op, inputs, attributes, name=name, num_outputs=1)
    node.outputs[0].name = names.new(f"{name}_output")
    node.outputs[0].type = ir.TensorType(float_type)
    node.outputs[0].shape = ir.Shape(shape)
    return node


# Weight types a folded dequantization can write: float32, and float16 computed in float32
# and cast at the end (onnxruntime's CPU provider has no float16 Mul to fold; it folds Cast).
FOLDED_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16})


def folds(float_type: ir.DataType) -> bool:
    """Whether a weight dequantized to `float_type` can be written for onnxruntime to fold
    (FOLDED_TYPES); every layout can."""
    return float_type in FOLDED_TYPES


def dequantize_layout(node: ir.Node) -> tuple[int | None, int]:
    """A DequantizeLinear's axis (None: per tensor, a scalar scale) and block size (0: no
    blocks), with the operator's default axis of 1."""
    block = node.attributes.get("block_size")
    block_size = block.as_int() if block is not None else 0
    scale = node.inputs[1] if len(node.inputs) > 1 else None
    shape = (scale.const_value.shape if scale is not None and scale.const_value is not None
             else scale.shape if scale is not None else None)
    if not block_size and shape is not None and len(shape) == 0:
        return None, 0
    axis = node.attributes.get("axis")
    return (axis.as_int() if axis is not None else 1), block_size


def folded_dequantize(graph: ir.Graph, names: NameAllocator, name: str, integers: ir.Value,
                      integer: IntegerWeight, float_type: ir.DataType) -> list[ir.Node]:
    """Nodes computing the float weight from `integers` (the initializer of `integer.q`),
    with its scale (and zero point) added as initializers as DequantizeLinear takes them;
    the last node's output is the weight."""
    layout = integer.layout
    scale = add_initializer(graph, names.new(f"{name}_scale"),
                            np.asarray(integer.scale, float_type.numpy()), float_type)
    zero = None if layout.grid.symmetric else add_initializer(
        graph, names.new(f"{name}_zero_point"),
        np.asarray(integer.zero_point).astype(layout.grid.storage.numpy()),
        layout.grid.storage)
    return folded_nodes(names, name, integers, scale, zero, layout.axis, layout.block_size,
                        float_type)


def folded_nodes(names: NameAllocator, name: str, integers: ir.Value, scale: ir.Value,
                 zero: ir.Value | None, axis: int | None, block: int,
                 float_type: ir.DataType) -> list[ir.Node]:
    """DequantizeLinear(integers, scale, zero, axis, block_size) as Cast [-> Sub] -> Mul,
    per tensor, per channel or in blocks (`folds`): scale and zero point reshaped to
    broadcast along the channel axis, or, for blocks, over the integers viewed as
    [..., blocks, block_size, ...] (padded to whole blocks and cut back). The arithmetic is
    float32; a float16 weight is cast at the end (its scale cast to float32 first). The last
    node's output is the weight."""
    graph = integers.graph
    assert graph is not None and integers.shape is not None and scale.shape is not None
    full = tuple(integers.shape.numpy())
    axis = None if axis is None or len(scale.shape) == 0 else axis % len(full)
    padded = full
    if block:
        assert axis is not None
        blocks = -(-full[axis] // block)
        # The last block may end short (as DequantizeLinear's may): padded, then cut back.
        padded = (*full[:axis], blocks * block, *full[axis + 1:])
        work = (*full[:axis], blocks, block, *full[axis + 1:])
        params = (*full[:axis], blocks, 1, *full[axis + 1:])
    else:
        work = full
        params = tuple(full[axis] if i == axis else 1 for i in range(len(full)))
    compute = ir.DataType.FLOAT
    to = {"to": compute}
    nodes: list[ir.Node] = []
    shapes: dict[tuple[int, ...], ir.Value] = {}

    def reshaped(value: ir.Value, target: tuple[int, ...], what: str) -> ir.Value:
        if axis is None or tuple(value.shape.numpy() if value.shape else ()) == target:
            return value
        if target not in shapes:
            shapes[target] = add_initializer(graph, names.new(f"{name}_{what}_shape"),
                                             np.asarray(target, np.int64))
        nodes.append(_node(names, "Reshape", [value, shapes[target]], f"{name}_{what}_Reshape",
                           compute, target))
        return nodes[-1].outputs[0]

    nodes.append(_node(names, "Cast", [integers], f"{name}_Cast", compute, full, to))
    value = nodes[-1].outputs[0]
    if padded != full:
        assert axis is not None
        ends = [0] * len(full)
        ends[axis] = padded[axis] - full[axis]
        pads = add_initializer(graph, names.new(f"{name}_pads"),
                               np.asarray([0] * len(full) + ends, np.int64))
        nodes.append(_node(names, "Pad", [value, pads], f"{name}_Pad", compute, padded))
        value = nodes[-1].outputs[0]
    value = reshaped(value, work, "blocks")
    if zero is not None:
        assert zero.shape is not None
        # Cast first: onnxruntime has no int4 / int2 Reshape.
        nodes.append(_node(names, "Cast", [zero], f"{name}_zero_point_Cast", compute,
                           tuple(zero.shape.numpy()), to))
        nodes.append(_node(names, "Sub", [value, reshaped(nodes[-1].outputs[0], params,
                                                           "zero_point")],
                           f"{name}_Sub", compute, work))
        value = nodes[-1].outputs[0]
    scale.meta[PARAMETER] = True
    if scale.dtype != compute:
        nodes.append(_node(names, "Cast", [scale], f"{name}_scale_Cast", compute,
                           tuple(scale.shape.numpy()), to))
        scale = nodes[-1].outputs[0]
    nodes.append(_node(names, "Mul", [value, reshaped(scale, params, "scale")], f"{name}_Mul",
                       compute, work))
    value = reshaped(nodes[-1].outputs[0], padded, "weight")
    if padded != full:
        assert axis is not None
        bounds = [add_initializer(graph, names.new(f"{name}_slice_{what}"),
                                  np.asarray(v, np.int64))
                  for what, v in (("starts", [0]), ("ends", [full[axis]]), ("axes", [axis]))]
        nodes.append(_node(names, "Slice", [value, *bounds], f"{name}_Slice", compute, full))
        value = nodes[-1].outputs[0]
    if float_type != compute:
        nodes.append(_node(names, "Cast", [value], f"{name}_weight_Cast", float_type, full,
                           {"to": float_type}))
    return nodes
