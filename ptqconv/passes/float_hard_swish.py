"""A hard-swish left float after a quantized producer written back as one HardSwish op.

The planner sees hard-swish as HardSigmoid(x; 1/6, 1/2) * x (hard_swish.py). Where both stay
float and x comes out of a DequantizeLinear, onnxruntime gives each of the two readers its own
copy of the DequantizeLinear (EnsureUniqueDQForNodeUnit): the tensor is dequantized twice.
HardSwish (opset 14) is one reader, the same function; onnxruntime 1.32 expands it back into
the pair after handing out the copies, so one DequantizeLinear feeds both (docs/decisions.md,
float hard-swish as HardSwish). A float x from a float Conv keeps the pair, which onnxruntime
fuses into the conv.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from ptqconv.graph.naming import NameAllocator, take_place
from ptqconv.graph.ops import is_onnx
from ptqconv.passes.hard_swish import SIXTH

HARD_SWISH_OPSET = 14
# Close enough to HardSwish's constants that both compute the same float32 values.
TOLERANCE = 1e-6


@dataclass
class FloatHardSwishResult(ir.passes.PassResult):
    rewritten: int = 0


def _gate(node: ir.Node) -> tuple[ir.Value, ir.Node] | None:
    """(x, the Mul) when `node` is the HardSigmoid of a float x * HardSigmoid(x) whose x a
    DequantizeLinear writes."""
    if not is_onnx(node) or node.op_type != "HardSigmoid" or node.inputs[0] is None:
        return None
    if (abs(node.attributes.get_float("alpha", 0.2) - SIXTH) > TOLERANCE * SIXTH
            or abs(node.attributes.get_float("beta", 0.5) - 0.5) > TOLERANCE):
        return None
    x, gate = node.inputs[0], node.outputs[0]
    producer = x.producer()
    if producer is None or producer.op_type != "DequantizeLinear" or len(producer.inputs) < 2:
        return None
    scale = producer.inputs[1]  # a DequantizeLinear writes its scale's type
    if (x.dtype or (scale.dtype if scale is not None else None)) != ir.DataType.FLOAT:
        return None  # onnxruntime's CPU HardSwish is float32 only
    uses = list(gate.uses())
    if len(uses) != 1 or gate.is_graph_output():
        return None
    mul = uses[0][0]
    if not is_onnx(mul) or mul.op_type != "Mul" or len(mul.inputs) != 2 or (
            {id(v) for v in mul.inputs} != {id(x), id(gate)}):
        return None
    return x, mul


def _upgradable(model: ir.Model) -> bool:
    """Whether declaring opset 14 keeps every node's meaning: of the ops opset 14 changed,
    only BatchNormalization can mean something else (its training outputs)."""
    return not any(
        node.op_type == "BatchNormalization" and is_onnx(node) and len(node.outputs) > 1
        for graph in model.graphs() for node in graph)


class FloatHardSwishPass(ir.passes.InPlacePass):
    """Rewrite float HardSigmoid(x) * x after a DequantizeLinear as HardSwish(x), declaring
    opset 14 where the model is older and may be (`_upgradable`)."""

    def call(self, model: ir.Model) -> FloatHardSwishResult:
        result = FloatHardSwishResult(model, False)
        graph = model.graph
        found = [(node, *gate) for node in graph if (gate := _gate(node)) is not None]
        opset = model.opset_imports.get("", 1)
        if not found or (opset < HARD_SWISH_OPSET and not _upgradable(model)):
            return result
        names = NameAllocator(graph)
        for node, x, mul in found:
            stem = mul.outputs[0].name or "hard_swish"
            swish = ir.node("HardSwish", [x], name=names.new(f"{stem}_HardSwish"))
            graph.insert_after(mul, [swish])
            take_place(mul.outputs[0], swish.outputs[0])
            graph.remove([node, mul], safe=True)
            result.rewritten += 1
        if result.rewritten:
            result.modified = True
            if opset < HARD_SWISH_OPSET:
                model.opset_imports[""] = HARD_SWISH_OPSET
        return result
