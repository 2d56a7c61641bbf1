"""Output-accuracy metrics: MindSpore's mean bias, cosine, SQNR, top-1 agreement (pure numpy).

`mean_bias` is MindSpore Lite benchmark's "mean bias" (docs/reference.md §4, the same as
``BenchmarkBase::CompareData`` in mindspore/lite/tools/benchmark/benchmark_base.h). For every
element with reference r and output o, e = |o - r|:

1. skip it when ``e <= 1e-8 + 1e-5 * |r|`` (absolute plus relative tolerance);
2. else, when ``|r| < FLT_EPSILON`` (the reference is about zero, so a relative error means
   nothing), count ``e`` itself if ``e > 1e-5``, and SKIP the element otherwise. This is our
   reading of "count e itself when e > 1e-5": MindSpore's code has ``else { continue; }``
   there, so such an element is neither counted nor sent to step 3;
3. else count the relative error ``e / (|r| + FLT_MIN)``.

A tensor's mean bias is the sum over the counted elements divided by their number (0 when
none is counted); a model's is the mean over its output tensors, as a percentage
(`model_mean_bias_percent`).

Where we differ from MindSpore, on purpose:
- Arithmetic is float64 (MindSpore uses float32, so a skip/count decision can differ for an
  error within one float32 ulp of a tolerance, and its float32 running sum loses digits on
  large tensors).
- A non-finite e (NaN or Inf in the output or the reference) is always counted, so the sum
  becomes NaN/Inf and the bias cannot look good. MindSpore fails on NaN/Inf in the output
  before computing anything; taken literally its comparisons would skip a NaN element.
- Over many samples `OutputComparison` pools the sums and counts of all samples (MindSpore
  compares a single sample).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ptqconv.errors import PtqError

# docs/reference.md §4 (MindSpore benchmark_base.h: absoluteTolerance, relativeTolerance).
ABSOLUTE_TOLERANCE = 1e-8
RELATIVE_TOLERANCE = 1e-5
# docs/reference.md §4: about-zero references count the absolute error when it is above this.
ZERO_REFERENCE_ERROR = 1e-5
FLT_EPSILON = float(np.finfo(np.float32).eps)
FLT_MIN = float(np.finfo(np.float32).tiny)

RESULT_KEYS = (
    "mean_bias_percent",
    "cosine",
    "sqnr_db",
    "max_abs_error",
    "top1_agreement",
    "agreement",
    "non_finite",
    "samples",
    "elements",
    "shape_changes",
)


def mean_bias(reference: np.ndarray, output: np.ndarray) -> tuple[float, int]:
    """MindSpore's mean-bias terms of one tensor: (sum of the counted errors, count).

    The tensor's mean bias is ``sum / count`` (0 when count is 0); see the module docstring
    for the rule. Raise ValueError when the two arrays differ in size.
    """
    r = np.asarray(reference, dtype=np.float64).ravel()
    o = np.asarray(output, dtype=np.float64).ravel()
    if r.size != o.size:
        raise ValueError(f"reference has {r.size} elements but output has {o.size}")
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.abs(o - r)
        abs_r = np.abs(r)
        # `not (e <= tol)` rather than `e > tol`, so that NaN is never skipped.
        over = ~(e <= ABSOLUTE_TOLERANCE + RELATIVE_TOLERANCE * abs_r)
        about_zero = abs_r < FLT_EPSILON
        absolute = over & about_zero & ~(e <= ZERO_REFERENCE_ERROR)
        relative = over & ~about_zero
        total = float(e[absolute].sum()) + float((e[relative] / (abs_r[relative] + FLT_MIN)).sum())
    return total, int(np.count_nonzero(absolute)) + int(np.count_nonzero(relative))


def cosine_similarity(dot: float, reference_sq: float, output_sq: float) -> float:
    """Cosine from pooled sums; 1.0 when both vectors are zero, 0.0 when only one is.

    (MindSpore's GetMeanError also returns 1 when only one of them is zero; a model that
    outputs zeros where the reference does not has not matched it, so we return 0.)
    """
    if reference_sq == 0.0 and output_sq == 0.0:
        return 1.0
    if reference_sq == 0.0 or output_sq == 0.0:
        return 0.0
    norms = math.sqrt(reference_sq * output_sq)
    if math.isinf(norms) or norms == 0.0:  # the product overflowed or underflowed
        norms = math.sqrt(reference_sq) * math.sqrt(output_sq)
    if norms == 0.0:
        return math.nan
    cosine = dot / norms
    return cosine if math.isnan(cosine) else min(1.0, max(-1.0, cosine))


def as_array(value: Any) -> np.ndarray:
    """An output's values as one array: a sequence output's elements flattened end to end,
    a map's values by key (sklearn's ZipMap), a tensor as it is."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, dict):
        return np.asarray([value[key] for key in sorted(value)], np.float64)
    if isinstance(value, (list, tuple)):
        parts = [as_array(v).ravel() for v in value]
        return np.concatenate(parts) if parts else np.zeros(0)
    return np.asarray(value)


