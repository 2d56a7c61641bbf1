"""QDQ insertion: rewrite a float graph into the QuantizeLinear/DequantizeLinear layout that
onnxruntime's CPU provider fuses into integer kernels (uint8 activations, int8 symmetric
per-channel weights, int32 bias with scale = input scale x weight scale)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from ptqconv import qparams
from ptqconv.passes.bias_correction import CORRECTED_OPS
from ptqconv.passes.naming import NameAllocator, values_by_name
from ptqconv.passes.qdq_plan import WEIGHT_OPS, QuantPlan

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


class QDQPass(ir.passes.InPlacePass):
    """Insert Q/DQ pairs on planned activations and DQ on quantized weights, biases, constants.

    `ranges` maps every observed or fixed tensor of `plan` to its float range; shared tensors
    reuse their source's scale and zero point (the same initializers).
    """

    def __init__(self, plan: QuantPlan, ranges: Mapping[str, tuple[float, float]], bits: int,
                 per_channel: bool = True, keep_weight_errors: bool = False,
                 keep_weights: bool = False, reduce_range: bool = True,
                 act_bits: int | None = None):
        super().__init__()
        self.keep_weights = keep_weights  # float weights for the per-layer report
        # For bias correction: node index in the float graph -> (node, W - dequantized W).
        self.keep_weight_errors = keep_weight_errors
        self.weight_errors: dict[int, tuple[ir.Node, np.ndarray]] = {}
        self.plan = plan
        self.ranges = ranges
        self.act_grid = qparams.activation_grid(act_bits or bits)
        self.bits = bits
        self.reduce_range = reduce_range
        self.weight_grid = qparams.fused_weight_grid(bits, reduce_range)  # of GEMM kernels
        self.per_channel = per_channel
        # tensor name -> (scale value, zero point value, float scale) of its activation grid
        self.act_params: dict[str, tuple[ir.Value, ir.Value, float]] = {}
        self.weight_scales: dict[tuple[int, int], np.ndarray] = {}
        self.weights_quantized = 0
        # For reports: float tensor name -> its dequantized value's name (activations), and
        # weight name -> (float values, scale, zero point, axis, owner node name).
        self.dequantized: dict[str, str] = {}
        self.weight_params: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, int | None,
                                            str, qparams.Grid]] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.node_index = {id(node): i for i, node in enumerate(graph)}
        self.names = NameAllocator(graph)
        self.graph = graph
        values = values_by_name(graph)
        # Roots first (their parameters are created), then the tensors that share them.
        for name in self.plan.quantized_tensors():
            if name in values and self._params(name) is not None:
                self._insert_qdq(values[name])
        for node, index, axis in self.plan.weights:
            self._quantize_weight(node, index, axis)
        for node, index, unit in self.plan.biases:
            self._quantize_bias(node, index, unit)
        for name in self.plan.constants:
            if name in values:
                self._quantize_constant(values[name])
        return ir.passes.PassResult(model, modified=True)

    # --- activations -------------------------------------------------------------------

    def activation_params(self, name: str) -> tuple[float, int] | None:
        """(scale, zero point) of an activation tensor this pass quantized."""
        params = self._params(name) if name in self.dequantized else None
        if params is None:
            return None
        return params[2], int(params[1].const_value.numpy())

    def _params(self, name: str) -> tuple[ir.Value, ir.Value, float] | None:
        root = self.plan.shared.get(name, name)
        if root in self.act_params:
            return self.act_params[root]
        bounds = self.plan.fixed.get(root) or self.ranges.get(root)
        if bounds is None:
            return None
        if root in self.plan.fixed:
            # onnxruntime's QLinearSoftmax wants y_scale = 1/256, zp 0 for uint8.
            scale = np.float32(1.0 / (self.act_grid.qmax + 1))
            zero_point = np.int64(0)
        else:
            scale, zero_point = qparams.scale_zero_point(bounds[0], bounds[1], self.act_grid)
        scale_value = self._initializer(f"{root}_scale", np.asarray(scale, np.float32),
                                        ir.DataType.FLOAT)
        zp_value = self._initializer(f"{root}_zero_point", np.asarray(zero_point, np.uint8),
                                     ir.DataType.UINT8)
        self.act_params[root] = (scale_value, zp_value, float(scale))
        return self.act_params[root]

    def _insert_qdq(self, value: ir.Value) -> None:
        scale, zero_point, _ = self._params(value.name)
        uses = list(value.uses())
        name = value.name
        quant = ir.node("QuantizeLinear", [value, scale, zero_point],
                        name=self.names.new(f"{name}_QuantizeLinear"))
        dequant = ir.node("DequantizeLinear", [quant.outputs[0], scale, zero_point],
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
        self.dequantized[name] = out.name

    # --- weights, biases, constants ----------------------------------------------------

    def _quantize_weight(self, node: ir.Node, index: int, axis: int) -> None:
        value = node.inputs[index]
        if value.const_value is None:
            return
        weights = value.const_value.numpy()
        use_axis = axis if self.per_channel else None
        grid = weight_grid_for(node, self.bits, self.reduce_range)
        rmin, rmax = qparams.tensor_range(weights, use_axis)
        scale, zero_point = qparams.scale_zero_point(rmin, rmax, grid)
        q = qparams.quantize(weights, scale, zero_point, grid, use_axis, dtype=np.int8)
        self.weight_scales[(id(node), index)] = scale
        if self.keep_weights:
            self.weight_params[value.name] = (weights, scale, zero_point, use_axis,
                                              node.name or node.op_type, grid)
        if self.keep_weight_errors and node.op_type in CORRECTED_OPS:
            error = weights - qparams.dequantize(q, scale, zero_point, use_axis)
            for user, _ in value.uses():
                if user.op_type in CORRECTED_OPS:
                    self.weight_errors[self.node_index[id(user)]] = (user, error)
        name = value.name
        q_value = self._initializer(f"{name}_quantized", q, ir.DataType.INT8)
        s_value = self._initializer(f"{name}_scale", scale, ir.DataType.FLOAT)
        zp_value = self._initializer(f"{name}_zero_point", np.zeros(scale.shape, np.int8),
                                     ir.DataType.INT8)
        attributes = {"axis": axis} if use_axis is not None else {}
        out = self._dequantize(node, [q_value, s_value, zp_value], attributes, name,
                               weights.shape)
        for user, i in list(value.uses()):
            if user.op_type in WEIGHT_OPS:
                user.replace_input_with(i, out)
                self.weight_scales[(id(user), i)] = scale
        if not value.uses() and name in self.graph.initializers:
            self.graph.initializers.pop(name)
        self.weights_quantized += 1

    def _quantize_bias(self, node: ir.Node, index: int, unit: ir.Node) -> None:
        """Input `index` of `node` as int32 with the scale of `unit`'s input x weight."""
        value = node.inputs[index]
        input_params = self._input_params(unit)
        weight_index = 1
        weight_scale = self.weight_scales.get((id(unit), weight_index))
        if value is None or value.const_value is None or input_params is None or (
                weight_scale is None):
            return
        bias = value.const_value.numpy().astype(np.float64)
        bias_scale = (np.float64(input_params[2]) * weight_scale.astype(np.float64))
        bias_scale = np.broadcast_to(bias_scale, bias.shape) if bias_scale.ndim else bias_scale
        q = np.clip(np.rint(bias / bias_scale), INT32_MIN, INT32_MAX).astype(np.int32)
        name = value.name
        q_value = self._initializer(f"{name}_quantized", q, ir.DataType.INT32)
        scale32 = np.asarray(bias_scale, np.float32)
        s_value = self._initializer(f"{name}_scale", scale32, ir.DataType.FLOAT)
        attributes = {"axis": 0} if scale32.ndim else {}
        out = self._dequantize(node, [q_value, s_value], attributes, name, bias.shape)
        node.replace_input_with(index, out)
        if not value.uses() and name in self.graph.initializers:
            self.graph.initializers.pop(name)

    def _input_params(self, node: ir.Node) -> tuple[ir.Value, ir.Value, float] | None:
        source = node.inputs[0]
        producer = source.producer() if source is not None else None
        if producer is None or producer.op_type != "DequantizeLinear":
            return None
        scale = producer.inputs[1]
        for params in self.act_params.values():
            if params[0] is scale:
                return params
        return None

    def _quantize_constant(self, value: ir.Value) -> None:
        array = value.const_value.numpy()
        if array.dtype != np.float32:
            return
        scale, zero_point = qparams.scale_zero_point(array.min(), array.max(), self.act_grid)
        q = qparams.quantize(array, scale, zero_point, self.act_grid, dtype=np.uint8)
        name = value.name
        users = [(u, i) for u, i in value.uses() if u in set(self.plan.units)]
        if not users:
            return
        q_value = self._initializer(f"{name}_quantized", q, ir.DataType.UINT8)
        s_value = self._initializer(f"{name}_scale", np.asarray(scale, np.float32),
                                    ir.DataType.FLOAT)
        zp_value = self._initializer(f"{name}_zero_point", np.asarray(zero_point, np.uint8),
                                     ir.DataType.UINT8)
        out = self._dequantize(users[0][0], [q_value, s_value, zp_value], {}, name, array.shape)
        for user, i in users:
            user.replace_input_with(i, out)
        if not value.uses() and name in self.graph.initializers:
            self.graph.initializers.pop(name)

    def _dequantize(self, before: ir.Node, inputs: list[ir.Value], attributes: dict, name: str,
                    shape: tuple[int, ...]) -> ir.Value:
        node = ir.node("DequantizeLinear", inputs, attributes,
                       name=self.names.new(f"{name}_DequantizeLinear"))
        out = node.outputs[0]
        out.name = self.names.new(f"{name}_dequantized")
        out.type = ir.TensorType(ir.DataType.FLOAT)
        out.shape = ir.Shape(shape)
        first = next(iter(self.graph))
        # Weight DQ nodes depend only on initializers: put them at the top, in a stable order.
        anchor = first if first is not None else before
        self.graph.insert_before(anchor, node)
        return out

    def _initializer(self, base: str, array: np.ndarray, dtype: ir.DataType) -> ir.Value:
        name = self.names.new(base)
        tensor = ir.Tensor(np.asarray(array, order="C"), dtype=dtype, name=name)
        value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(array.shape),
                         const_value=tensor)
        self.graph.register_initializer(value)
        return value


def weight_grid_for(node: ir.Node, bits: int, reduce_range: bool) -> qparams.Grid:
    """The int8 grid of `node`'s weight. onnxruntime's depthwise kernel accumulates single
    products in int32, so it cannot saturate like the GEMM kernels: depthwise weights keep the
    full 8-bit grid (measured on mobilenet_v2's first depthwise conv: output SQNR 10.5 dB at 7
    bits, 19.6 at 8, identical fused and unfused)."""
    return qparams.fused_weight_grid(bits, reduce_range and not is_depthwise(node))


def is_depthwise(node: ir.Node) -> bool:
    """A Conv with one input channel per group (and more than one group)."""
    if node.op_type != "Conv" or "group" not in node.attributes:
        return False
    weight = node.inputs[1].const_value if len(node.inputs) > 1 else None
    return (node.attributes["group"].as_int() > 1 and weight is not None
            and weight.shape[1] == 1)
