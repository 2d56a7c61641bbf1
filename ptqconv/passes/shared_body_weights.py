"""Identical weights of several control-flow bodies held once, in the main graph.

onnxruntime's constant folding works body by body: an outer weight that two branches of an If
both transform (an Unsqueeze of an LSTM weight, in silero_vad) comes out as one folded copy in
each branch, so the simplified model, and everything written from it, holds the bytes twice.
Body initializers with the same type, shape and contents become one main-graph initializer
that every body reads from the outer scope. Run after `UniqueNamesPass`: the name kept is
then unique in the whole model.
"""

from __future__ import annotations

import hashlib

import onnx_ir as ir

# Smaller initializers are not worth hashing (and are often scalars shared by design).
MIN_BYTES = 1024


class ShareBodyWeightsPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        groups: dict[tuple, list[tuple[ir.Graph, ir.Value]]] = {}
        for graph in model.graph.subgraphs():
            for value in graph.initializers.values():
                tensor = value.const_value
                if (tensor is None or tensor.nbytes < MIN_BYTES or value.is_graph_input()
                        or value.is_graph_output()):
                    continue
                key = (tensor.dtype, tuple(tensor.shape),
                       hashlib.sha256(tensor.tobytes()).digest())
                groups.setdefault(key, []).append((graph, value))
        modified = False
        for members in groups.values():
            if len(members) < 2:
                continue
            home, kept = members[0]
            home.initializers.pop(kept.name)
            model.graph.register_initializer(kept)
            for graph, copy in members[1:]:
                copy.replace_all_uses_with(kept)
                graph.initializers.pop(copy.name)
            modified = True
        return ir.passes.PassResult(model, modified)
