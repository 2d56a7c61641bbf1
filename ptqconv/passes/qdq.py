"""QDQ insertion: rewrite a float graph into the QuantizeLinear/DequantizeLinear layout that
onnxruntime's CPU provider fuses into integer kernels (uint8 activations, int8 symmetric
per-channel weights, int32 bias with scale = input scale x weight scale)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ptqconv import qparams
from ptqconv.graph.initializers import add_initializer
from ptqconv.graph.naming import NameAllocator, node_key, values_by_name
from ptqconv.graph.ops import is_depthwise
from ptqconv.passes.qdq_plan import WEIGHT_OPS, PlannedBias, PlannedWeight, QuantPlan
from ptqconv.weights.layout import IntegerWeight, WeightLayout

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
# Ops whose weight rounding error bias correction measures.
CORRECTED_OPS = ("Conv", "Gemm")


@dataclass(frozen=True)
class ActivationParams:
    """The grid of one quantized activation: its scale and zero point, as numbers and as the
    initializers the Q/DQ nodes read."""

    scale: float
    zero_point: int
    scale_value: ir.Value
    zero_point_value: ir.Value


@dataclass(frozen=True)
class QuantizedWeight:
    """One weight as the QDQ pass quantized it (kept for the per-layer report)."""

    name: str
    values: np.ndarray  # float
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None  # None: per tensor
    owner: str  # the node's name (or op type)
    grid: qparams.Grid


@dataclass(frozen=True)
class WeightError:
    """W - dequantized W of a Conv/Gemm, for bias correction."""

    node: ir.Node
    error: np.ndarray
    input_name: str  # the float activation the node reads (before Q/DQ)


@dataclass
class QDQResult(ir.passes.PassResult):
    """What the pass did, beyond the rewritten model."""

    activation_grid: qparams.Grid | None = None
    weight_grid: qparams.Grid | None = None  # of the GEMM kernels (depthwise convs may differ)
    # float tensor name -> its grid (shared tensors under their own names too)
    activations: dict[str, ActivationParams] = field(default_factory=dict)
    dequantized: dict[str, str] = field(default_factory=dict)  # float name -> dequantized name
    activation_ranges: int = 0  # distinct grids made (tensors sharing one count once)
    weights_quantized: int = 0
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)  # with keep_weights
    # node key (graph.naming.node_key in the float graph) -> error, with keep_weight_errors
    weight_errors: dict[str, WeightError] = field(default_factory=dict)

    @property
    def quantize_nodes(self) -> int:
        return sum(1 for n in self.model.graph if n.op_type == "QuantizeLinear")


class QDQPass(ir.passes.InPlacePass):
    """Insert Q/DQ pairs on planned activations and DQ on quantized weights, biases, constants.

    `ranges` maps every observed or fixed tensor of `plan` to its float range; shared tensors
    reuse their source's scale and zero point (the same initializers).
    """

    def __init__(self, plan: QuantPlan, ranges: Mapping[str, tuple[float, float]], bits: int,
                 per_channel: bool = True, keep_weight_errors: bool = False,
                 keep_weights: bool = False, reduce_range: bool = True,
                 act_bits: int | None = None, weights: dict | None = None,
                 integer_weights: Mapping[str, IntegerWeight] | None = None):
        super().__init__()
        self.plan = plan
        self.ranges = ranges
        self.bits = bits
        self.per_channel = per_channel
        self.reduce_range = reduce_range
        self.act_grid = qparams.activation_grid(act_bits or bits)
        self.keep_weights = keep_weights
        self.keep_weight_errors = keep_weight_errors
        # (tensor, grid, axis) -> (q, scale, zero point): builds that share a weight tensor
        # (clones share tensors) quantize it once.
        self.cache = weights if weights is not None else {}
        # Integers chosen elsewhere (GPTQ), by weight name: used where their layout is the
        # one this pass would write, so the DequantizeLinear layout never changes.
        self.integer_weights = integer_weights or {}

    def call(self, model: ir.Model) -> QDQResult:
        graph = model.graph
        self.graph = graph
        self.names = NameAllocator(graph)
        # Keys before any rename: a quantized graph output gives its name to the DQ output.
        self.keys = {node: node_key(node) for node in graph}
        self.input_names = {node: node.inputs[0].name for node in graph
                            if node.inputs and node.inputs[0] is not None}
        self.result = QDQResult(model, True, self.act_grid,
                                qparams.fused_weight_grid(self.bits, self.reduce_range))
        self.roots: dict[str, ActivationParams] = {}
        self.weight_scales: dict[tuple[ir.Node, int], np.ndarray] = {}
        values = values_by_name(graph)
        # Roots first (their parameters are created), then the tensors that share them.
        for name in self.plan.quantized_tensors():
            if name in values and self._params(name) is not None:
                self._insert_qdq(values[name])
        for weight in self.plan.weights:
            self._quantize_weight(weight)
        for bias in self.plan.biases:
            self._quantize_bias(bias)
        for name in self.plan.constants:
            if name in values:
                self._quantize_constant(values[name])
        return self.result

    # --- activations -------------------------------------------------------------------

    def _params(self, name: str) -> ActivationParams | None:
        root = self.plan.shared.get(name, name)
        if root in self.roots:
            return self.roots[root]
        bounds = self.plan.fixed.get(root) or self.ranges.get(root)
        if bounds is None:
            return None
        if root in self.plan.fixed:
            # onnxruntime's QLinearSoftmax wants y_scale = 1/256, zp 0 for uint8.
            scale = np.float32(1.0 / (self.act_grid.qmax + 1))
            zero_point = np.int64(0)
        else:
            scale, zero_point = qparams.scale_zero_point(bounds[0], bounds[1], self.act_grid)
        scale_value = add_initializer(self.graph, self.names.new(f"{root}_scale"),
                                      np.asarray(scale, np.float32))
        zp_value = add_initializer(self.graph, self.names.new(f"{root}_zero_point"),
                                   np.asarray(zero_point, np.uint8))
        self.roots[root] = ActivationParams(float(scale), int(zero_point), scale_value,
                                            zp_value)
        self.result.activation_ranges += 1
        return self.roots[root]

    def _insert_qdq(self, value: ir.Value) -> None:
        params = self._params(value.name)
        uses = list(value.uses())
        name = value.name
        grid_inputs = [params.scale_value, params.zero_point_value]
        quant = ir.node("QuantizeLinear", [value, *grid_inputs],
                        name=self.names.new(f"{name}_QuantizeLinear"))
        dequant = ir.node("DequantizeLinear", [quant.outputs[0], *grid_inputs],
                          name=self.names.new(f"{name}_DequantizeLinear"))
        quant.outputs[0].name = self.names.new(f"{name}_quantized")
        quant.outputs[0].type = ir.TensorType(self.act_grid.storage)
        quant.outputs[0].shape = value.shape
        out = dequant.outputs[0]
        out.type = ir.TensorType(ir.DataType.FLOAT)
        out.shape = value.shape
        producer = value.producer()
        if producer is None:
            first = next(iter(self.graph), None)
            self.graph.insert_before(first, [quant, dequant])
        else:
            self.graph.insert_after(producer, [quant, dequant])
        for user, index in uses:
            # Nodes the user keeps in float read the float tensor, so onnxruntime cannot
            # fuse them into a DQ -> op -> Q integer kernel.
            if user not in self.plan.skipped:
                user.replace_input_with(index, out)
        if not out.uses() and not value.is_graph_output():
            self.graph.remove([quant, dequant], safe=True)
            return
        if value.is_graph_output():
            # The graph output keeps its name and becomes the dequantized value, so the
            # producer is followed by Q and can be fused.
            for i, output in enumerate(self.graph.outputs):
                if output is value:
                    self.graph.outputs[i] = out
            value.name = self.names.new(f"{name}_float")
            out.name = name
        else:
            out.name = self.names.new(f"{name}_dequantized")
        self.result.dequantized[name] = out.name
        self.result.activations[name] = params

    # --- weights, biases, constants ----------------------------------------------------

    def _quantize_weight(self, planned: PlannedWeight) -> None:
        node, index = planned.node, planned.index
        value = node.inputs[index]
        if value.const_value is None:
            return
        weights = value.const_value.numpy()
        axis = planned.axis if self.per_channel else None
        grid = weight_grid_for(node, self.bits, self.reduce_range)
        key = (id(value.const_value), grid, axis)
        given = self.integer_weights.get(value.name or "")
        if (given is not None and given.layout == WeightLayout(grid, axis)
                and given.q.shape == weights.shape):
            q, scale, zero_point = given.q.astype(np.int8), given.scale, given.zero_point
        else:
            if key not in self.cache:
                rmin, rmax = qparams.tensor_range(weights, axis)
                scale, zero_point = qparams.scale_zero_point(rmin, rmax, grid)
                q = qparams.quantize(weights, scale, zero_point, grid, axis, dtype=np.int8)
                self.cache[key] = (value.const_value, q, scale, zero_point)
            _, q, scale, zero_point = self.cache[key]
        self.weight_scales[(node, index)] = scale
        name = value.name
        if self.keep_weights:
            self.result.weights[name] = QuantizedWeight(name, weights, scale, zero_point, axis,
                                                        node.name or node.op_type, grid)
        if self.keep_weight_errors and node.op_type in CORRECTED_OPS:
            error = weights - qparams.dequantize(q, scale, zero_point, axis)
            for user, _ in value.uses():
                if user.op_type in CORRECTED_OPS:
                    self.result.weight_errors[self.keys[user]] = WeightError(
                        user, error, self.input_names.get(user, ""))
        inputs = [add_initializer(self.graph, self.names.new(f"{name}_quantized"), q),
                  add_initializer(self.graph, self.names.new(f"{name}_scale"), scale),
                  add_initializer(self.graph, self.names.new(f"{name}_zero_point"),
                                  np.zeros(scale.shape, np.int8))]
        out = self._dequantize(inputs, {"axis": planned.axis} if axis is not None else {}, name,
                               weights.shape)
        for user, i in list(value.uses()):
            if user.op_type in WEIGHT_OPS:
                user.replace_input_with(i, out)
                self.weight_scales[(user, i)] = scale
        if not value.uses() and name in self.graph.initializers:
            self.graph.initializers.pop(name)
        self.result.weights_quantized += 1

    def _quantize_bias(self, planned: PlannedBias) -> None:
        """The planned input as int32 with the scale of the unit's input x weight."""
        node, index = planned.node, planned.index
        value = node.inputs[index]
        input_params = self._input_params(planned.unit)
        weight_scale = self.weight_scales.get((planned.unit, 1))
        if value is None or value.const_value is None or input_params is None or (
                weight_scale is None):
            return
        bias = value.const_value.numpy().astype(np.float64)
        bias_scale = np.float64(input_params.scale) * weight_scale.astype(np.float64)
        bias_scale = np.broadcast_to(bias_scale, bias.shape) if bias_scale.ndim else bias_scale
        q = np.clip(np.rint(bias / bias_scale), INT32_MIN, INT32_MAX).astype(np.int32)
        name = value.name
        scale32 = np.asarray(bias_scale, np.float32)
        inputs = [add_initializer(self.graph, self.names.new(f"{name}_quantized"), q),
                  add_initializer(self.graph, self.names.new(f"{name}_scale"), scale32)]
        out = self._dequantize(inputs, {"axis": 0} if scale32.ndim else {}, name, bias.shape)
        node.replace_input_with(index, out)
        if not value.uses() and name in self.graph.initializers:
            self.graph.initializers.pop(name)

    def _input_params(self, node: ir.Node) -> ActivationParams | None:
        source = node.inputs[0]
        producer = source.producer() if source is not None else None
        if producer is None or producer.op_type != "DequantizeLinear":
            return None
        scale = producer.inputs[1]
        return next((p for p in self.roots.values() if p.scale_value is scale), None)

    def _quantize_constant(self, value: ir.Value) -> None:
        array = value.const_value.numpy()
        if array.dtype != np.float32:
            return
        scale, zero_point = qparams.scale_zero_point(array.min(), array.max(), self.act_grid)
        q = qparams.quantize(array, scale, zero_point, self.act_grid, dtype=np.uint8)
        name = value.name
        units = set(self.plan.units)
        users = [(u, i) for u, i in value.uses() if u in units]
        if not users:
            return
        inputs = [add_initializer(self.graph, self.names.new(f"{name}_quantized"), q),
                  add_initializer(self.graph, self.names.new(f"{name}_scale"),
                                  np.asarray(scale, np.float32)),
                  add_initializer(self.graph, self.names.new(f"{name}_zero_point"),
                                  np.asarray(zero_point, np.uint8))]
        out = self._dequantize(inputs, {}, name, array.shape)
        for user, i in users:
            user.replace_input_with(i, out)
        if not value.uses() and name in self.graph.initializers:
            self.graph.initializers.pop(name)

    def _dequantize(self, inputs: list[ir.Value], attributes: dict, name: str,
                    shape: tuple[int, ...]) -> ir.Value:
        node = ir.node("DequantizeLinear", inputs, attributes,
                       name=self.names.new(f"{name}_DequantizeLinear"))
        out = node.outputs[0]
        out.name = self.names.new(f"{name}_dequantized")
        out.type = ir.TensorType(ir.DataType.FLOAT)
        out.shape = ir.Shape(shape)
        # Weight DQ nodes depend only on initializers: put them at the top, in a stable order.
        self.graph.insert_before(next(iter(self.graph)), node)
        return out


def weight_grid_for(node: ir.Node, bits: int, reduce_range: bool) -> qparams.Grid:
    """The int8 grid of `node`'s weight. onnxruntime's depthwise kernel accumulates single
    products in int32, so it cannot saturate like the GEMM kernels: depthwise weights keep the
    full 8-bit grid (docs/decisions.md, depthwise weights)."""
    return qparams.fused_weight_grid(bits, reduce_range and not is_depthwise(node))
