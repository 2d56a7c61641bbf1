"""Prefix the names onnxruntime's simplification generated, so that onnxruntime can fuse the
saved model again.

onnxruntime names what its fusions create from fixed stems with a counter that restarts in
every session (MatMulAddFusion: `gemm_input_shape`, `gemm_input_shape_token_0`, ...), so
fusing the quantized model at load time could reuse names the first session had written
(docs/decisions.md, generated names).
"""

from __future__ import annotations

import onnx_ir as ir

from ptqconv.graph.naming import NameAllocator

PREFIX = "ptq_"


def _values(graph: ir.Graph) -> list[ir.Value]:
    """Graph inputs, initializers, and every value a node of `graph` or its subgraphs reads or
    writes, each once, in a deterministic order."""
    found = {id(v): v for v in (*graph.inputs, *graph.initializers.values())}
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for v in (*node.inputs, *node.outputs):
            if v is not None:
                found.setdefault(id(v), v)
    return list(found.values())


def value_names(graph: ir.Graph) -> set[str]:
    """Every value name of `graph` and its subgraphs."""
    return {v.name for v in _values(graph) if v.name}


class PrefixGeneratedNamesPass(ir.passes.InPlacePass):
    """Give every value whose name is not among `original` (the user's model) PREFIX."""

    def __init__(self, original: set[str]) -> None:
        super().__init__()
        self.original = original

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        names = NameAllocator(model.graph)
        modified = False
        for value in _values(model.graph):
            if value.name and value.name not in self.original:
                value.name = names.new(PREFIX + value.name)
                modified = True
        return ir.passes.PassResult(model, modified)
