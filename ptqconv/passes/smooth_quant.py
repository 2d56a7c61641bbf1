"""SmoothQuant (Xiao et al., 2023) for MatMul activations with outlier channels.

Transformer activations (LayerNorm and GELU outputs) carry a few channels far larger than the
rest; a per-tensor uint8 scale then crushes every other channel (the per-layer report shows
them at 15-20 dB). For each activation X feeding MatMuls with constant weights W [K, N], the
per-channel factors s_j = max|X_j|^a / max|W_j,:|^(1-a) move that range into the weights,
which are quantized per channel anyway (the strength a is chosen per activation, see
`scale_migration`):
X' = X / s (a float Mul inserted on the MatMul branch only, so other readers of X are
unchanged) and W' = diag(s) W, so X' W' = X W exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ptqconv.passes import scale_migration
from ptqconv.passes.naming import NameAllocator
from ptqconv.passes.ops import is_onnx


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
        if node.op_type != "MatMul" or not is_onnx(node) or len(node.inputs) < 2:
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


SUFFIX = "_smooth"


def smoothing_nodes(graph: ir.Graph) -> frozenset[str]:
    """Names of the Mul nodes `smooth` inserted, which quantization must leave float."""
    return frozenset(n.name for n in graph if n.op_type == "Mul" and n.name
                     and n.name.endswith(SUFFIX) and n.inputs[1] is not None
                     and (n.inputs[1].name or "").endswith("_smooth_inv_scale"))


def smooth(
    graph: ir.Graph,
    groups: list[SmoothGroup],
    statistics: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    act_levels: int = 255,
    weight_levels: int = 63,
) -> dict[str, tuple[float, float]]:
    """Apply SmoothQuant to `groups` given per-channel (min, max, mean square) of each
    activation along its last axis; return the float range of each new smoothed tensor, by
    name (exact for min/max statistics). Groups whose best strength is 0 are left alone.

    The inserted Mul nodes are named `<activation>_smooth` (see `is_smoothing`): they must
    stay float and read the float activation, or X would be quantized before smoothing.
    """
    names = NameAllocator(graph)
    values = {v.name: v for n in graph for v in n.outputs}
    values.update({v.name: v for v in graph.inputs})
    new_ranges = {}
    for group in groups:
        if group.activation not in statistics or group.activation not in values:
            continue
        lo, hi, mean_square = statistics[group.activation]
        weights = [m.inputs[1].const_value.numpy() for m in group.matmuls]
        if any(w.shape[0] != lo.shape[0] for w in weights):
            continue
        readers = [scale_migration.Reader.matmul(w, weight_levels) for w in weights]
        alpha, s = scale_migration.choose_scales(lo, hi, mean_square, readers, act_levels)
        if alpha == 0.0:
            continue
        x = values[group.activation]
        inv = ir.Value(name=names.new(f"{group.activation}_smooth_inv_scale"),
                       type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(s.shape),
                       const_value=ir.Tensor((1.0 / s).astype(np.float32)))
        inv.const_value.name = inv.name
        graph.register_initializer(inv)
        mul = ir.node("Mul", [x, inv], name=names.new(f"{group.activation}{SUFFIX}"))
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
