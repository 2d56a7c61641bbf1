"""What a conversion did, as data, and the summary text printed at the end of a run."""

from __future__ import annotations

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
from ptqconv.passes.latency_plan import LatencyPlan
from ptqconv.passes.weight_quant import WeightRecord
from ptqconv.runtime import Latency


@dataclass(frozen=True)
class Migration:
    """One scale-migration technique (equalization, SmoothQuant): the activations it changed
    and why it left each other candidate alone."""

    technique: str
    migrated: list[str]
    left_alone: dict[str, str]


@dataclass
class PostTrainingSummary:
    method: str
    samples: int
    bit_num: int
    activation_bits: int
    per_channel: bool
    units: int  # node units quantized
    kl_refused: int
    migrations: list[Migration]
    sentinels: list[str]  # observed tensors kept float for their mask-like range
    activation_ranges: int
    quantize_nodes: int
    weights_quantized: int
    weight_grid: qparams.Grid | None
    # op type -> activations run as integer kernels they have none of their own
    integer_activations: dict[str, int] = field(default_factory=dict)
    latency_plan: LatencyPlan | None = None  # None: latency_aware=false
    latency: Latency | None = None  # measured "float" and "quantized"; None: not measured
    bias_corrections: list[Correction] | None = None  # None: not asked for
    layer_report: LayerReport | None = None
    sensitivity: list[UnitSensitivity] | None = None


@dataclass
class GateReport:
    """The accuracy gate: the written model against the float one on held-out samples."""

    samples: int
    comparisons: dict[str, OutputComparison]
    failures: list[str]  # empty: passed

    @property
    def mean_bias_percent(self) -> float:
        return model_mean_bias_percent(self.comparisons)


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
    post_training: PostTrainingSummary | None = None
    gate: GateReport | None = None

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
        if self.post_training is not None:
            lines += post_training_lines(self.post_training)
        if self.gate is not None:
            lines += gate_lines(self.gate)
        for w in self.skipped[:max_skipped]:
            lines.append(f"    {w.name} [{w.op_type} {'x'.join(map(str, w.shape))}]: {w.reason}")
        if len(self.skipped) > max_skipped:
            lines.append(f"    ... and {len(self.skipped) - max_skipped} more")
        if self.opset_after != self.opset_before:
            lines.append(f"  opset: {self.opset_before} -> {self.opset_after}")
        if self.post_training is not None and self.post_training.latency is not None:
            lines.append(latency_line(self.post_training.latency))
        lines.append(
            f"  size: {_mb(self.size_before)} -> {_mb(self.size_after)} ({ratio:.3f} of float)"
        )
        lines.append(f"  time: {self.seconds:.2f} s")
        return "\n".join(lines)


def post_training_lines(s: PostTrainingSummary, shown: int = 10) -> list[str]:
    by_technique = {m.technique: m for m in s.migrations}
    equalized = by_technique.get("equalization")
    smoothed = by_technique.get("SmoothQuant")
    grid = s.weight_grid
    lines = [
        f"  calibration: {s.method} on {s.samples} samples",
        *([f"  KL thresholds refused: {s.kl_refused} (clipping would leave below "
           f"{KL_SQNR_FLOOR_DB:g} dB SQNR; observed range used)"] if s.kl_refused else []),
        *([f"  activations: {s.activation_bits}-bit"] if s.activation_bits != s.bit_num else []),
        f"  node units quantized: {s.units}",
        *kept_float_lines(s.latency_plan),
        *([f"  equalized: {len(equalized.migrated)} Conv -> Conv activations"]
          if equalized and equalized.migrated else []),
        *([f"  SmoothQuant: {len(smoothed.migrated)} MatMul inputs"]
          if smoothed and smoothed.migrated else []),
        *[line for m in s.migrations for line in _left_alone(m)],
        *([f"  kept float (mask-like range beyond {SENTINEL_RANGE:g}): "
           f"{', '.join(s.sentinels)}"] if s.sentinels else []),
        f"  activations quantized: {s.activation_ranges} ranges, "
        f"{s.quantize_nodes} QuantizeLinear nodes",
        *([f"  integer activations: {_integer_forms(s.integer_activations)}"]
          if s.integer_activations else []),
    ]
    if grid is not None:
        lines.append(
            f"  weights quantized: {s.weights_quantized} (int8 symmetric"
            f"{' per-channel' if s.per_channel else ''}, levels [{grid.qmin}, {grid.qmax}]"
            f"{', reduce_range' if grid.qmax < 2 ** (s.bit_num - 1) - 1 else ''})")
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


INTEGER_FORMS = {"HardSigmoid": "QLinearAdd", "Tanh": "QLinearSigmoid"}


def _integer_forms(counts: dict[str, int]) -> str:
    return ", ".join(f"{count} {op} as {INTEGER_FORMS.get(op, 'integer ops')}"
                     for op, count in sorted(counts.items()))


def kept_float_lines(plan: LatencyPlan | None, shown: int = 3) -> list[str]:
    """The units kept float because onnxruntime runs them faster in float."""
    if plan is None or not plan.kept_float:
        return []
    kept = plan.kept_float
    names = ", ".join(f"{c.name} ({c.op_type})" for c in kept[:shown])
    more = f" and {len(kept) - shown} more" if len(kept) > shown else ""
    return [f"  kept float for speed: {len(kept)} unit{'s' if len(kept) > 1 else ''}, "
            f"{names}{more} (predicted {plan.planned_us / 1e3:.2f} ms as planned, "
            f"{plan.quantized_us / 1e3:.2f} ms all integer, {plan.float_us / 1e3:.2f} ms all "
            "float)"]


def latency_line(latency: Latency) -> str:
    quantized, reference = latency.ms["quantized"], latency.ms["float"]
    return (f"  latency: {quantized:.3f} ms, float {reference:.3f} ms "
            f"({quantized / reference:.2f}x; median of {latency.runs} interleaved runs, "
            f"{latency.threads} thread{'s' if latency.threads > 1 else ''}, {latency.cpu})")


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
