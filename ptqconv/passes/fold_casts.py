"""Fold Cast nodes that turn an initializer into float32 into a float32 initializer.

onnxruntime's CPU provider computes float16 models in float32 and its simplification writes
that down: a Cast in front of every float16 weight. Folded, those weights are ordinary float32
weights that the QDQ pass quantizes per channel to int8; left alone, the cast outputs looked
like activations and got per-tensor uint8.
"""

from __future__ import annotations

import onnx_ir as ir

from ptqconv.graph.initializers import add_initializer
from ptqconv.graph.ops import is_onnx


class FoldInitializerCastsPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type != "Cast" or not is_onnx(node) or len(node.inputs) != 1:
                continue
            source, out = node.inputs[0], node.outputs[0]
            to = node.attributes.get("to")
            if (source is None or source.const_value is None or to is None
                    or to.as_int() != ir.DataType.FLOAT or out.is_graph_output()
                    or source.name not in graph.initializers):
                continue
            array = source.const_value.numpy().astype(ir.DataType.FLOAT.numpy())
            # The weight keeps its own name when the cast was its only use.
            sole = len(source.uses()) == 1 and not source.is_graph_output()
            name = source.name if sole else out.name
            if sole:
                graph.initializers.pop(source.name)
            out.name = None
            folded = add_initializer(graph, name, array)
            out.replace_all_uses_with(folded)
            graph.remove(node, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified)
