"""Which tensors of a float graph get QuantizeLinear/DequantizeLinear, decided before calibration.

Node units follow what onnxruntime's CPU provider fuses into integer kernels (REFERENCE.md §3):
- QUANT_OPS have QLinear* kernels: their float activation inputs and their output are quantized;
- SHARE_OPS only move data: their output reuses their input's scale, so they run on uint8;
- Relu/Clip right after a quantized op are folded: the quantized tensor is their output, whose
  range (zp = qmin for Relu) lets onnxruntime drop them;
- everything else stays float, with Q/DQ only where it meets a quantized unit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from ptqconv.passes.weight_slots import weight_slot

QUANT_OPS = frozenset({
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Concat", "AveragePool",
    "GlobalAveragePool", "Sigmoid", "LeakyRelu", "Softmax",
})
SHARE_OPS = frozenset({
    "MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Gather",
    "Resize", "Identity",
})
FOLD_OPS = frozenset({"Relu", "Clip"})
# Inputs that carry a constant per-channel weight and an int32 bias.
WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
BIAS_INDEX = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2}


@dataclass
class QuantPlan:
    """The outcome of planning: what calibration observes and what the QDQ pass rewrites."""

    units: list[ir.Node] = field(default_factory=list)  # quantized node units
    observe: list[str] = field(default_factory=list)  # activations that need a range
    shared: dict[str, str] = field(default_factory=dict)  # tensor -> tensor whose params it uses
    fixed: dict[str, tuple[float, float]] = field(default_factory=dict)  # e.g. Softmax [0, 1]
    folded: dict[str, str] = field(default_factory=dict)  # producer output -> Relu/Clip output
    weights: list[tuple[ir.Node, int, int]] = field(default_factory=list)  # node, input, axis
    biases: list[tuple[ir.Node, int]] = field(default_factory=list)  # node, input index
    constants: list[str] = field(default_factory=list)  # constant activations (Add/Mul/Concat)
    skipped: set[ir.Node] = field(default_factory=set)  # skip_quant_node: consume float tensors

    def quantized_tensors(self) -> list[str]:
        return [*self.observe, *self.fixed, *self.shared]


def _is_float(value: ir.Value | None) -> bool:
    # Unknown types count as float: calibration drops tensors that turn out not to be.
    return value is not None and (value.dtype is None or value.dtype == ir.DataType.FLOAT)


def _skipped(node: ir.Node, skip: frozenset[str]) -> bool:
    return (node.name in skip) or (node.op_type in skip) or node.domain not in ("", "ai.onnx")


def plan_quantization(graph: ir.Graph, skip: frozenset[str] = frozenset()) -> QuantPlan:
    """Decide the node units and quantized tensors of `graph` (top level; subgraphs stay float)."""
    plan = QuantPlan()
    marked: dict[str, None] = {}  # ordered set of activation tensors to quantize
    graph_outputs = {v.name for v in graph.outputs}

    def mark(value: ir.Value | None) -> None:
        if _is_float(value) and value.name:
            marked[value.name] = None

    plan.skipped = {node for node in graph if node.name in skip or node.op_type in skip}
    for node in graph:
        if _skipped(node, skip) or node.op_type not in QUANT_OPS:
            continue
        slot = weight_slot(node) if node.op_type in WEIGHT_OPS else None
        weight_index = None
        if slot is not None and len(slot.node.inputs[slot.index].const_value.shape) >= 2 and (
            slot.node.inputs[slot.index].dtype == ir.DataType.FLOAT
        ):
            weight_index = slot.index
        if node.op_type in WEIGHT_OPS and weight_index is None and node.op_type != "MatMul":
            continue  # Conv/Gemm with a non-constant weight: leave float
        plan.units.append(node)
        if weight_index is not None:
            plan.weights.append((node, weight_index, slot.axis))
        bias_index = BIAS_INDEX.get(node.op_type)
        for index, value in enumerate(node.inputs):
            if value is None or index == weight_index:
                continue
            if index == bias_index and weight_index is not None:
                if value.const_value is not None and len(value.const_value.shape) == 1:
                    plan.biases.append((node, index))
                continue
            if value.const_value is not None:
                if _is_float(value) and value.name not in plan.constants:
                    plan.constants.append(value.name)
                continue
            mark(value)
        output = node.outputs[0]
        users = output.uses()
        if (len(users) == 1 and output.name not in graph_outputs
                and users[0][0].op_type in FOLD_OPS and not _skipped(users[0][0], skip)
                and node.op_type not in ("Softmax", "Sigmoid")):
            plan.folded[output.name] = users[0][0].outputs[0].name
            mark(users[0][0].outputs[0])
        else:
            mark(output)
        if node.op_type == "Softmax":
            plan.fixed[output.name] = (0.0, 1.0)

    # Data-movement ops whose input is quantized pass the same scale through.
    for node in graph:
        if _skipped(node, skip) or node.op_type not in SHARE_OPS or not node.inputs:
            continue
        source = node.inputs[0]
        if source is None or source.const_value is not None or not node.outputs:
            continue
        if (source.name in marked or source.name in plan.shared) and _is_float(node.outputs[0]):
            plan.shared[node.outputs[0].name] = plan.shared.get(source.name, source.name)
            marked.pop(node.outputs[0].name, None)

    plan.observe = [name for name in marked if name not in plan.fixed]
    return plan
