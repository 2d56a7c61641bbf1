"""Rounding that keeps each kernel's sum: round a Conv weight to nearest, then move the fewest
integers whose rounding was closest to a tie one step the other way, so that the taps of
every (output, input channel) kernel add up to the rounded sum of their unrounded grid values.

Why: on a smooth input map a kernel's output is its taps' sum times the local level, and
nearest rounding misses that sum by a random walk of the taps' rounding errors: mobilenet_v2's
first depthwise conv, whose BN-folded channels are derivative filters with taps that nearly
cancel, lost 2.7% of output cosine to it at 8 bits. Data-free and on the same grid: every
integer stays within one step of its value, nothing is added to the graph. Kept per kernel,
not per output channel: the inputs of a 1x1 conv, a Gemm or a MatMul share no level, and
moving their roundings only added error (docs/decisions.md, sum-preserving rounding).
"""

from __future__ import annotations

import numpy as np

from ptqconv.weights.layout import IntegerWeight, expand


def sum_preserving(w: np.ndarray, integer: IntegerWeight) -> IntegerWeight:
    """`integer` (nearest rounding of the Conv weight `w`, [O, I, *kernel]) with each
    kernel's taps adding up to their rounded unrounded sum (module docstring). Weights of
    one tap, and layouts whose blocks would split a kernel, are returned as they are."""
    layout = integer.layout
    taps = int(np.prod(w.shape[2:])) if w.ndim > 2 else 1
    if taps == 1 or layout.grid.binary or (layout.block_size and layout.axis not in (0, 1)):
        return integer
    scale = expand(integer.scale, layout, w.shape).astype(np.float64)
    zero_point = expand(integer.zero_point, layout, w.shape).astype(np.float64)
    exact = (w.astype(np.float64) / scale + zero_point).reshape(-1, taps)
    q = integer.q.astype(np.float64).reshape(-1, taps)
    _keep_sums(exact, q, layout.grid.qmin, layout.grid.qmax)
    return IntegerWeight(q.reshape(w.shape).astype(integer.q.dtype), integer.scale,
                         integer.zero_point, layout)


def _keep_sums(x: np.ndarray, q: np.ndarray, qmin: int, qmax: int) -> None:
    """Move, in place, the fewest entries of each row of `q` (nearest integers of `x`) one
    step towards `x`, those nearest a tie first, until the row's sum is the rounded sum of
    `x`'s row; only entries that move towards their value and stay on the grid."""
    need = np.rint(x.sum(axis=1) - q.sum(axis=1)).astype(np.int64)
    for sign in (1, -1):
        # Only the rows that need a move this way (about 3 in 10 for 3x3 kernels): ranking
        # every row's taps took most of a ResNet-18's conversion.
        moving = np.nonzero(sign * need > 0)[0]
        if not moving.size:
            continue
        wanted = sign * need[moving]
        most = min(int(wanted.max()), q.shape[1])
        xs, qs = x[moving], q[moving]
        room = qs < qmax if sign > 0 else qs > qmin
        towards = sign * (xs - qs)
        towards = np.where(room & (towards > 0), towards, -np.inf)
        top = np.argpartition(-towards, most - 1, axis=1)[:, :most]
        values = np.take_along_axis(towards, top, axis=1)
        ranked = np.argsort(-values, axis=1, kind="stable")
        top = np.take_along_axis(top, ranked, axis=1)
        values = np.take_along_axis(values, ranked, axis=1)
        pick = (np.arange(most)[None, :] < wanted[:, None]) & np.isfinite(values)
        rows = moving[np.nonzero(pick)[0]]
        q[rows, top[pick]] += sign
