"""Spell every hard-swish as HardSigmoid(x; 1/6, 1/2) * x.

Exporters write hard-swish as one HardSwish op or spelled out as x * Clip(x + 3, 0, 6) / 6
(Paddle's MobileNetV3 and PP-LCNet). The planner knows one form: HardSigmoid is an integer
unit (a QLinearAdd, see integer_activations.py) and the Mul a QLinearMul, so the activation
never goes back to float between two quantized convs. onnxruntime also fuses this form into a
float Conv (activation HardSwish) where the model stays float, which the spelled-out form
does not get (docs/decisions.md, integer activations).
"""

from __future__ import annotations

import onnx_ir as ir

from ptqconv.graph.naming import NameAllocator, take_place
from ptqconv.graph.ops import is_onnx, scalar_constant

SIXTH = 1.0 / 6.0


def _sole_user(value: ir.Value, op_types: tuple[str, ...]) -> ir.Node | None:
    """The one node reading `value`, when it has one of `op_types` and `value` is internal."""
    users = value.uses()
    if len(users) != 1 or value.is_graph_output():
        return None
    node = users[0][0]
    return node if node.op_type in op_types and is_onnx(node) else None


def _other_input(node: ir.Node, value: ir.Value) -> ir.Value | None:
    if len(node.inputs) != 2:
        return None
    first, second = node.inputs
    return second if first is value else first if second is value else None


def _divides_by_six(node: ir.Node, value: ir.Value) -> bool:
    """`node` is value / 6 or value * (1/6)."""
    if node.op_type == "Div":
        return node.inputs[0] is value and _close(scalar_constant(node.inputs[1]), 6.0)
    return _close(scalar_constant(_other_input(node, value)), SIXTH)


def _close(found: float | None, wanted: float) -> bool:
    return found is not None and abs(found - wanted) <= 1e-6 * abs(wanted)


def _spelled_out(clip: ir.Node) -> tuple[ir.Value, list[ir.Node], ir.Value] | None:
    """(x, the nodes, y) when `clip` is the Clip of y = x * Clip(x + 3, 0, 6) / 6, in either
    order of the Mul and the division."""
    if (len(clip.inputs) != 3 or not _close(scalar_constant(clip.inputs[2]), 6.0)
            or scalar_constant(clip.inputs[1]) != 0.0):
        return None
    add = clip.inputs[0].producer() if clip.inputs[0] is not None else None
    if add is None or add.op_type != "Add" or not is_onnx(add) or _sole_user(
            add.outputs[0], ("Clip",)) is not clip:
        return None
    x = next((v for v in add.inputs if v is not None and v.const_value is None), None)
    if x is None or not _close(scalar_constant(_other_input(add, x)), 3.0):
        return None
    first = _sole_user(clip.outputs[0], ("Mul", "Div"))
    if first is None:
        return None
    if first.op_type == "Mul" and _other_input(first, clip.outputs[0]) is x:
        last = _sole_user(first.outputs[0], ("Mul", "Div"))  # (x * clip) / 6
        if last is None or not _divides_by_six(last, first.outputs[0]):
            return None
    elif _divides_by_six(first, clip.outputs[0]):
        last = _sole_user(first.outputs[0], ("Mul",))  # x * (clip / 6)
        if last is None or _other_input(last, first.outputs[0]) is not x:
            return None
    else:
        return None
    return x, [add, clip, first, last], last.outputs[0]


class HardSwishPass(ir.passes.InPlacePass):
    """Rewrite HardSwish ops and x * Clip(x + 3, 0, 6) / 6 into HardSigmoid + Mul."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameAllocator(graph)
        found = []
        for node in graph:
            if not is_onnx(node):
                continue
            if node.op_type == "HardSwish" and node.inputs[0] is not None:
                found.append((node.inputs[0], [node], node.outputs[0]))
            elif node.op_type == "Clip":
                match = _spelled_out(node)
                if match is not None:
                    found.append(match)
        for x, nodes, y in found:
            self._replace(graph, names, x, nodes, y)
        return ir.passes.PassResult(model, bool(found))

    @staticmethod
    def _replace(graph: ir.Graph, names: NameAllocator, x: ir.Value, nodes: list[ir.Node],
                 y: ir.Value) -> None:
        stem = y.name or "hard_swish"
        gate = ir.node("HardSigmoid", [x], {"alpha": SIXTH, "beta": 0.5},
                       name=names.new(f"{stem}_HardSigmoid"))
        gate.outputs[0].name = names.new(f"{stem}_gate")
        gate.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        gate.outputs[0].shape = x.shape
        product = ir.node("Mul", [x, gate.outputs[0]], name=names.new(f"{stem}_Mul"))
        graph.insert_after(nodes[-1], [gate, product])
        take_place(y, product.outputs[0])  # the user's name for the activation stays
        graph.remove(nodes, safe=True)
