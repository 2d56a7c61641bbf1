"""MindSpore's mean bias and the streaming output comparison."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ptqconv.errors import PtqError
from ptqconv.evaluate.metrics import (
    FLT_EPSILON,
    FLT_MIN,
    RESULT_KEYS,
    OutputComparison,
    mean_bias,
    model_mean_bias_percent,
    output_error,
    squared_error,
)


def scalar_mean_bias(reference, output) -> tuple[float, int]:
    """MindSpore's loop (benchmark_base.h CompareData), element by element, for cross-checks."""
    total, count = 0.0, 0
    for r, o in zip(np.ravel(reference).tolist(), np.ravel(output).tolist(), strict=True):
        e = abs(o - r)
        if e <= 1e-8 + 1e-5 * abs(r):
            continue
        if abs(r) < FLT_EPSILON:
            if e > 1e-5 or math.isnan(e):  # ours: NaN is counted, never skipped
                total += e
                count += 1
            continue
        total += e / (abs(r) + FLT_MIN)
        count += 1
    return total, count


# --- mean_bias on hand-computed cases ---------------------------------------------------------


def test_relative_error_is_counted():
    assert mean_bias([2.0], [1.0]) == (pytest.approx(0.5), 1)
    assert mean_bias([-4.0], [-3.0]) == (pytest.approx(0.25), 1)


def test_error_within_tolerance_is_skipped():
    # tolerance at r=1 is 1e-8 + 1e-5 = 1.001e-5
    assert mean_bias([1.0], [1.0 + 1.0e-5]) == (0.0, 0)
    assert mean_bias([1000.0], [1000.0 + 0.009]) == (0.0, 0)  # tol 1.00000001e-2
    total, count = mean_bias([1.0], [1.0 + 2e-5])
    assert count == 1 and total == pytest.approx(2e-5)


def test_about_zero_reference_counts_the_absolute_error_above_1e_5():
    # |r| < FLT_EPSILON: a relative error is meaningless, e itself is counted when > 1e-5
    total, count = mean_bias([0.0], [3e-5])
    assert count == 1 and total == pytest.approx(3e-5)
    total, count = mean_bias([1e-9], [-0.5])
    assert count == 1 and total == pytest.approx(0.5 + 1e-9)


def test_about_zero_reference_skips_errors_up_to_1e_5():
    # Above the tolerance (1e-8) but not above 1e-5: MindSpore `continue`s; the element is
    # neither counted as absolute error nor sent to the relative branch (which would give
    # 5e-6 / FLT_MIN, about 4e32).
    assert mean_bias([0.0], [5e-6]) == (0.0, 0)
    assert mean_bias([0.0], [1e-5]) == (0.0, 0)
    assert mean_bias([1e-8], [1e-8 + 5e-8]) == (0.0, 0)


def test_reference_at_flt_epsilon_uses_the_relative_branch():
    total, count = mean_bias([FLT_EPSILON], [3 * FLT_EPSILON])
    assert count == 1 and total == pytest.approx(2 * FLT_EPSILON / (FLT_EPSILON + FLT_MIN))


def test_mixed_tensor():
    reference = np.array([1.0, 0.0, 2.0, 0.0, 4.0], np.float32)
    output = np.array([1.1, 3e-5, 2.0, 1e-6, 4.00001], np.float32)
    total, count = mean_bias(reference, output)
    # 0.1/1 (relative) + 3e-5 (absolute) ; 0 and 1e-6 and 4.00001 (within tol 4.001e-5) skip
    assert count == 2
    assert total == pytest.approx(0.1 + 3e-5, rel=1e-6)


def test_nan_in_the_output_makes_the_sum_nan_whatever_the_branch():
    total, count = mean_bias([1.0, 2.0], [np.nan, 2.0])
    assert math.isnan(total) and count == 1
    total, count = mean_bias([0.0], [np.nan])  # the about-zero branch counts NaN too
    assert math.isnan(total) and count == 1
    total, count = mean_bias([1.0], [np.inf])
    assert total == math.inf and count == 1


def test_size_mismatch_is_an_error():
    with pytest.raises(ValueError):
        mean_bias([1.0, 2.0], [1.0])


def test_model_mean_bias_is_the_mean_over_outputs():
    assert model_mean_bias_percent([1.0, 3.0]) == 2.0
    assert model_mean_bias_percent([]) == 0.0
    assert math.isnan(model_mean_bias_percent([1.0, math.nan]))
    a, b = OutputComparison("a"), OutputComparison("b")
    a.update(np.array([2.0]), np.array([1.0]))  # 50 %
    b.update(np.array([1.0, 1.0]), np.array([1.0, 1.0]))  # 0 %
    assert model_mean_bias_percent({"a": a, "b": b}) == pytest.approx(25.0)


# --- OutputComparison -------------------------------------------------------------------------


