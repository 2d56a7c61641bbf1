"""Fold Transpose(weight) -> MatMul/Gemm into a transposed weight initializer.

`torch.onnx.export` writes `x @ E.T` as a Transpose of the initializer E, which onnxruntime
folds at load; DynamicQuant's integer kernel takes only a constant B, so it needs the folded
weight. A tied embedding table (read by a Gather too) becomes two weights, the table and its
transpose, each quantized to int8 by its own op: 2 bytes per element instead of 4 in float.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ptqconv.graph.initializers import add_initializer
from ptqconv.graph.naming import NameAllocator
from ptqconv.graph.weight_slots import transposed_weight_slot


class FoldTransposedWeightsPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameAllocator(graph)
        modified = False
        for node in list(graph):
            source = node.inputs[0] if node.inputs else None
            if (transposed_weight_slot(node) is None or source is None
                    or source.name not in graph.initializers):
                continue
            out = node.outputs[0]
            folded = add_initializer(graph, names.new(f"{source.name}_transposed"),
                                     np.ascontiguousarray(source.const_value.numpy().T))
            out.replace_all_uses_with(folded)
            graph.remove(node, safe=True)
            if not source.uses() and not source.is_graph_output():
                graph.initializers.pop(source.name)
            modified = True
        return ir.passes.PassResult(model, modified)
