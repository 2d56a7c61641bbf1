"""Sum-preserving rounding of weights (weights.sum_rounding), checked with hypothesis, and what
it buys on a layer whose channels nearly cancel."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ptqconv import qparams
from ptqconv.weights import layout as layouts
from ptqconv.weights.layout import WeightLayout
from ptqconv.weights.sum_rounding import sum_preserving

weights = hnp.arrays(
    np.float32, hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=7),
    elements=st.floats(-100, 100, allow_nan=False, width=32))


def _layouts(ndim: int, bits: int) -> st.SearchStrategy[tuple[WeightLayout, int]]:
    """A layout of a weight of rank `ndim` and its output-channel axis."""
    grid = qparams.weight_only_grid(bits)
    return st.one_of(
        st.just((WeightLayout(grid, 0), 0)),
        st.just((WeightLayout(grid, None), 0)),
        # MatMul: channels along axis 1, blocks along the inputs (axis 0).
        st.sampled_from([2, 3, 16]).map(lambda b: (WeightLayout(grid, 0, b), 1)),
        # Conv: blocks along the input channels.
        st.sampled_from([2, 4]).map(
            lambda b: (WeightLayout(grid, 1 if ndim > 2 else 0, b), 0 if ndim > 2 else 1)))


def _groups(a: np.ndarray, layout: WeightLayout, channel: int) -> list[np.ndarray]:
    """Every channel's, or block's, entries of `a` (reference: one index at a time)."""
    out: dict[tuple[int, int], list[float]] = {}
    for index in np.ndindex(a.shape):
        block = 0
        if layout.block_size and layout.axis != channel:
            block = index[layout.axis] // layout.block_size
        out.setdefault((index[channel], block), []).append(float(a[index]))
    return [np.array(v) for v in out.values()]


@settings(max_examples=200, deadline=None)
@given(data=st.data(), w=weights, bits=st.integers(2, 8))
def test_each_channel_keeps_its_sum_with_the_fewest_moves_of_at_most_a_step(data, w, bits):
    layout, channel = data.draw(_layouts(w.ndim, bits))
    nearest = layouts.nearest(w, layout)
    kept = sum_preserving(w, nearest, channel)
    grid = layout.grid
    scale = layouts.expand(nearest.scale, layout, w.shape).astype(np.float64)
    zero = layouts.expand(nearest.zero_point, layout, w.shape).astype(np.float64)
    exact = w.astype(np.float64) / scale + zero
    q, q0 = kept.q.astype(np.int64), nearest.q.astype(np.int64)
    assert np.array_equal(kept.scale, nearest.scale)
    assert q.min() >= grid.qmin and q.max() <= grid.qmax
    moved = q != q0
    # One step at most, and only towards the value: never more than a step from it.
    assert np.all(np.abs(q - q0) <= 1)
    assert np.all(np.sign(q - q0)[moved] == np.sign(exact - q0)[moved])
    assert np.all(np.abs(q - exact) < 1 + 1e-6)
    for x, a, b in zip(_groups(exact, layout, channel), _groups(q, layout, channel),
                       _groups(q0, layout, channel), strict=True):
        before, after = round(x.sum() - b.sum()), round(x.sum() - a.sum())
        assert int(np.sum(a != b)) == abs(before) - abs(after)  # the fewest moves
        # Short of the sum only where no entry could move towards its value on the grid.
        if after > 0:
            assert not np.any((x - a > 0) & (a < grid.qmax))
        if after < 0:
            assert not np.any((x - a < 0) & (a > grid.qmin))


def test_a_derivative_filter_keeps_its_response_to_a_flat_input():
    """mobilenet_v2's first depthwise conv in small: channels whose taps nearly cancel. On a
    flat input their output is the taps' sum, which nearest rounding misses by a random walk
    of the rounding errors and sum-preserving rounding by at most half a step."""
    rng = np.random.default_rng(0)
    taps = rng.uniform(-3, 3, (256, 9)).astype(np.float32)
    taps[:, 4] -= taps.sum(axis=1)  # every channel sums to about 0
    layout = WeightLayout(qparams.weight_only_grid(8), 0)
    nearest = layouts.nearest(taps, layout)
    kept = sum_preserving(taps, nearest, 0)
    truth = taps.astype(np.float64).sum(axis=1)
    step = nearest.scale.astype(np.float64)
    err_nearest = np.abs(nearest.dequantized().sum(axis=1) - truth) / step
    err_kept = np.abs(kept.dequantized().sum(axis=1) - truth) / step
    assert np.all(err_kept <= 0.5 + 1e-4)
    assert err_nearest.mean() > 2 * err_kept.mean()
    # The weights themselves stay as close: the error grows by few ties moved.
    sq = [np.sum((t.dequantized() - taps) ** 2) for t in (nearest, kept)]
    assert sq[1] < 1.2 * sq[0]
