"""Gather the rows of an integer table, then dequantize only those rows.

Dequantizing a table before its Gather runs over the whole table on every inference; the
rows a Gather picks are a few of them (an embedding's tokens).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ptqconv.graph.initializers import add_initializer
from ptqconv.graph.naming import NameAllocator


def dequantize_gathered(graph: ir.Graph, names: NameAllocator, node: ir.Node,
                        integers: ir.Value, scale: np.ndarray, zero_point: np.ndarray | None,
                        per_row: bool, base: str,
                        float_type: ir.DataType = ir.DataType.FLOAT,
                        scale_type: ir.DataType | None = None) -> None:
    """Make `node`, a Gather of a float table along its rows, gather the rows of the integer
    table `integers` and dequantize only them. Per table: DequantizeLinear(rows, scale,
    zero_point). Per row: (Cast(rows) - zero_points) * scales, each row's scale (and zero
    point, unless `zero_point` is None) gathered with it; exact like DequantizeLinear, since
    the difference of two small integers is exact in float. The last node's output takes the
    gathered value's name and place; new names start with `base`, the float table's. New
    constants go to `graph` (the table's), new nodes beside `node` (in a body, perhaps).
    Per table, a `scale_type` other than `float_type` (float32 scales of a float16 table,
    before opset 19) is dequantized in it and cast to `float_type`."""
    prefix = node.name or base
    indices = node.inputs[1]
    node.replace_input_with(0, integers)
    gathered = node.outputs[0]
    if per_row:
        def gathered_rows(values: np.ndarray, what: str) -> ir.Node:
            # [rows, 1, ...]: broadcast over the rest of each gathered row.
            rows = np.asarray(values, float_type.numpy()).reshape(
                -1, *([1] * (len(integers.const_value.shape) - 1)))
            return ir.node("Gather", [add_initializer(graph, names.new(f"{base}_row_{what}"),
                                                      rows), indices],
                           attributes={"axis": 0}, name=names.new(f"{prefix}_{what}s"))

        chain = [gathered_rows(scale, "scale")]
        if zero_point is not None:
            chain.append(gathered_rows(zero_point, "zero_point"))
        first = ir.node("Cast", [None], attributes={"to": float_type},
                        name=names.new(f"{prefix}_Cast"))
        current = first.outputs[0]
        chain.append(first)
        if zero_point is not None:
            sub = ir.node("Sub", [current, chain[1].outputs[0]], name=names.new(f"{prefix}_Sub"))
            chain.append(sub)
            current = sub.outputs[0]
        last = ir.node("Mul", [current, chain[0].outputs[0]], name=names.new(f"{prefix}_Mul"))
        chain.append(last)
    else:
        scale_type = scale_type or float_type
        inputs = [None, add_initializer(graph, names.new(f"{base}_scale"),
                                        np.asarray(scale, scale_type.numpy()))]
        if zero_point is not None:
            inputs.append(add_initializer(graph, names.new(f"{base}_zero_point"), zero_point,
                                          integers.const_value.dtype))
        first = last = ir.node("DequantizeLinear", inputs,
                               name=names.new(f"{prefix}_DequantizeLinear"))
        chain = [first]
        if scale_type != float_type:
            last = ir.node("Cast", [first.outputs[0]], attributes={"to": float_type},
                           name=names.new(f"{prefix}_Cast"))
            chain.append(last)
    assert node.graph is not None
    # Named here: values left unnamed are named per graph when saved, and a Loop body's
    # names would repeat the main graph's.
    for step in chain:
        for value in step.outputs:
            value.name = value.name or names.new(f"{step.name}_output")
    node.graph.insert_after(node, chain)
    # The chain's output takes the gathered value's place (and name); the integer rows
    # feed the chain.
    out = last.outputs[0]
    out.type, out.shape = gathered.type, gathered.shape
    gathered.replace_all_uses_with(out, replace_graph_outputs=True)
    out.name, gathered.name = gathered.name, names.new(f"{gathered.name or base}_quantized")
    first.replace_input_with(0, gathered)
    gathered.type = ir.TensorType(integers.const_value.dtype)
