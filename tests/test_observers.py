"""Observers: streaming summaries equal their all-at-once results; KL matches TensorRT's loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ptqconv.calibrate.observers import (
    KL_BIN_FLOOR,
    KL_BINS,
    KL_TARGET_BINS,
    OBSERVERS,
    HistogramObserver,
    MinMaxObserver,
    MSEObserver,
    RemovalOutlierObserver,
    histogram_values,
    kl_divergences,
    kl_threshold_bin,
    predicted_error,
)

values = st.floats(-1e3, 1e3, allow_nan=False, width=32)
chunks = st.lists(hnp.arrays(np.float32, st.integers(1, 300), elements=values), min_size=1,
                  max_size=8)


def feed(observer, arrays):
    for a in arrays:
        observer.update(a)
    return observer


@settings(max_examples=150, deadline=None)
@given(chunks, st.sampled_from(sorted(OBSERVERS)), st.integers(1, 7))
def test_merging_observers_fed_in_chunks_equals_one_fed_everything(arrays, method, split):
    cls = OBSERVERS[method]
    whole = feed(cls(), arrays)
    split = split % len(arrays) if len(arrays) > 1 else 0
    left, right = feed(cls(), arrays[:split]), feed(cls(), arrays[split:])
    left.merge(right)
    assert left.compute_range(8) == pytest.approx(whole.compute_range(8), rel=1e-12, abs=0)
    if method == "KL":
        # Power-of-two bin widths make the streamed histogram exact, not an approximation.
        concatenated = feed(cls(), [np.concatenate(arrays)])
        assert np.array_equal(whole.hist, concatenated.hist)
        assert whole.exponent == concatenated.exponent
        assert np.array_equal(left.hist, whole.hist)


def tensorrt_kl_loop(hist: np.ndarray, quant_bins: int) -> int:
    """The textbook per-candidate search (TensorRT / MindSpore), for reference."""
    best, best_i = np.inf, -1
    for i in range(quant_bins, len(hist)):
        sliced = hist[:i].copy()
        p = sliced.copy()
        p[i - 1] += hist[i:].sum()
        q = np.zeros(i)
        m = i // quant_bins
        for g in range(quant_bins):
            start, stop = g * m, (i if g == quant_bins - 1 else (g + 1) * m)
            q[start:stop] = sliced[start:stop].sum() / (stop - start)
        p, q = p / p.sum(), q / q.sum()
        kl = float((p * np.log(p / q)).sum())
        if kl < best:
            best, best_i = kl, i
    return best_i


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("quant_bins", [128, 256, 16])
def test_closed_form_kl_matches_the_per_candidate_loop(seed, quant_bins):
    rng = np.random.default_rng(seed)
    x = np.abs(rng.standard_t(2 + seed, 50_000))
    hist = np.histogram(x, 2048, (0, x.max()))[0] + 1e-7
    assert kl_threshold_bin(hist, quant_bins) == tensorrt_kl_loop(hist, quant_bins)


def test_histogram_matches_a_direct_2048_bin_histogram():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(200_000).astype(np.float32)
    obs = feed(HistogramObserver(), np.array_split(x, 7))
    hist, absmax = obs.histogram()
    direct = np.histogram(np.abs(x[x != 0]), 2048, (0, absmax))[0]
    assert absmax == pytest.approx(np.abs(x).max())
    assert hist.sum() == pytest.approx(direct.sum())
    # Re-binning from >= 4 fine bins per bin: each bin within a few counts of the direct one.
    assert np.abs(hist - direct).max() <= 0.05 * direct.max()


def test_kl_clips_a_heavy_tail_and_keeps_unsigned_tensors_unsigned():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(100_000).astype(np.float32)
    x[:5] = 30.0  # outliers, 4% of the energy
    lo, hi = feed(HistogramObserver(), [x]).compute_range(8)
    # The outliers at 30 are clipped; the range is [-T, T] within the observed minimum.
    assert lo == pytest.approx(max(x.min(), -hi)) and 3 < hi < 25
    relu = np.maximum(x, 0)
    lo, hi = feed(HistogramObserver(), [relu]).compute_range(8)
    assert lo == 0.0 and 3 < hi < 25


def test_kl_is_refused_where_its_clipping_would_leave_mostly_noise():
    # As ppocrv4_rec's Hardswish outputs: most values within 0.04 of zero, a few up to 100 x
    # larger that carry most of the energy. KL's threshold cuts that tail.
    rng = np.random.default_rng(3)
    x = (np.abs(rng.standard_normal(200_000)) * 0.03 - 0.04).astype(np.float32)
    x[:20_000] = rng.exponential(0.08, 20_000)
    x[:400] = rng.uniform(0.5, 3.5, 400)
    lo, hi = feed(HistogramObserver(), [x]).compute_range(8)
    assert (lo, hi) == (pytest.approx(x.min()), pytest.approx(x.max(), rel=1e-6))

    def sqnr_db(obs) -> float:
        lo, hi = feed(obs, [x]).compute_range(8)
        scale = (hi - lo) / 255
        zp = np.round(-lo / scale)
        q = (np.clip(np.round(x / scale) + zp, 0, 255) - zp) * scale
        return float(10 * np.log10(np.mean(x.astype(np.float64) ** 2) / np.mean((q - x) ** 2)))

    # What the refusal avoids: KL's own threshold, as MindSpore computes it, leaves < 10 dB.
    unguarded = HistogramObserver()
    unguarded._destroys_tensor = lambda *a: False
    assert sqnr_db(unguarded) < 10 < 25 < sqnr_db(HistogramObserver())
    guarded = feed(HistogramObserver(), [x])
    guarded.compute_range(8)
    assert guarded.kl_refused


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 5000), st.integers(1, 400), st.integers(0, 2**31 - 1))
def test_sampled_histogram_reads_every_value_once_in_step_updates(size, cap, seed):
    """A sampled histogram fed one tensor p times (p its stride) is exactly p times the full
    histogram of it: the moving offset reads each position once, counted p times."""
    x = np.random.default_rng(seed).standard_normal(size).astype(np.float32)
    exact = feed(HistogramObserver(), [x])
    sampled = HistogramObserver(cap)
    sampled.update(x)
    step = 1
    if cap < size:  # the least prime that takes at most `cap` values
        step = -(-size // cap)
        while any(step % k == 0 for k in range(2, int(step**0.5) + 1)):
            step += 1
    for _ in range(step - 1):
        sampled.update(x)
    assert sampled.exponent == exact.exponent
    assert np.array_equal(sampled.hist, exact.hist * step)
    assert (sampled.min, sampled.max) == (exact.min, exact.max)


def _activations(kind: str, samples: int, shape: tuple[int, ...], seed: int):
    rng = np.random.default_rng(seed)
    channel = np.exp(rng.normal(0, 1, shape[1])).astype(np.float32)[None, :, None, None]
    for _ in range(samples):
        z = rng.standard_normal(shape).astype(np.float32)
        if kind == "relu":
            x = np.maximum(z * channel + 0.3, 0)
        elif kind == "laplace":
            x = rng.laplace(size=shape).astype(np.float32) * channel
        elif kind == "outliers":
            x = z * channel
            x.reshape(-1)[rng.integers(0, x.size, 20)] *= 40
        else:  # spatially smooth
            x = np.cumsum(z, axis=3) / 8 * channel
        yield np.ascontiguousarray(x, dtype=np.float32)


@pytest.mark.parametrize("kind", ["relu", "laplace", "outliers", "smooth"])
@pytest.mark.parametrize(("samples", "shape", "seed"),
                         [(300, (1, 64, 28, 28), 2), (40, (1, 32, 112, 112), 1)])
def test_sampled_histograms_stay_within_the_stated_bound(kind, samples, shape, seed):
    """docs/decisions.md (histogram sampling): from the sampled histogram, KL's threshold has a
    divergence on the exact histogram at most 20% above the least, and MSE's a predicted
    quantization noise at most 5% above the exact histogram's choice."""
    assert histogram_values(samples) < math.prod(shape)  # the case samples
    exact, sampled = MSEObserver(), MSEObserver(histogram_values(samples))
    for x in _activations(kind, samples, shape, seed):
        exact.update(x)
        sampled.update(x)
    hist, absmax = exact.histogram()
    unsigned = exact.min >= 0
    kl_at = kl_divergences(hist + KL_BIN_FLOOR, KL_TARGET_BINS * (2 if unsigned else 1))

    def threshold(observer, method):
        r = observer.range_for(method)
        return r.high if unsigned else max(-r.low, r.high)

    def divergence(t):
        candidates, kl = kl_at
        return kl[min(max(int(t / absmax * KL_BINS) - candidates[0], 0), len(kl) - 1)]

    assert divergence(threshold(sampled, "KL")) <= 1.2 * divergence(threshold(exact, "KL"))
    noise = predicted_error(hist, absmax, np.array([threshold(o, "MSE") for o in (exact, sampled)]),
                            not unsigned, 8)
    assert noise[1] <= 1.05 * noise[0]