def squared_error(reference: np.ndarray, output: np.ndarray) -> float:
    """Sum of the squared differences (float64). Outputs of different shapes (data-dependent:
    the boxes a NonMaxSuppression kept) count as unrelated, |r|^2 + |o|^2: a change in what
    was detected costs as much as the detections themselves."""
    r = reference.astype(np.float64, copy=False)
    o = output.astype(np.float64, copy=False)
    if r.shape != o.shape:
        return float(np.square(r).sum() + np.square(o).sum())
    return float(np.square(o - r).sum())


def output_error(references: Sequence[np.ndarray], outputs: Sequence[np.ndarray]
                 ) -> float | None:
    """Mean over the float outputs of squared_error over the reference's power (the
    noise-to-signal ratio PostTraining's held-out scoring reports); None without any."""
    noise: dict[int, float] = {}
    signal: dict[int, float] = {}
    for k, (reference, output) in enumerate(zip(references, outputs, strict=True)):
        reference, output = as_array(reference), as_array(output)
        if np.issubdtype(reference.dtype, np.floating):
            signal[k] = float(np.square(reference.astype(np.float64)).sum())
            noise[k] = squared_error(reference, np.asarray(output))
    return mean_noise_to_signal(noise, signal) if noise else None


def mean_noise_to_signal(noise: Mapping[Any, float], signal: Mapping[Any, float]) -> float:
    """Mean over outputs of their (pooled) noise-to-signal ratio: 0 for an exact output of
    no power, inf for noise on none; 0 without outputs."""
    ratios = [noise[n] / signal[n] if signal[n] else (0.0 if not noise[n] else math.inf)
              for n in noise]
    error = float(np.mean(ratios)) if ratios else 0.0
    return error if math.isfinite(error) else math.inf


def sqnr_db(signal_sq: float, noise_sq: float) -> float:
    """10 log10(signal / noise): +inf without noise, -inf for noise on a zero signal."""
    if math.isnan(signal_sq) or math.isnan(noise_sq):
        return math.nan
    if noise_sq == 0.0:
        return math.inf
    if signal_sq == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal_sq / noise_sq)


