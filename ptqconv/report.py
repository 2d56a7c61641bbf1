"""What a conversion did, as data, and the summary text printed at the end of a run."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ptqconv import qparams
from ptqconv.calibrate.observers import KL_SQNR_FLOOR_DB
from ptqconv.calibrate.ranges import SENTINEL_RANGE
from ptqconv.debug.layer_report import LayerReport
from ptqconv.debug.sensitivity import UnitSensitivity
from ptqconv.evaluate.metrics import OutputComparison, model_mean_bias_percent
from ptqconv.passes.bias_correction import Correction
from ptqconv.passes.gptq import GPTQSummary
from ptqconv.passes.weight_quant import WeightRecord
from ptqconv.target import Target


@dataclass(frozen=True)
class Migration:
    """One scale-migration technique (equalization, SmoothQuant): the activations it changed
    and why it left each other candidate alone."""

    technique: str
    migrated: list[str]
    left_alone: dict[str, str]


@dataclass(frozen=True)
class Measured:
    """One candidate scored on held-out calibration samples."""

    what: str  # how it differs from where the search started ("range method KL + ...")
    choice: str  # the whole choice scored
    error: float  # the model outputs' noise-to-signal ratio against the float model
    folds: int = 1  # how many folds it was scored on


@dataclass
class PostTrainingSummary:
    method: str
    samples: int
    bit_num: int
    activation_bits: int
    per_channel: bool
    target: Target
    reduce_range: bool
    units: int  # node units quantized
    kl_refused: int
    migrations: list[Migration]
    sentinels: list[str]  # observed tensors kept float for their mask-like range
    activation_ranges: int
    quantize_nodes: int
    weights_quantized: int
    weight_grid: qparams.Grid | None
    bias_corrections: list[Correction] | None = None  # None: not asked for
    layer_report: LayerReport | None = None
    sensitivity: list[UnitSensitivity] | None = None
    chosen: str = ""  # the method and the techniques the model was built with
    measured: list[Measured] = field(default_factory=list)  # in the order they were tried
    held_out: int = 0  # calibration samples the candidates were scored on
    scored_folds: int = 0  # folds of the samples scored, each with ranges from the others
    open_choices: list[str] = field(default_factory=list)  # what the settings left open
    gptq: GPTQSummary | None = None  # quant_strategy=GPTQ


@dataclass
class WeightQuantSummary:
    """What the weight algorithms of a WeightQuant run did."""

    strategy: str  # MAX_MIN (round to nearest) or GPTQ
    per_channel: bool
    block_size: int
    bias_correction: bool
    gptq: GPTQSummary | None = None
    weight_corrections: int = 0  # weights whose parameters took MindSpore's correction
    bias_corrections: list[Correction] | None = None  # None: no calibration data
    equalize_chains: int = 0  # Conv -> Relu -> Conv chains found
    # 1 - output cosine on the calibration samples without and with equalization (rounded
    # to nearest); None: no calibration data to measure on.
    equalize_errors: tuple[float, float] | None = None
    equalized: int = 0  # chains equalized
    init_scale: float | None = None  # mixed bit: the target used (auto_tune: found)
    auto_tune: list[tuple[float, float]] = field(default_factory=list)  # (init_scale, cosine)


@dataclass
class GateReport:
    """The accuracy gate: the written model against the float one on held-out samples."""

    samples: int
    comparisons: dict[str, OutputComparison]
    failures: list[str]  # empty: passed

    @property
    def mean_bias_percent(self) -> float:
        return model_mean_bias_percent(self.comparisons)


@dataclass(frozen=True)
class TargetAttempt:
    float_units: int  # how many of the most harmful units were kept float
    passed: bool
    mean_bias_percent: float
    min_cosine: float


@dataclass
class TargetReport:
    """How the accuracy target was met, or why not: what the quantized model missed, what
    was tried, the units left float and what that costs."""

    missed: list[str]
    attempts: list[TargetAttempt]
    float_units: list[str]  # empty: not met
    size_before: int = 0  # bytes of the fully quantized model
    size_after: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)  # float, quantized, written
    cpu: str = ""

    @property
    def met(self) -> bool:
        return bool(self.float_units)


@dataclass
class ConversionReport:
    model_file: Path
    output_file: Path
    quant_type: str
    bit_num: int
    size_before: int = 0
    size_after: int = 0
    seconds: float = 0.0
    opset_before: int = 0
    opset_after: int = 0
    weights: list[WeightRecord] = field(default_factory=list)  # WeightQuant
    weight_quant: WeightQuantSummary | None = None
    post_training: PostTrainingSummary | None = None
    gate: GateReport | None = None
    target: TargetReport | None = None  # the gate failed and units were kept float

    @property
    def gate_failures(self) -> list[str]:
        return self.gate.failures if self.gate is not None else []

    @property
    def passed(self) -> bool:
        return not self.gate_failures

    @property
    def quantized(self) -> list[WeightRecord]:
        return [w for w in self.weights if w.quantized]

    @property
    def skipped(self) -> list[WeightRecord]:
        return [w for w in self.weights if not w.quantized]

    def format(self, max_skipped: int = 20) -> str:
        ratio = self.size_after / self.size_before if self.size_before else 0.0
        storages = sorted({w.storage for w in self.quantized})
        lines = [f"{self.quant_type} {self.bit_num}-bit: {self.model_file} -> {self.output_file}"]
        if self.quant_type == "WeightQuant":
            lines += [
                f"  weights quantized: {len(self.quantized)}"
                + (f" (stored as {', '.join(storages)})" if storages else ""),
                f"  weights skipped:   {len(self.skipped)}",
            ]
            if self.weight_quant is not None:
                lines += weight_quant_lines(self.weight_quant, self.quantized)
        if self.post_training is not None:
            lines += post_training_lines(self.post_training)
        if self.target is not None:
            lines += target_lines(self.target)
        if self.gate is not None:
            lines += gate_lines(self.gate)
        for w in self.skipped[:max_skipped]:
            lines.append(f"    {w.name} [{w.op_type} {'x'.join(map(str, w.shape))}]: {w.reason}")
        if len(self.skipped) > max_skipped:
            lines.append(f"    ... and {len(self.skipped) - max_skipped} more")
        if self.opset_after != self.opset_before:
            lines.append(f"  opset: {self.opset_before} -> {self.opset_after}")
        lines.append(
            f"  size: {_mb(self.size_before)} -> {_mb(self.size_after)} ({ratio:.3f} of float)"
        )
        lines.append(f"  time: {self.seconds:.2f} s")
        return "\n".join(lines)


def weight_quant_lines(s: WeightQuantSummary, quantized: list[WeightRecord],
                       shown: int = 10) -> list[str]:
    layouts = Counter(w.layout for w in quantized)
    lines = []
    if layouts and set(layouts) != {"per channel"}:
        lines.append("  layout: " + ", ".join(f"{n} {k}" for k, n in sorted(layouts.items())))
    if s.equalize_chains:
        if s.equalize_errors is None:
            lines.append(f"  equalization left alone: {s.equalize_chains} Conv -> Relu -> Conv "
                         "chains (no calibration data to measure it on)")
        else:
            without, with_ = s.equalize_errors
            lines.append(f"  equalization of {s.equalize_chains} Conv -> Relu -> Conv chains: "
                         f"{'kept' if s.equalized else 'left out'} (1 - output cosine on the "
                         f"calibration samples: {without:.3g} without, {with_:.3g} with)")
    if s.gptq is not None:
        lines.append(gptq_line(s.gptq))
    if s.bias_correction:
        lines.append(f"  weight correction (MindSpore var/mean, in scales and zero points): "
                     f"{s.weight_corrections} weights")
    if s.bias_corrections is not None:
        applied = [c for c in s.bias_corrections if c.applied]
        lines.append(f"  bias correction (expected output shift): {len(applied)} of "
                     f"{len(s.bias_corrections)} Conv/Gemm layers")
        lines += [f"    {c.node_name}: skipped, {c.reason}"
                  for c in s.bias_corrections if not c.applied][:shown]
    if s.init_scale is not None:
        tuned = (f", found by auto_tune ({len(s.auto_tune)} tried, output cosine "
                 f"{dict(s.auto_tune).get(s.init_scale, float('nan')):.4f})"
                 if s.auto_tune else "")
        elements = sum(math.prod(w.shape) for w in quantized)
        average = (sum(w.bits * math.prod(w.shape) for w in quantized) / elements
                   if elements else 0.0)
        lines.append(f"  mixed bit: init_scale {s.init_scale:.4g}{tuned}; {average:.2f} bits "
                     "per weight on average; bits per layer:")
        lines += [f"    {w.name} [{w.op_type} {'x'.join(map(str, w.shape))}]: {w.bits} bits "
                  f"({w.storage})" for w in quantized]
    return lines


def gptq_line(g: GPTQSummary) -> str:
    ratio = "" if g.error_ratio is None else f", layer error {g.error_ratio:.3f} of nearest's"
    passes = f" in {g.passes} passes" if g.passes > 1 else ""
    return (f"  GPTQ: {g.layers} layers{passes}{ratio}; {g.rows_nearest} rows kept "
            "round-to-nearest (no better)")


def post_training_lines(s: PostTrainingSummary, shown: int = 10) -> list[str]:
    by_technique = {m.technique: m for m in s.migrations}
    equalized = by_technique.get("equalization")
    smoothed = by_technique.get("SmoothQuant")
    grid = s.weight_grid
    given = ("" if s.reduce_range == s.target.saturates
             else f"; reduce_range={str(s.reduce_range).lower()} set in the config")
    lines = [
        f"  target: {s.target.describe()}{given}",
        f"  calibration: {s.method} on {s.samples} samples",
        *_measured_lines(s),
        *([f"  KL thresholds refused: {s.kl_refused} (clipping would leave below "
           f"{KL_SQNR_FLOOR_DB:g} dB SQNR; observed range used)"] if s.kl_refused else []),
        *([f"  activations: {s.activation_bits}-bit"] if s.activation_bits != s.bit_num else []),
        f"  node units quantized: {s.units}",
        *([f"  equalized: {len(equalized.migrated)} Conv -> Conv activations"]
          if equalized and equalized.migrated else []),
        *([f"  SmoothQuant: {len(smoothed.migrated)} MatMul inputs"]
          if smoothed and smoothed.migrated else []),
        *[line for m in s.migrations for line in _left_alone(m)],
        *([f"  kept float (mask-like range beyond {SENTINEL_RANGE:g}): "
           f"{', '.join(s.sentinels)}"] if s.sentinels else []),
        f"  activations quantized: {s.activation_ranges} ranges, "
        f"{s.quantize_nodes} QuantizeLinear nodes",
    ]
    if grid is not None:
        lines.append(
            f"  weights quantized: {s.weights_quantized} (int8 symmetric"
            f"{' per-channel' if s.per_channel else ''}, levels [{grid.qmin}, {grid.qmax}]"
            f"{', reduce_range' if grid.qmax < 2 ** (s.bit_num - 1) - 1 else ''})")
    if s.gptq is not None:
        lines.append(gptq_line(s.gptq))
    if s.bias_corrections is not None:
        applied = [c for c in s.bias_corrections if c.applied]
        lines.append(f"  bias correction: {len(applied)} of {len(s.bias_corrections)} layers")
        lines += [f"    {c.node_name}: skipped, {c.reason}"
                  for c in s.bias_corrections if not c.applied][:shown]
    if s.layer_report is not None:
        lines += layer_report_lines(s.layer_report)
    if s.sensitivity is not None:
        lines += sensitivity_lines(s.sensitivity, shown)
    return lines


def _measured_lines(s: PostTrainingSummary) -> list[str]:
    if not s.measured:
        if s.open_choices:
            return [f"  chosen without measuring (too few samples to hold any out): "
                    f"{s.chosen}"]
        return []
    how = (f"{s.scored_folds} folds, each scored with ranges from the others"
           if s.scored_folds > 1 else "ranges from the other samples")
    lines = [f"  chosen by measurement: {s.chosen} (output error against float on "
             f"{s.held_out} held-out samples; {how}):"]
    most = max(m.folds for m in s.measured)
    lines += [f"    {m.what}: {m.error:.3g}"
              + (f" (dropped after {m.folds} of {most} folds)" if m.folds < most else "")
              for m in s.measured]
    return lines


def _left_alone(m: Migration, shown: int = 3) -> list[str]:
    """One line for the candidates a migration left alone for a reason other than its own
    measurement, the commonest reasons first."""
    reasons = Counter(reason for reason in m.left_alone.values()
                      if reason != "predicted to gain nothing")
    if not reasons:
        return []
    listed = "; ".join(f"{reason}: {count}" for reason, count in reasons.most_common(shown))
    more = f"; {len(reasons) - shown} other reasons" if len(reasons) > shown else ""
    count = sum(reasons.values())
    return [f"  {m.technique} left alone: {count} candidate{'s' if count > 1 else ''} "
            f"({listed}{more})"]


def target_lines(t: TargetReport) -> list[str]:
    lines = [f"  accuracy target: the quantized model missed it ({'; '.join(t.missed)})"]
    tried = ", ".join(f"{a.float_units} float: {'pass' if a.passed else 'fail'} "
                      f"(mean bias {a.mean_bias_percent:.3g}%, min cosine {a.min_cosine:.6f})"
                      for a in t.attempts)
    lines.append(f"    tried, most harmful units first: {tried}")
    if not t.met:
        lines.append("    not met even with every unit float: the quantized model was written")
        return lines
    shown = ", ".join(t.float_units[:10]) + (f" and {len(t.float_units) - 10} more"
                                               if len(t.float_units) > 10 else "")
    lines.append(f"    met with {len(t.float_units)} unit{'s' if len(t.float_units) > 1 else ''}"
                 f" float: {shown}")
    lines.append(f"    cost: size {_mb(t.size_before)} -> {_mb(t.size_after)}; latency "
                 + ", ".join(f"{k} {v:.3g} ms" for k, v in t.latency_ms.items())
                 + f" ({t.cpu})")
    return lines


def gate_lines(gate: GateReport) -> list[str]:
    lines = [f"  accuracy gate on {gate.samples} eval samples "
             f"(mean bias {gate.mean_bias_percent:.3f}%):"]
    for name, comparison in gate.comparisons.items():
        r = comparison.result()
        top1 = "" if r["top1_agreement"] is None else f", top-1 {r['top1_agreement']:.3f}"
        lines.append(f"    {name}: mean bias {r['mean_bias_percent']:.3f}%, cosine "
                     f"{r['cosine']:.5f}, SQNR {r['sqnr_db']:.1f} dB{top1}")
    return lines


def layer_report_lines(report: LayerReport) -> list[str]:
    lines = [f"  per-layer report: {report.path} ({report.tensors} tensors); "
             "worst by per-channel SQNR:"]
    for r in report.worst:
        lines.append(f"    {r['tensor_name']} ({r['kind']}, {r['node_name']}): channel SQNR "
                     f"{r['channel_sqnr_db']:.1f} dB, rmse/scale {r['rmse_over_scale']:.2f}, "
                     f"clip {r['clip_rate']:.2%}, cumulative cos {r['cos_similarity']:.4f}")
    if report.suggested_skip:
        lines.append(f"    suggested skip_quant_node={','.join(report.suggested_skip)}")
    return lines


def sensitivity_lines(ranking: list[UnitSensitivity], top: int = 10) -> list[str]:
    lines = [f"  sensitivity ({len(ranking)} units, output SQNR with only that unit quantized; "
             "lowest first):"]
    lines += [f"    {r.node} ({r.op_type}): {r.output_sqnr_db:.1f} dB" for r in ranking[:top]]
    if ranking:
        lines.append(f"    to keep the worst in float: --skipQuantNode={ranking[0].node}")
    return lines


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
