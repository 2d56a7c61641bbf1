"""Activations between two quantized tensors as onnxruntime integer kernels.

onnxruntime's CPU provider has no integer kernel for HardSigmoid or Tanh, so the QDQ pass
leaves DequantizeLinear -> fn -> QuantizeLinear around them: the tensor goes back to float,
and in NHWC models the float op also sits between layout transposes. Both are rewritten here
into QDQ forms onnxruntime fuses, with the same integers on the quantized output:

- HardSigmoid(x) = clip(alpha x + beta, 0, 1) = alpha * clip(x + beta/alpha, 0, 1/alpha):
  Add(x, beta/alpha) quantized at scale s/alpha with zp 0 is a QLinearAdd whose uint8
  saturation does the clip, and its integers are those of the HardSigmoid at scale s.
  With the Mul of hard-swish (hard_swish.py) it makes QLinearAdd + QLinearMul.
- Tanh(x) = 2 sigmoid(2x) - 1: a DequantizeLinear at twice the input scale, Sigmoid, and a
  QuantizeLinear at half the output scale with the zero point moved by k = 1/scale, which
  onnxruntime fuses into a QLinearSigmoid (its lookup table). Exact for an integer k.

The consumers' DequantizeLinear keep the activation's own scale. A 256-entry lookup table
(Gather) would be exact for any function, but onnxruntime runs every table made of standard
ops slower than the float path it replaces (docs/decisions.md, integer activations).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ptqconv import qparams
from ptqconv.graph.initializers import add_initializer
from ptqconv.graph.naming import NameAllocator
from ptqconv.graph.ops import is_onnx, scalar_constant

# float32 scales: 255 * float32(1/255) is 1 within this.
SCALE_TOLERANCE = 1e-5
UINT8_MAX = 255


@dataclass
class IntegerActivationsResult(ir.passes.PassResult):
    rewritten: Counter[str] = field(default_factory=Counter)  # op type -> count


@dataclass(frozen=True)
class _Site:
    """fn between DequantizeLinear `dq` (per tensor) and its only reader QuantizeLinear `q`."""

    dq: ir.Node
    fn: ir.Node
    q: ir.Node

    @property
    def in_scale(self) -> float:
        return scalar_constant(self.dq.inputs[1]) or 0.0

    @property
    def out_scale(self) -> float:
        return scalar_constant(self.q.inputs[1]) or 0.0

    @property
    def out_zero_point(self) -> int:
        return int(scalar_constant(self.q.inputs[2]) or 0)


def _site(node: ir.Node) -> _Site | None:
    source = node.inputs[0] if node.inputs else None
    dq = source.producer() if source is not None else None
    out = node.outputs[0]
    users = out.uses()
    if dq is None or dq.op_type != "DequantizeLinear" or len(users) != 1 or (
            out.is_graph_output()):
        return None
    q = users[0][0]
    if q.op_type != "QuantizeLinear" or len(q.inputs) < 3 or len(dq.inputs) < 3:
        return None
    params = [dq.inputs[1], dq.inputs[2], q.inputs[1], q.inputs[2]]
    if any(scalar_constant(v) is None for v in params) or any(
            v.dtype != ir.DataType.UINT8 for v in (dq.inputs[2], q.inputs[2])):
        return None
    return _Site(dq, node, q)


class IntegerActivationsPass(ir.passes.InPlacePass):
    """Rewrite DQ -> HardSigmoid / Tanh -> Q into the forms above where their grids allow.

    `grid` is the activation grid, for the constant the HardSigmoid form adds.
    """

    def __init__(self, grid: qparams.Grid):
        super().__init__()
        self.grid = grid

    def call(self, model: ir.Model) -> IntegerActivationsResult:
        self.graph = model.graph
        self.names = NameAllocator(self.graph)
        result = IntegerActivationsResult(model, False)
        for node in list(self.graph):
            if not is_onnx(node) or node.op_type not in ("HardSigmoid", "Tanh"):
                continue
            site = _site(node)
            if site is None:
                continue
            done = (self._hard_sigmoid(site) if node.op_type == "HardSigmoid"
                    else self._tanh(site))
            if done:
                result.rewritten[node.op_type] += 1
                result.modified = True
        return result

    def _scalar(self, stem: str, value: float | int, dtype: type) -> ir.Value:
        return add_initializer(self.graph, self.names.new(stem), np.asarray(value, dtype))

    def _hard_sigmoid(self, site: _Site) -> bool:
        node = site.fn
        alpha = node.attributes.get_float("alpha", 0.2)
        beta = node.attributes.get_float("beta", 0.5)
        # The uint8 saturation is the clip only with zp 0 and the top of uint8 at most 1.
        if alpha <= 0 or site.out_zero_point != 0 or (
                UINT8_MAX * site.out_scale > 1 + SCALE_TOLERANCE):
            return False
        stem = node.outputs[0].name or "hard_sigmoid"
        offset = np.float32(beta / alpha)
        scale, zero_point = qparams.scale_zero_point(min(offset, 0), max(offset, 0), self.grid)
        level = qparams.quantize(np.asarray(offset), scale, zero_point, self.grid,
                                 dtype=np.uint8)
        constant = ir.node("DequantizeLinear", [
            self._scalar(f"{stem}_offset_quantized", level, np.uint8),
            self._scalar(f"{stem}_offset_scale", scale, np.float32),
            self._scalar(f"{stem}_offset_zero_point", zero_point, np.uint8),
        ], name=self.names.new(f"{stem}_offset_DequantizeLinear"))
        constant.outputs[0].name = self.names.new(f"{stem}_offset")
        add = ir.node("Add", [node.inputs[0], constant.outputs[0]],
                      name=self.names.new(f"{stem}_Add"))
        add.outputs[0].name = self.names.new(f"{stem}_shifted")
        add.outputs[0].type = node.outputs[0].type
        add.outputs[0].shape = node.outputs[0].shape
        self.graph.insert_before(node, [constant, add])
        site.q.replace_input_with(0, add.outputs[0])
        site.q.replace_input_with(1, self._scalar(
            f"{stem}_add_scale", np.float32(site.out_scale / alpha), np.float32))
        self.graph.remove(node, safe=True)
        return True

    def _tanh(self, site: _Site) -> bool:
        k = round(1.0 / site.out_scale)
        # tanh = 2 sigmoid(2x) - 1 moves the zero point by k: it must be an integer, and the
        # sigmoid's zero point z - k a uint8.
        if abs(k * site.out_scale - 1) > SCALE_TOLERANCE or not (
                k <= site.out_zero_point <= UINT8_MAX + k):
            return False
        node = site.fn
        stem = node.outputs[0].name or "tanh"
        doubled = ir.node("DequantizeLinear", [
            site.dq.inputs[0],
            self._scalar(f"{stem}_input_scale", np.float32(2 * site.in_scale), np.float32),
            site.dq.inputs[2],
        ], name=self.names.new(f"{stem}_DequantizeLinear"))
        doubled.outputs[0].name = self.names.new(f"{stem}_doubled")
        sigmoid = ir.node("Sigmoid", [doubled.outputs[0]], name=self.names.new(f"{stem}_Sigmoid"))
        sigmoid.outputs[0].name = self.names.new(f"{stem}_sigmoid")
        for value in (doubled.outputs[0], sigmoid.outputs[0]):
            value.type, value.shape = node.outputs[0].type, node.outputs[0].shape
        self.graph.insert_before(node, [doubled, sigmoid])
        site.q.replace_input_with(0, sigmoid.outputs[0])
        site.q.replace_input_with(1, self._scalar(
            f"{stem}_sigmoid_scale", np.float32(site.out_scale / 2), np.float32))
        site.q.replace_input_with(2, self._scalar(
            f"{stem}_sigmoid_zero_point", site.out_zero_point - k, np.uint8))
        self.graph.remove(node, safe=True)
        if not site.dq.outputs[0].uses() and not site.dq.outputs[0].is_graph_output():
            self.graph.remove(site.dq, safe=True)
        return True
