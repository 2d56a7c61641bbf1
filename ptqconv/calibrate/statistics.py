"""What calibration collects: statistics that steps ask for, collected in one streaming pass.

A step declares `StatisticPoint`s (a tensor and the `Statistic` it needs there); the collector
(`calibrate.collector.collect`) builds one accumulator per distinct point, feeds every sample
once, and returns `Statistics`. Equal statistics on a tensor share one accumulator, so steps
asking for the same figure cost nothing extra. An accumulator has `update(array)` and
`merge(other)`; its summary does not grow with the number of samples.
"""

from __future__ import annotations

import copy
import math
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np


class Accumulator(ABC):
    """A running summary of one tensor's values."""

    # Whether every sample must reach `update`, even one in which the tensor did not run (an
    # empty array: a body an If did not take); others are given only values.
    per_sample = False
    # The accumulators of one tensor are updated in increasing order: one that finds the
    # array's extremes on its way (`remember_extremes`) goes first.
    order = 0

    def accepts(self, dtype: np.dtype) -> bool:
        """Whether values of `dtype` are for this accumulator (ranges: float32 only)."""
        return dtype == np.float32

    @abstractmethod
    def update(self, x: np.ndarray) -> None:
        """Fold in the values of one sample (or batch)."""

    @abstractmethod
    def merge(self, other: Any) -> None:
        """Fold in another accumulator of the same kind, as if this one had seen its data."""


# The array whose extremes were found last (weakly held) and them.
_last_extremes: tuple[weakref.ref | None, float, float] = (None, 0.0, 0.0)


def extremes(x: np.ndarray) -> tuple[float, float]:
    """min and max of a non-empty `x`. The accumulators of one tensor (a method's observer,
    its folds, the candidates AUTO compares) are handed the same array in turn: it is
    scanned once."""
    ref, lo, hi = _last_extremes  # one tuple: read and replaced whole
    if ref is not None and ref() is x:
        return lo, hi
    lo, hi = float(x.min()), float(x.max())
    remember_extremes(x, lo, hi)
    return lo, hi


def remember_extremes(x: np.ndarray, lo: float, hi: float) -> None:
    """Record `x`'s min and max, found some other way, for `extremes`."""
    global _last_extremes
    _last_extremes = (weakref.ref(x), lo, hi)


@dataclass(frozen=True)
class Statistic:
    """What to accumulate: an accumulator class and the arguments it is built with."""

    kind: type[Accumulator]
    args: tuple = ()

    def create(self) -> Accumulator:
        return self.kind(*self.args)


@dataclass(frozen=True)
class StatisticPoint:
    """`statistic` of the values of `tensor` over the calibration samples."""

    tensor: str
    statistic: Statistic


class Statistics:
    """The accumulators of a collection, by tensor and statistic. Tensors that turned out not
    to be float32 are in `not_float` and have none."""

    def __init__(self, accumulators: dict[StatisticPoint, Accumulator],
                 not_float: frozenset[str] = frozenset()) -> None:
        self._accumulators = accumulators
        self.not_float = not_float

    def get(self, tensor: str, statistic: Statistic) -> Any:
        return self._accumulators.get(StatisticPoint(tensor, statistic))

    @property
    def tensors(self) -> list[str]:
        return list(dict.fromkeys(p.tensor for p in self._accumulators))

    def subset(self, points: Iterable[StatisticPoint]) -> Statistics:
        """These statistics restricted to `points` (the others can then be freed)."""
        wanted = set(points)
        return Statistics({p: a for p, a in self._accumulators.items() if p in wanted},
                          self.not_float)

    def view(self, without: int | None = None) -> Statistics:
        """These statistics with every `Folds` accumulator merged over its folds, all of them
        or all but fold `without`, under the statistic it folds."""
        found: dict[StatisticPoint, Accumulator] = {}
        for point, accumulator in self._accumulators.items():
            if isinstance(accumulator, Folds):
                found[StatisticPoint(point.tensor, point.statistic.args[0])] = (
                    accumulator.without(without))
            else:
                found[point] = accumulator
        return Statistics(found, self.not_float)


def unique_points(points: Iterable[StatisticPoint]) -> list[StatisticPoint]:
    return list(dict.fromkeys(points))


@dataclass(frozen=True)
class ChannelStatistics:
    """Per-channel min, max and mean square of a tensor along one axis."""

    minimum: np.ndarray
    maximum: np.ndarray
    mean_square: np.ndarray


