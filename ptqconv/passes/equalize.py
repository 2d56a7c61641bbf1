"""Cross-layer equalization (Nagel et al., 2019) for Conv -> [Relu | Clip(0, c)] -> Conv chains.

After batch-norm folding, the channels of a Conv's output can differ in range by a factor of
a thousand. A per-tensor uint8
scale rounds the quiet channels to a few levels, and the next conv multiplies that error by
its largest weights. Scaling output channel k of the producing Conv (weights and bias) by
1 / s_k and the next Convs' input channel k by s_k is exact in float for any s > 0 through
Relu, and through Clip(0, c) on channels the clip never reached (`scale_migration`), and it
costs the weights nothing: both Convs are quantized per output channel. The factors come from
calibration statistics, as SmoothQuant's do, so no float op is added to the graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ptqconv.calibrate.statistics import ChannelMoments, ChannelStatistics, Statistic
from ptqconv.graph.initializers import scale_constant, set_constant
from ptqconv.graph.ops import in_skip, is_onnx
from ptqconv.passes import scale_migration
from ptqconv.passes.calibrated import Divided, Migrated, MigrationPass
from ptqconv.qparams import Range

# Equalized channels get this much room above their observed maxima (docs/decisions.md,
# equalization headroom).
HEADROOM = 2.0
# Per-channel statistics of NCHW activations.
CHANNELS = Statistic(ChannelMoments, (1,))


@dataclass
class EqualizeGroup:
    activation: str  # the tensor quantized per tensor: the Relu/Clip output, or the Conv's
    producer: ir.Node  # Conv whose output channels take 1 / s
    clip_max: float | None  # c of a Clip(0, c) between them
    consumers: list[ir.Node]  # Convs whose input channels take s


def _group(node: ir.Node) -> int:
    attr = node.attributes.get("group")
    return 1 if attr is None else int(attr.as_int())


def _own_constant(node: ir.Node, index: int) -> bool:
    """Whether input `index` is a float constant read by `node` alone (so it may be edited)."""
    if len(node.inputs) <= index or node.inputs[index] is None:
        return False
    value = node.inputs[index]
    return (value.const_value is not None and value.dtype == ir.DataType.FLOAT
            and all(user is node for user, _ in value.uses()))


def _scalar(value: ir.Value | None) -> float | None:
    if value is None or value.const_value is None or value.const_value.size != 1:
        return None
    return float(value.const_value.numpy().reshape(()))


def _activation(y: ir.Value) -> tuple[ir.Value, float | None] | None:
    """The tensor after an optional Relu / Clip(0, c) on `y`, and c; None if unusable."""
    users = y.uses()
    if len(users) != 1:
        return y, None
    user = users[0][0]
    if not is_onnx(user) or not user.outputs:
        return y, None
    if user.op_type == "Relu":
        return user.outputs[0], None
    if user.op_type == "Clip":
        low = _scalar(user.inputs[1]) if len(user.inputs) > 1 else None
        high = _scalar(user.inputs[2]) if len(user.inputs) > 2 else None
        if low == 0.0 and high is not None and high > 0:
            return user.outputs[0], high
        return None  # clips that are not 0-based do not commute with scaling
    return y, None


@dataclass
class GroupSearch:
    """The groups found, and why each other Conv -> Conv activation was passed over."""

    groups: list[EqualizeGroup] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)


def find_groups(graph: ir.Graph, skip: frozenset[str] = frozenset()) -> GroupSearch:
    """Conv -> [Relu | Clip(0, c)] -> Convs, where nothing else reads the tensors between them
    and every weight and bias involved is a constant of its own Conv."""
    outputs = {v.name for v in graph.outputs}

    def unusable(node: ir.Node) -> str:
        if node.op_type != "Conv" or not is_onnx(node):
            return f"also read by {node.op_type}"
        if in_skip(node, skip):
            return "a reader is in skip_quant_node"
        if not _own_constant(node, 1) or not (
                len(node.inputs) < 3 or node.inputs[2] is None or _own_constant(node, 2)):
            return "a weight or bias is shared or computed"
        return ""

    search = GroupSearch()
    for producer in graph:
        if producer.op_type != "Conv" or unusable(producer) or not producer.outputs:
            continue
        y = producer.outputs[0]
        found = _activation(y)
        if found is None:
            search.rejected[y.name] = "a Clip that is not Clip(0, c) follows"
            continue
        x, clip_max = found
        users = x.uses()
        if not users or not x.name or x.name in outputs or y.name in outputs:
            continue  # a model output, or nothing to equalize with
        channels = producer.inputs[1].const_value.shape[0]
        if not any(user.op_type == "Conv" for user, _ in users):
            continue  # no Conv to equalize with
        reason = next((unusable(user) for user, _ in users if unusable(user)), "")
        if not reason and any(index != 0 for _, index in users):
            reason = "also read as a weight"
        if not reason and any(user.inputs[1].const_value.shape[1] * _group(user) != channels
                              for user, _ in users):
            reason = "a reader's input channels differ from the producer's output channels"
        if reason:
            search.rejected[x.name] = reason
            continue
        search.groups.append(EqualizeGroup(x.name, producer, clip_max, [u for u, _ in users]))
    return search


class EqualizePass(MigrationPass):
    """Equalize every group whose per-channel statistics predict less output noise after it;
    `weight_levels(conv)` is the largest integer of the conv's weight grid."""

    technique = "equalization"
    channels = CHANNELS

    def __init__(self, skip: frozenset[str], act_levels: int,
                 weight_levels: Callable[[ir.Node], int]) -> None:
        super().__init__()
        self.skip, self.act_levels, self.weight_levels = skip, act_levels, weight_levels

    def find(self, graph: ir.Graph) -> tuple[list[EqualizeGroup], dict[str, str]]:
        search = find_groups(graph, self.skip)
        return search.groups, search.rejected

    def touches(self, group: EqualizeGroup) -> set[str]:
        producer = group.producer
        return {group.activation, producer.outputs[0].name,
                *(v.name for v in producer.inputs[1:] if v is not None),
                *(c.inputs[1].name for c in group.consumers)}

    def migrate(self, model: ir.Model, group: EqualizeGroup,
                stats: ChannelStatistics) -> Migrated | None:
        return self._equalize(group, stats.minimum, stats.maximum, stats.mean_square)

    def _equalize(self, group: EqualizeGroup, lo: np.ndarray, hi: np.ndarray,
                  mean_square: np.ndarray) -> Migrated | None:
        # Per-channel maxima from a calibration set are a loose estimate, and an equalized
        # channel is clipped by the per-tensor range at its own estimate: plan for HEADROOM x
        # the observed range (never past the tensor's).
        plan_lo = np.maximum(lo * HEADROOM, np.min(lo))
        plan_hi = np.minimum(hi * HEADROOM, np.max(hi))
        readers = [scale_migration.Reader.conv(c.inputs[1].const_value.numpy(), _group(c),
                                               self.weight_levels(c)) for c in group.consumers]
        if any(r.channels != lo.shape[0] for r in readers):
            return None
        alpha, s = scale_migration.choose_scales(plan_lo, plan_hi, mean_square, readers,
                                                 self.act_levels, clip_max=group.clip_max)
        if alpha == 0.0:
            return None
        _scale_outputs(group.producer, 1.0 / s)
        for consumer in group.consumers:
            _scale_inputs(consumer, s)
        divided = Divided(s, 1)  # the producer's output and, after its Relu/Clip, the input
        return Migrated(group.activation, Range(float(np.min(lo / s)), float(np.max(hi / s))),
                        {group.producer.outputs[0].name: divided, group.activation: divided})


def _scale_outputs(conv: ir.Node, factors: np.ndarray) -> None:
    rank = len(conv.inputs[1].const_value.shape)
    scale_constant(conv.inputs[1], factors.reshape(-1, *[1] * (rank - 1)))
    if len(conv.inputs) > 2 and conv.inputs[2] is not None:
        set_constant(conv.inputs[2], conv.inputs[2].const_value.numpy() * factors)


def _scale_inputs(conv: ir.Node, factors: np.ndarray) -> None:
    """Multiply the weights reading input channel k by factors[k]; output n of group g reads
    channels g * K/G ... (g + 1) * K/G - 1 through W[n, 0 ... K/G - 1]."""
    shape = conv.inputs[1].const_value.shape
    n_out, k_per_group = shape[0], shape[1]
    group_of = np.arange(n_out) // (n_out // _group(conv))
    per_weight = factors[group_of[:, None] * k_per_group + np.arange(k_per_group)[None, :]]
    scale_constant(conv.inputs[1],
                   per_weight.reshape(n_out, k_per_group, *[1] * (len(shape) - 2)))
