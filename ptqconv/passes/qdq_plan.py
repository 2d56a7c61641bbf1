"""Which tensors of a float graph get QuantizeLinear/DequantizeLinear.

Node units follow what onnxruntime's CPU provider runs as integer kernels (docs/reference.md §3):
- weight ops (Conv, ConvTranspose, Gemm, MatMul) are always units: their activation inputs
  are quantized. A Conv needs Q after it to become QLinearConv, so its output is always
  quantized; MatMul/Gemm also run integer with a float output (MatMulIntegerToFloat, QGemm),
  so theirs is quantized only when an integer consumer reads it;
- elementwise units (Add, Mul, Concat, pooling, Sigmoid, LeakyRelu, Softmax, and HardSigmoid
  and Tanh, which integer_activations.py turns into QLinearAdd and QLinearSigmoid) only pay
  when their inputs already come from units and an integer consumer reads their output;
  otherwise the Q/DQ pairs would only add noise (transformer residual streams with outlier
  channels). An Add of a scalar constant is never one: it would only round the tensor again
  (a Mul by one keeps attention's scaled scores integer between QLinearMatMul and Softmax);
- SHARE_OPS move data: their outputs (every part of a Split) reuse their input's scale, so
  they run on uint8;
- Relu/Clip right after a unit are folded: the quantized tensor is their output, whose range
  (zp = qmin for Relu) lets onnxruntime drop them;
- everything else, and every node in `skip`, stays float.

`plan_quantization` plans one graph; `passes.body_plan` plans the bodies of If / Loop / Scan
with it, one graph at a time. In a body, values from the enclosing graphs count like graph
inputs (they are quantized where they are read), and readers in other graphs do not count.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import onnx_ir as ir

from ptqconv.graph.naming import node_key
from ptqconv.graph.ops import in_skip, is_onnx
from ptqconv.graph.weight_slots import weight_slot

if TYPE_CHECKING:
    from ptqconv.passes.body_plan import BodyPlan

logger = logging.getLogger(__name__)
WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
ELEMENTWISE_OPS = frozenset({
    "Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool", "Sigmoid", "LeakyRelu", "Softmax",
    "HardSigmoid", "Tanh",
})
# Outputs on a fixed grid: onnxruntime's QLinearSoftmax wants scale 1/256, zp 0; Tanh runs as
# a QLinearSigmoid only on a grid of step 1/k with -1 on it (integer_activations.py).
FIXED_RANGES = {"Softmax": (0.0, 1.0), "Tanh": (-1.0, 1.0)}
# Their output range is not a function of the input's that a folded Relu/Clip could narrow.
NO_FOLD = frozenset({"Softmax", "Sigmoid", "HardSigmoid", "Tanh"})
QUANT_OPS = WEIGHT_OPS | ELEMENTWISE_OPS
SHARE_OPS = frozenset({
    "MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Gather",
    "Resize", "Identity", "Split",
})
FOLD_OPS = frozenset({"Relu", "Clip"})
FLOAT_OUTPUT_OK = frozenset({"Gemm", "MatMul"})
BIAS_INDEX = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2}


@dataclass(frozen=True)
class PlannedWeight:
    """Input `index` of `node` is a constant weight with output channels along `axis`."""

    node: ir.Node
    index: int
    axis: int


@dataclass(frozen=True)
class PlannedBias:
    """Input `index` of `node` is a bias whose scale is `unit`'s input scale x weight scale:
    a Conv/Gemm's own bias, or the constant of the Add after a float-output MatMul."""

    node: ir.Node
    index: int
    unit: ir.Node


