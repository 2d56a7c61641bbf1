"""The one way passes put constants into a graph."""

from __future__ import annotations

import contextlib

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


class ScaledTensor(ir.LazyTensor):
    """`base` (float32) times `factors` (broadcast against it), computed each time it is read:
    a migration of a weight mapped from external data holds no scaled copy of it."""

    __slots__ = ("base",)

    def __init__(self, base: ir.TensorProtocol, factors: np.ndarray, name: str | None) -> None:
        super().__init__(lambda: ir.Tensor(np.asarray(base.numpy() * factors, np.float32)),
                         dtype=ir.DataType.FLOAT, shape=ir.Shape(base.shape), name=name)
        self.base = base


def scale_constant(value: ir.Value, factors: np.ndarray) -> None:
    """Multiply the float32 constant `value` by `factors` (broadcast against it). A weight
    read from external data is multiplied when read: scaled copies of a big model's mapped
    weights would add its size to the conversion's memory (docs/decisions.md, conversion
    memory)."""
    tensor = value.const_value
    if isinstance(tensor, ir.ExternalTensor | ScaledTensor):
        value.const_value = ScaledTensor(tensor, factors, value.name)
    else:
        set_constant(value, tensor.numpy() * factors)


def mapped(tensor: ir.TensorProtocol | None) -> ir.ExternalTensor | None:
    """The external tensor whose data `tensor` reads (itself, or under scalings), if any."""
    while isinstance(tensor, ScaledTensor):
        tensor = tensor.base
    return tensor if isinstance(tensor, ir.ExternalTensor) else None


def release_mapping(tensor: ir.TensorProtocol | None) -> None:
    """Close the memory map `tensor` reads from, if any: its pages stop counting against the
    process, and a later read maps it again. Kept while an array still views it."""
    source = mapped(tensor)
    if source is not None and source.raw is not None:
        with contextlib.suppress(BufferError):
            source.release()
