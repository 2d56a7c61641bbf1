"""Every constant weight's DequantizeLinear rewritten as the Cast -> Sub -> Mul onnxruntime
folds at load (`graph.folded_dequantize`), for a weight-only model that a timing showed
faster with its weights dequantized at load than as written (`conversion`): MatMulNBits'
int8 activations can cost more than float GEMMs on small transformers (ViT-tiny 8-bit
1.26x float as written, 0.93x folded, AMD EPYC Zen 5; docs/decisions.md, weights folded for
speed)."""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from ptqconv.graph.folded_dequantize import dequantize_layout, folded_nodes, folds
from ptqconv.graph.naming import NameAllocator
from ptqconv.graph.ops import is_onnx


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


@dataclass
class FoldWeightDequantizeResult(ir.passes.PassResult):
    folded: int = 0


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
        return result
