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
from ptqconv.errors import shown
from ptqconv.evaluate.metrics import OutputComparison, model_mean_bias_percent
from ptqconv.passes.bias_correction import Correction
from ptqconv.passes.weight_quant import WeightRecord


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


@dataclass(frozen=True)
class InferredShape:
    """An input shape with a dimension read from a sample file's size."""

    what: str  # "calibration data", "eval data"
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path

    def line(self) -> str:
        return (f"  {self.what}: input {self.name!r} read as {self.dtype} "
                f"[{','.join(map(str, self.shape))}] (from the size of {shown(self.file.name)})")


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
    inferred_shapes: list[InferredShape] = field(default_factory=list)
    # Files this run replaced that it had not written before: an existing <output>.data.
    replaced: list[Path] = field(default_factory=list)

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
        lines = [f"{self.quant_type} {self.bit_num}-bit: {shown(self.model_file)} -> "
                 f"{shown(self.output_file)}"]
        lines += [shape.line() for shape in self.inferred_shapes]
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
