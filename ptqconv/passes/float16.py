"""--fp16: the float32 constants that stay float are stored in float16, behind a Cast.

converter_lite's --fp16 serializes float32 constant tensors in float16 and leaves quantized
ones alone (docs/reference.md §1); the arithmetic, the model's inputs and outputs stay
float32. onnxruntime folds each Cast into a float32 initializer when it loads the model, so
only the file shrinks and the weights lose float16's precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ptqconv.graph.folded_dequantize import PARAMETER
from ptqconv.graph.initializers import add_initializer
from ptqconv.graph.naming import NameAllocator
from ptqconv.graph.ops import is_onnx

# Inputs that must stay float32: quantization parameters (their type is the output's).
_PARAMETER_SLOTS = {"QuantizeLinear": (1, 2), "DequantizeLinear": (1, 2)}


@dataclass
class Float16Result(ir.passes.PassResult):
    converted: int = 0
    float32_bytes: int = 0  # of the converted constants, before
    kept: int = 0  # float32 constants float16 cannot hold (overflow, or underflow to 0)


class Float16ConstantsPass(ir.passes.InPlacePass):
    """`names`: only the constants of these names (None: every float32 constant)."""

    def __init__(self, names: frozenset[str] | None = None) -> None:
        super().__init__()
        self.names = names

    def call(self, model: ir.Model) -> Float16Result:
        graph = model.graph
        names = NameAllocator(graph)
        result = Float16Result(model, False)
        for value in list(graph.initializers.values()):
            tensor = value.const_value
            if tensor is None or tensor.dtype != ir.DataType.FLOAT or tensor.size < 2 \
                    or value.is_graph_output() or not value.uses() \
                    or (self.names is not None and value.name not in self.names):
                continue
            if value.meta.get(PARAMETER) or any(
                    not is_onnx(user) or index in _PARAMETER_SLOTS.get(user.op_type, ())
                    for user, index in value.uses()):
                continue
            array = tensor.numpy()
            with np.errstate(over="ignore"):
                half = array.astype(np.float16)
            if not np.isfinite(half).all() or ((half == 0) & (array != 0)).any():
                result.kept += 1
                continue
            name = value.name or "constant"
            stored = add_initializer(graph, names.new(f"{name}_float16"), half)
            cast = ir.node("Cast", [stored], {"to": ir.DataType.FLOAT},
                           name=names.new(f"{name}_Cast"))
            graph.insert_before(value.uses()[0][0], cast)
            out = cast.outputs[0]
            out.type, out.shape = value.type, value.shape
            value.replace_all_uses_with(out)
            graph.initializers.pop(name)
            value.name = None
            out.name = name  # consumers and debug tools keep finding it by name
            result.converted += 1
            result.float32_bytes += tensor.nbytes
            result.modified = True
        if result.modified:
            graph.sort()
        return result
