"""Data-free cross-layer equalization for WeightQuant (Nagel et al. 2019, "Data-Free
Quantization Through Weight Equalization and Bias Correction", §4.1).

In a Conv -> Relu -> Conv chain, output channel c of the first conv can be divided by any
s_c > 0 if input channel c of the second is multiplied by it: Relu(x / s) = Relu(x) / s, so
the float model is unchanged. With s_c = sqrt(r1_c / r2_c), r1_c the largest |weight| of the
first conv's channel c and r2_c of the second conv's input channel c, both become
sqrt(r1_c r2_c): the channels' ranges are equalized, which is what one scale per weight
needs. Whether the quantized model gains from it depends on the model: on the corpus it
helped and hurt by turns (docs/decisions.md, WeightQuant equalization), so WeightQuant tries
it with per-tensor weights only and keeps it only where the calibration samples measure a
gain.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ptqconv.graph.initializers import set_constant
from ptqconv.graph.ops import in_skip, is_onnx


@dataclass
class WeightEqualizeResult(ir.passes.PassResult):
    chains: int = 0  # Conv -> Relu -> Conv chains equalized


def _owned_weight(node: ir.Node, index: int) -> ir.Value | None:
    """`node`'s constant float32 input `index` when no other node reads it."""
    if len(node.inputs) <= index or node.inputs[index] is None:
        return None
    value = node.inputs[index]
    if (value.const_value is None or not value.is_initializer() or value.is_graph_output()
            or len(value.uses()) != 1 or value.const_value.dtype != ir.DataType.FLOAT):
        return None
    return value


def _group(node: ir.Node) -> int:
    attr = node.attributes.get("group")
    return 1 if attr is None else attr.as_int()


class WeightEqualizePass(ir.passes.InPlacePass):
    """Equalize every Conv -> Relu -> Conv chain whose tensors and weights nothing else
    reads and whose nodes are not in `skip` (names or op types)."""

    def __init__(self, skip: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.skip = skip

    def _skipped(self, node: ir.Node) -> bool:
        return in_skip(node, self.skip)

    def find(self, graph: ir.Graph) -> list[tuple[ir.Node, ir.Node]]:
        """The (first, second) convs of every chain this pass would equalize."""
        return [chain for second in graph if (chain := self._chain(second)) is not None]

    def call(self, model: ir.Model) -> WeightEqualizeResult:
        result = WeightEqualizeResult(model, False)
        for chain in self.find(model.graph):
            self._equalize(*chain)
            result.chains += 1
            result.modified = True
        return result

    def _chain(self, second: ir.Node) -> tuple[ir.Node, ir.Node] | None:
        if second.op_type != "Conv" or not is_onnx(second) or second.inputs[0] is None:
            return None
        relu = second.inputs[0].producer()
        if relu is None or relu.op_type != "Relu" or not is_onnx(relu):
            return None
        first = relu.inputs[0].producer() if relu.inputs[0] is not None else None
        if first is None or first.op_type != "Conv" or not is_onnx(first):
            return None
        for value in (first.outputs[0], relu.outputs[0]):
            if value.is_graph_output() or len(value.uses()) != 1:
                return None
        if any(self._skipped(n) for n in (first, relu, second)):
            return None
        w1, w2 = _owned_weight(first, 1), _owned_weight(second, 1)
        if w1 is None or w2 is None:
            return None
        channels = w1.const_value.shape[0]
        if w2.const_value.shape[1] * _group(second) != channels:
            return None
        if len(first.inputs) > 2 and first.inputs[2] is not None and \
                _owned_weight(first, 2) is None:
            return None
        return first, second

    def _equalize(self, first: ir.Node, second: ir.Node) -> None:
        w1 = first.inputs[1].const_value.numpy().astype(np.float64)
        w2 = second.inputs[1].const_value.numpy().astype(np.float64)
        channels = w1.shape[0]
        groups = _group(second)
        per_group_in, per_group_out = w2.shape[1], w2.shape[0] // groups
        r1 = np.abs(w1.reshape(channels, -1)).max(axis=1)
        # Input channel c of the second conv: rows of its group, column c within the group.
        blocks = np.abs(w2).reshape(groups, per_group_out, per_group_in, -1)
        r2 = blocks.max(axis=(1, 3)).reshape(channels)
        live = (r1 > 0) & (r2 > 0)
        factors = np.where(live, np.sqrt(np.where(live, r1, 1.0) / np.where(live, r2, 1.0)),
                           1.0)
        shape1 = (channels,) + (1,) * (w1.ndim - 1)
        set_constant(first.inputs[1], w1 / factors.reshape(shape1))
        if len(first.inputs) > 2 and first.inputs[2] is not None:
            bias = first.inputs[2].const_value.numpy().astype(np.float64)
            set_constant(first.inputs[2], bias / factors)
        scaled = w2.reshape(groups, per_group_out, per_group_in, -1) * factors.reshape(
            groups, 1, per_group_in, 1)
        set_constant(second.inputs[1], scaled.reshape(w2.shape))
