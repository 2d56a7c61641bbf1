"""Activation ranges: which statistic gives each tensor its range, and the ranges it gave."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ptqconv.calibrate.observers import (
    OBSERVERS,
    HistogramObserver,
    MinMaxObserver,
    Observer,
)
from ptqconv.calibrate.statistics import Statistic, StatisticPoint, Statistics, folded
from ptqconv.qparams import Range

# Activations beyond this magnitude are mask sentinels (e.g. -3.4e38), left in float.
SENTINEL_RANGE = 1e15


# MAX_MIN, KL and MSE read one histogram when several methods are candidates.
HISTOGRAM_METHODS = ("MAX_MIN", "KL", "MSE")


@dataclass(frozen=True)
class RangeMethod:
    """The range statistic of each tensor: `method`'s observer, except for model inputs,
    which keep their observed min/max (clipping an input throws information away before the
    first layer, and inputs are often discrete, pixels or tokens, which misleads histogram
    methods), and so do the tensors in `min_max`, which calibration can only observe as one
    [min, max] per execution (`calibrate.exposure`). With `shared`, MAX_MIN, KL and MSE read
    one histogram per tensor, so the collection that serves one of them serves all three.
    `values`: what histograms bin of each sample (`HistogramObserver`; 0: every value)."""

    method: str
    model_inputs: frozenset[str]
    shared: bool = False
    min_max: frozenset[str] = frozenset()
    values: int = 0

    def statistic(self, tensor: str) -> Statistic:
        if tensor in self.model_inputs or tensor in self.min_max:
            return Statistic(MinMaxObserver)
        kind = (HistogramObserver if self.shared and self.method in HISTOGRAM_METHODS
                else OBSERVERS[self.method])
        if issubclass(kind, HistogramObserver):
            return Statistic(kind, (self.values,))
        return Statistic(kind)

    def points(self, tensors: Iterable[str]) -> list[StatisticPoint]:
        return [StatisticPoint(t, self.statistic(t)) for t in tensors]

    def range(self, observer: Observer, bits: int) -> Range:
        if isinstance(observer, HistogramObserver) and self.method in HISTOGRAM_METHODS:
            return observer.range_for(self.method, bits)
        return observer.compute_range(bits)


def candidate_points(methods: Iterable[str], model_inputs: frozenset[str],
                     tensors: Iterable[str], folds: int,
                     min_max: frozenset[str] = frozenset(),
                     values: int = 0) -> list[StatisticPoint]:
    """Statistics over `folds` folds (see `statistics.Folds`) serving every one of
    `methods`."""
    return [folded(point, folds) for method in methods
            for point in RangeMethod(method, model_inputs, True, min_max, values)
            .points(tensors)]


@dataclass
class ActivationRanges:
    """What calibration measured: a range for every activation to quantize, and the observed
    tensors that stay float."""

    ranges: dict[str, Range]
    float_tensors: frozenset[str]  # observed but left in float
    sentinels: list[str]  # of those, the ones with mask-like ranges
    unobserved: list[str]  # of those, the ones that never ran
    kl_refused: int  # KL thresholds replaced by the observed range
    sampled: int = 0  # tensors whose histograms binned a sample of their values


def activation_ranges(statistics: Statistics, method: RangeMethod, tensors: Iterable[str],
                      bits: int) -> ActivationRanges:
    """The range of each of `tensors` from `statistics`, at `bits` activation bits."""
    observers: dict[str, Observer] = {}
    for tensor in tensors:
        found = statistics.get(tensor, method.statistic(tensor))
        if found is not None:
            observers[tensor] = found
    # A body tensor that never ran (an If branch no sample took) has no range to quantize.
    unobserved = sorted(n for n, obs in observers.items() if not obs.seen)
    ranges = {name: method.range(obs, bits) for name, obs in observers.items()
              if name not in unobserved}
    # Attention masks fill with float32's lowest value; a tensor whose range reaches such
    # sentinels is not a signal, and quantizing it would erase everything else it carries.
    # Tensors that turned out not to be float32 stay unquantized as well.
    sentinels = sorted(n for n, (lo, hi) in ranges.items()
                       if not (abs(lo) < SENTINEL_RANGE and abs(hi) < SENTINEL_RANGE))
    float_tensors = frozenset(sentinels) | statistics.not_float | frozenset(unobserved)
    return ActivationRanges(
        ranges={n: r for n, r in ranges.items() if n not in float_tensors},
        float_tensors=float_tensors,
        sentinels=sentinels,
        unobserved=unobserved,
        kl_refused=sum(obs.kl_refused for obs in observers.values())
        if method.method == "KL" else 0,
        sampled=sum(obs.sampled for obs in observers.values()),
    )