def test_result_keys_and_values():
    c = OutputComparison("y")
    r = np.array([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]], np.float32)
    o = np.array([[1.5, 2.0, 0.0], [0.5, -1.0, 0.375]], np.float32)
    c.update(r, o)
    result = c.result()
    assert tuple(result) == RESULT_KEYS
    # counted: 0.5/1 and 2.625/3
    assert result["mean_bias_percent"] == pytest.approx((0.5 + 2.625 / 3) / 2 * 100)
    dot, rr, oo = float(np.sum(r * o)), float(np.sum(r * r)), float(np.sum(o * o))
    assert result["cosine"] == pytest.approx(dot / math.sqrt(rr * oo))
    assert result["sqnr_db"] == pytest.approx(10 * math.log10(rr / (0.25 + 2.625**2)))
    assert result["max_abs_error"] == 2.625
    assert result["top1_agreement"] == 0.5  # row 0 agrees (index 1), row 1 does not (2 vs 0)
    assert (result["non_finite"], result["samples"], result["elements"]) == (0, 1, 6)


def test_nothing_counted_gives_zero_percent():
    c = OutputComparison("y")
    c.update(np.zeros(4), np.full(4, 1e-6))
    assert c.result()["mean_bias_percent"] == 0.0


def test_top1_agreement_over_rows_of_the_last_axis():
    c = OutputComparison("scores")
    r = np.array([[[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]], np.float32)  # [1, 3, 2]: 3 rows
    o = np.array([[[0.2, 0.8], [0.1, 0.9], [0.6, 0.4]]], np.float32)
    c.update(r, o)
    assert c.top1_agreement == pytest.approx(1 / 3)
    c.update(r, r)
    assert c.top1_agreement == pytest.approx(4 / 6)


@pytest.mark.parametrize(
    "shape, dtype",
    [((10,), np.float32), ((4, 1), np.float32), ((2, 5), np.int64), ((), np.float32),
     ((1, 1, 8, 8), np.float32)],  # a mask: argmax over its width means nothing
)
def test_top1_is_none_for_outputs_that_are_not_score_vectors(shape, dtype):
    c = OutputComparison("y")
    c.update(np.zeros(shape, dtype), np.ones(shape, dtype))
    assert c.result()["top1_agreement"] is None


def test_top1_is_none_once_an_update_is_not_a_score_vector():
    c = OutputComparison("y")
    c.update(np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32))
    c.update(np.ones((3, 1), np.float32), np.ones((3, 1), np.float32))
    assert c.top1_agreement is None


def test_non_finite_values_are_counted_and_poison_the_figures():
    c = OutputComparison("y")
    r = np.array([[1.0, -2.0, 3.0, 0.5]], np.float32)
    o = np.array([[np.nan, -2.0, np.inf, 0.5]], np.float32)
    c.update(r, o)
    result = c.result()
    assert result["non_finite"] == 2
    for key in ("mean_bias_percent", "cosine", "sqnr_db", "max_abs_error"):
        assert math.isnan(result[key]), key


def test_identical_and_zero_edge_cases():
    c = OutputComparison("y")
    c.update(np.zeros((2, 3)), np.zeros((2, 3)))
    assert c.cosine == 1.0 and c.sqnr_db == math.inf and c.max_abs_error == 0.0
    c = OutputComparison("y")
    c.update(np.ones(3), np.zeros(3))
    assert c.cosine == 0.0  # MindSpore says 1 when only one side is zero; we do not
    c = OutputComparison("y")
    c.update(np.zeros(3), np.ones(3))
    assert c.sqnr_db == -math.inf


def test_outputs_of_another_shape_count_as_unrelated_values():
    """A data-dependent output (NonMaxSuppression's boxes) can differ in shape from the
    reference: that sample is compared as unrelated values, every element 100% off."""
    c = OutputComparison("boxes")
    same = np.array([[1.0, 2.0, 3.0, 4.0]])
    c.update(same, same)
    c.update(np.ones((3, 4)), np.full((2, 4), 2.0))
    assert c.shape_changes == 1 and c.samples == 2
    assert c.error_sq == pytest.approx(12 * 1.0 + 8 * 4.0)
    assert c.cosine == pytest.approx(30 / math.sqrt((30 + 12) * (30 + 32)))
    assert c.mean_bias_percent == pytest.approx(100.0)  # equal elements are not counted
    assert c.max_abs_error == 2.0
    assert c.result()["shape_changes"] == 1
    assert squared_error(np.ones((3, 4)), np.full((2, 4), 2.0)) == pytest.approx(44.0)
    assert squared_error(np.ones(3), np.full(3, 2.0)) == pytest.approx(3.0)


def test_string_outputs_are_rejected():
    c = OutputComparison("text")
    with pytest.raises(PtqError, match="'text'"):
        c.update(np.array(["a"]), np.array(["a"]))


def test_state_is_a_handful_of_scalars():
    c = OutputComparison("y")
    rng = np.random.default_rng(0)
    for _ in range(20):
        r = rng.standard_normal((8, 100)).astype(np.float32)
        c.update(r, r + 0.01)
    assert all(not isinstance(v, np.ndarray) for v in vars(c).values())
    assert c.samples == 20 and c.elements == 16000


# --- properties -------------------------------------------------------------------------------

FINITE = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)


SHAPES = hnp.array_shapes(min_dims=1, max_dims=3, max_side=6)


