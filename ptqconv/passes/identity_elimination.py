"""onnx-ir's Identity elimination, minus the two eliminations that break a model.

onnx-ir 1.1 (`onnx_ir.passes.common.IdentityEliminationPass`) also removes `y = Identity(x)`
where `y` is a graph output and `x` is
- a value of an outer graph: the body then returns an outer-scope value, which onnxruntime
  refuses to load ("Subgraph output ... is an outer scope value being returned directly"),
  and the outer value is renamed to `y`;
- a graph output itself: `x` is renamed to `y`, and the model's outputs [x, y] become [y, y].
Those Identity nodes stay; every other one goes as onnx-ir removes it.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import IdentityEliminationPass as _OnnxIrPass

from ptqconv.graph.subgraphs import owner


class IdentityEliminationPass(_OnnxIrPass):
    # onnx-ir's per-node hook; should it be renamed, tests/test_control_flow.py fails.
    def _try_eliminate_identity_node(self, node: ir.Node) -> bool:
        if node.op_type == "Identity" and node.domain == "" and len(node.inputs) == 1 \
                and len(node.outputs) == 1 and node.outputs[0].is_graph_output() \
                and (x := node.inputs[0]) is not None \
                and (x.is_graph_output() or owner(x) is not node.graph):
            return False
        return super()._try_eliminate_identity_node(node)