class ChannelMoments(Accumulator):
    """Per-channel min, max and mean square along `axis` (the last for MatMul inputs, 1 for
    NCHW Conv inputs), which scale migration needs."""

    order = -1  # its per-channel extremes give the tensor's to the observers after it

    def __init__(self, axis: int = -1) -> None:
        self.axis = axis
        self.channel_min: np.ndarray | None = None
        self.channel_max: np.ndarray | None = None
        self.channel_sumsq: np.ndarray | None = None
        self.rows = 0

    def update(self, x: np.ndarray) -> None:
        if x.ndim == 0 or x.size == 0:
            return
        axis = self.axis % x.ndim
        # [outer, channel, inner] is a view of a contiguous array: no copy per sample. When
        # outer or inner is 1 (one NCHW sample; a MatMul input), the reductions run over one
        # contiguous axis of a 2-D view, twice as fast as over two. Squares are summed in
        # float32 within a sample (relative error ~1e-6) and in float64 across samples.
        view = x.reshape(math.prod(x.shape[:axis]), x.shape[axis], -1)
        if view.shape[2] == 1:
            rows = view[:, :, 0]
            lo, hi = rows.min(axis=0), rows.max(axis=0)
            sumsq = np.einsum("ij,ij->j", rows, rows).astype(np.float64)
        elif view.shape[0] == 1:
            rows = view[0]
            lo, hi = rows.min(axis=1), rows.max(axis=1)
            sumsq = np.einsum("ij,ij->i", rows, rows).astype(np.float64)
        else:
            lo, hi = view.min(axis=(0, 2)), view.max(axis=(0, 2))
            sumsq = np.einsum("ijk,ijk->j", view, view).astype(np.float64)
        self.rows += x.size // x.shape[axis]
        remember_extremes(x, float(lo.min()), float(hi.max()))
        if self.channel_min is None:
            self.channel_min, self.channel_max, self.channel_sumsq = lo, hi, sumsq
        else:
            self.channel_min = np.minimum(self.channel_min, lo)
            self.channel_max = np.maximum(self.channel_max, hi)
            self.channel_sumsq = self.channel_sumsq + sumsq

    def merge(self, other: ChannelMoments) -> None:
        if other.channel_min is None:
            return
        self.rows += other.rows
        if self.channel_min is None:
            self.channel_min, self.channel_max = other.channel_min, other.channel_max
            self.channel_sumsq = other.channel_sumsq
        else:
            self.channel_min = np.minimum(self.channel_min, other.channel_min)
            self.channel_max = np.maximum(self.channel_max, other.channel_max)
            self.channel_sumsq = self.channel_sumsq + other.channel_sumsq

    def result(self) -> ChannelStatistics | None:
        if self.channel_min is None:
            return None
        return ChannelStatistics(self.channel_min, self.channel_max,
                                 self.channel_sumsq / max(self.rows, 1))


class Folds(Accumulator):
    """One statistic accumulated `k` times over disjoint folds of the samples (sample i in
    fold i % k), so that what some folds decide can be checked on a fold that did not set
    it. Each update is one sample, in order."""

    per_sample = True  # sample i belongs to fold i % k, whether its tensor ran or not

    def __init__(self, inner: Statistic, k: int) -> None:
        self.parts = [inner.create() for _ in range(k)]
        self.count = 0
        self.order = inner.kind.order

    def update(self, x: np.ndarray) -> None:
        if x.size:
            self.parts[self.count % len(self.parts)].update(x)
        self.count += 1

    def merge(self, other: Folds) -> None:
        for mine, theirs in zip(self.parts, other.parts, strict=True):
            mine.merge(theirs)

    def without(self, fold: int | None) -> Accumulator:
        """All folds merged but `fold` (None: all of them), as a new accumulator."""
        kept = [p for i, p in enumerate(self.parts) if i != fold]
        merged = copy.deepcopy(kept[0])
        for part in kept[1:]:
            merged.merge(part)
        return merged


def folded(point: StatisticPoint, k: int) -> StatisticPoint:
    """`point` accumulated over `k` folds (see `Folds`)."""
    return StatisticPoint(point.tensor, Statistic(Folds, (point.statistic, k)))


class FoldValues(Accumulator):
    """The values themselves of the samples in `folds` (sample i is in fold i % k), at most
    `cap` per fold, by sample index: the reference that choices are checked against."""

    per_sample = True

    def accepts(self, dtype: np.dtype) -> bool:
        return np.issubdtype(dtype, np.floating)

    def __init__(self, k: int, folds: tuple[int, ...], cap: int) -> None:
        self.k, self.folds, self.cap = k, folds, cap
        self.values: dict[int, np.ndarray] = {}
        self.count = 0

    def update(self, x: np.ndarray) -> None:
        fold = self.count % self.k
        if fold in self.folds and self.count // self.k < self.cap:
            self.values[self.count] = np.array(x)
        self.count += 1

    def merge(self, other: FoldValues) -> None:
        self.values.update(other.values)


class TensorShape(Accumulator):
    """The largest shape (by element count) a tensor took: what the latency planner costs
    its kernels by."""

    def __init__(self) -> None:
        self.shape: tuple[int, ...] | None = None
        self.size = -1

    def update(self, x: np.ndarray) -> None:
        if x.size > self.size:  # compared on every sample: no per-sample product
            self.shape, self.size = tuple(x.shape), x.size

    def merge(self, other: TensorShape) -> None:
        if other.shape is not None:
            self.update(np.empty(other.shape, np.uint8))
