"""Recurrent weights computed from constants, folded into constants.

torch.onnx's dynamo exporter (the default since PyTorch 2.9) writes the W, R and B inputs of
an LSTM, GRU or RNN as Concat(Unsqueeze(Concat(Slice(parameter), ...))): PyTorch's gate order
rearranged into ONNX's, per direction. onnxruntime folds that at load, and PostTraining's
simplification does too, but WeightQuant and DynamicQuant quantize constant weights only, so
these stayed float. Each such input is evaluated once (onnx's reference implementation) into
an initializer; the parameters it was sliced from go when nothing else reads them.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from ptqconv.graph.initializers import add_initializer
from ptqconv.graph.naming import NameAllocator
from ptqconv.graph.ops import is_onnx
from ptqconv.graph.weight_slots import RECURRENT_OPS

logger = logging.getLogger(__name__)
# Ops that only move or convert data: what an exporter puts between a parameter and W.
DATA_OPS = frozenset({"Slice", "Concat", "Unsqueeze", "Squeeze", "Reshape", "Transpose",
                      "Identity", "Split", "Gather", "Cast", "Constant"})
MAX_NODES = 256  # per input: a bidirectional LSTM's gate shuffle is about 20
INPUTS = {1: "W", 2: "R", 3: "B"}


def _producers(value: ir.Value) -> list[ir.Node] | None:
    """The nodes that compute `value` from constants alone, in graph order; None when some
    input is not a constant or an op is not a data-movement op."""
    found: dict[ir.Node, None] = {}
    pending = [value]
    while pending:
        current = pending.pop()
        if current.const_value is not None:
            continue
        node = current.producer()
        if (node is None or node.graph is not value.graph or not is_onnx(node)
                or node.op_type not in DATA_OPS or len(found) >= MAX_NODES):
            return None
        if node not in found:
            found[node] = None
            pending += [v for v in node.inputs if v is not None]
    order = {node: i for i, node in enumerate(value.graph)}
    return sorted(found, key=order.__getitem__)


def _evaluate(value: ir.Value, nodes: list[ir.Node], opset: int) -> np.ndarray:
    constants = {v.name: v for node in nodes for v in node.inputs
                 if v is not None and v.const_value is not None}
    # The parameters' values, not references to a data file (exports keep them there).
    graph = onnx.helper.make_graph(
        [ir.serde.serialize_node(node) for node in nodes], "fold", [],
        [onnx.helper.make_tensor_value_info(value.name, onnx.TensorProto.UNDEFINED, None)],
        [onnx.numpy_helper.from_array(v.const_value.numpy(), name)
         for name, v in constants.items()])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    # Imported here: onnx's reference runtime costs 25 ms of every start-up otherwise.
    from onnx.reference import ReferenceEvaluator

    return np.asarray(ReferenceEvaluator(model).run(None, {})[0])


class FoldRecurrentWeightsPass(ir.passes.InPlacePass):
    """W, R and B of main-graph LSTM / GRU / RNN nodes computed from constants by data-movement
    ops become initializers."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameAllocator(graph)
        opset = graph.opset_imports.get("", 0)
        modified = False
        for node in list(graph):
            if node.op_type not in RECURRENT_OPS or not is_onnx(node):
                continue
            for index, label in INPUTS.items():
                value = node.inputs[index] if len(node.inputs) > index else None
                if value is None or value.const_value is not None or not value.name:
                    continue
                nodes = _producers(value)
                if not nodes:
                    continue
                try:
                    folded = _evaluate(value, nodes, opset)
                except Exception as error:  # onnx's reference evaluator raises any kind
                    # Left as it was (a float weight), as before this pass: onnxruntime
                    # evaluates it at load, or reports what is wrong with it.
                    logger.debug("%s %s of %s not folded: %s", node.op_type, label, node.name,
                                 error)
                    continue
                constant = add_initializer(
                    graph, names.new(f"{node.name or node.op_type}_{label}"), folded)
                node.replace_input_with(index, constant)
                modified = True
        if modified:
            RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified)