def test_minmax_and_removal_outlier_ranges():
    rng = np.random.default_rng(2)
    samples = [rng.standard_normal(100_000).astype(np.float32) for _ in range(4)]
    samples[0][0] = 50.0
    assert feed(MinMaxObserver(), samples).compute_range() == (
        min(s.min() for s in samples), 50.0)
    lo, hi = feed(RemovalOutlierObserver(), samples).compute_range()
    expected = np.mean([np.quantile(s, [0.0001, 0.9999]) for s in samples], axis=0)
    assert (lo, hi) == pytest.approx(tuple(expected))
    assert hi < 5


def test_observer_that_saw_nothing_gives_a_zero_range():
    for cls in OBSERVERS.values():
        assert cls().compute_range() == (0.0, 0.0)


def test_mse_keeps_a_saturated_relu6_spike_that_kl_clips():
    rng = np.random.default_rng(5)
    x = np.clip(np.abs(rng.standard_normal(200_000)) * 1.5, 0, 6).astype(np.float32)
    x[:2000] = 6.0  # 1% of the values saturate at 6, as after ReLU6
    from ptqconv.calibrate.observers import MSEObserver

    kl_lo, kl_hi = feed(HistogramObserver(), [x]).compute_range(8)
    mse_lo, mse_hi = feed(MSEObserver(), [x]).compute_range(8)
    assert kl_lo == mse_lo == 0.0
    assert mse_hi == pytest.approx(6.0, abs=0.01)
    assert kl_hi < 5.9

    def mse(hi: float) -> float:
        step = hi / 255
        return float(np.mean((np.clip(np.round(x / step), 0, 255) * step - x) ** 2))

    assert mse(mse_hi) < mse(kl_hi)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3000), st.integers(0, 2**31 - 1), st.floats(0.1, 10),
       st.one_of(st.none(), st.tuples(st.floats(-5, 0), st.floats(0, 5))),
       st.sampled_from(["normal", "relu", "discrete", "saturated"]), st.booleans())
