"""SmoothQuant's Muls that no quantized MatMul reads, undone after QDQ.

SmoothQuant (smooth_quant.py) runs before the plan is known, on every group its statistics
favour. Where the plan then keeps every reader of a smoothed activation float (kept float for
speed, skip_quant_node, a float plan), the inserted X / s gains nothing and costs a kernel per
inference: a GPT-2-style decoder whose plan kept all 15 units float ran nine such Muls and
timed 1.10x float (docs/decisions.md, unused smoothing). The MatMuls read X again and get the
weights of the float model back, so the graph computes exactly what the float one does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ptqconv.graph.initializers import ScaledTensor, set_constant
from ptqconv.graph.ops import is_onnx
from ptqconv.passes.smooth_quant import smoothing_nodes


@dataclass
class UnusedSmoothingResult(ir.passes.PassResult):
    undone: list[str] = field(default_factory=list)  # smoothed activations


def _float_readers(mul: ir.Node, graph: ir.Graph) -> list[ir.Node] | None:
    """The MatMuls reading the smoothed tensor as input A with a float constant weight,
    when they are all its readers (None otherwise: something quantizes it)."""
    out = mul.outputs[0]
    if out in graph.outputs:
        return None
    readers = []
    for user, index in out.uses():
        weight = user.inputs[1] if len(user.inputs) > 1 else None
        if (not is_onnx(user) or user.op_type != "MatMul" or index != 0 or weight is None
                or weight.const_value is None or weight.dtype != ir.DataType.FLOAT):
            return None
        readers.append(user)
    return readers or None


class UnusedSmoothingPass(ir.passes.InPlacePass):
    """`originals`: the float model's weights by name (a migrated weight keeps its name);
    a weight not found there is divided back by its factors."""

    def __init__(self, originals: Mapping[str, ir.Value]) -> None:
        super().__init__()
        self.originals = originals

    def call(self, model: ir.Model) -> UnusedSmoothingResult:
        graph = model.graph
        result = UnusedSmoothingResult(model, False)
        names = smoothing_nodes(graph)
        for mul in [n for n in graph if n.name in names]:
            readers = _float_readers(mul, graph)
            if readers is None:
                continue
            x, inverse = mul.inputs[0], mul.inputs[1]
            factors = inverse.const_value.numpy() if inverse.const_value is not None else None
            if x is None or factors is None:
                continue
            for matmul in readers:
                self._restore(matmul.inputs[1], factors)
                matmul.replace_input_with(0, x)
            graph.remove(mul, safe=True)
            if not inverse.uses() and inverse.name in graph.initializers:
                graph.initializers.pop(inverse.name)
            result.undone.append(x.name or "")
            result.modified = True
        return result

    def _restore(self, weight: ir.Value, inverse: np.ndarray) -> None:
        original = self.originals.get(weight.name or "")
        if original is not None and original.const_value is not None:
            weight.const_value = original.const_value
        elif isinstance(weight.const_value, ScaledTensor):
            weight.const_value = weight.const_value.base
        else:
            set_constant(weight, weight.const_value.numpy() * inverse[:, None])
