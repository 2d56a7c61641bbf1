"""SmoothQuant (Xiao et al., 2023) for MatMul activations with outlier channels.

Transformer activations (LayerNorm and GELU outputs) carry a few channels far larger than the
rest; a per-tensor uint8 scale then crushes every other channel (the per-layer report shows
them at 15-20 dB). For each activation X feeding MatMuls with constant weights W [K, N], the
per-channel factors s_j = max|X_j|^a / max|W_j,:|^(1-a) move that range into the weights,
which are quantized per channel anyway: X' = X / s (a float Mul inserted on the MatMul branch
only, so other readers of X are unchanged) and W' = diag(s) W, so X' W' = X W exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ptqconv.passes.naming import NameAllocator

ALPHA = 0.5
SCALE_LIMITS = (1e-4, 1e4)


@dataclass
class SmoothGroup:
    activation: str
    matmuls: list[ir.Node]


def find_groups(graph: ir.Graph, skip: frozenset[str] = frozenset()) -> list[SmoothGroup]:
    """Activations read as input A by MatMuls whose B is a constant 2-D float weight used by
    nothing else; every reader of such an activation that is a MatMul must qualify."""
    groups: dict[str, SmoothGroup] = {}
    rejected: set[str] = set()
    for node in graph:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        x, w = node.inputs[0], node.inputs[1]
        if x is None or x.const_value is not None or not x.name:
            continue
        ok = (node.name not in skip and w is not None and w.const_value is not None
              and w.dtype == ir.DataType.FLOAT and len(w.const_value.shape) == 2
              and all(user.op_type == "MatMul" and index == 1 for user, index in w.uses()))
        if not ok:
            rejected.add(x.name)
            continue
        groups.setdefault(x.name, SmoothGroup(x.name, [])).matmuls.append(node)
    return [g for name, g in groups.items() if name not in rejected]


def smooth(
    graph: ir.Graph,
    groups: list[SmoothGroup],
    channel_ranges: Mapping[str, tuple[np.ndarray, np.ndarray]],
    alpha: float = ALPHA,
) -> dict[str, tuple[float, float]]:
    """Apply SmoothQuant to `groups` given per-channel (min, max) of each activation along its
    last axis; return the float range of each new smoothed tensor, by name (exact for
    min/max statistics)."""
    names = NameAllocator(graph)
    values = {v.name: v for n in graph for v in n.outputs}
    values.update({v.name: v for v in graph.inputs})
    new_ranges = {}
    for group in groups:
        if group.activation not in channel_ranges or group.activation not in values:
            continue
        lo, hi = channel_ranges[group.activation]
        act = np.maximum(np.abs(lo), np.abs(hi)).astype(np.float64)
        weights = [m.inputs[1].const_value.numpy() for m in group.matmuls]
        if any(w.shape[0] != act.shape[0] for w in weights):
            continue
        wmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            s = act**alpha / wmax ** (1 - alpha)
        s = np.where(np.isfinite(s) & (s > 0), s, 1.0)
        s = np.clip(s, *SCALE_LIMITS).astype(np.float32)
        x = values[group.activation]
        inv = ir.Value(name=names.new(f"{group.activation}_smooth_inv_scale"),
                       type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(s.shape),
                       const_value=ir.Tensor((1.0 / s).astype(np.float32)))
        inv.const_value.name = inv.name
        graph.register_initializer(inv)
        mul = ir.node("Mul", [x, inv], name=names.new(f"{group.activation}_smooth"))
        out = mul.outputs[0]
        out.name = names.new(f"{group.activation}_smoothed")
        out.type = ir.TensorType(ir.DataType.FLOAT)
        out.shape = x.shape
        graph.insert_before(group.matmuls[0], mul)
        for matmul, w in zip(group.matmuls, weights, strict=True):
            matmul.replace_input_with(0, out)
            weight = matmul.inputs[1]
            weight.const_value = ir.Tensor((w * s[:, None]).astype(np.float32),
                                           name=weight.name)
        new_ranges[out.name] = (float(np.min(lo / s)), float(np.max(hi / s)))
    return new_ranges