@dataclass
class QuantPlan:
    """The outcome of planning: what calibration observes and what the QDQ pass rewrites."""

    units: list[ir.Node] = field(default_factory=list)  # quantized node units
    observe: list[str] = field(default_factory=list)  # activations that need a range
    shared: dict[str, str] = field(default_factory=dict)  # tensor -> tensor whose params it uses
    fixed: dict[str, tuple[float, float]] = field(default_factory=dict)  # FIXED_RANGES
    folded: dict[str, str] = field(default_factory=dict)  # producer output -> Relu/Clip output
    weights: list[PlannedWeight] = field(default_factory=list)
    biases: list[PlannedBias] = field(default_factory=list)
    constants: list[str] = field(default_factory=list)  # constant activations (Add/Mul/Concat)
    skipped: set[ir.Node] = field(default_factory=set)  # skip_quant_node: consume float tensors
    bodies: list[BodyPlan] = field(default_factory=list)  # passes.body_plan, top level only

    def quantized_tensors(self) -> list[str]:
        """Every activation to quantize: roots (observed, fixed) before the tensors sharing them."""
        return [*self.observe, *self.fixed, *self.shared]


def _is_float(value: ir.Value | None) -> bool:
    # Unknown types count as float: calibration drops tensors that turn out not to be.
    return value is not None and (value.dtype is None or value.dtype == ir.DataType.FLOAT)


def _activations(node: ir.Node) -> list[ir.Value]:
    return [v for v in node.inputs if v is not None and v.const_value is None and _is_float(v)]


def _matmul_bias(node: ir.Node, weight_index: int | None,
                 skipped: set[ir.Node]) -> tuple[ir.Node, int] | None:
    """The (Add, input index) of the constant bias added to this MatMul's output, if any.

    onnxruntime fuses MatMul + Add into a Gemm before its QDQ fusions run; with the bias
    through DequantizeLinear from int32 that Gemm becomes a QGemm, with a float bias it
    stays a float Gemm fed by two DequantizeLinear (11 attention output projections of the
    BERT-base bench did).
    """
    if node.op_type != "MatMul" or weight_index != 1:
        return None
    weight = node.inputs[1].const_value
    users = node.outputs[0].uses()
    if weight is None or len(weight.shape) != 2 or len(users) != 1:
        return None
    add, index = users[0]
    if add.op_type != "Add" or add in skipped or not is_onnx(add):
        return None
    bias = add.inputs[1 - index]
    if (bias is None or bias.const_value is None or bias.dtype != ir.DataType.FLOAT
            or tuple(bias.const_value.shape) != (weight.shape[1],)):
        return None
    return add, 1 - index


def _into_sum(node: ir.Node) -> bool:
    """Whether this MatMul's only reader adds a computed tensor to it. onnxruntime fuses such
    a MatMul + Add into a Gemm before its QDQ fusions, and no integer kernel takes a Gemm
    whose C is not a constant: it ran in float on dequantized weights (a recurrent cell's
    x Wx + h Wh). A quantized output puts Q between them."""
    users = node.outputs[0].uses()
    if node.op_type != "MatMul" or len(users) != 1:
        return False
    add, index = users[0]
    other = add.inputs[1 - index] if len(add.inputs) == 2 else None
    return (add.op_type == "Add" and is_onnx(add) and add.graph is node.graph
            and other is not None and other.const_value is None)


def _into_activation(node: ir.Node, skipped: Iterable[ir.Node]) -> bool:
    """Whether this Gemm's only reader is a Relu/Clip. onnxruntime fuses a float-output Gemm
    and its activation into a float FusedGemm before its QDQ fusions, which then dequantizes
    the weight on every run (a 4096 x 64 Gemm: 1.24x float); with Q after the activation it
    runs as QGemm, the activation dropped (docs/decisions.md)."""
    users = node.outputs[0].uses()
    return (node.op_type == "Gemm" and len(users) == 1 and users[0][0].op_type in FOLD_OPS
            and users[0][0] not in skipped and users[0][0].graph is node.graph)


def _constant_weight_index(node: ir.Node) -> int | None:
    slot = weight_slot(node)
    if slot is None:
        return None
    value = slot.node.inputs[slot.index]
    if len(value.const_value.shape) < 2 or value.dtype != ir.DataType.FLOAT:
        return None
    return slot.index


