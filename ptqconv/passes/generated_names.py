"""Prefix the names onnxruntime's simplification generated, so that onnxruntime can fuse the
saved model again.

onnxruntime names what its fusions create from fixed stems with a counter that restarts in
every session (MatMulAddFusion: `gemm_input_shape`, `gemm_input_shape_token_0`, ...). Fusing
the quantized model at load time then generated names the first session had already used,
and onnxruntime 1.31 refused the model with "Attempt to replace the existing tensor" (a
3-layer BERT-like encoder at hidden size 256 did; the 12-layer one happened not to).
"""

from __future__ import annotations

import onnx_ir as ir

PREFIX = "ptq_"


def value_names(graph: ir.Graph) -> set[str]:
    """Every value name of `graph` and its subgraphs: inputs, initializers, node outputs."""
    names: set[str] = set()
    for g in (graph, *_subgraphs(graph)):
        names.update(v.name for v in g.inputs if v.name)
        names.update(g.initializers)
        names.update(v.name for node in g for v in node.outputs if v.name)
    return names


class PrefixGeneratedNamesPass(ir.passes.InPlacePass):
    """Give every value whose name is not among `original` (the user's model) PREFIX."""

    def __init__(self, original: set[str]) -> None:
        super().__init__()
        self.original = original

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        taken = value_names(model.graph)
        seen: set[int] = set()
        modified = False
        for g in (model.graph, *_subgraphs(model.graph)):
            values = [*g.inputs, *g.initializers.values(),
                      *(v for node in g for v in node.outputs)]
            for value in values:
                if id(value) in seen or not value.name or value.name in self.original:
                    continue
                seen.add(id(value))
                new = PREFIX + value.name
                while new in taken:
                    new = PREFIX + new
                taken.add(new)
                value.name = new
                modified = True
        return ir.passes.PassResult(model, modified)


def _subgraphs(graph: ir.Graph) -> list[ir.Graph]:
    found = []
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                found.append(attr.as_graph())
            elif attr.type == ir.AttributeType.GRAPHS:
                found.extend(attr.as_graphs())
    return found
