"""Held-out output errors kept per sample, so that a choice's win can be checked for resting
on a single sample (docs/decisions.md, AUTO: a win on one sample)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ptqconv.evaluate.metrics import mean_noise_to_signal


@dataclass(frozen=True)
class SampleErrors:
    """Per float output, the squared error against the float model and the float output's
    power, one entry per scored sample."""

    noise: dict[str, np.ndarray]
    signal: dict[str, np.ndarray]


def pooled(parts: Sequence[SampleErrors]) -> float:
    """The mean over outputs of the noise-to-signal ratio pooled over every sample of
    `parts` (a sample whose output is near zero cannot dominate)."""
    if not parts:
        return 0.0
    names = parts[0].noise
    return mean_noise_to_signal({n: sum(float(p.noise[n].sum()) for p in parts) for n in names},
                                {n: sum(float(p.signal[n].sum()) for p in parts) for n in names})


def _left_out(parts: Sequence[SampleErrors]) -> np.ndarray:
    """`pooled` over all samples, then with each sample left out in turn (one sample: only
    the first)."""
    names = list(parts[0].noise)
    ratios = []
    for name in names:
        noise = np.concatenate([p.noise[name] for p in parts])
        signal = np.concatenate([p.signal[name] for p in parts])
        noise = np.concatenate(([noise.sum()], np.maximum(noise.sum() - noise, 0.0)
                                if len(noise) > 1 else []))
        signal = np.concatenate(([signal.sum()], np.maximum(signal.sum() - signal, 0.0)
                                 if len(signal) > 1 else []))
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(signal > 0, noise / np.where(signal > 0, signal, 1.0),
                             np.where(noise > 0, np.inf, 0.0))
        # NaN outputs are the worst error there is (pooled: inf), never a tie with a number.
        ratios.append(np.where(np.isnan(ratio), np.inf, ratio))
    return np.mean(ratios, axis=0) if ratios else np.zeros(1)


def beats(a: Sequence[SampleErrors], b: Sequence[SampleErrors], margin: float) -> bool:
    """Whether errors `a` are below `b` (on the same samples) by more than `margin`, pooled
    over every sample and with any one sample left out: a win that one sample carries is
    that sample's noise, not the choice's merit."""
    if not a or not b:
        return False
    with np.errstate(invalid="ignore"):
        return bool(np.all(_left_out(b) - _left_out(a) > margin))