class _Planner:
    def __init__(self, graph: ir.Graph, skip: frozenset[str], float_tensors: frozenset[str],
                 float_nodes: frozenset[ir.Node] = frozenset(),
                 float_units: frozenset[str] = frozenset()):
        self.graph = graph
        self.float_tensors = float_tensors
        self.outputs = {v.name for v in graph.outputs}
        self.skipped = {n for n in graph if in_skip(n, skip)
                        or not is_onnx(n) or n in float_nodes}
        candidates = {n for n in graph if n not in self.skipped and self._candidate(n)}
        # Kept float for speed, their outputs still feed integer units (quantized where those
        # read them), as the latency plan costed them.
        self.kept_float = {n for n in candidates if node_key(n) in float_units}
        self.units = candidates - self.kept_float
        self._prune_elementwise()

    def _candidate(self, node: ir.Node) -> bool:
        if node.op_type not in QUANT_OPS or not node.outputs:
            return False
        if any(v.name in self.float_tensors for v in (*_activations(node), node.outputs[0])):
            return False
        if node.op_type in WEIGHT_OPS and node.op_type != "MatMul":
            return _constant_weight_index(node) is not None
        if node.op_type == "Add" and any(
                v is not None and v.const_value is not None and v.const_value.size == 1
                for v in node.inputs):
            # A shift of one tensor: QLinearAdd would round it once more (docs/decisions.md,
            # scalar Add).
            return False
        if node.op_type == "HardSigmoid":
            # Its integer form adds beta/alpha and rescales by alpha (integer_activations.py).
            alpha = node.attributes.get("alpha")
            return alpha is None or alpha.as_float() > 0
        return True

    def readers(self, value: ir.Value) -> bool:
        """Whether an integer unit reads `value`, directly or through SHARE/FOLD ops."""
        for user, _ in value.uses():
            if user in self.skipped or user.graph is not self.graph:
                continue
            if user in self.units:
                return True
            if user.op_type in SHARE_OPS | FOLD_OPS and any(
                    self.readers(out) for out in user.outputs):
                return True
        return False

    def from_unit(self, value: ir.Value) -> bool:
        """Whether `value` is already quantized upstream (a unit, through SHARE/FOLD ops)."""
        producer = value.producer()
        if producer is None:
            return value in self.graph.inputs or value.graph not in (None, self.graph)
        if producer.graph is not self.graph or producer in self.units | self.kept_float:
            return True
        if producer in self.skipped:
            return False
        if producer.op_type in SHARE_OPS | FOLD_OPS and producer.inputs:
            source = producer.inputs[0]
            return source is not None and self.from_unit(source)
        return False

    def _prune_elementwise(self) -> None:
        changed = True
        while changed:
            changed = False
            for node in [n for n in self.units if n.op_type in ELEMENTWISE_OPS]:
                if not (all(self.from_unit(v) for v in _activations(node))
                        and self.readers(node.outputs[0])):
                    logger.debug("%s %s stays float: an input is float or no integer op "
                                 "reads its output", node.op_type, node.name)
                    self.units.discard(node)
                    changed = True


