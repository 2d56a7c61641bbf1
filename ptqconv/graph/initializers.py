"""The one way passes put constants into a graph."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray,
                    dtype: ir.DataType | None = None) -> ir.Value:
    """Register `array` as initializer `name` (already unique, see naming.NameAllocator);
    `dtype` overrides numpy's type, for the packed int4/int2 containers."""
    array = np.asarray(array, order="C")
    dtype = dtype or ir.DataType.from_numpy(array.dtype)
    value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(array.shape),
                     const_value=ir.Tensor(array, dtype=dtype, name=name))
    graph.register_initializer(value)
    return value


def set_constant(value: ir.Value, array: np.ndarray) -> None:
    """Replace the float32 contents of a constant value, keeping its name."""
    value.const_value = ir.Tensor(np.asarray(array, np.float32), name=value.name)
