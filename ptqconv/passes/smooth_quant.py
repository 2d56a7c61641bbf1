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

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ptqconv.calibrate.statistics import ChannelMoments, ChannelStatistics, Statistic
from ptqconv.graph.initializers import add_initializer, scale_constant
from ptqconv.graph.naming import NameAllocator
from ptqconv.graph.ops import in_skip, is_onnx
from ptqconv.passes import scale_migration
from ptqconv.passes.calibrated import Divided, Migrated, MigrationPass
from ptqconv.qparams import Range

# Per-channel statistics along the last axis (MatMul's K).
CHANNELS = Statistic(ChannelMoments, (-1,))
SUFFIX = "_smooth"
INV_SCALE_SUFFIX = "_smooth_inv_scale"


@dataclass
class SmoothGroup:
    activation: str
    matmuls: list[ir.Node]


@dataclass
class GroupSearch:
    """The groups found, and why each other MatMul input was passed over."""

    groups: list[SmoothGroup] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)


def find_groups(graph: ir.Graph, skip: frozenset[str] = frozenset()) -> GroupSearch:
    """Activations read as input A by MatMuls whose B is a constant 2-D float weight used by
    nothing else; every reader of such an activation that is a MatMul must qualify."""
    groups: dict[str, SmoothGroup] = {}
    rejected: dict[str, str] = {}
    for node in graph:
        if node.op_type != "MatMul" or not is_onnx(node) or len(node.inputs) < 2:
            continue
        x, w = node.inputs[0], node.inputs[1]
        if x is None or x.const_value is not None or not x.name:
            continue
        reason = ""
        if in_skip(node, skip):
            reason = "a reader is in skip_quant_node"
        elif (w is None or w.const_value is None or w.dtype != ir.DataType.FLOAT
              or len(w.const_value.shape) != 2):
            reason = "a MatMul reader has no constant 2-D float weight"
        elif not all(user.op_type == "MatMul" and index == 1 for user, index in w.uses()):
            reason = "a reader's weight is also read elsewhere"
        if reason:
            rejected.setdefault(x.name, reason)
            continue
        groups.setdefault(x.name, SmoothGroup(x.name, [])).matmuls.append(node)
    # Only activations some MatMul could smooth were candidates (not attention's Q.K^T).
    return GroupSearch([g for name, g in groups.items() if name not in rejected],
                       {name: why for name, why in rejected.items() if name in groups})


def smoothing_nodes(graph: ir.Graph) -> frozenset[str]:
    """Names of the Mul nodes `SmoothQuantPass` inserted, which quantization must leave float."""
    return frozenset(n.name for n in graph if n.op_type == "Mul" and n.name
                     and n.name.endswith(SUFFIX) and n.inputs[1] is not None
                     and (n.inputs[1].name or "").endswith(INV_SCALE_SUFFIX))


class SmoothQuantPass(MigrationPass):
    """Smooth every group whose per-channel statistics predict less output noise after it.

    The inserted Mul nodes are named `<activation>_smooth` (see `smoothing_nodes`): they must
    stay float and read the float activation, or X would be quantized before smoothing.
    """

    technique = "SmoothQuant"
    channels = CHANNELS

    def __init__(self, skip: frozenset[str], act_levels: int, weight_levels: int) -> None:
        super().__init__()
        self.skip, self.act_levels, self.weight_levels = skip, act_levels, weight_levels

    def find(self, graph: ir.Graph) -> tuple[list[SmoothGroup], dict[str, str]]:
        search = find_groups(graph, self.skip)
        return search.groups, search.rejected

    def touches(self, group: SmoothGroup) -> set[str]:
        return {group.activation, *(m.inputs[1].name for m in group.matmuls)}

    def migrate(self, model: ir.Model, group: SmoothGroup,
                stats: ChannelStatistics) -> Migrated | None:
        graph = model.graph
        x = next((v for v in (*graph.inputs, *(o for n in graph for o in n.outputs))
                  if v.name == group.activation), None)
        if x is None:
            return None
        return self._smooth(graph, NameAllocator(graph), x, group, stats.minimum,
                            stats.maximum, stats.mean_square)

    def _smooth(self, graph: ir.Graph, names: NameAllocator, x: ir.Value, group: SmoothGroup,
                lo: np.ndarray, hi: np.ndarray, mean_square: np.ndarray,
                ) -> Migrated | None:
        weights = [m.inputs[1].const_value.numpy() for m in group.matmuls]
        if any(w.shape[0] != lo.shape[0] for w in weights):
            return None
        readers = [scale_migration.Reader.matmul(w, self.weight_levels) for w in weights]
        alpha, s = scale_migration.choose_scales(lo, hi, mean_square, readers, self.act_levels)
        if alpha == 0.0:
            return None
        inv = add_initializer(graph, names.new(f"{group.activation}{INV_SCALE_SUFFIX}"),
                              (1.0 / s).astype(np.float32))
        mul = ir.node("Mul", [x, inv], name=names.new(f"{group.activation}{SUFFIX}"))
        out = mul.outputs[0]
        out.name = names.new(f"{group.activation}_smoothed")
        out.type = ir.TensorType(ir.DataType.FLOAT)
        out.shape = x.shape
        graph.insert_before(group.matmuls[0], mul)
        for matmul in group.matmuls:
            matmul.replace_input_with(0, out)
            scale_constant(matmul.inputs[1], s[:, None])
        return Migrated(out.name, Range(float(np.min(lo / s)), float(np.max(hi / s))),
                        {out.name: Divided(s, -1)})