def arrays(shape=SHAPES):
    return hnp.arrays(np.float32, shape, elements=FINITE)


@settings(max_examples=60, deadline=None)
@given(arrays())
def test_identical_tensors_have_no_error(x):
    c = OutputComparison("y")
    c.update(x, x.copy())
    assert mean_bias(x, x) == (0.0, 0)
    assert c.mean_bias_percent == 0.0
    assert c.cosine == 1.0
    assert c.sqnr_db == math.inf
    assert c.max_abs_error == 0.0
    if x.ndim >= 2 and x.shape[-1] > 1:
        assert c.top1_agreement == 1.0


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_vectorized_equals_mindspores_loop(data):
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=2, max_side=8))
    # Values spread over the interesting regions: about zero, near the tolerances, large.
    values = st.one_of(
        FINITE,
        st.sampled_from([0.0, 1e-9, -1e-8, 1e-7, 2e-7, 5e-6, 1e-5, 2e-5, 1.0, -1.0]),
    )
    r = data.draw(hnp.arrays(np.float64, shape, elements=values))
    o = data.draw(hnp.arrays(np.float64, shape, elements=values))
    total, count = mean_bias(r, o)
    expected_total, expected_count = scalar_mean_bias(r, o)
    assert count == expected_count
    assert total == pytest.approx(expected_total, rel=1e-9, abs=1e-300)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 6).flatmap(
        lambda n: st.tuples(
            hnp.arrays(np.float32, (n, 4), elements=FINITE),
            hnp.arrays(np.float32, (n, 4), elements=FINITE),
            st.lists(st.integers(1, n), max_size=n),
        )
    )
)
def test_streaming_over_chunks_equals_one_update(case):
    r, o, cuts = case
    bounds = sorted({0, r.shape[0], *cuts})
    whole, chunks = OutputComparison("y"), OutputComparison("y")
    whole.update(r, o)
    for a, b in itertools.pairwise(bounds):
        chunks.update(r[a:b], o[a:b])
    one, many = whole.result(), chunks.result()
    for key in ("non_finite", "elements", "top1_agreement", "max_abs_error"):
        assert many[key] == one[key], key
    assert chunks.bias_count == whole.bias_count
    for key in ("mean_bias_percent", "cosine", "sqnr_db"):
        assert many[key] == pytest.approx(one[key], rel=1e-9, abs=1e-12), key
    assert many["samples"] == len(bounds) - 1


@settings(max_examples=50, deadline=None)
@given(reference=hnp.arrays(np.float32, st.integers(1, 40),
                            elements=st.floats(-100, 100, width=32)),
       noise=st.floats(0.0, 10.0), seed=st.integers(0, 2**31 - 1))
def test_output_error_is_the_mean_noise_to_signal_ratio_of_float_outputs(reference, noise,
                                                                         seed):
    rng = np.random.default_rng(seed)
    output = reference + noise * rng.standard_normal(reference.shape).astype(np.float32)
    ids = np.arange(3)
    power = float(np.square(reference.astype(np.float64)).sum())
    got = output_error([reference, ids, reference], [output, ids[::-1], reference])
    want = (squared_error(reference, output) / power if power
            else (0.0 if not squared_error(reference, output) else math.inf))
    # Integer outputs (indices) are no measure; the exact second float output adds 0.
    assert got == pytest.approx(want / 2, rel=1e-12)


def test_output_error_of_outputs_that_are_not_float_is_none():
    assert output_error([np.arange(3)], [np.arange(3)]) is None
    assert output_error([], []) is None


def test_integer_outputs_are_held_to_a_cosine_threshold_by_agreement():
    from ptqconv.evaluate.comparison import gate_failures

    # Class indices of an ArgMax, one per sample: the cosine of the pooled indices stays
    # near 1 when one class in five changes; the agreement is what a threshold can hold.
    classes = OutputComparison("label")
    for reference, output in [(3, 3), (5, 6), (7, 7), (2, 2), (9, 9)]:
        classes.update(np.array([reference], np.int64), np.array([output], np.int64))
    assert classes.cosine > 0.99 and classes.agreement == pytest.approx(0.8)
    assert classes.similarity == classes.agreement
    assert classes.result()["agreement"] == pytest.approx(0.8)
    scores = OutputComparison("scores")
    scores.update(np.ones((1, 4), np.float32), np.ones((1, 4), np.float32))
    assert scores.agreement is None and scores.similarity == scores.cosine
    failures = gate_failures({"label": classes, "scores": scores}, None, 0.99)
    assert failures == ["output 'label': 0.8000 of its integer values equal the reference's, "
                        "below --cosineDistanceThreshold 0.99"]
    assert gate_failures({"label": classes}, None, 0.8) == []
    # A sample whose shapes differ agrees nowhere; a float update ends the integer view.
    boxes = OutputComparison("kept")
    boxes.update(np.array([1, 2], np.int64), np.array([1, 2, 3], np.int64))
    assert boxes.agreement == 0.0
    boxes.update(np.array([1.0]), np.array([1.0]))
    assert boxes.agreement is None
