"""Fold constant Mul/Add next to a Conv into the Conv's weights and bias.

onnxruntime's simplification folds a per-channel Mul/Add after a Conv only when the constant
is the second input; Paddle's exports (the learnable affine blocks of PP-LCNet, around every
hard-swish of PP-OCRv4) write Mul(scale, x) with a [1] constant, so they stay. Quantized,
each would be a QLinearMul or QLinearAdd of its own: one more rounding of the tensor and one
more pass over it. Folded, they cost nothing:

- after a Conv: conv(x) * c + d is a Conv with weights W c and bias B c + d (c, d scalars or
  one per output channel);
- before a Conv: conv(h * c + d) is a Conv with weights W c over h + d / c, and without
  padding, where every tap of the kernel sees the shift, with bias B + d sum(W) over h
  (c, d scalars). With padding the shift stays, as an Add before the Conv.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ptqconv.graph.initializers import add_initializer, set_constant
from ptqconv.graph.naming import NameAllocator
from ptqconv.graph.ops import is_onnx


def _constant_operand(node: ir.Node) -> tuple[ir.Value, np.ndarray] | None:
    """(the other input, the constant) of a binary Mul/Add with one float constant input."""
    if len(node.inputs) != 2 or not is_onnx(node):
        return None
    a, b = node.inputs
    for value, constant in ((a, b), (b, a)):
        if (value is not None and value.const_value is None and constant is not None
                and constant.const_value is not None
                and constant.dtype == ir.DataType.FLOAT):
            return value, constant.const_value.numpy()
    return None


def _sole_user(value: ir.Value) -> ir.Node | None:
    users = value.uses()
    if len(users) != 1 or value.is_graph_output():
        return None
    return users[0][0]


def _per_channel(array: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """`array` as one value per channel of a Conv output of `rank` (N, C, spatial...), if it
    broadcasts so: a scalar, or [C, 1, ...] / [1, C, 1, ...]."""
    if array.size == 1:
        return np.full(channels, float(array.reshape(())), np.float32)
    spatial = rank - 2
    if (array.size == channels and array.ndim >= spatial + 1
            and array.shape[-spatial - 1] == channels):
        return array.reshape(channels).astype(np.float32)
    return None


def _weights(conv: ir.Node) -> tuple[ir.Value, ir.Value | None] | None:
    """The Conv's initializer weight and bias (None when it has none) when both are float
    initializers used by this Conv alone."""
    weight = conv.inputs[1] if len(conv.inputs) > 1 else None
    bias = conv.inputs[2] if len(conv.inputs) > 2 else None
    for value in (weight, bias):
        if value is not None and (value.const_value is None or len(value.uses()) != 1
                                  or value.dtype != ir.DataType.FLOAT):
            return None
    return (weight, bias) if weight is not None else None


class FoldAffinePass(ir.passes.InPlacePass):
    """Fold the constant Mul and Add around Convs into them, where exact."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.graph = model.graph
        self.names = NameAllocator(self.graph)
        modified = False
        for conv in [n for n in self.graph if n.op_type == "Conv" and is_onnx(n)]:
            modified |= self._after(conv)
            modified |= self._before(conv)
        return ir.passes.PassResult(model, modified)

    def _constant(self, stem: str, array: np.ndarray) -> ir.Value:
        return add_initializer(self.graph, self.names.new(stem), np.asarray(array, np.float32))

    def _set_bias(self, conv: ir.Node, bias: ir.Value | None, values: np.ndarray) -> None:
        if bias is not None:
            set_constant(bias, values)
            return
        conv.resize_inputs(3)
        conv.replace_input_with(2, self._constant(f"{conv.outputs[0].name}_bias", values))

    def _after(self, conv: ir.Node) -> bool:
        """conv -> Mul(c) -> Add(d), either or both: into W and B."""
        found = _weights(conv)
        if found is None:
            return False
        weight, bias = found
        w = weight.const_value.numpy()
        channels = w.shape[0]
        scale, shift = np.ones(channels, np.float32), np.zeros(channels, np.float32)
        folded: list[ir.Node] = []
        out = conv.outputs[0]
        for op in ("Mul", "Add"):
            user = _sole_user(out)
            operand = _constant_operand(user) if user is not None and (
                user.op_type == op) else None
            values = _per_channel(operand[1], channels, w.ndim) if operand is not None \
                else None
            if values is None:
                continue
            if op == "Mul":
                scale, shift = scale * values, shift * values
            else:
                shift = shift + values
            folded.append(user)
            out = user.outputs[0]
        if not folded:
            return False
        current = bias.const_value.numpy() if bias is not None else np.zeros(channels)
        set_constant(weight, w * scale.reshape(-1, *([1] * (w.ndim - 1))))
        self._set_bias(conv, bias, (current * scale + shift).astype(np.float32))
        # The Conv now writes what the last folded node wrote, under its name.
        name = out.name
        out.replace_all_uses_with(conv.outputs[0], replace_graph_outputs=True)
        self.graph.remove(folded, safe=True)
        out.name = None
        conv.outputs[0].name = name
        return True

    def _before(self, conv: ir.Node) -> bool:
        """h -> Mul(c) -> Add(d) -> conv, either or both, scalars: c into W; d into B
        without padding, else d / c added to h before the Conv."""
        found = _weights(conv)
        if found is None or conv.inputs[0] is None:
            return False
        weight, bias = found
        chain: list[ir.Node] = []
        c, d, h, reader = 1.0, 0.0, conv.inputs[0], conv
        for op in ("Add", "Mul"):
            producer = h.producer()
            operand = _constant_operand(producer) if producer is not None and (
                producer.op_type == op) else None
            value = (float(operand[1].reshape(())) if operand is not None
                     and operand[1].size == 1 else None)
            if value is None or _sole_user(h) is not reader or (op == "Mul" and value == 0):
                continue
            if op == "Add":
                d = value
            else:
                c = value
            chain.insert(0, producer)
            h, reader = operand[0], producer
        if not chain:
            return False
        w = weight.const_value.numpy()
        pads = conv.attributes.get("pads")
        auto_pad = conv.attributes.get("auto_pad")
        padded = (pads is not None and any(pads.as_ints())) or (
            auto_pad is not None and auto_pad.as_string() not in ("NOTSET", "VALID"))
        set_constant(weight, w * np.float32(c))
        source = h
        if d and not padded:
            channels = w.shape[0]
            current = bias.const_value.numpy() if bias is not None else np.zeros(channels)
            total = w.reshape(channels, -1).sum(axis=1, dtype=np.float64)
            self._set_bias(conv, bias, (current + d * total).astype(np.float32))
        elif d:
            # Zero padding would not see the shift: it stays, in h's units, before the Conv.
            stem = conv.inputs[0].name or "shift"
            shift = ir.node("Add", [h, self._constant(f"{stem}_shift", np.float32(d / c))],
                            name=self.names.new(f"{stem}_Add"))
            shift.outputs[0].name = self.names.new(f"{stem}_shifted")
            shift.outputs[0].type, shift.outputs[0].shape = h.type, h.shape
            self.graph.insert_before(conv, shift)
            source = shift.outputs[0]
        conv.replace_input_with(0, source)
        self.graph.remove(chain, safe=True)
        return True
