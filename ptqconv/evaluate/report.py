"""The benchmark's report: a data object with its JSON form (schema `ptqconv.benchmark/1`)
and the table the command prints."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ptqconv.calibrate.dataset import SampleFormat
from ptqconv.errors import PtqError, one_line, shown
from ptqconv.evaluate.comparison import names
from ptqconv.evaluate.kernels import INTEGER_CONV, INTEGER_MATMUL, KernelShare
from ptqconv.evaluate.metrics import OutputComparison, model_mean_bias_percent
from ptqconv.evaluate.options import SCHEMA, BenchmarkSettings
from ptqconv.files import Staging

MAX_TABLE_ROWS = 20
MAX_FAILURES_SHOWN = 3


@dataclass
class BenchmarkReport:
    """The outcome of a benchmark: figures and verdict (data), its JSON and its table."""

    settings: BenchmarkSettings
    model_size: int
    model_latency_ms: float
    reference_size: int
    reference_latency_ms: float | None
    samples: int
    comparisons: dict[str, OutputComparison]
    not_compared: list[str] = field(default_factory=list)  # model outputs not in the data file
    failures: list[str] = field(default_factory=list)
    data: SampleFormat | None = None  # how the sample files became inputs
    kernels: KernelShare | None = None  # the model's Conv/MatMul/Gemm work by kernel

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def mean_bias_percent(self) -> float:
        return model_mean_bias_percent(self.comparisons)

    def overall(self) -> dict[str, float]:
        results = [c.result() for c in self.comparisons.values()]
        return {
            "mean_bias_percent": self.mean_bias_percent,
            "min_cosine": _worst([r["cosine"] for r in results], min),
            "min_sqnr_db": _worst([r["sqnr_db"] for r in results], min),
            "max_abs_error": _worst([r["max_abs_error"] for r in results], max),
        }

    def to_dict(self) -> dict[str, Any]:
        """The JSON report (schema ``ptqconv.benchmark/1``); NaN -> null, ±inf -> "inf"."""
        reference: dict[str, Any]
        if self.settings.reference_model is not None:
            reference = {"path": str(self.settings.reference_model)}
        else:
            reference = {"benchmark_data_file": str(self.settings.benchmark_data_file)}
        reference["size_bytes"] = self.reference_size
        reference["median_latency_ms"] = self.reference_latency_ms
        report = {
            "schema": SCHEMA,
            "model": {
                "path": str(self.settings.model_file),
                "size_bytes": self.model_size,
                "median_latency_ms": self.model_latency_ms,
            },
            "reference": reference,
            "samples": self.samples,
            "inputs": ("random: latency only, no accuracy verdict"
                       if self.settings.random_inputs
                       else self.data.describe() if self.data else None),
            "outputs": {name: c.result() for name, c in self.comparisons.items()},
            "overall": self.overall(),
            "thresholds": {
                "accuracy_threshold_percent": self.settings.accuracy_threshold,
                "cosine_distance_threshold": self.settings.cosine_distance_threshold,
            },
            "passed": None if self.settings.random_inputs else self.passed,
            "failures": list(self.failures),
            "session": {
                "graph_optimization_level": self.settings.graph_optimization_level,
                "num_threads": self.settings.num_threads,
            },
            "kernels": self.kernels.to_dict() if self.kernels is not None else None,
        }
        return _json_safe(report)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def write(self, path: str | os.PathLike) -> None:
        """Write the JSON report to `path`, whole or not at all."""
        path = Path(path)
        with Staging() as staging:
            try:
                staging.path(path).write_text(self.to_json(), encoding="utf-8")
            except OSError as exc:
                raise PtqError(
                    f"--reportFile: cannot write {shown(path)}: {exc.strerror or exc}"
                ) from None
            staging.commit()

    def format(self, max_rows: int = MAX_TABLE_ROWS) -> str:
        """The table printed by the command: one screen whatever the number of outputs."""
        if self.settings.random_inputs:
            return self._format_latency()
        if self.settings.reference_model is not None:
            against = shown(self.settings.reference_model)
        else:
            against = f"benchmark data {shown(self.settings.benchmark_data_file)}"
        lines = [
            f"benchmark: {shown(self.settings.model_file)} vs {against}; {self.samples} sample"
            f"{'s' if self.samples != 1 else ''}, graph optimization "
            f"{self.settings.graph_optimization_level}, {self.settings.num_threads} thread"
            f"{'s' if self.settings.num_threads != 1 else ''}"
        ]
        if self.data is not None and (self.data.kind == "image" or self.data.file_layout):
            lines.append(f"inputs: {self.data.describe()}")
        items = list(self.comparisons.items())
        rows = items
        if len(items) > max_rows:
            rows = sorted(items, key=lambda kv: _sort_key(kv[1].mean_bias_percent))[:max_rows]
        width = min(32, max([len("overall"), *(len(_cut(n, 32)) for n, _ in rows)]))
        head = (
            f"{'output':<{width}}  {'mean bias %':>11}  {'cosine':>9}  {'SQNR dB':>8}  "
            f"{'max abs err':>11}  {'top-1':>6}"
        )
        lines += [head, "-" * len(head)]
        for name, c in rows:
            r = c.result()
            top1 = r["top1_agreement"]
            lines.append(
                f"{_cut(name, width):<{width}}  {_num(r['mean_bias_percent'], '.4f'):>11}  "
                f"{_num(r['cosine'], '.6f'):>9}  {_num(r['sqnr_db'], '.2f'):>8}  "
                f"{_num(r['max_abs_error'], '.4g'):>11}  "
                f"{'-' if top1 is None else format(top1, '.1%'):>6}"
            )
        if len(items) > len(rows):
            lines.append(
                f"... {len(items) - len(rows)} more outputs with a lower mean bias "
                "(all of them in --reportFile)"
            )
        o = self.overall()
        lines.append(
            f"{'overall':<{width}}  {_num(o['mean_bias_percent'], '.4f'):>11}  "
            f"{_num(o['min_cosine'], '.6f'):>9}  {_num(o['min_sqnr_db'], '.2f'):>8}  "
            f"{_num(o['max_abs_error'], '.4g'):>11}"
        )
        lines.append("  (overall: mean bias averaged over outputs; worst cosine, SQNR, error)")
        for name, c in items:
            if c.agreement is not None:
                lines.append(f"output {name!r}: integer values, {c.agreement:.2%} equal to the "
                             "reference's (what --cosineDistanceThreshold holds it to)")
            if c.shape_changes:
                lines.append(f"output {name!r}: shape differs from the reference's on "
                             f"{c.shape_changes} of {c.samples} samples (compared as "
                             "unrelated values, every element 100% off)")
        if self.not_compared:
            lines.append(
                f"not in the benchmark data file, not compared: {names(self.not_compared)}"
            )
        runs = (f"median of {self.settings.loop_count} runs after "
                f"{self.settings.warm_up_loop_count} warm-up")
        if self.settings.reference_model is not None:
            lines.append(
                f"size:    model {_size(self.model_size)}, reference {_size(self.reference_size)}"
                f" ({_ratio(self.model_size, self.reference_size)})"
            )
            assert self.reference_latency_ms is not None
            lines.append(
                f"latency: model {self.model_latency_ms:.3f} ms, reference "
                f"{self.reference_latency_ms:.3f} ms "
                f"({_ratio(self.model_latency_ms, self.reference_latency_ms)}; {runs})"
            )
        else:
            lines.append(f"size:    model {_size(self.model_size)}")
            lines.append(f"latency: model {self.model_latency_ms:.3f} ms ({runs})")
        if self.kernels is not None and self.kernels.total_macs:
            lines.append(f"kernels: {kernel_line(self.kernels)}")
        limit = self.settings.cosine_distance_threshold
        cosine = ("" if limit is None
                  else f", every cosine >= --cosineDistanceThreshold {limit:.10g}")
        if self.passed:
            bias = _num(self.mean_bias_percent, '.4g')
            accuracy = self.settings.accuracy_threshold
            checked = (f"mean bias {bias}% <= --accuracyThreshold {accuracy:g}%{cosine}"
                       if accuracy is not None else
                       f"mean bias {bias}%{cosine.replace(', every', ' (every', 1)})")
            lines.append(f"PASS: {checked}, no NaN/Inf")
        else:
            shown_failures = self.failures[:MAX_FAILURES_SHOWN]
            more = len(self.failures) - len(shown_failures)
            lines.append(
                "FAIL: "
                + "; ".join(shown_failures)
                + (f"; and {more} more (all of them in --reportFile)" if more else "")
            )
        return "\n".join(lines)


    def _format_latency(self) -> str:
        s = self.settings
        runs = f"median of {s.loop_count} runs after {s.warm_up_loop_count} warm-up"
        lines = [f"benchmark: {shown(s.model_file)} on RANDOM inputs (no data given): latency "
                 f"only, no accuracy verdict; graph optimization {s.graph_optimization_level}, "
                 f"{s.num_threads} thread{'s' if s.num_threads != 1 else ''}"]
        if s.reference_model is not None and self.reference_latency_ms is not None:
            lines.append(f"size:    model {_size(self.model_size)}, reference "
                         f"{_size(self.reference_size)} "
                         f"({_ratio(self.model_size, self.reference_size)})")
            lines.append(f"latency: model {self.model_latency_ms:.3f} ms, reference "
                         f"{self.reference_latency_ms:.3f} ms "
                         f"({_ratio(self.model_latency_ms, self.reference_latency_ms)}; {runs})")
        else:
            lines.append(f"size:    model {_size(self.model_size)}")
            lines.append(f"latency: model {self.model_latency_ms:.3f} ms ({runs})")
        return "\n".join(lines)


def kernel_line(share: KernelShare) -> str:
    """"87.5% of the Conv/MatMul/Gemm work in integer kernels (QLinearConv 47, ...)"."""
    def listed(ops: set[str]) -> str:
        return ", ".join(f"{op} {share.nodes[op]}" for op in sorted(share.nodes, key=lambda o: (
            -share.macs[o], o)) if op in ops)

    integer = INTEGER_CONV | INTEGER_MATMUL
    parts = [f"integer: {listed(integer)}" if set(share.nodes) & integer else "",
             f"float: {listed(set(share.nodes) - integer)}" if set(share.nodes) - integer
             else ""]
    return (f"{share.integer_share:.1%} of the Conv/MatMul/Gemm multiply-accumulates in "
            f"integer kernels ({'; '.join(p for p in parts if p)})")


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        number = float(value)
        if math.isnan(number):
            return None
        if math.isinf(number):
            return "inf" if number > 0 else "-inf"
        return number
    return value


def _worst(values: list[float], pick: Callable[..., float]) -> float:
    if not values:
        return math.nan
    if any(math.isnan(v) for v in values):
        return math.nan
    return pick(values)


def _sort_key(bias: float) -> float:
    return -math.inf if math.isnan(bias) else -bias  # NaN first, then the largest bias


def _num(value: float | None, spec: str) -> str:
    if value is None or math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return format(value, spec)


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def _cut(name: str, width: int) -> str:
    name = one_line(name)
    if len(name) <= width:
        return name
    keep = width - 3
    return name[: keep // 2] + "..." + name[len(name) - (keep - keep // 2) :]


