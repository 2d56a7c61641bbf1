"""Rounding that keeps each output channel's sum: round to nearest, then move the fewest
integers whose rounding was closest to a tie one step the other way, so that within every
run of weights one output reads through (a channel, or one block of it) the integers add up to
the rounded sum of the unrounded grid values.

Why: a layer's output error is sum_k e_k x_k over the weights' errors e. Where the inputs of
one output share a common level (smooth images under a 3x3 depthwise conv, activations with a
mean), that level times sum_k e_k is the error, and nearest rounding leaves that sum a random
walk of the errors: mobilenet_v2's first depthwise conv, whose BN-folded channels are
derivative filters with weights that nearly cancel, lost 2.7% of output cosine to it at 8
bits. Data-free and on the same grid: every integer stays within one step of its value,
nothing is added to the graph (docs/decisions.md, sum-preserving rounding).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ptqconv.weights.layout import IntegerWeight, blocked, expand


def sum_preserving(w: np.ndarray, integer: IntegerWeight, channel_axis: int) -> IntegerWeight:
    """`integer` (nearest rounding of `w`) with each output channel's integers, or each
    block's, adding up to their rounded unrounded sum (module docstring)."""
    if integer.layout.grid.binary or w.ndim < 2:
        return integer
    shape = w.shape
    scale = expand(integer.scale, integer.layout, shape).astype(np.float64)
    zero_point = expand(integer.zero_point, integer.layout, shape).astype(np.float64)
    exact = w.astype(np.float64) / scale + zero_point
    group, ungroup = _grouping(shape, integer, channel_axis)
    x, q = group(exact), group(integer.q.astype(np.float64))
    _keep_sums(x, q, integer.layout.grid.qmin, integer.layout.grid.qmax)
    return IntegerWeight(ungroup(q).astype(integer.q.dtype), integer.scale, integer.zero_point,
                         integer.layout)


def _grouping(shape: tuple[int, ...], integer: IntegerWeight, channel_axis: int,
              ) -> tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]:
    """Views of a weight-shaped array as [groups, members] (a channel, or a block of one,
    per row; a short last block padded with exact zeros) and back."""
    ndim = len(shape)
    channel = channel_axis % ndim
    layout = integer.layout
    if layout.block_size and layout.axis is not None and layout.axis % ndim != channel:
        axis, size = layout.axis % ndim, layout.block_size
        front = [channel + 1 if channel > axis else channel, axis]
        order = front + [d for d in range(ndim + 1) if d not in front]

        def group(a: np.ndarray) -> np.ndarray:
            t = blocked(a, axis, size).transpose(order)
            return np.ascontiguousarray(t).reshape(t.shape[0] * t.shape[1], -1)

        def ungroup(g: np.ndarray) -> np.ndarray:
            blocks = -(-shape[axis] // size)
            full = [*shape[:axis], blocks, size, *shape[axis + 1:]]
            t = g.reshape([full[d] for d in order]).transpose(np.argsort(order))
            t = t.reshape(*shape[:axis], blocks * size, *shape[axis + 1:])
            return t[(slice(None),) * axis + (slice(0, shape[axis]),)]

        return group, ungroup

    def group_channels(a: np.ndarray) -> np.ndarray:
        return np.moveaxis(a, channel, 0).reshape(shape[channel], -1)

    def ungroup_channels(g: np.ndarray) -> np.ndarray:
        moved = [shape[channel], *(shape[d] for d in range(ndim) if d != channel)]
        return np.moveaxis(g.reshape(moved), 0, channel)

    return group_channels, ungroup_channels


def _keep_sums(x: np.ndarray, q: np.ndarray, qmin: int, qmax: int) -> None:
    """Move, in place, the fewest entries of each row of `q` (nearest integers of `x`) one
    step towards `x`, those nearest a tie first, until the row's sum is the rounded sum of
    `x`'s row; only entries that move towards their value and stay on the grid."""
    need = np.rint(x.sum(axis=1) - q.sum(axis=1)).astype(np.int64)
    for sign, room in ((1, q < qmax), (-1, q > qmin)):
        wanted = np.maximum(sign * need, 0)
        most = min(int(wanted.max(initial=0)), q.shape[1])
        if most == 0:
            continue
        towards = sign * (x - q)
        towards = np.where(room & (towards > 0), towards, -np.inf)
        top = np.argpartition(-towards, most - 1, axis=1)[:, :most]
        values = np.take_along_axis(towards, top, axis=1)
        ranked = np.argsort(-values, axis=1, kind="stable")
        top = np.take_along_axis(top, ranked, axis=1)
        values = np.take_along_axis(values, ranked, axis=1)
        pick = (np.arange(most)[None, :] < wanted[:, None]) & np.isfinite(values)
        rows = np.nonzero(pick)[0]
        q[rows, top[pick]] += sign
