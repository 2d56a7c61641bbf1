"""Sum-preserving rounding of conv kernels (weights.sum_rounding), checked with hypothesis,
and what it buys on a layer whose kernels nearly cancel."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ptqconv import qparams
from ptqconv.weights import layout as layouts
from ptqconv.weights.layout import WeightLayout
from ptqconv.weights.sum_rounding import sum_preserving

kernels = hnp.arrays(
    np.float32, hnp.array_shapes(min_dims=3, max_dims=4, min_side=1, max_side=6),
    elements=st.floats(-100, 100, allow_nan=False, width=32))


def _layouts(bits: int) -> st.SearchStrategy[WeightLayout]:
    """A Conv weight's layouts: per output channel, per tensor, blocks of input channels."""
    grid = qparams.weight_only_grid(bits)
    return st.one_of(st.just(WeightLayout(grid, 0)), st.just(WeightLayout(grid, None)),
                     st.sampled_from([2, 3, 16]).map(lambda b: WeightLayout(grid, 1, b)))


@settings(max_examples=200, deadline=None)
@given(data=st.data(), w=kernels, bits=st.integers(2, 8))
def test_each_kernel_keeps_its_sum_with_the_fewest_moves_of_at_most_a_step(data, w, bits):
    layout = data.draw(_layouts(bits))
    nearest = layouts.nearest(w, layout)
    kept = sum_preserving(w, nearest)
    grid = layout.grid
    scale = layouts.expand(nearest.scale, layout, w.shape).astype(np.float64)
    zero = layouts.expand(nearest.zero_point, layout, w.shape).astype(np.float64)
    taps = int(np.prod(w.shape[2:]))
    exact = (w.astype(np.float64) / scale + zero).reshape(-1, taps)
    q = kept.q.astype(np.int64).reshape(-1, taps)
    q0 = nearest.q.astype(np.int64).reshape(-1, taps)
    assert np.array_equal(kept.scale, nearest.scale)
    assert q.min() >= grid.qmin and q.max() <= grid.qmax
    if taps == 1:  # a 1x1 kernel: nothing to keep
        assert np.array_equal(q, q0)
    moved = q != q0
    # One step at most, and only towards the value: never more than a step from it.
    assert np.all(np.abs(q - q0) <= 1)
    assert np.all(np.sign(q - q0)[moved] == np.sign(exact - q0)[moved])
    assert np.all(np.abs(q - exact) < 1 + 1e-6)
    for x, a, b in zip(exact, q, q0, strict=True):
        before, after = round(x.sum() - b.sum()), round(x.sum() - a.sum())
        assert int(np.sum(a != b)) == abs(before) - abs(after)  # the fewest moves
        # Short of the sum only where no tap could move towards its value on the grid.
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
    taps = taps.reshape(256, 1, 3, 3)
    layout = WeightLayout(qparams.weight_only_grid(8), 0)
    nearest = layouts.nearest(taps, layout)
    kept = sum_preserving(taps, nearest)
    truth = taps.astype(np.float64).sum(axis=(1, 2, 3))
    step = nearest.scale.astype(np.float64)
    err_nearest = np.abs(nearest.dequantized().sum(axis=(1, 2, 3)) - truth) / step
    err_kept = np.abs(kept.dequantized().sum(axis=(1, 2, 3)) - truth) / step
    assert np.all(err_kept <= 0.5 + 1e-4)
    assert err_nearest.mean() > 2 * err_kept.mean()
    # The weights themselves stay as close: the error grows by few ties moved.
    sq = [np.sum((t.dequantized() - taps) ** 2) for t in (nearest, kept)]
    assert sq[1] < 1.2 * sq[0]
