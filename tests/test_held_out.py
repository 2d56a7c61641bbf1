"""Held-out errors per sample: pooling, and when one choice's win counts."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from ptqconv.evaluate.held_out import SampleErrors, beats, pooled
from ptqconv.evaluate.metrics import mean_noise_to_signal

TIE = 1e-5
power = st.floats(1e-3, 1e3)
error = st.floats(0.0, 1e2)


def errors(noise: list[float], signal: list[float] | None = None) -> SampleErrors:
    signal = signal if signal is not None else [1.0] * len(noise)
    return SampleErrors({"y": np.array(noise, float)}, {"y": np.array(signal, float)})


@st.composite
def pairs(draw):
    """Errors of two choices on the same samples (same float outputs, so same power)."""
    n = draw(st.integers(1, 12))
    signal = draw(st.lists(power, min_size=n, max_size=n))
    a = draw(st.lists(error, min_size=n, max_size=n))
    b = draw(st.lists(error, min_size=n, max_size=n))
    return errors(a, signal), errors(b, signal)


@given(pairs())
def test_pooled_is_the_noise_to_signal_ratio_of_the_sums(pair):
    a, _ = pair
    expected = mean_noise_to_signal({"y": a.noise["y"].sum()}, {"y": a.signal["y"].sum()})
    assert pooled([a]) == expected
    # Split into two folds, the same samples pool to the same figure.
    n = len(a.noise["y"]) // 2
    halves = [errors(list(a.noise["y"][:n]), list(a.signal["y"][:n])),
              errors(list(a.noise["y"][n:]), list(a.signal["y"][n:]))]
    assert np.isclose(pooled(halves), expected, rtol=1e-12)


@given(pairs())
def test_a_win_is_one_way_and_needs_more_than_the_margin(pair):
    a, b = pair
    assert not (beats([a], [b], TIE) and beats([b], [a], TIE))
    if beats([a], [b], TIE):
        assert pooled([a]) < pooled([b]) - TIE
    assert not beats([a], [a], TIE)


@given(st.lists(st.floats(1e-4, 1.0), min_size=2, max_size=12), st.floats(1e-3, 1.0))
def test_less_error_on_every_sample_is_a_win(base, less):
    worse = errors(list(base))
    better = errors([x * (1 - less) for x in base])
    assert beats([better], [worse], TIE) == (pooled([worse]) - pooled([better]) > TIE and all(
        # with each sample left out, still more than the margin
        (sum(base) - x) * less / (len(base) - 1) > TIE for x in base))


def test_a_win_one_sample_carries_is_a_tie():
    # Equal on three samples; the fourth gives all the difference.
    simple = errors([1e-3, 1e-3, 1e-3, 5e-2])
    other = errors([1e-3, 1e-3, 1e-3, 1e-3])
    assert pooled([other]) < pooled([simple]) - TIE
    assert not beats([other], [simple], TIE)
    # Spread over two samples, it holds with either left out: a win.
    simple = errors([1e-3, 1e-3, 5e-2, 5e-2])
    assert beats([other], [simple], TIE)
    # Over folds: the samples of every fold count.
    assert beats([errors([1e-3, 1e-3]), errors([1e-3, 1e-3])],
                 [errors([1e-3, 1e-3]), errors([5e-2, 5e-2])], TIE)


def test_one_sample_is_judged_by_the_margin_alone():
    assert beats([errors([1e-3])], [errors([2e-3])], TIE)
    assert not beats([errors([1e-3])], [errors([1e-3 + 5e-6])], TIE)


def test_noise_on_an_output_without_power_loses_to_none():
    silent = [0.0, 0.0]
    assert beats([errors([0.0, 0.0], silent)], [errors([1.0, 1.0], silent)], TIE)
    assert not beats([errors([1.0, 1.0], silent)], [errors([0.0, 0.0], silent)], TIE)
    assert not beats([], [], TIE)


def test_nan_outputs_lose_to_any_number_and_tie_with_each_other():
    broken = errors([1e-3, float("nan"), 1e-3])
    fine = errors([5e-1, 5e-1, 5e-1])
    assert pooled([broken]) == np.inf
    assert beats([fine], [broken], TIE) and not beats([broken], [fine], TIE)
    assert not beats([broken], [errors([float("nan")] * 3)], TIE)
