"""QDQ insertion: rewrite a float graph into the QuantizeLinear/DequantizeLinear layout that
onnxruntime's CPU provider fuses into integer kernels (uint8 activations, int8 symmetric
per-channel weights, int32 bias with scale = input scale x weight scale).

Inside If / Loop / Scan bodies (`body_plan`) the layout is the same, with one rule
onnxruntime's fusions need: every DequantizeLinear lives in the graph of the node that reads
it. An activation is quantized once, in the graph that defines it, and dequantized in each
graph whose units read it; a weight's integer initializers stay where the float weight was
(outer-scope initializers fuse), its DequantizeLinear goes into each graph that uses it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ptqconv import qparams
from ptqconv.graph.initializers import add_initializer, release_mapping
from ptqconv.graph.naming import NameAllocator, node_key
from ptqconv.graph.ops import is_depthwise
from ptqconv.graph.subgraphs import all_nodes, all_values, owner
from ptqconv.passes.body_plan import every_plan
from ptqconv.passes.qdq_plan import WEIGHT_OPS, PlannedBias, PlannedWeight, QuantPlan
from ptqconv.weights import layout as layouts
from ptqconv.weights.layout import IntegerWeight, WeightLayout

INT32_MIN, INT32_MAX = -qparams.INT32_MAX - 1, qparams.INT32_MAX
BIAS_GRID = qparams.Grid(32, INT32_MIN, INT32_MAX, ir.DataType.INT32, symmetric=True)
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
    shallow_8bit: int = 0  # of them, shallow convs kept on the 8-bit grid below 8 bits
    # weights whose scale was raised so that their layer's int32 bias holds the bias
    bias_widened: int = 0
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)  # with keep_weights
    # node key (graph.naming.node_key in the float graph) -> error, with keep_weight_errors
    weight_errors: dict[str, WeightError] = field(default_factory=dict)
    # graph outputs the dequantized value took the name of: new name of the float -> old
    renamed: dict[str, str] = field(default_factory=dict)
    # node key -> the DequantizeLinear output its weight is read from (fused: gone once
    # onnxruntime optimized the model)
    weight_inputs: dict[str, str] = field(default_factory=dict)
    # every quantized tensor's grid as its Q/DQ hold it, by float tensor name (encodings)
    activation_encodings: dict[str, qparams.Encoding] = field(default_factory=dict)
    param_encodings: dict[str, qparams.Encoding] = field(default_factory=dict)  # weights...
    imported: set[str] = field(default_factory=set)  # grids taken from `fixed`
    # op type -> activations rewritten into integer kernels (passes.integer_activations)
    integer_activations: Counter[str] = field(default_factory=Counter)
    # float hard-swishes after a DequantizeLinear written as HardSwish (float_hard_swish)
    float_hard_swish: int = 0
    # smoothed activations no quantized MatMul reads, smoothing undone (unused_smoothing)
    smoothing_undone: list[str] = field(default_factory=list)

    @property
    def quantize_nodes(self) -> int:
        return sum(1 for n in all_nodes(self.model.graph) if n.op_type == "QuantizeLinear")


class QDQPass(ir.passes.InPlacePass):
    """Insert Q/DQ pairs on planned activations and DQ on quantized weights, biases, constants.

    `ranges` maps every observed or fixed tensor of `plan` to its float range; shared tensors
    reuse their source's scale and zero point (the same initializers). `fixed` gives the grid
    of some activations and weights outright (encodings imported from a file).
    """

    def __init__(self, plan: QuantPlan, ranges: Mapping[str, tuple[float, float]], bits: int,
                 per_channel: bool = True, keep_weight_errors: bool = False,
                 keep_weights: bool = False, reduce_range: bool = True,
                 act_bits: int | None = None, weights: dict | None = None,
                 fixed: Mapping[str, qparams.Encoding] | None = None,
                 integer_weights: Mapping[str, IntegerWeight] | None = None,
                 shallow_8bit: bool = False):
        super().__init__()
        self.shallow_8bit = shallow_8bit
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
        self.fixed = fixed or {}
        # Integers chosen elsewhere (GPTQ), by weight name: used where their layout is the
        # one this pass would write, so the DequantizeLinear layout never changes.
        self.given_weights = integer_weights or {}

    def call(self, model: ir.Model) -> QDQResult:
        self.top = model.graph
        self.names = NameAllocator(self.top)
        # Keys before any rename: a quantized graph output gives its name to the DQ output.
        self.keys = {node: node_key(node) for node in self.top}
        self.input_names = {node: node.inputs[0].name for node in self.top
                            if node.inputs and node.inputs[0] is not None}
        self.result = QDQResult(model, True, self.act_grid,
                                qparams.fused_weight_grid(self.bits, self.reduce_range))
        self.roots: dict[str, ActivationParams] = {}
        self.grids: dict[str, qparams.Grid] = {}  # root -> its grid
        self.weight_scales: dict[tuple[ir.Node, int], np.ndarray] = {}
        self.quantized: dict[str, ir.Value] = {}  # activation -> its QuantizeLinear output
        # id(float weight) -> its integer initializers, shared by the graphs that read it
        self.integer_weights: dict[int, list[ir.Value]] = {}
        values = all_values(self.top)
        for graph, plan in every_plan(self.plan, self.top):
            self.graph, self.graph_plan = graph, plan
            # Roots first (their parameters are created), then the tensors that share them.
            for name in plan.quantized_tensors():
                if name in values and self._params(name) is not None:
                    self._insert_qdq(values[name])
            self.bias_of = {bias.unit: bias for bias in plan.biases}
            for weight in plan.weights:
                self._quantize_weight(weight)
            for bias in plan.biases:
                self._quantize_bias(bias)
            for name in plan.constants:
                if name in values:
                    self._quantize_constant(values[name])
        self._drop_unused_grids()
        return self.result

    def _drop_unused_grids(self) -> None:
        """Scales and zero points whose every Q/DQ pair was dropped (the tensors' readers all
        stay float): onnxruntime warns about each unused initializer on every load."""
        for params in self.roots.values():
            if params.scale_value.uses() or params.zero_point_value.uses():
                continue
            for value in (params.scale_value, params.zero_point_value):
                self.top.initializers.pop(value.name, None)
            self.result.activation_ranges -= 1

    # --- activations -------------------------------------------------------------------

    def _params(self, name: str) -> ActivationParams | None:
        root = self.graph_plan.shared.get(name, name)
        if root in self.roots:
            return self.roots[root]
        fixed = self.graph_plan.fixed
        bounds = fixed.get(root) or self.ranges.get(root)
        imported = self.fixed.get(root) if root not in fixed else None
        if bounds is None and imported is None:
            return None
        grid = self.act_grid
        if imported is not None:
            scale, zero_point, grid = imported.scale, imported.zero_point, imported.grid
            self.result.imported.add(root)
        elif root in fixed:
            # Softmax: QLinearSoftmax wants 1/256, zp 0; Tanh: a grid with -1 on it.
            scale, zero_point = qparams.fixed_scale_zero_point(*fixed[root], self.act_grid)
        else:
            scale, zero_point = qparams.scale_zero_point(bounds[0], bounds[1], self.act_grid)
        # In the main graph: every body sees it (an outer-scope initializer still fuses).
        scale_value = add_initializer(self.top, self.names.new(f"{root}_scale"),
                                      np.asarray(scale, np.float32))
        zp_value = add_initializer(self.top, self.names.new(f"{root}_zero_point"),
                                   np.asarray(zero_point, np.uint8))
        self.roots[root] = ActivationParams(float(scale), int(zero_point), scale_value,
                                            zp_value)
        self.grids[root] = grid
        self.result.activation_ranges += 1
        return self.roots[root]

    def _insert_qdq(self, value: ir.Value) -> None:
        """Q after `value` in the graph that defines it (once), DQ in the graph being
        rewritten, read by that graph's nodes."""
        params = self._params(value.name)
        graph, home = self.graph, owner(value)
        # Nodes of other graphs (bodies, or the graph around one) are rewired by their plans.
        uses = [(user, index) for user, index in value.uses() if user.graph is graph]
        name = value.name
        grid_inputs = [params.scale_value, params.zero_point_value]
        quant = None
        quantized = self.quantized.get(name)
        if quantized is None:
            quant = ir.node("QuantizeLinear", [value, *grid_inputs],
                            name=self.names.new(f"{name}_QuantizeLinear"))
            quantized = quant.outputs[0]
        dequant = ir.node("DequantizeLinear", [quantized, *grid_inputs],
                          name=self.names.new(f"{name}_DequantizeLinear"))
        if quant is not None:
            quantized.name = self.names.new(f"{name}_quantized")
            quantized.type = ir.TensorType(self.act_grid.storage)
            quantized.shape = value.shape
        out = dequant.outputs[0]
        out.type = ir.TensorType(ir.DataType.FLOAT)
        out.shape = value.shape
        if home is graph:  # graphs are rewritten outermost first: Q is new here
            _insert_after_definition(graph, value, [quant, dequant])
        else:
            if quant is not None:
                _insert_after_definition(home or self.top, value, [quant])
            graph.insert_before(next(iter(graph)), dequant)
        for user, index in uses:
            # Nodes the user keeps in float read the float tensor, so onnxruntime cannot
            # fuse them into a DQ -> op -> Q integer kernel.
            if user not in self.graph_plan.skipped:
                user.replace_input_with(index, out)
        # A graph input passed straight through as an output keeps being both: renaming it
        # would rename the model's input.
        is_output = value in graph.outputs and not value.is_graph_input()
        if not out.uses() and not is_output:
            graph.remove(dequant, safe=True)
            if quant is not None and not quantized.uses():
                quant.graph.remove(quant, safe=True)
            return
        if quant is not None:
            self.quantized[name] = quantized
        if is_output:
            # The graph output keeps its name and becomes the dequantized value, so the
            # producer is followed by Q and can be fused.
            for i, output in enumerate(graph.outputs):
                if output is value:
                    graph.outputs[i] = out
            value.name = self.names.new(f"{name}_float")
            out.name = name
            self.result.renamed[value.name] = name
        else:
            out.name = self.names.new(f"{name}_dequantized")
        self.result.dequantized.setdefault(name, out.name)
        self.result.activations[name] = params
        grid = self.grids[self.graph_plan.shared.get(name, name)]
        self.result.activation_encodings[name] = qparams.Encoding(
            np.asarray(params.scale, np.float32), np.asarray(params.zero_point, np.int64), grid)

    # --- weights, biases, constants ----------------------------------------------------

    def _quantize_weight(self, planned: PlannedWeight) -> None:
        node, index = planned.node, planned.index
        value = node.inputs[index]
        if value.const_value is None:
            return
        tensor = value.const_value
        # Read only when used: a cached weight needs no read, and a migrated weight mapped
        # from a file is multiplied out on every read (graph.initializers.ScaledTensor).
        weights: np.ndarray | None = None
        name = value.name
        imported = self.fixed.get(name)
        if imported is not None:  # 1-d: one grid per channel along the weight's axis
            grid, scale, zero_point = imported.grid, imported.scale, imported.zero_point
            axis = planned.axis if scale.ndim == 1 else None
            given = self.given_weights.get(name or "")
            if given is not None and _same_grid(given, tensor, scale, zero_point):
                # GPTQ's integers: the file holds the grid it chose for them (a replay).
                q = given.q.astype(np.int8)
            else:
                weights = tensor.numpy()
                q = qparams.quantize(weights, scale, zero_point, grid, axis, dtype=np.int8)
            self.result.imported.add(name)
        else:
            axis = planned.axis if self.per_channel else None
            grid = weight_grid_for(node, self.bits, self.reduce_range, self.shallow_8bit)
            key = (id(tensor), grid, axis)
            given = self.given_weights.get(name or "")
            if (given is not None and given.layout == WeightLayout(grid, axis)
                    and given.q.shape == tuple(tensor.shape)):
                q, scale, zero_point = given.q.astype(np.int8), given.scale, given.zero_point
            else:
                if key not in self.cache:
                    weights = tensor.numpy()
                    scale, zero_point = layouts.parameters(weights, WeightLayout(grid, axis))
                    q = qparams.quantize(weights, scale, zero_point, grid, axis,
                                         dtype=np.int8)
                    self.cache[key] = (tensor, q, scale, zero_point)
                _, q, scale, zero_point = self.cache[key]
            floor = self._bias_scale_floor(node, index, int(np.size(scale)))
            if floor is not None and np.any(scale < floor):
                weights = tensor.numpy() if weights is None else weights
                low, high = qparams.widened_range(*qparams.tensor_range(weights, axis), grid,
                                                  np.maximum(scale, floor))
                scale, zero_point = qparams.scale_zero_point(low, high, grid)
                q = qparams.quantize(weights, scale, zero_point, grid, axis, dtype=np.int8)
                self.result.bias_widened += 1
        self.weight_scales[(node, index)] = scale
        if weights is None and (self.keep_weights or (self.keep_weight_errors
                                                      and node.op_type in CORRECTED_OPS)):
            weights = tensor.numpy()
        if self.keep_weights:
            self.result.weights[name] = QuantizedWeight(name, weights, scale, zero_point, axis,
                                                        node.name or node.op_type, grid)
        if self.keep_weight_errors and node.op_type in CORRECTED_OPS:
            error = weights - qparams.dequantize(q, scale, zero_point, axis)
            for user, _ in value.uses():
                # Bias correction has mean inputs of main-graph layers only.
                if user.op_type in CORRECTED_OPS and user in self.keys:
                    self.result.weight_errors[self.keys[user]] = WeightError(
                        user, error, self.input_names.get(user, ""))
        if not self.keep_weights:
            # Read once: with the view gone, a weight mapped from a file stops counting until
            # read again (the errors of bias correction are arrays of their own).
            del weights
            release_mapping(tensor)
        home = owner(value) or self.graph
        inputs = self.integer_weights.get(id(value))
        if inputs is None:  # beside the float weight: bodies read it from the outer scope
            inputs = [add_initializer(home, self.names.new(f"{name}_quantized"), q),
                      add_initializer(home, self.names.new(f"{name}_scale"), scale),
                      add_initializer(home, self.names.new(f"{name}_zero_point"),
                                      np.asarray(zero_point, np.int8))]
            self.integer_weights[id(value)] = inputs
            self.result.weights_quantized += 1
            if kept_8bit(node, self.bits, self.shallow_8bit) and name not in self.result.imported:
                self.result.shallow_8bit += 1
            self.result.param_encodings[name] = qparams.Encoding(scale, zero_point, grid)
        out = self._dequantize(inputs, {"axis": planned.axis} if axis is not None else {}, name,
                               tuple(tensor.shape))
        for user, i in list(value.uses()):
            if user.op_type in WEIGHT_OPS and user.graph is self.graph:
                user.replace_input_with(i, out)
                self.weight_scales[(user, i)] = scale
                key = node_key(user)
                self.result.weight_inputs[self.result.renamed.get(key, key)] = out.name
        if not value.uses() and not value.is_graph_output() and name in home.initializers:
            home.initializers.pop(name)

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
        if bias_scale.ndim and bias_scale.size < bias.size and bias.size % bias_scale.size == 0:
            # A grouped ConvTranspose: its weight [C, M/g, k...] has a scale per output of a
            # group, and output channel o is output o mod M/g of group o div M/g.
            bias_scale = np.tile(bias_scale.reshape(-1), bias.size // bias_scale.size)
        bias_scale = np.broadcast_to(bias_scale, bias.shape) if bias_scale.ndim else bias_scale
        q = np.clip(np.rint(bias / bias_scale), INT32_MIN, INT32_MAX).astype(np.int32)
        name = value.name
        scale32 = np.asarray(bias_scale, np.float32)
        home = owner(value) or self.graph
        inputs = [add_initializer(home, self.names.new(f"{name}_quantized"), q),
                  add_initializer(home, self.names.new(f"{name}_scale"), scale32)]
        out = self._dequantize(inputs, {"axis": 0} if scale32.ndim else {}, name, bias.shape)
        node.replace_input_with(index, out)
        self.result.param_encodings[name] = qparams.Encoding(
            scale32, np.zeros(scale32.shape, np.int64), BIAS_GRID)
        if not value.uses() and not value.is_graph_output() and name in home.initializers:
            home.initializers.pop(name)

    def _bias_scale_floor(self, node: ir.Node, index: int, channels: int
                          ) -> np.ndarray | None:
        """The least scale of `node`'s weight at which its int32 bias holds (None: no bias,
        or its input is not quantized)."""
        planned = self.bias_of.get(node) if index == 1 else None
        if planned is None:
            return None
        bias = planned.node.inputs[planned.index]
        params = self._input_params(node)
        if bias is None or bias.const_value is None or params is None:
            return None
        return qparams.bias_scale_floor(bias.const_value.numpy(), params.scale, channels)

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
        units = set(self.graph_plan.units)
        users = [(u, i) for u, i in value.uses() if u in units]
        if not users:
            return
        home = owner(value) or self.graph
        inputs = [add_initializer(home, self.names.new(f"{name}_quantized"), q),
                  add_initializer(home, self.names.new(f"{name}_scale"),
                                  np.asarray(scale, np.float32)),
                  add_initializer(home, self.names.new(f"{name}_zero_point"),
                                  np.asarray(zero_point, np.uint8))]
        out = self._dequantize(inputs, {}, name, array.shape)
        for user, i in users:
            user.replace_input_with(i, out)
        self.result.param_encodings[name] = qparams.Encoding(
            np.asarray(scale, np.float32), np.asarray(zero_point, np.int64), self.act_grid)
        if not value.uses() and not value.is_graph_output() and name in home.initializers:
            home.initializers.pop(name)

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


def _insert_after_definition(graph: ir.Graph, value: ir.Value, nodes: list[ir.Node]) -> None:
    producer = value.producer()
    if producer is None:
        graph.insert_before(next(iter(graph), None), nodes)
    else:
        graph.insert_after(producer, nodes)


# Below 8 bits, with `shallow_8bit`, Conv weights of at most this many values per output
# channel (depthwise convs, image stems) keep the 8-bit grid: their outputs sum too few
# products for rounding errors to average out, and int8 holds them either way
# (docs/decisions.md, shallow convs in 8 bits).
SHALLOW_DEPTH = 32


def is_shallow(node: ir.Node) -> bool:
    """A Conv whose constant weight has at most SHALLOW_DEPTH values per output channel."""
    weight = node.inputs[1].const_value if node.op_type == "Conv" and len(node.inputs) > 1 \
        else None
    return weight is not None and math.prod(weight.shape[1:]) <= SHALLOW_DEPTH


def kept_8bit(node: ir.Node, bits: int, shallow_8bit: bool) -> bool:
    """Whether `node`'s weight takes 8 bits instead of `bits` (`shallow_8bit`, `is_shallow`)."""
    return shallow_8bit and bits < 8 and is_shallow(node)


def weight_grid_for(node: ir.Node, bits: int, reduce_range: bool,
                    shallow_8bit: bool = False) -> qparams.Grid:
    """The int8 grid of `node`'s weight. onnxruntime's depthwise kernel accumulates single
    products in int32, so it cannot saturate like the GEMM kernels: depthwise weights keep the
    full 8-bit grid (docs/decisions.md, depthwise weights). With `shallow_8bit`, shallow convs
    get 8 bits whatever `bits` is (`kept_8bit`)."""
    if kept_8bit(node, bits, shallow_8bit):
        bits = 8
    return qparams.fused_weight_grid(bits, reduce_range and not is_depthwise(node))


def _same_grid(given: IntegerWeight, tensor: ir.TensorProtocol, scale: np.ndarray,
               zero_point: np.ndarray) -> bool:
    """Whether integers rounded elsewhere (GPTQ) lie on this weight's imported scale and zero
    point, so that they can be written as they are."""
    return (given.q.shape == tuple(tensor.shape)
            and np.array_equal(np.ravel(given.scale).astype(np.float32),
                               np.ravel(scale).astype(np.float32))
            and np.array_equal(np.ravel(given.zero_point), np.ravel(zero_point)))