def test_tail_quantiles_equal_numpys_whatever_the_hint(size, seed, scale, near, kind,
                                                       with_extremes):
    from ptqconv.calibrate.observers import OUTLIER_QUANTILES, tail_quantiles

    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(size) * scale).astype(np.float32)
    if kind == "relu":
        x = np.maximum(x, 0)
    elif kind == "discrete":
        x = np.round(x)
    elif kind == "saturated":  # ReLU6-like: ties at both ends
        x = np.clip(x, 0, scale / 2)
    expected = tuple(float(v) for v in np.quantile(x, OUTLIER_QUANTILES))
    extremes = (float(x.min()), float(x.max())) if with_extremes else None
    if with_extremes and near is not None and rng.random() < 0.5:
        near = extremes  # the last sample's quantiles sat on this one's extremes
    assert tail_quantiles(x, OUTLIER_QUANTILES, near, extremes) == expected


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 4),
                          st.integers(1, 4)), min_size=1, max_size=4),
       st.sampled_from([1, -1]), st.integers(0, 2**31 - 1))
def test_channel_moments_streamed_equal_a_float64_reference(shapes, axis, seed):
    """Whatever the layout (one sample, a batch, a MatMul input), per-channel min and max are
    exact and the mean square is within float32 summation error of a float64 reference."""
    from ptqconv.calibrate.statistics import ChannelMoments

    rng = np.random.default_rng(seed)
    channels = shapes[0][1] if axis == 1 else shapes[0][3]
    arrays = []
    for n, _, h, w in shapes:
        shape = (n, channels, h, w) if axis == 1 else (n, h, w, channels)
        arrays.append((rng.standard_normal(shape) * rng.uniform(0.1, 100)).astype(np.float32))
    moments = feed(ChannelMoments(axis), arrays)
    flat = np.concatenate([np.moveaxis(a, axis, -1).reshape(-1, channels) for a in arrays])
    result = moments.result()
    np.testing.assert_array_equal(result.minimum, flat.min(axis=0))
    np.testing.assert_array_equal(result.maximum, flat.max(axis=0))
    reference = (flat.astype(np.float64) ** 2).mean(axis=0)
    np.testing.assert_allclose(result.mean_square, reference, rtol=1e-5)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 50), st.integers(0, 3)), min_size=1, max_size=12),
       st.integers(0, 2**31 - 1))
