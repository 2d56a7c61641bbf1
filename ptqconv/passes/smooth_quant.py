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

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ptqconv.calibrate.statistics import ChannelMoments, Statistic, StatisticPoint
from ptqconv.graph.initializers import add_initializer, set_constant
from ptqconv.graph.naming import NameAllocator
from ptqconv.graph.ops import is_onnx
from ptqconv.passes import scale_migration
from ptqconv.passes.calibrated import CalibratedPass, MigrationResult
from ptqconv.qparams import Range

logger = logging.getLogger(__name__)
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
        if node.name in skip:
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


class SmoothQuantPass(CalibratedPass):
    """Smooth every group whose per-channel statistics predict less output noise after it.

    The inserted Mul nodes are named `<activation>_smooth` (see `smoothing_nodes`): they must
    stay float and read the float activation, or X would be quantized before smoothing.
    """

    technique = "SmoothQuant"

    def __init__(self, skip: frozenset[str], act_levels: int, weight_levels: int) -> None:
        super().__init__()
        self.skip, self.act_levels, self.weight_levels = skip, act_levels, weight_levels

    def statistic_points(self, model: ir.Model) -> list[StatisticPoint]:
        return [StatisticPoint(g.activation, CHANNELS)
                for g in find_groups(model.graph, self.skip).groups]

    def call(self, model: ir.Model) -> MigrationResult:
        graph = model.graph
        search = find_groups(graph, self.skip)
        result = MigrationResult(model, False, self.technique, left_alone=dict(search.rejected))
        names = NameAllocator(graph)
        values = {v.name: v for n in graph for v in n.outputs}
        values.update({v.name: v for v in graph.inputs})
        for group in search.groups:
            moments = self.statistics.get(group.activation, CHANNELS)
            stats = moments.result() if moments is not None else None
            if stats is None or group.activation in self.excluded or (
                    group.activation not in values):
                result.left_alone[group.activation] = "not calibrated (stays float)"
                continue
            made = self._smooth(graph, names, values[group.activation], group, stats.minimum,
                                stats.maximum, stats.mean_square)
            if made is None:
                result.left_alone[group.activation] = "predicted to gain nothing"
                continue
            result.ranges[made[0]] = made[1]
            result.migrated.append(group.activation)
            result.modified = True
        for name, reason in result.left_alone.items():
            logger.debug("SmoothQuant: %s left alone: %s", name, reason)
        return result

    def _smooth(self, graph: ir.Graph, names: NameAllocator, x: ir.Value, group: SmoothGroup,
                lo: np.ndarray, hi: np.ndarray, mean_square: np.ndarray,
                ) -> tuple[str, Range] | None:
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
        for matmul, w in zip(group.matmuls, weights, strict=True):
            matmul.replace_input_with(0, out)
            set_constant(matmul.inputs[1], w * s[:, None])
        return out.name, Range(float(np.min(lo / s)), float(np.max(hi / s)))
