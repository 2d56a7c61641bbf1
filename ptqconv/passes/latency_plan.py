"""Latency-aware planning: the node units that stay float because onnxruntime runs them faster
in float on this kind of CPU.

On x86 without VNNI, onnxruntime's integer kernels beat its float ones on large GEMM-like
work (QLinearConv at 0.45-0.6x the float time) and lose on the rest: image stems with three
input channels, depthwise convs, and tiny ops where the per-kernel cost dominates. Each
boundary between integer and float also costs a QuantizeLinear or DequantizeLinear pass over
the tensor, plus an NHWC <-> NCHW layout change in conv nets. Each unit gets a predicted cost
as float and as integer kernel from its shapes (seen in calibration), each quantized tensor a
boundary cost where its producer and a reader disagree, and the cheapest labelling of the
whole graph is a minimum cut (graph.min_cut): a global optimum, and deterministic, unlike
timing candidate layouts on a loaded machine. The cost constants come from onnxruntime
profiles of the corpus models (docs/decisions.md, latency cost model); the measured latency
of the result is reported beside the prediction.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ptqconv.graph import min_cut
from ptqconv.graph.naming import node_key
from ptqconv.graph.ops import is_depthwise
from ptqconv.graph.weight_slots import weight_slot
from ptqconv.passes.qdq_plan import FOLD_OPS, SHARE_OPS, WEIGHT_OPS, QuantPlan

logger = logging.getLogger(__name__)
MILLION = 1e6
# Unobserved shapes are derived through at most this many ops (attention's scores: MatMul,
# Mul, Add, Softmax).
SHAPE_DEPTH = 6
CONV_OPS = frozenset({"Conv", "ConvTranspose"})
# Ops whose output has the broadcast shape of their inputs.
SAME_SHAPE_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Where", "Softmax", "Tanh", "Sigmoid", "Relu", "Erf", "Clip",
    "LeakyRelu", "HardSigmoid", "HardSwish", "Cast", "Sqrt", "Neg", "Exp", "Gelu"})


@dataclass(frozen=True)
class KernelCost:
    """µs of `kernels` kernel launches: per launch (on top of DISPATCH), per million MACs
    (or per million weights read, when reading the weights takes longer: GEMV), per million
    outputs, per million output pixels (the depthwise kernel's per-position overhead)."""

    call: float
    mac: float = 0.0
    out: float = 0.0
    weights: float = 0.0
    pixels: float = 0.0
    kernels: int = 1

    def us(self, macs: float = 0.0, outputs: float = 0.0, weights: float = 0.0,
           pixels: float = 0.0) -> float:
        work = max(self.mac * macs, self.weights * weights)
        return (self.kernels * (DISPATCH + self.call)
                + (work + self.out * outputs + self.pixels * pixels) / MILLION)


# Everything below: onnxruntime 1.32, 2 threads, AVX2 without VNNI, from kernel times in
# onnxruntime profiles of the corpus models (docs/decisions.md, latency cost model).
# Handing a kernel to the thread pool, on top of its own launch cost; more under load.
DISPATCH = 8.0
# (float, integer)
GEMM = (KernelCost(10, mac=23, out=45, weights=310), KernelCost(11, mac=11.5, out=170, weights=100))
# A MatMul of two activations (attention's Q x K^T and P x V): no weights to pack ahead, so
# QLinearMatMul barely beats the float kernel and pays its launch and requantization.
ACTIVATION_GEMM = (KernelCost(4, mac=14), KernelCost(16, mac=9.7, out=110))
# Spatial kernels over few input channels (an image stem: 3x3x3 = 27 deep): the integer
# kernel's im2col costs more than the float conv (STEM_DEPTH).
STEM = (KernelCost(10, mac=43, out=45), KernelCost(11, mac=72, out=170))
DEPTHWISE = (KernelCost(8, mac=17, out=400), KernelCost(13.5, mac=58, out=69, pixels=10400))
ELEMENTWISE = (KernelCost(7, out=300), KernelCost(10, out=300))
# Softmax (opset 13+) over an axis before the last two: onnxruntime's kernel transposes the
# axis last and back with its generic transpose. Integer, the same unless a QLinearConv reads
# it: the NHWC layout change then absorbs the transposes (YOLOv8's DFL head;
# docs/decisions.md, softmax over a leading axis).
SOFTMAX_TRANSPOSED = KernelCost(0, out=12000, kernels=0)
# An activation or a residual Add right after a float Conv runs inside it (NCHWc fusion).
FUSED = KernelCost(0, out=50, kernels=0)
FUSED_INTO_CONV = frozenset({"HardSigmoid", "Sigmoid", "Tanh", "LeakyRelu", "Add", "Mul"})
QUANTIZE, DEQUANTIZE = KernelCost(7, out=430), KernelCost(8, out=280)
# NHWC <-> NCHW(c) at a boundary of a conv net: a Transpose and a reorder.
LAYOUT = KernelCost(7, out=690, kernels=2)
STEM_DEPTH = 32
# A MaxPool (per input element) on uint8 between integer kernels (NHWC) costs more than in
# float (NCHWc); between a float producer and an integer reader, onnxruntime moves the Q
# above it and runs the slow NCHW uint8 MaxPool.
POOL_INT = KernelCost(0, out=1300, kernels=0)
POOL_PROPAGATED = KernelCost(0, out=4800, kernels=0)


@dataclass(frozen=True)
class UnitCost:
    """A unit's predicted time as float and as integer kernel (µs)."""

    name: str
    op_type: str
    float_us: float
    int_us: float


@dataclass
class LatencyPlan:
    """Units kept float for speed, and the predicted time of the units and boundaries (µs)
    with every unit float, every unit integer, and as planned."""

    kept_float: list[UnitCost] = field(default_factory=list)
    float_us: float = 0.0
    quantized_us: float = 0.0
    planned_us: float = 0.0
    keys: frozenset[str] = frozenset()  # node keys (graph.naming.node_key) of kept_float
    ordered: tuple[str, ...] = ()  # the same keys in the plan's (graph) order


# Cuts of a plan timed on a target the cost model was not measured on: its first units in
# graph order, these fractions of them (docs/decisions.md, cut plans).
CUT_FRACTIONS = (0.125, 0.25, 0.5, 0.75)


def cuts(latency: LatencyPlan) -> list[frozenset[str]]:
    """Smaller plans to time beside `latency`: the first units it keeps float, in graph
    order, CUT_FRACTIONS of them (distinct, each at least one unit, none the whole plan).
    The cost model's constants are from x86 without VNNI, where integer kernels lose on more
    units; elsewhere the units it keeps float first (image stems, early depthwise convs over
    large maps) can still be the slow ones, and a timing says which cut is fastest."""
    count = len(latency.ordered)
    sizes = sorted({max(1, round(count * f)) for f in CUT_FRACTIONS} - {count})
    return [frozenset(latency.ordered[:size]) for size in sizes]


def _elements(shape: tuple[int, ...] | None) -> float | None:
    return float(math.prod(shape)) if shape is not None else None


class _Costs:
    """Shapes and kernel costs of the units of one plan."""

    def __init__(self, plan: QuantPlan, shapes: Mapping[str, tuple[int, ...]]):
        self.plan = plan
        self.shapes = shapes
        self.units = set(plan.units)
        self._derived: dict[tuple[ir.Value, int], tuple[int, ...] | None] = {}

    def shape(self, value: ir.Value | None, depth: int = 0) -> tuple[int, ...] | None:
        """`value`'s calibration shape; for a tensor calibration did not observe (a float
        MatMul's output, Softmax's), the broadcast of its elementwise producer's known input
        shapes or a MatMul's product shape, a few ops up."""
        if value is None or not value.name:
            return None
        key = (value, depth)
        if key not in self._derived:
            self._derived[key] = self._shape(value, depth)
        return self._derived[key]

    def _shape(self, value: ir.Value, depth: int) -> tuple[int, ...] | None:
        if value.const_value is not None:
            return tuple(value.const_value.shape)
        name = self.plan.folded.get(value.name, value.name)
        found = self.shapes.get(name) or self.shapes.get(value.name)
        producer = value.producer()
        if found is not None or producer is None or depth >= SHAPE_DEPTH:
            return found
        if producer.op_type in ("MatMul", "Gemm"):
            return self._product_shape(producer, depth + 1)
        if producer.op_type in SAME_SHAPE_OPS:
            inputs = [(v, self.shape(v, depth + 1)) for v in producer.inputs if v is not None]
            # Constants alone do not size the output (a bias broadcasts to it), activations do.
            if not any(v.const_value is None and found for v, found in inputs):
                return None
            with contextlib.suppress(ValueError):
                return tuple(np.broadcast_shapes(*(found for _, found in inputs if found)))
        return None

    def elements(self, value: ir.Value | None) -> float | None:
        return _elements(self.shape(value))

    def output_shape(self, node: ir.Node) -> tuple[int, ...] | None:
        found = self.shape(node.outputs[0])
        if found is not None or node.op_type not in ("MatMul", "Gemm"):
            return found
        return self._product_shape(node)

    def _product_shape(self, node: ir.Node, depth: int = 0) -> tuple[int, ...] | None:
        """A MatMul's or Gemm's output shape from its inputs': [.., M, K] x [K, N] -> [.., M, N]."""
        a, b = self.shape(node.inputs[0], depth), self.shape(node.inputs[1], depth)
        if a is None or b is None or len(b) < 2:
            return None
        if node.op_type == "Gemm":
            rows = a[-1] if _attr(node, "transA") else a[-2]
            return (rows, b[-2] if _attr(node, "transB") else b[-1])
        with contextlib.suppress(ValueError):
            return (*np.broadcast_shapes(a[:-2], b[:-2]), a[-2] if len(a) > 1 else 1, b[-1])
        return None

    def unit(self, node: ir.Node) -> UnitCost | None:
        """Predicted float and integer time of `node`, None when a shape is unknown."""
        out_shape = self.output_shape(node)
        if out_shape is None:
            return None
        outputs = _elements(out_shape)
        if node.op_type not in WEIGHT_OPS:
            fused = _fused_into_conv(node)
            pair = self._pair(node, (FUSED if fused else ELEMENTWISE[0], ELEMENTWISE[1]),
                              outputs=outputs)
            if not _transposing_softmax(node, len(out_shape)):
                return pair
            extra = SOFTMAX_TRANSPOSED.us(outputs=outputs)
            conv_read = [u.op_type for u, _ in node.outputs[0].uses()] == ["Conv"]
            return UnitCost(pair.name, pair.op_type, pair.float_us + extra,
                            pair.int_us + (0.0 if conv_read else extra))
        weight = _weight(node)
        macs = self.macs(node)
        if macs is None:
            return None
        if node.op_type in ("MatMul", "Gemm"):
            if weight is None:
                return self._pair(node, ACTIVATION_GEMM, macs=macs, outputs=outputs)
            return self._pair(node, GEMM, macs=macs, outputs=outputs,
                              weights=float(math.prod(weight.shape)))
        if node.op_type == "ConvTranspose":
            # onnxruntime's CPU provider has no integer ConvTranspose: a quantized one runs
            # the float kernel on its dequantized input and weight, then quantizes the output
            # (docs/decisions.md, integer ConvTranspose).
            pair = self._pair(node, GEMM, macs=macs, outputs=outputs)
            weights = float(math.prod(weight.shape)) if weight is not None else 0.0
            extra = (DEQUANTIZE.us(outputs=self.elements(node.inputs[0]) or 0.0)
                     + DEQUANTIZE.us(outputs=weights) + QUANTIZE.us(outputs=outputs))
            return UnitCost(pair.name, pair.op_type, pair.float_us, pair.float_us + extra)
        if is_depthwise(node):
            return self._pair(node, DEPTHWISE, macs=macs, outputs=outputs,
                              pixels=outputs / out_shape[1])
        assert weight is not None
        kernel = math.prod(weight.shape[2:])
        stem = kernel > 1 and weight.shape[1] * kernel < STEM_DEPTH
        costs = STEM if stem else GEMM
        return self._pair(node, costs, macs=macs, outputs=outputs)

    def macs(self, node: ir.Node) -> float | None:
        """Multiply-accumulates of a GEMM-like unit (None when a shape is unknown)."""
        out_shape = self.output_shape(node)
        if out_shape is None:
            return None
        outputs = _elements(out_shape)
        weight = _weight(node)
        if node.op_type in ("MatMul", "Gemm"):
            a = self.shape(node.inputs[0])
            if a is None:
                return None
            transposed = node.op_type == "Gemm" and _attr(node, "transA")
            return outputs * (a[-2] if transposed else a[-1])
        if weight is None or len(out_shape) < 3:
            return None
        kernel = math.prod(weight.shape[2:])
        if node.op_type == "ConvTranspose":
            return (self.elements(node.inputs[0]) or 0.0) * weight.shape[1] * kernel
        return outputs * weight.shape[1] * kernel

    @staticmethod
    def _pair(node: ir.Node, costs: tuple[KernelCost, KernelCost], **work: float) -> UnitCost:
        return UnitCost(node.name or node.op_type, node.op_type, costs[0].us(**work),
                        costs[1].us(**work))

    def boundary(self, value: ir.Value, cost: KernelCost, layout: bool = True) -> float:
        """A Q or DQ pass over `value`, with the layout change between two convs' feature
        maps (next to float ops, float convs reorder their layout too: it costs the same)."""
        shape = self.shape(value)
        outputs = _elements(shape) or 0.0
        change = LAYOUT.us(outputs=outputs) if layout and shape is not None and len(
            shape) == 4 and _feature_map(value) else 0.0
        return cost.us(outputs=outputs) + change


def _weight(node: ir.Node) -> ir.TensorProtocol | None:
    slot = weight_slot(node)
    return slot.node.inputs[slot.index].const_value if slot else None


def product_share(plan: QuantPlan, shapes: Mapping[str, tuple[int, ...]],
                  products: frozenset[ir.Node]) -> float:
    """The share of the multiply-accumulates of `plan`'s GEMM-like units that `products` (the
    MatMuls of two activations) do; 1.0 when one of them cannot be sized."""
    costs = _Costs(plan, shapes)
    total = theirs = 0.0
    for node in plan.units:
        if node.op_type not in WEIGHT_OPS:
            continue
        macs = costs.macs(node)
        if macs is None and node in products:
            return 1.0
        total += macs or 0.0
        theirs += (macs or 0.0) if node in products else 0.0
    return theirs / total if total else 1.0


def _feature_map(value: ir.Value) -> bool:
    """Whether a conv writes or reads `value` (through data-movement ops): only conv feature
    maps change layout at a boundary, not attention's 4-D tensors."""
    producer = value.producer()
    while producer is not None and producer.op_type in SHARE_OPS | FOLD_OPS and producer.inputs \
            and producer.inputs[0] is not None:
        producer = producer.inputs[0].producer()
    if producer is not None and producer.op_type in CONV_OPS:
        return True
    pending, seen = [value], set()
    while pending:
        current = pending.pop()
        for user, _ in current.uses():
            if user.op_type in CONV_OPS:
                return True
            if user.op_type in SHARE_OPS | FOLD_OPS and user not in seen:
                seen.add(user)
                pending.extend(user.outputs)
    return False


def _transposing_softmax(node: ir.Node, rank: int) -> bool:
    """Whether onnxruntime runs this Softmax by transposing its axis last (opset 13+, an
    axis before the last two; older Softmax flattens the trailing axes instead)."""
    if node.op_type != "Softmax" or node.graph is None:
        return False
    opset = node.version or node.graph.opset_imports.get("", 0)
    axis = _attr(node, "axis") if "axis" in node.attributes else -1
    return opset >= 13 and axis % max(rank, 1) < rank - 2


def _fused_into_conv(node: ir.Node) -> bool:
    """Whether onnxruntime runs float `node` inside the float Conv before it: an activation
    of the Conv's output, the Mul of hard-swish (x * HardSigmoid(x)), a residual Add."""
    if node.op_type not in FUSED_INTO_CONV:
        return False
    producers = [v.producer() if v is not None else None for v in node.inputs]
    if node.op_type == "Mul":
        gate = next((p for p in producers if p is not None and p.op_type == "HardSigmoid"),
                    None)
        return gate is not None and gate.inputs[0] in node.inputs and _fused_into_conv(gate)
    return any(p is not None and p.op_type == "Conv" for p in producers)


def _attr(node: ir.Node, name: str) -> int:
    attribute = node.attributes.get(name)
    return attribute.as_int() if attribute is not None else 0


def _pooled(node: ir.Node, costs: _Costs) -> float:
    """Input elements of a MaxPool (from its output shape and strides), else 0."""
    if node.op_type != "MaxPool":
        return 0.0
    strides = node.attributes.get("strides")
    return (costs.elements(node.outputs[0]) or 0.0) * math.prod(
        strides.as_ints() if strides is not None else [1])


def _source(value: ir.Value, units: set[ir.Node], costs: _Costs,
            ) -> tuple[ir.Node | None, float]:
    """The unit whose output `value` is, through data-movement and folded ops (None if
    none), and the elements MaxPools on the way read."""
    producer, pooled = value.producer(), 0.0
    while producer is not None and producer not in units and (
            producer.op_type in SHARE_OPS | FOLD_OPS) and producer.inputs:
        pooled += _pooled(producer, costs)
        source = producer.inputs[0]
        producer = source.producer() if source is not None else None
    return (producer if producer in units else None), pooled


def _readers(value: ir.Value, units: set[ir.Node], costs: _Costs, pooled: float = 0.0,
             ) -> Iterator[tuple[ir.Node | None, float]]:
    """The units reading `value` through data-movement and folded ops (None for every other
    reader: a float op or a graph output), each with the elements MaxPools on the way read."""
    if value.is_graph_output():
        yield None, pooled
    for user, _ in value.uses():
        if user in units:
            yield user, pooled
        elif user.op_type in SHARE_OPS | FOLD_OPS and user.outputs:
            for out in user.outputs:  # every part of a Split
                yield from _readers(out, units, costs, pooled + _pooled(user, costs))
        else:
            yield None, pooled


@dataclass(frozen=True)
class _Tensor:
    """A unit's quantized output read by costed units: a DQ is due when the producer is
    integer and a reader float (`dequantize` is 0 when float ops read it anyway), a Q in the
    other case."""

    producer: ir.Node
    readers: tuple[ir.Node, ...]
    quantize: float
    dequantize: float

    def cost(self, integer: set[ir.Node]) -> float:
        if self.producer in integer:
            return self.dequantize if any(r not in integer for r in self.readers) else 0.0
        return self.quantize if any(r in integer for r in self.readers) else 0.0


def plan_latency(plan: QuantPlan, shapes: Mapping[str, tuple[int, ...]],
                 keep: frozenset[str] | None = None) -> LatencyPlan:
    """The units of `plan` to keep float so that the whole runs fastest, by the cost model;
    with `keep` (node keys), those units instead, with the cost model's predictions.

    `shapes` holds the calibration shapes of the plan's tensors; a unit whose work cannot be
    sized stays integer (it is not costed).
    """
    costs = _Costs(plan, shapes)
    quantized = set(plan.quantized_tensors())
    all_units = set(plan.units)
    unit_costs = {node: cost for node in plan.units if (cost := costs.unit(node)) is not None}
    units = set(unit_costs)
    # Boundaries with what does not depend on the cut (float ops, model inputs and outputs,
    # units that cannot be costed and stay integer) go to one label of the unit.
    int_us = {node: cost.int_us for node, cost in unit_costs.items()}
    float_us = {node: cost.float_us for node, cost in unit_costs.items()}
    tensors: list[_Tensor] = []
    for node in units:
        for value in {v for v in node.inputs if v is not None and v.name in quantized}:
            origin, pooled = _source(value, all_units, costs)
            if origin is None:
                int_us[node] += costs.boundary(value, QUANTIZE, layout=False) + (
                    POOL_INT.us(outputs=pooled) + POOL_PROPAGATED.us(outputs=pooled))
            elif origin not in units:
                int_us[node] += POOL_INT.us(outputs=pooled)
                float_us[node] += costs.boundary(value, DEQUANTIZE)
        out = node.outputs[0]
        if plan.folded.get(out.name, out.name) not in quantized:
            continue  # a float output (MatMulIntegerToFloat): no boundary
        readers: dict[ir.Node | None, float] = {}
        for reader, pooled in _readers(out, all_units, costs):
            readers[reader] = max(readers.get(reader, 0.0), pooled)
        float_read = None in readers
        # An integer MatMul whose readers are float writes float (MatMulIntegerToFloat): no
        # DequantizeLinear pass. onnxruntime has no such fusion for Gemm (a float Gemm reads
        # its weights through a DequantizeLinear then).
        dequantize = 0.0 if node.op_type == "MatMul" else costs.boundary(
            out, DEQUANTIZE, layout=False)
        if float_read:
            int_us[node] += dequantize
        if any(r is not None and r not in units for r in readers):
            float_us[node] += costs.boundary(out, QUANTIZE)
        known = tuple(r for r in readers if r in units)
        for reader in known:
            int_us[reader] += POOL_INT.us(outputs=readers[reader])
        if known:
            propagated = POOL_PROPAGATED.us(outputs=max(readers[r] for r in known))
            tensors.append(_Tensor(
                node, known, costs.boundary(out, QUANTIZE) + propagated,
                0.0 if float_read or not dequantize else costs.boundary(out, DEQUANTIZE)))
    source, sink = "source", "sink"  # integer, float
    edges: list[tuple[object, object, float]] = []
    for node in units:
        edges += [(source, node, float_us[node]), (node, sink, int_us[node])]
    for index, tensor in enumerate(tensors):
        quantize, dequantize = ("q", index), ("dq", index)
        edges.append((quantize, tensor.producer, tensor.quantize))
        edges += [(reader, quantize, math.inf) for reader in tensor.readers]
        edges.append((tensor.producer, dequantize, tensor.dequantize))
        edges += [(dequantize, reader, math.inf) for reader in tensor.readers]
    if keep is None:
        finite = sum(c for _, _, c in edges if math.isfinite(c)) + 1.0
        integer = min_cut.source_side(
            [(a, b, c if math.isfinite(c) else finite) for a, b, c in edges], source, sink)
        integer_units = {n for n in units if n in integer}
    else:
        integer_units = {n for n in units if node_key(n) not in keep}

    def total(labelled: set[ir.Node]) -> float:
        return (sum(int_us[n] if n in labelled else float_us[n] for n in units)
                + sum(t.cost(labelled) for t in tensors))

    kept_nodes = [n for n in plan.units if n in units and n not in integer_units]
    kept = [unit_costs[n] for n in kept_nodes]
    ordered = tuple(node_key(n) for n in kept_nodes)
    for cost in kept:
        logger.debug("%s %s kept float for speed: predicted %.1f us float, %.1f us integer",
                     cost.op_type, cost.name, cost.float_us, cost.int_us)
    return LatencyPlan(
        kept_float=kept,
        float_us=total(set()),
        quantized_us=total(units),
        planned_us=total(integer_units),
        keys=frozenset(ordered),
        ordered=ordered,
    )