def test_extremes_are_each_arrays_own_whatever_came_before(steps, seed):
    """The shared min/max scan answers for the array it is given, never for an earlier
    one: arrays freed and new ones allocated (perhaps at the same address), repeats."""
    from ptqconv.calibrate.statistics import extremes

    rng = np.random.default_rng(seed)
    kept: list[np.ndarray] = []
    for size, action in steps:
        if action == 0 and kept:
            x = kept[int(rng.integers(len(kept)))]  # an array seen before
        else:
            x = rng.standard_normal(size).astype(np.float32)
            if action == 1:
                kept.append(x)
        assert extremes(x) == (float(x.min()), float(x.max()))
        del x


@settings(max_examples=50, deadline=None)
@given(st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 4), st.integers(1, 4)),
       st.sampled_from([1, -1]), st.integers(0, 2**31 - 1))
def test_channel_moments_hand_the_observers_after_them_exact_extremes(shape, axis, seed):
    """Per-channel extremes found by ChannelMoments serve a MinMax observer of the same array
    (the collector updates ChannelMoments first); the range is the array's own."""
    from ptqconv.calibrate.observers import MinMaxObserver
    from ptqconv.calibrate.statistics import ChannelMoments

    assert ChannelMoments.order < MinMaxObserver.order
    x = (np.random.default_rng(seed).standard_normal(shape) * 3).astype(np.float32)
    ChannelMoments(axis).update(x)
    from ptqconv.calibrate import statistics

    assert statistics._last_extremes[0]() is x  # shared, not scanned again
    observer = MinMaxObserver()
    observer.update(x)
    assert (observer.min, observer.max) == (float(x.min()), float(x.max()))


@settings(max_examples=100, deadline=None)
@given(chunks, st.sampled_from(["KL", "MSE"]), st.integers(1, 300))
def test_pending_values_binned_later_give_the_histogram_of_binning_each_update(
        arrays, method, cap):
    """Buffered |x| are binned at the width reached by then: the same counts as binning
    each update at its own width and coarsening."""
    eager = OBSERVERS[method](cap)
    eager.PENDING_VALUES = 1  # every update binned at once
    buffered = OBSERVERS[method](cap)
    buffered.PENDING_VALUES = 1 << 30  # nothing binned before the histogram is read
    for a in arrays:
        eager.update(a)
        buffered.update(a)
    assert buffered.exponent == eager.exponent
    assert np.array_equal(buffered.hist, eager.hist)
    assert buffered.compute_range(8) == eager.compute_range(8)
