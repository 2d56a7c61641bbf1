"""Compare a model with its reference on the same samples, output by output, and decide the
gate (MindSpore's benchmark figures, docs/reference.md §4)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

from ptqconv import runtime
from ptqconv.errors import PtqUsageError, shown
from ptqconv.evaluate.metrics import OutputComparison, as_array, model_mean_bias_percent
from ptqconv.runtime import ModelSource, Session

# MindSpore benchmark defaults (benchmark_base.h): numThreads 2.
DEFAULT_THREADS = 2


def names(items: Iterable[str]) -> str:
    return ", ".join(repr(n) for n in items)


def check_same_io(model: Session, reference: Session) -> None:
    """Both sessions take the same inputs and give outputs of the same names."""
    if set(model.inputs) != set(reference.inputs):
        raise PtqUsageError(
            f"{reference.label} has inputs {names(reference.inputs)} but {model.label} has "
            f"{names(model.inputs)}; both models must take the same inputs")
    for name, kind in model.inputs.items():
        if reference.inputs[name] != kind:
            raise PtqUsageError(
                f"input {name!r} is {kind} in {model.label} but {reference.inputs[name]} in "
                f"{reference.label}; both models must take the same inputs")
    if set(model.outputs) != set(reference.outputs):
        only_model = [n for n in model.outputs if n not in reference.outputs]
        only_reference = [n for n in reference.outputs if n not in model.outputs]
        raise PtqUsageError(
            f"outputs are matched by name but {model.label} has {names(model.outputs)} and "
            f"{reference.label} has {names(reference.outputs)} (only in the model: "
            f"{names(only_model) or 'none'}; only in the reference: "
            f"{names(only_reference) or 'none'})")


def compare_sessions(
    model: Session,
    reference: Session,
    samples: Iterable[Mapping[str, np.ndarray]],
    progress: Callable[[int], None] | None = None,
    first: list[Mapping[str, np.ndarray]] | None = None,
) -> dict[str, OutputComparison]:
    """One `OutputComparison` per output of `model`, in its output order, over every sample
    (consumed once, one at a time). The first sample is appended to `first` when given."""
    comparisons = {name: OutputComparison(name) for name in model.outputs}
    for k, sample in enumerate(samples):
        if first is not None and k == 0:
            first.append(sample)
        label = f"sample {k}"
        expected = reference.run(sample, sample=label)
        actual = model.run(sample, sample=label)
        for name, comparison in comparisons.items():
            comparison.update(as_array(expected[name]), as_array(actual[name]))
        if progress:
            progress(1)
    return comparisons


def compare_models(
    model: ModelSource,
    reference: ModelSource,
    samples: Iterable[Mapping[str, np.ndarray]],
    level: str = "all",
    threads: int = DEFAULT_THREADS,
    progress: Callable[[int], None] | None = None,
) -> dict[str, OutputComparison]:
    """Run every sample through both models and compare their outputs, matched by name.

    `model` and `reference` are paths (external data is found beside the file), serialized
    bytes, ``onnx.ModelProto`` or ``onnx_ir.Model``. Both get the same session options.
    Raise PtqUsageError when the inputs or the output names of the two models differ,
    PtqError when a model cannot be loaded or run.
    """
    if level not in runtime.LEVELS:
        raise ValueError(f"level must be one of {', '.join(runtime.LEVELS)}, not {level!r}")
    quantized = Session(model, threads, level, _label("model", model))
    float_model = Session(reference, threads, level, _label("reference", reference))
    check_same_io(quantized, float_model)
    return compare_sessions(quantized, float_model, samples, progress)


def _label(role: str, source: ModelSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"{role} {shown(Path(source))}"
    return role


def gate_failures(
    comparisons: Mapping[str, OutputComparison],
    accuracy_threshold: float | None,
    cosine_threshold: float | None = None,
    flags: tuple[str, str] = ("--accuracyThreshold", "--cosineDistanceThreshold"),
) -> list[str]:
    """Why the comparisons fail the gate (empty when they pass), one message per reason.

    Fails on NaN/Inf in the model's outputs, on a model mean bias (mean over outputs of their
    mean bias, percent) above `accuracy_threshold` or not a number, and on an output whose
    cosine is below `cosine_threshold` or not a number (an integer output: the share of its
    values that equal the reference's). None disables a threshold. `flags`
    name the thresholds in the messages.
    """
    failures = []
    for name, c in comparisons.items():
        if c.non_finite:
            failures.append(
                f"output {name!r}: {c.non_finite} NaN/Inf value(s) in the model's output")
    if accuracy_threshold is not None and comparisons:
        bias = model_mean_bias_percent(comparisons)
        if math.isnan(bias):
            failures.append(f"mean bias is NaN (limit {flags[0]} {accuracy_threshold:.10g}%)")
        elif not bias <= accuracy_threshold:
            failures.append(f"mean bias {bias:.4g}% is above {flags[0]} {accuracy_threshold:.10g}%")
    if cosine_threshold is not None:
        for name, c in comparisons.items():
            agreement = c.agreement
            if agreement is not None:  # indices or counts: held to the threshold by agreement
                if not agreement >= cosine_threshold:
                    failures.append(
                        f"output {name!r}: {agreement:.4f} of its integer values equal the "
                        f"reference's, below {flags[1]} {cosine_threshold:.10g}")
                continue
            cosine = c.cosine
            if math.isnan(cosine):
                failures.append(
                    f"output {name!r}: cosine is NaN (limit {flags[1]} {cosine_threshold:.10g})")
            elif not cosine >= cosine_threshold:
                failures.append(
                    f"output {name!r}: cosine {cosine:.6f} is below {flags[1]} "
                    f"{cosine_threshold:.10g}")
    return failures