def plan_quantization(
    graph: ir.Graph, skip: frozenset[str] = frozenset(),
    float_tensors: frozenset[str] = frozenset(),
    float_nodes: frozenset[ir.Node] = frozenset(),
    float_units: frozenset[str] = frozenset(),
) -> QuantPlan:
    """Decide the node units and quantized tensors of `graph` (its subgraphs: body_plan).

    `skip` names nodes (or op types) the user keeps float, `float_nodes` are nodes of `graph`
    kept float by a decision of ptqconv's; `float_tensors` must stay float (calibration found
    them unquantizable, e.g. masks). `float_units` (node keys, graph.naming.node_key) are not
    units, like ops without integer kernels: unlike skipped nodes they read dequantized
    tensors, so their neighbours still fuse, and their outputs are quantized where units read
    them (latency_plan.py keeps them float for speed, and costs them so).
    """
    planner = _Planner(graph, skip, float_tensors, float_nodes, float_units)
    plan = QuantPlan(skipped=planner.skipped)
    marked: dict[str, None] = {}  # ordered set of activation tensors to quantize

    def mark(value: ir.Value | None) -> None:
        if _is_float(value) and value.name and value.name not in float_tensors:
            marked[value.name] = None

    for node in graph:
        if node not in planner.units:
            continue
        plan.units.append(node)
        weight_index = _constant_weight_index(node) if node.op_type in WEIGHT_OPS else None
        if weight_index is not None:
            plan.weights.append(PlannedWeight(node, weight_index, weight_slot(node).axis))
        bias_index = BIAS_INDEX.get(node.op_type)
        for index, value in enumerate(node.inputs):
            if value is None or index == weight_index:
                continue
            if index == bias_index and weight_index is not None:
                if value.const_value is not None and len(value.const_value.shape) == 1:
                    plan.biases.append(PlannedBias(node, index, node))
                continue
            if value.const_value is not None:
                if _is_float(value) and value.name not in plan.constants:
                    plan.constants.append(value.name)
                continue
            mark(value)
        output = node.outputs[0]
        if (node.op_type in FLOAT_OUTPUT_OK and not planner.readers(output)
                and not _into_sum(node) and not _into_activation(node, planner.skipped)):
            bias = _matmul_bias(node, weight_index, planner.skipped)
            if bias is not None:
                plan.biases.append(PlannedBias(*bias, node))
            continue  # runs as MatMulIntegerToFloat / QGemm with a float output
        users = output.uses()
        if (len(users) == 1 and output.name not in planner.outputs
                and users[0][0].op_type in FOLD_OPS and users[0][0] not in planner.skipped
                and node.op_type not in NO_FOLD):
            plan.folded[output.name] = users[0][0].outputs[0].name
            mark(users[0][0].outputs[0])
        else:
            mark(output)

    for node in graph:
        fixed = FIXED_RANGES.get(node.op_type)
        # A probability suits [0, 1] wherever it is quantized; Tanh needs it as a unit only.
        if (fixed and node.outputs[0].name in marked
                and (node.op_type == "Softmax" or node in planner.units)):
            plan.fixed[node.outputs[0].name] = fixed

    # Data-movement ops whose input is quantized pass the same scale through.
    for node in graph:
        if node in planner.skipped or node.op_type not in SHARE_OPS or not node.inputs:
            continue
        source = node.inputs[0]
        if source is None or source.const_value is not None or not node.outputs:
            continue
        if source.name not in marked and source.name not in plan.shared:
            continue
        for out in node.outputs:  # every part of a Split
            if _is_float(out) and out.name not in float_tensors:
                plan.shared[out.name] = plan.shared.get(source.name, source.name)
                marked.pop(out.name, None)

    plan.observe = [name for name in marked if name not in plan.fixed]
    return plan


def activation_products(graph: ir.Graph) -> frozenset[ir.Node]:
    """The MatMuls of two activations (attention's Q.K^T and probs.V): no weights."""
    return frozenset(n for n in graph if n.op_type == "MatMul" and is_onnx(n)
                     and weight_slot(n) is None and len(_activations(n)) == 2)


def output_units(graph: ir.Graph) -> frozenset[ir.Node]:
    """The elementwise nodes (cheap to keep float) that write a model output, directly or
    through data-movement ops: quantizing there rounds what the user reads."""
    found = set()
    for output in graph.outputs:
        value: ir.Value | None = output
        while value is not None and (producer := value.producer()) is not None:
            if producer.op_type in ELEMENTWISE_OPS:
                found.add(producer)
                break
            if producer.op_type not in SHARE_OPS | FOLD_OPS or not producer.inputs:
                break
            value = producer.inputs[0]
    return frozenset(found)
