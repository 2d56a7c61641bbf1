"""Cross-layer equalization (Nagel et al., 2019) for Conv -> [Relu | Clip(0, c)] -> Conv chains.

After batch-norm folding, the channels of a Conv's output can differ in range by a factor of
a thousand (mobilenet_v2's first conv: per-channel weight maxima from 0.0007 to 0.36, and the
depthwise conv reading it has weights up to 15 on the quiet channels). A per-tensor uint8
scale rounds the quiet channels to a few levels, and the next conv multiplies that error by
its largest weights. Scaling output channel k of the producing Conv (weights and bias) by
1 / s_k and the next Convs' input channel k by s_k is exact in float for any s > 0 through
Relu, and through Clip(0, c) on channels the clip never reached (`scale_migration`), and it
costs the weights nothing: both Convs are quantized per output channel. The factors come from
calibration statistics, as SmoothQuant's do, so no float op is added to the graph.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ptqconv.passes import scale_migration
from ptqconv.passes.ops import is_onnx

# Equalized channels get this much room above their observed maxima (see `equalize`). On
# mobilenet_v2 (MSE + bias correction) 1 gave top-1 agreement 0.80, 2 and 4 gave 0.95, with
# logit cosine 0.9867, 0.9874 and 0.9841.
HEADROOM = 2.0


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


def find_groups(graph: ir.Graph, skip: frozenset[str] = frozenset()) -> list[EqualizeGroup]:
    """Conv -> [Relu | Clip(0, c)] -> Convs, where nothing else reads the tensors between them
    and every weight and bias involved is a constant of its own Conv."""
    outputs = {v.name for v in graph.outputs}

    def usable(node: ir.Node) -> bool:
        return (node.op_type == "Conv" and is_onnx(node) and node.name not in skip
                and node.op_type not in skip and _own_constant(node, 1)
                and (len(node.inputs) < 3 or node.inputs[2] is None or _own_constant(node, 2)))

    groups = []
    for producer in graph:
        if not usable(producer) or not producer.outputs or producer.outputs[0].name in outputs:
            continue
        found = _activation(producer.outputs[0])
        if found is None:
            continue
        x, clip_max = found
        users = x.uses()
        channels = producer.inputs[1].const_value.shape[0]
        if (not x.name or x.name in outputs or not users
                or not all(index == 0 and usable(user) for user, index in users)
                or any(user.inputs[1].const_value.shape[1] * _group(user) != channels
                       for user, _ in users)):
            continue
        groups.append(EqualizeGroup(x.name, producer, clip_max, [u for u, _ in users]))
    return groups


def equalize(
    groups: list[EqualizeGroup],
    statistics: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    act_levels: int,
    weight_levels: Callable[[ir.Node], int],
) -> dict[str, tuple[float, float]]:
    """Equalize each group whose activation has per-channel (min, max, mean square) along axis
    1 in `statistics`; return the new float range of each tensor changed (exact for min/max
    statistics). Groups whose best strength is 0 are left alone."""
    new_ranges = {}
    for group in groups:
        if group.activation not in statistics:
            continue
        lo, hi, mean_square = statistics[group.activation]
        # Per-channel maxima from a calibration set are a loose estimate: eval data beat them
        # by 2x on mobilenet_v2 (up to 14x in its last blocks), and an equalized channel is
        # clipped by the per-tensor range at its own estimate. Planning for HEADROOM x the
        # observed range (never past the tensor's) keeps such channels unclipped.
        plan_lo = np.maximum(lo * HEADROOM, np.min(lo))
        plan_hi = np.minimum(hi * HEADROOM, np.max(hi))
        readers = [scale_migration.Reader.conv(c.inputs[1].const_value.numpy(), _group(c),
                                               weight_levels(c)) for c in group.consumers]
        if any(r.square.shape[0] != lo.shape[0] for r in readers):
            continue
        alpha, s = scale_migration.choose_scales(plan_lo, plan_hi, mean_square, readers,
                                                 act_levels, clip_max=group.clip_max)
        if alpha == 0.0:
            continue
        _scale_outputs(group.producer, 1.0 / s)
        for consumer in group.consumers:
            _scale_inputs(consumer, s)
        new_ranges[group.activation] = (float(np.min(lo / s)), float(np.max(hi / s)))
    return new_ranges


def _set(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.Tensor(array.astype(np.float32), name=value.name)


def _scale_outputs(conv: ir.Node, factors: np.ndarray) -> None:
    w = conv.inputs[1].const_value.numpy()
    _set(conv.inputs[1], w * factors.reshape(-1, *[1] * (w.ndim - 1)))
    if len(conv.inputs) > 2 and conv.inputs[2] is not None:
        _set(conv.inputs[2], conv.inputs[2].const_value.numpy() * factors)


def _scale_inputs(conv: ir.Node, factors: np.ndarray) -> None:
    """Multiply the weights reading input channel k by factors[k]; output n of group g reads
    channels g * K/G ... (g + 1) * K/G - 1 through W[n, 0 ... K/G - 1]."""
    w = conv.inputs[1].const_value.numpy()
    n_out, k_per_group = w.shape[:2]
    group_of = np.arange(n_out) // (n_out // _group(conv))
    per_weight = factors[group_of[:, None] * k_per_group + np.arange(k_per_group)[None, :]]
    _set(conv.inputs[1], w * per_weight.reshape(n_out, k_per_group, *[1] * (w.ndim - 2)))
