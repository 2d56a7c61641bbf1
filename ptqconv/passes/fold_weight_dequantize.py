"""Every constant weight's DequantizeLinear rewritten as the Cast -> Sub -> Mul onnxruntime
folds at load (`graph.folded_dequantize`), for a weight-only model that a timing showed
faster with its weights dequantized at load than as written (`conversion`): MatMulNBits'
int8 activations can cost more than float GEMMs on small transformers (ViT-tiny 8-bit
1.26x float as written, 0.93x folded, AMD EPYC Zen 5; docs/decisions.md, weights folded for
speed).

Embedding tables gathered row by row (`graph.gathered_rows`, per row: Gather -> Cast [-> Sub
by the gathered zero points] -> Mul by the gathered scales) are rewritten the same way: the
whole table dequantized by constant ops before the Gather, which then gathers float rows as
the float model does. The six kernels per table cost the GPT-2-style export 4-8% of its
0.35 ms (docs/decisions.md, weights folded for speed).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from ptqconv.graph.folded_dequantize import dequantize_layout, folded_nodes, folds
from ptqconv.graph.naming import NameAllocator
from ptqconv.graph.ops import is_onnx

# Integer tables a Gather reads (graph.gathered_rows): int4 ones are dequantized whole already.
GATHERED_TYPES = frozenset({ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT16,
                            ir.DataType.UINT16})


def _constant(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None


def weight_dequantizers(graph: ir.Graph) -> list[ir.Node]:
    """The DequantizeLinear nodes of `graph` whose every input is a constant."""
    return [node for node in graph if is_onnx(node) and node.op_type == "DequantizeLinear"
            and all(_constant(v) for v in node.inputs if v is not None)]


def foldable(node: ir.Node) -> bool:
    """Whether `node` (a weight's DequantizeLinear) can be written as Cast -> Mul."""
    scale = node.inputs[1]
    return scale is not None and scale.dtype is not None and folds(scale.dtype)


@dataclass(frozen=True)
class _GatheredTable:
    """A per-row table chain: `gather` of the integer table, then `cast`, `sub` (by the
    rows of `zero_points`, if any) and `mul` (by the rows of `scales`), each row constant
    gathered by its own Gather node."""

    gather: ir.Node
    cast: ir.Node
    sub: ir.Node | None
    mul: ir.Node
    row_gathers: tuple[ir.Node, ...]
    scales: ir.Value
    zero_points: ir.Value | None


def _sole_use(value: ir.Value, index: int = 0) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) != 1 or uses[0][1] != index or not is_onnx(uses[0][0]):
        return None
    return uses[0][0]


def _row_constant(value: ir.Value | None, indices: ir.Value) -> tuple[ir.Node, ir.Value] | None:
    """(the Gather, its float32 table) when `value` gathers rows of a constant by `indices`."""
    node = value.producer() if value is not None else None
    if (node is None or not is_onnx(node) or node.op_type != "Gather"
            or node.attributes.get_int("axis", 0) != 0 or node.inputs[1] is not indices
            or not _constant(node.inputs[0]) or node.inputs[0].dtype != ir.DataType.FLOAT
            or len(list(node.outputs[0].uses())) != 1):
        return None
    return node, node.inputs[0]


def gathered_tables(graph: ir.Graph) -> list[_GatheredTable]:
    """The per-row dequantized embedding tables of `graph` (main graph) in float32."""
    found = []
    for gather in graph:
        if (not is_onnx(gather) or gather.op_type != "Gather" or len(gather.inputs) != 2
                or gather.attributes.get_int("axis", 0) != 0 or not _constant(gather.inputs[0])
                or gather.inputs[0].dtype not in GATHERED_TYPES):
            continue
        indices = gather.inputs[1]
        cast = _sole_use(gather.outputs[0])
        if (indices is None or cast is None or cast.op_type != "Cast"
                or cast.attributes.get_int("to", 0) != ir.DataType.FLOAT):
            continue
        sub = _sole_use(cast.outputs[0])
        zero = None
        if sub is not None and sub.op_type == "Sub":
            zero = _row_constant(sub.inputs[1], indices)
            mul = _sole_use(sub.outputs[0]) if zero is not None else None
        else:
            sub, mul = None, sub
        if mul is None or mul.op_type != "Mul":
            continue
        scale = _row_constant(mul.inputs[1], indices)
        if scale is None:
            continue
        found.append(_GatheredTable(
            gather, cast, sub, mul, (scale[0], *((zero[0],) if zero else ())), scale[1],
            zero[1] if zero else None))
    return found


@dataclass
class FoldWeightDequantizeResult(ir.passes.PassResult):
    folded: int = 0
    tables: int = 0  # embedding tables now dequantized whole, at load


class FoldWeightDequantizePass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> FoldWeightDequantizeResult:
        graph = model.graph
        names = NameAllocator(graph)
        result = FoldWeightDequantizeResult(model, False)
        for node in weight_dequantizers(graph):
            if not foldable(node):
                continue
            q, scale = node.inputs[0], node.inputs[1]
            zero = node.inputs[2] if len(node.inputs) > 2 else None
            assert q is not None and scale is not None and scale.dtype is not None
            out = node.outputs[0]
            name = out.name or q.name or "weight"
            axis, block = dequantize_layout(node)
            made = folded_nodes(names, name, q, scale, zero, axis, block, scale.dtype)
            graph.insert_before(node, made)
            weight = made[-1].outputs[0]
            ir.convenience.replace_all_uses_with(out, weight)
            graph.remove(node, safe=True)
            weight.name = name  # consumers and tools find the weight by its name
            result.folded += 1
            result.modified = True
        for table in gathered_tables(graph):
            self._fold_table(graph, names, table)
            result.tables += 1
            result.modified = True
        return result

    def _fold_table(self, graph: ir.Graph, names: NameAllocator, table: _GatheredTable
                    ) -> None:
        gather, integers = table.gather, table.gather.inputs[0]
        assert integers is not None
        base = integers.name or "table"
        value = integers
        made = []
        for op, other in (("Cast", None), ("Sub", table.zero_points), ("Mul", table.scales)):
            if op == "Sub" and other is None:
                continue
            node = ir.node(op, [value] if other is None else [value, other],
                           {"to": ir.DataType.FLOAT} if op == "Cast" else None,
                           name=names.new(f"{base}_{op}"))
            value = node.outputs[0]
            value.name = names.new(f"{base}_{op}_output")
            value.type = ir.TensorType(ir.DataType.FLOAT)
            value.shape = integers.shape
            made.append(node)
        graph.insert_before(gather, made)
        gather.replace_input_with(0, value)
        rows, out = gather.outputs[0], table.mul.outputs[0]
        name = out.name
        ir.convenience.replace_all_uses_with(out, rows, replace_graph_outputs=True)
        graph.remove([n for n in (table.mul, table.sub, table.cast, *table.row_gathers)
                      if n is not None], safe=True)
        rows.name, rows.type, rows.shape = name, out.type, out.shape
