"""One name per value across the whole model, subgraphs included.

Each body of an If, Loop or Scan is its own scope, so two branches may both define `h`; but
calibration statistics, activation ranges and encodings files key tensors by name. The
second and later definitions of a name get a fresh one (graphs without subgraphs, and
models whose names are already unique, are unchanged).
"""

from __future__ import annotations

import onnx_ir as ir

from ptqconv.graph.naming import NameAllocator


class UniqueNamesPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        subgraphs = list(model.graph.subgraphs())
        if not subgraphs:
            return ir.passes.PassResult(model, False)
        names = NameAllocator(model.graph)
        seen: set[str] = set()
        modified = False
        for graph in (model.graph, *subgraphs):
            defined = [*graph.inputs, *graph.initializers.values(),
                       *(v for node in graph for v in node.outputs)]
            for value in defined:
                if not value.name:
                    continue
                if value.name in seen:
                    old = value.name
                    if old in graph.initializers:
                        graph.initializers.pop(old)
                        value.name = names.new(old)
                        graph.register_initializer(value)
                    else:
                        value.name = names.new(old)
                    modified = True
                seen.add(value.name)
        return ir.passes.PassResult(model, modified)
