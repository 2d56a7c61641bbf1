"""Observers: one accumulator class per calibration method, with compute_range.

An observer sees the float values of one activation tensor, one sample (or batch) at a time,
keeps a summary whose size does not depend on the number of samples, and turns it into a
quantization range. `OBSERVERS` maps the config's method names to classes.
"""

from __future__ import annotations

import functools
import math
from abc import abstractmethod

import numpy as np

from ptqconv.calibrate.statistics import Accumulator, extremes
from ptqconv.qparams import Range

# docs/reference.md §2 (MindSpore / MNN / TensorRT KL): 2048 bins over |x|, bins start at 1e-7.
KL_BINS = 2048
KL_BIN_FLOOR = 1e-7
KL_TARGET_BINS = 128
# A KL threshold that would leave a tensor below this predicted SQNR is refused when the
# observed range does better: KL weighs bins by probability and can clip away the rare large
# values that carry a long-tailed tensor's signal (docs/decisions.md, KL safety net).
KL_SQNR_FLOOR_DB = 10.0
# docs/reference.md §2 REMOVAL_OUTLIER: per-sample 0.01% / 99.99% quantiles.
OUTLIER_QUANTILES = (0.0001, 0.9999)
# Thresholds of the tail search: the last sample's quantile moved inwards by 1/32, then 1/4,
# of the distance between its two quantiles (docs/decisions.md, REMOVAL_OUTLIER).
TAIL_SPREADS = (32, 4)
# Histogram sampling: about this many values of each tensor over the whole calibration set
# feed its KL / MSE histogram, and never fewer than HISTOGRAM_MIN_VALUES a sample (min and
# max stay exact). Binning every value took 12 of 14 ms a sample on a ResNet-18; the tested
# bound on what the sampled ranges cost is in docs/decisions.md (histogram sampling).
HISTOGRAM_BUDGET = 1 << 22
HISTOGRAM_MIN_VALUES = 4096


