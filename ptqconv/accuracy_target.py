"""Meeting an accuracy target: when the quantized model misses the gate's thresholds, keep the
most harmful node units float, fewest first, until it meets them (as NNCF's accuracy control
and AIMET's AutoQuant do, from the command line on `.bin` data)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ptqconv.calibrate.dataset import CalibrationSet
from ptqconv.evaluate.comparison import compare_models, gate_failures
from ptqconv.post_training import Built, PostTraining
from ptqconv.report import GateReport, TargetAttempt, TargetReport
from ptqconv.settings import GateSettings


def meet_target(pt: PostTraining, model_file: Path, data: CalibrationSet, gate: GateSettings,
                missed: GateReport,
                progress: Callable[[int, str], Callable[[int], None]] | None = None,
                ) -> tuple[Built | None, TargetReport]:
    """The model with the fewest units float that passes the gate on `data` (None if even
    every unit float does not), and what was tried. Units leave integer in the order of the
    harm each does alone (`PostTraining.ranking`): 1, 2, 4, ... of them until the gate
    passes, then the smallest count in between that passes too."""
    ranking = pt.ranking()
    keys = [unit.key for unit in ranking]
    names = {unit.key: unit.node for unit in ranking}
    attempts: list[TargetAttempt] = []
    models: dict[int, Built] = {}

    def passes(count: int) -> bool:
        built = pt.with_float_units(frozenset(keys[:count]))
        comparisons = compare_models(built.model, model_file, data, "all", gate.threads)
        report = GateReport(len(data), comparisons, gate_failures(
            comparisons, gate.accuracy_threshold, gate.cosine_threshold, gate.names))
        attempts.append(TargetAttempt(count, not report.failures, report.mean_bias_percent,
                                      min(c.similarity for c in comparisons.values())))
        if not report.failures:
            models[count] = built
        return not report.failures

    low, high = 0, None  # low fails (the full model did), high passes
    count = 1
    while count <= len(keys):
        if passes(count):
            high = count
            break
        low = count
        count = min(count * 2, len(keys)) if count < len(keys) else len(keys) + 1
    while high is not None and high - low > 1:
        middle = (low + high) // 2
        if passes(middle):
            high = middle
        else:
            low = middle
    report = TargetReport(missed=missed.failures, attempts=attempts,
                          float_units=[names[k] for k in keys[:high]] if high else [])
    if high is None:
        return None, report
    return models[high], report