class OutputComparison:
    """Streaming comparison of one output tensor, reference vs output, over many samples.

    Only running sums are kept, so memory does not depend on the number of samples. Shapes
    may change between samples (dynamic axes). Where the two sides of one sample differ in
    shape (a data-dependent output: the boxes NonMaxSuppression kept), they are compared as
    unrelated values (`squared_error`), every element 100% off, and counted in
    `shape_changes`.
    """

    def __init__(self, name: str = "output") -> None:
        self.name = name
        self.samples = 0
        self.elements = 0
        self.non_finite = 0
        self.bias_sum = 0.0
        self.bias_count = 0
        self.dot = 0.0
        self.reference_sq = 0.0
        self.output_sq = 0.0
        self.error_sq = 0.0
        self.max_abs_error = 0.0
        self.top1_hits = 0
        self.top1_rows = 0
        self._top1 = True  # every update so far looked like a batch of score vectors
        self.shape_changes = 0
        # Integer outputs (class indices of an ArgMax or TopK, counts): how many values equal
        # the reference's, of how many compared. A cosine of indices says nothing.
        self._integer = True
        self.equal = 0
        self.compared = 0

    def update(self, reference: np.ndarray, output: np.ndarray) -> None:
        """Add one sample (or a batch of samples stacked along axis 0).

        Raise PtqError naming the output when a side is not numeric.
        """
        reference = np.asarray(reference)
        output = np.asarray(output)
        for which, array in (("reference", reference), ("model", output)):
            if array.dtype.kind not in "biuf":
                raise PtqError(
                    f"output {self.name!r}: the {which} gives {array.dtype.name} values; only "
                    "numeric outputs can be compared"
                )
        related = reference.shape == output.shape
        r = reference.astype(np.float64, copy=False).ravel()
        o = output.astype(np.float64, copy=False).ravel()
        with np.errstate(invalid="ignore", over="ignore"):
            reference_sq, output_sq = float(np.dot(r, r)), float(np.dot(o, o))
            if related:
                diff = o - r
                dot, error_sq = float(np.dot(r, o)), float(np.dot(diff, diff))
                worst = float(np.max(np.abs(diff), initial=0.0))  # NaN propagates
                total, count = mean_bias(r, o)
            else:  # unrelated values: squared_error's |r|^2 + |o|^2, every element 100% off
                self.shape_changes += 1
                dot, error_sq = 0.0, reference_sq + output_sq
                worst = float(max(np.max(np.abs(r), initial=0.0),
                                  np.max(np.abs(o), initial=0.0)))
                total = count = max(r.size, o.size)
        self.dot += dot
        self.reference_sq += reference_sq
        self.output_sq += output_sq
        self.error_sq += error_sq
        self.max_abs_error = (math.nan if math.isnan(worst) or math.isnan(self.max_abs_error)
                              else max(self.max_abs_error, worst))
        self.bias_sum += total
        self.bias_count += count
        if output.dtype.kind == "f":
            self.non_finite += int(output.size - np.count_nonzero(np.isfinite(output)))
        self.samples += 1
        self.elements += output.size
        if self._integer and reference.dtype.kind in "biu" and output.dtype.kind in "biu":
            self.equal += int(np.count_nonzero(r == o)) if related else 0
            self.compared += max(r.size, o.size)
        else:
            self._integer = False
        if self._top1 and _is_scores(reference, output):
            if related and output.size:
                rows_r = np.argmax(reference.reshape(-1, reference.shape[-1]), axis=-1)
                rows_o = np.argmax(output.reshape(-1, output.shape[-1]), axis=-1)
                self.top1_hits += int(np.count_nonzero(rows_r == rows_o))
                self.top1_rows += rows_r.size
            elif not related and reference.ndim and reference.shape[-1]:
                # None agrees; a reference of another rank still has its rows counted.
                self.top1_rows += reference.size // reference.shape[-1]
        else:
            self._top1 = False

    @property
    def mean_bias_percent(self) -> float:
        """Pooled mean bias of all samples, percent; 0.0 when no element was counted."""
        return self.bias_sum / self.bias_count * 100.0 if self.bias_count else 0.0

    @property
    def cosine(self) -> float:
        return cosine_similarity(self.dot, self.reference_sq, self.output_sq)

    @property
    def sqnr_db(self) -> float:
        return sqnr_db(self.reference_sq, self.error_sq)

    @property
    def top1_agreement(self) -> float | None:
        """Share of rows (over the last axis) whose argmax agrees.

        None unless every update looked like a batch of score vectors: float values, rank >= 2
        and a last dimension > 1.
        """
        if not self._top1 or self.top1_rows == 0:
            return None
        return self.top1_hits / self.top1_rows

    @property
    def agreement(self) -> float | None:
        """Share of the values that equal the reference's, for an integer output (every
        update integer on both sides; a sample whose shapes differ agrees nowhere); None
        for others."""
        if not self._integer or self.compared == 0:
            return None
        return self.equal / self.compared

    @property
    def similarity(self) -> float:
        """What a cosine threshold holds this output to: its agreement when it is an integer
        output, else its cosine."""
        agreement = self.agreement
        return self.cosine if agreement is None else agreement

    def result(self) -> dict[str, Any]:
        """The figures, keyed by `RESULT_KEYS` (NaN/Inf stay floats here)."""
        return {
            "mean_bias_percent": self.mean_bias_percent,
            "cosine": self.cosine,
            "sqnr_db": self.sqnr_db,
            "max_abs_error": self.max_abs_error,
            "top1_agreement": self.top1_agreement,
            "agreement": self.agreement,
            "non_finite": self.non_finite,
            "samples": self.samples,
            "elements": self.elements,
            "shape_changes": self.shape_changes,
        }

    def __repr__(self) -> str:
        return f"OutputComparison({self.name!r}, {self.samples} samples)"


def model_mean_bias_percent(outputs: Mapping[str, OutputComparison] | Iterable[float]) -> float:
    """The model's mean bias: the mean of its output tensors' mean bias (percent), as MindSpore.

    Takes the comparisons or their `mean_bias_percent` values; NaN if any is NaN, 0.0 for none.
    """
    values = (
        [c.mean_bias_percent for c in outputs.values()]
        if isinstance(outputs, Mapping)
        else [float(v) for v in outputs]
    )
    return sum(values) / len(values) if values else 0.0


def _is_scores(reference: np.ndarray, output: np.ndarray) -> bool:
    """A batch of score vectors: float, rank 2 or 3 ([N, classes], [N, tokens, vocabulary]),
    more than one score per row. A rank-4 map ([N, C, H, W]) is no row of scores: its argmax
    over the width means nothing (a segmentation mask read "top-1 0.769")."""
    return (
        output.ndim in (2, 3)
        and output.shape[-1] > 1
        and reference.dtype.kind == "f"
        and output.dtype.kind == "f"
    )