def histogram_values(samples: int) -> int:
    """Values of one tensor a sample that histogram methods bin, for `samples` samples."""
    return max(HISTOGRAM_MIN_VALUES, -(-HISTOGRAM_BUDGET // max(samples, 1)))


class Observer(Accumulator):
    """Running summary of one tensor's values that yields its quantization range."""

    # Set by compute_range when the method's own choice was refused for the observed range.
    kl_refused = False
    # Whether some update binned only part of its values (`HistogramObserver`).
    sampled = False

    def __init__(self) -> None:
        self.min = math.inf
        self.max = -math.inf

    @property
    def seen(self) -> bool:
        return self.min <= self.max

    def update(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        lo, hi = extremes(x)
        self.min, self.max = min(self.min, lo), max(self.max, hi)

    def merge(self, other: Observer) -> None:
        """Fold in another observer of the same tensor, as if it had seen other's data too."""
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    @abstractmethod
    def compute_range(self, bits: int = 8) -> Range:
        """The float range [lo, hi] to quantize to `bits` bits (unsigned when lo >= 0)."""

    def _empty_range(self) -> Range | None:
        return None if self.seen else Range(0.0, 0.0)


class MinMaxObserver(Observer):
    """MAX_MIN: the running min and max."""

    def compute_range(self, bits: int = 8) -> Range:
        return self._empty_range() or Range(self.min, self.max)


class HistogramObserver(Observer):
    """KL: histogram of |x| and TensorRT's KL-divergence threshold search (docs/reference.md §2).

    Streaming: the histogram has FINE_BINS bins whose width is a power of two, doubled (by
    summing neighbouring pairs, which is exact) whenever a value outgrows the range. Because
    widths are powers of two, histograms fed the same values in any chunking, or merged, are
    identical to one fed everything at once, and the final 2048-bin histogram over [0, absmax]
    is re-binned from at least 4 fine bins per target bin.

    `values` > 0 bins at most that many values of an update: every p-th value (p the least
    prime that brings the count under `values`, so that it does not fall in step with a
    tensor's dimensions), from an offset that moves on with every update so that successive
    samples read different positions, each counted p times. min and max stay exact.

    The |x| of updates wait in a buffer of at most PENDING_VALUES and are binned together, at
    the bin width of that moment: binning at a wider power-of-two width gives what binning at
    the narrower one and coarsening would, and one binning's fixed cost (a FINE_BINS-long
    count and sum) is paid once for several samples instead of each (docs/decisions.md,
    histogram sampling).
    """

    FINE_BINS = 16384
    PENDING_VALUES = 1 << 15
    method = "KL"  # what compute_range uses; range_for serves MAX_MIN, KL and MSE alike

    def __init__(self, values: int = 0) -> None:
        super().__init__()
        self.values = values
        self.updates = 0
        self._hist = np.zeros(self.FINE_BINS, np.int64)
        self.exponent: int | None = None  # bin width = 2 ** exponent
        # |x| not binned yet, all from updates that read every `_pending_step`-th value.
        self._pending: list[np.ndarray] = []
        self._pending_values = 0
        self._pending_step = 1
        # (method, bits) -> (range, kl_refused): several candidates ask for the same range.
        self._ranges: dict[tuple[str, int], tuple[Range, bool]] = {}

    def update(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        self._ranges.clear()
        lo, hi = extremes(x)
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        absmax = max(-lo, hi)
        if absmax == 0.0 or not math.isfinite(absmax):
            # An infinite value (a causal mask's -inf) puts the range beyond
            # ranges.SENTINEL_RANGE: the tensor stays float and its histogram is never read.
            return
        self._grow_to(absmax)
        flat, step = x.reshape(-1), 1
        if 0 < self.values < flat.size:
            step = _least_prime(-(-flat.size // self.values))
            flat = flat[self.updates % step::step]
            self.sampled = True
        self.updates += 1
        if step != self._pending_step:
            self._bin_pending()
        self._pending.append(np.abs(flat, dtype=np.float32))
        self._pending_values += self._pending[-1].size
        self._pending_step = step
        if self._pending_values >= self.PENDING_VALUES:
            self._bin_pending()

    @property
    def hist(self) -> np.ndarray:
        """Counts of the FINE_BINS bins of width 2 ** exponent (bin k: (k-1)w < |x| <= kw)."""
        self._bin_pending()
        return self._hist

    def _bin_pending(self) -> None:
        if not self._pending:
            return
        assert self.exponent is not None
        a = (self._pending[0] if len(self._pending) == 1
             else np.concatenate(self._pending))
        step = self._pending_step
        self._pending, self._pending_values = [], 0
        # Multiplying by 2**-exponent is exact, so binning does not depend on the history.
        # Fine bin k >= 1 holds (k-1)w < |x| <= kw: exact zeros, which docs/reference.md §2 skips,
        # land alone in index 0 and are dropped without a separate pass.
        a *= np.float32(2.0 ** -self.exponent)
        np.ceil(a, out=a)
        # intp indices: bincount would otherwise convert them in another full pass.
        counts = np.bincount(a.astype(np.intp), minlength=self.FINE_BINS + 1)[1:]
        self._hist += counts if step == 1 else counts * step

    def _exponent_for(self, absmax: float) -> int:
        # Floor: 2**-exponent must stay finite in float32; such tiny ranges are below the
        # minimum quantization range anyway.
        exponent = max(math.ceil(math.log2(absmax / self.FINE_BINS)), -100)
        while absmax * 2.0 ** -exponent > self.FINE_BINS:
            exponent += 1
        return exponent

    def _grow_to(self, absmax: float) -> None:
        needed = self._exponent_for(absmax)
        if self.exponent is None:
            self.exponent = needed
        elif needed > self.exponent:
            # Pending values are binned later, at the new width directly.
            self._hist = _coarsen(self._hist, needed - self.exponent)
            self.exponent = needed

    def merge(self, other: Observer) -> None:
        assert isinstance(other, HistogramObserver)
        self._ranges.clear()
        super().merge(other)
        self.updates += other.updates
        self.sampled |= other.sampled
        if other.exponent is None:
            return
        if self.exponent is None:
            self.exponent, self._hist = other.exponent, other.hist.copy()
            return
        exponent = max(self.exponent, other.exponent)
        self._hist = (_coarsen(self.hist, exponent - self.exponent)
                      + _coarsen(other.hist, exponent - other.exponent))
        self.exponent = exponent

    def histogram(self) -> tuple[np.ndarray, float]:
        """The 2048-bin histogram of |x| over [0, absmax] (without the 1e-7 floor) and absmax."""
        absmax = max(-self.min, self.max, 0.0)
        if self.exponent is None or absmax == 0.0:
            return np.zeros(KL_BINS), absmax
        width = 2.0 ** self.exponent
        edges = np.arange(self.FINE_BINS + 1) * width
        cumulative = np.concatenate([[0.0], np.cumsum(self.hist, dtype=np.float64)])
        targets = np.linspace(0.0, absmax, KL_BINS + 1)
        # Counts are spread uniformly inside a fine bin; all mass lies below absmax.
        at = np.interp(targets, edges, cumulative)
        at[-1] = cumulative[-1]
        return np.diff(at), absmax

    def compute_range(self, bits: int = 8) -> Range:
        return self.range_for(self.method, bits)

    def range_for(self, method: str, bits: int = 8) -> Range:
        """The range `method` (MAX_MIN, KL or MSE) picks from this one histogram."""
        absmax = max(-self.min, self.max)
        if method == "MAX_MIN" or self.exponent is None or not 0.0 < absmax < math.inf:
            return self._empty_range() or Range(self.min, self.max)
        if (method, bits) not in self._ranges:
            hist, absmax = self.histogram()
            self.kl_refused = False
            threshold = (self._kl_threshold(hist, absmax, bits) if method == "KL"
                         else self._mse_threshold(hist, absmax, bits))
            self._ranges[method, bits] = (self._clip_to(threshold), self.kl_refused)
        found, self.kl_refused = self._ranges[method, bits]
        return found

    def _clip_to(self, threshold: float) -> Range:
        """[-T, T] (or [0, T] for tensors never negative), within the observed range."""
        if self.min >= 0:
            return Range(0.0, min(threshold, self.max))
        return Range(max(-threshold, self.min), min(threshold, self.max))

    def _kl_threshold(self, hist: np.ndarray, absmax: float, bits: int) -> float:
        unsigned = self.min >= 0
        # docs/reference.md §2: MindSpore merges into 128 bins per side whatever bit_num is (fewer
        # target bins make the search collapse onto its first candidates). Unsigned tensors
        # (after ReLU) have no negative side, so their 256 levels all lie on [0, T].
        target = KL_TARGET_BINS * 2 if unsigned else KL_TARGET_BINS
        threshold_bin = kl_threshold_bin(hist + KL_BIN_FLOOR, target)
        threshold = (threshold_bin + 0.5) * absmax / KL_BINS
        self.kl_refused = self._destroys_tensor(hist, absmax, bits, threshold)
        return absmax if self.kl_refused else threshold

    def _mse_threshold(self, hist: np.ndarray, absmax: float, bits: int) -> float:
        thresholds = np.arange(1, KL_BINS + 1) * (absmax / KL_BINS)
        error = predicted_error(hist, absmax, thresholds, self.min < 0, bits)
        return float(thresholds[int(np.argmin(error))])

    def _destroys_tensor(self, hist: np.ndarray, absmax: float, bits: int,
                         threshold: float) -> bool:
        kl_error, full_error = predicted_error(
            hist, absmax, np.array([threshold, absmax]), self.min < 0, bits)
        power = float(np.sum(hist * _bin_centres(absmax) ** 2))
        return bool(kl_error > full_error and power < kl_error * 10 ** (KL_SQNR_FLOOR_DB / 10))


@functools.cache
def _least_prime(n: int) -> int:
    """The least prime >= n (n >= 2)."""
    while any(n % d == 0 for d in range(2, math.isqrt(n) + 1)):
        n += 1
    return n


def _coarsen(hist: np.ndarray, steps: int) -> np.ndarray:
    """Double the bin width `steps` times by summing neighbouring pairs (exact)."""
    for _ in range(steps):
        hist = np.concatenate([hist.reshape(-1, 2).sum(1), np.zeros(len(hist) // 2, hist.dtype)])
    return hist


def kl_threshold_bin(hist: np.ndarray, quant_bins: int) -> int:
    """The candidate bin i in [quant_bins, len(hist) - 1] minimising KL(P || Q)."""
    candidates, kl = kl_divergences(hist, quant_bins)
    return int(candidates[np.argmin(kl)])


def kl_divergences(hist: np.ndarray, quant_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """KL(P || Q) of every candidate bin i in [quant_bins, len(hist) - 1].

    P is hist[:i] with the tail folded into bin i - 1; Q is hist[:i] merged into `quant_bins`
    groups (the last takes the remainder) and spread evenly back. Every bin is non-zero (the
    caller adds a floor), so KL has a closed form in prefix sums, evaluated for all candidates
    at once instead of TensorRT's per-candidate loop.
    """
    h = np.asarray(hist, np.float64)
    n = len(h)
    if quant_bins >= n:
        return np.array([n - 1]), np.zeros(1)
    cs = np.concatenate([[0.0], np.cumsum(h)])
    cs_hlogh = np.concatenate([[0.0], np.cumsum(h * np.log(h))])
    total = cs[-1]
    i = np.arange(quant_bins, n)  # candidates
    tail = total - cs[i]
    last = h[i - 1] + tail
    sum_p_log_p = cs_hlogh[i - 1] + last * np.log(last)

    # Groups of m = i // quant_bins bins; all but the last depend on m alone, which takes few
    # values, so their terms are summed once per m rather than once per candidate.
    m = i // quant_bins
    widths = np.unique(m)
    edges = np.arange(quant_bins)[None, :] * widths[:, None]  # [width, group start]
    full = cs[edges[:, 1:]] - cs[edges[:, :-1]]
    full_terms = (full * np.log(full / widths[:, None])).sum(1)
    first_of_last = (quant_bins - 1) * m
    last_sum = cs[i] - cs[first_of_last]
    log_last = np.log(last_sum / (i - first_of_last))
    sum_p_log_q = (full_terms[np.searchsorted(widths, m)] + (last_sum + tail) * log_last)

    kl = (sum_p_log_p - sum_p_log_q) / total + np.log(cs[i] / total)
    return i, kl


class MSEObserver(HistogramObserver):
    """MSE: the clipping threshold that minimises the expected squared quantization error.

    Same streaming histogram as KL; every candidate threshold T is scored by
    `predicted_error` (clipping error plus rounding noise on the grid the tensor will use).
    Unlike KL it pays for what clipping costs, so a spike of saturated values (ReLU6 at 6) or
    a rare but large outlier is kept when clipping it hurts.
    """

    method = "MSE"


def _bin_centres(absmax: float) -> np.ndarray:
    return (np.arange(KL_BINS) + 0.5) * (absmax / KL_BINS)


def predicted_error(hist: np.ndarray, absmax: float, thresholds: np.ndarray,
                    signed: bool, bits: int) -> np.ndarray:
    """Expected squared error (summed over values) of quantizing with each clip threshold T.

    `hist` is the KL_BINS-bin histogram of |x| over [0, absmax], each bin's mass taken at its
    centre. The error is the clipping error of the mass beyond T plus uniform rounding noise
    step^2 / 12 inside, with 2**bits levels over [0, T], or over [-T, T] for signed tensors.
    Barely negative tensors count as signed too (docs/decisions.md, symmetric noise model).
    """
    width = absmax / KL_BINS
    centres = _bin_centres(absmax)
    # Suffix sums: mass, first and second moments from bin k on.
    c0, c1, c2 = (np.append(np.cumsum((hist * centres**p)[::-1])[::-1], 0.0) for p in range(3))
    first_clipped = np.clip(np.floor(thresholds / width + 0.5), 0, KL_BINS).astype(np.intp)
    t = thresholds
    clip = c2[first_clipped] - 2 * t * c1[first_clipped] + t**2 * c0[first_clipped]
    step = (2 * t if signed else t) / (2**bits - 1)
    inside = c0[0] - c0[first_clipped]
    return np.maximum(clip, 0.0) + inside * step**2 / 12


class RemovalOutlierObserver(Observer):
    """REMOVAL_OUTLIER: the mean over samples of each sample's 0.01% / 99.99% quantiles."""

    def __init__(self) -> None:
        super().__init__()
        self.lo_sum = 0.0
        self.hi_sum = 0.0
        self.count = 0
        self._last: tuple[float, float] | None = None  # the previous sample's quantiles

    def update(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        super().update(x)
        lo, hi = tail_quantiles(x.ravel(), OUTLIER_QUANTILES, self._last, extremes(x))
        self._last = (lo, hi)
        self.lo_sum += lo
        self.hi_sum += hi
        self.count += 1

    def merge(self, other: Observer) -> None:
        assert isinstance(other, RemovalOutlierObserver)
        super().merge(other)
        self.lo_sum += other.lo_sum
        self.hi_sum += other.hi_sum
        self.count += other.count

    def compute_range(self, bits: int = 8) -> Range:
        empty = self._empty_range()
        if empty or not self.count:
            return empty or Range(self.min, self.max)
        return Range(self.lo_sum / self.count, self.hi_sum / self.count)


def tail_quantiles(flat: np.ndarray, quantiles: tuple[float, float],
                   near: tuple[float, float] | None = None,
                   bounds: tuple[float, float] | None = None) -> tuple[float, float]:
    """np.quantile(flat, quantiles) for a low and a high quantile, exactly, but reading only
    the tails: the order statistics are found among the values beyond a threshold placed
    from `near` (the last sample's quantiles), first close to it, then further in, falling
    back to a partition of everything when too few values are beyond either. Where the last
    quantile sat on this sample's min or max (`bounds`; a ReLU output's zeros), counting
    the values equal to it may settle that side at once. np.quantile copies and partitions
    the whole array: 30x slower on a million values (docs/decisions.md, REMOVAL_OUTLIER)."""
    n = flat.size
    if near is None and n > 8192:  # no previous sample: place the thresholds from a subsample
        sample = np.sort(flat[:: n // 4096])
        near = (float(sample[0]), float(sample[-1]))
    found = []
    for q, upper in ((quantiles[0], False), (quantiles[1], True)):
        position = q * (n - 1)
        i = math.floor(position)
        j = min(i + 1, n - 1)
        needed = n - i if upper else j + 1  # values at or beyond both order statistics
        pair = None
        if near is not None and bounds is not None:
            edge = bounds[1] if upper else bounds[0]
            if (near[1] if upper else near[0]) == edge \
                    and np.count_nonzero(flat == edge) >= needed:
                pair = (edge, edge)
        if pair is None and near is not None:
            width = near[1] - near[0]
            for spread in (width / TAIL_SPREADS[0], width / TAIL_SPREADS[1]):
                limit = near[1] - spread if upper else near[0] + spread
                mask = flat >= limit if upper else flat <= limit
                kept = int(np.count_nonzero(mask))
                if kept >= needed:
                    first = n - kept if upper else 0  # the global order of kept[0] once sorted
                    tail = np.partition(flat[mask], [i - first, j - first])
                    pair = (tail[i - first], tail[j - first])
                    break
        if pair is None:
            whole = np.partition(flat, [i, j])
            pair = (whole[i], whole[j])
        found.append(_lerp(pair[0], pair[1], position - i))
    return found[0], found[1]


def _lerp(a: np.floating, b: np.floating, t: float) -> float:
    """np.quantile's linear interpolation, to the bit: the difference in the array's dtype,
    the rest in float64, from the nearer end."""
    if a == b:  # also two infinities of a mask, which np.quantile would turn into NaN
        return float(a)
    diff = float(b - a)
    return float(b) - diff * (1 - t) if t >= 0.5 else float(a) + diff * t


OBSERVERS: dict[str, type[Observer]] = {
    "MAX_MIN": MinMaxObserver,
    "KL": HistogramObserver,
    "REMOVAL_OUTLIER": RemovalOutlierObserver,
    "MSE": MSEObserver,
}
