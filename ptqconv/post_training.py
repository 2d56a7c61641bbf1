"""PostTraining: calibrate -> scale migrations -> QDQ -> bias correction -> debug outputs.

Every pass that needs calibration statistics declares them first; one streaming collection
over the calibration set serves them all (`calibrate.collector.collect`). The prepared float
model is cloned once, in memory, for everything that starts again from float.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from ptqconv import modelio, qparams
from ptqconv.calibrate.collector import collect
from ptqconv.calibrate.dataset import CalibrationSet
from ptqconv.calibrate.ranges import ActivationRanges, RangeMethod, activation_ranges
from ptqconv.calibrate.statistics import Statistic, StatisticPoint, TensorShape
from ptqconv.debug import layer_report, sensitivity
from ptqconv.passes.bias_correction import apply_shifts, measure_shifts
from ptqconv.passes.calibrated import CalibratedPass, MigrationResult
from ptqconv.passes.equalize import EqualizePass
from ptqconv.passes.fold_affine import FoldAffinePass
from ptqconv.passes.fold_casts import FoldInitializerCastsPass
from ptqconv.passes.generated_names import PrefixGeneratedNamesPass
from ptqconv.passes.hard_swish import HardSwishPass
from ptqconv.passes.integer_activations import IntegerActivationsPass
from ptqconv.passes.latency_plan import plan_latency
from ptqconv.passes.qdq import QDQPass, QDQResult, weight_grid_for
from ptqconv.passes.qdq_plan import QuantPlan, plan_quantization
from ptqconv.passes.smooth_quant import SmoothQuantPass, smoothing_nodes
from ptqconv.qparams import Range
from ptqconv.report import Migration, PostTrainingSummary
from ptqconv.settings import PostTrainingSettings

ProgressFactory = Callable[[int, str], Callable[[int], None]]
# Per-axis DequantizeLinear, which QDQ weights need, arrived in opset 13.
QDQ_MIN_OPSET = 13
SHAPE = Statistic(TensorShape)


class PostTraining:
    """One PostTraining conversion with `settings` on the calibration samples `data`."""

    def __init__(self, settings: PostTrainingSettings, data: CalibrationSet,
                 progress: ProgressFactory | None = None) -> None:
        self.settings, self.data, self.progress = settings, data, progress
        self.skip = frozenset(settings.skip)

    def _step(self, total: int, label: str) -> Callable[[int], None] | None:
        return self.progress(total, label) if self.progress else None

    def load_float(self, source: Path, original_names: set[str]) -> ir.Model:
        """The simplified float model at `source`, ready to plan: onnxruntime's generated
        names prefixed (`original_names` are the user's), initializer Casts folded, only
        the opsets used, at least the opset QDQ needs."""
        model = modelio.load_model(source)
        ir.passes.Sequential(
            PrefixGeneratedNamesPass(original_names),
            FoldInitializerCastsPass(),
            # onnxruntime's simplification declares every domain it knows; keep the used ones.
            common_passes.RemoveUnusedOpsetsPass(),
        )(model)
        model = modelio.ensure_opset(model, QDQ_MIN_OPSET, source.parent)
        ir.passes.Sequential(FoldAffinePass(), HardSwishPass())(model)
        return model

    def migrations(self) -> list[CalibratedPass]:
        """The scale migrations the settings ask for, in the order they are applied."""
        s = self.settings
        levels = 2**s.activation_bits - 1
        found: list[CalibratedPass] = []
        # Equalization rescales per output channel, which per-tensor weights would pay for.
        if s.equalize and s.per_channel:
            found.append(EqualizePass(
                self.skip, levels,
                lambda conv: weight_grid_for(conv, s.bit_num, s.reduce_range).qmax))
        if s.smooth_quant:
            found.append(SmoothQuantPass(
                self.skip, levels, qparams.fused_weight_grid(s.bit_num, s.reduce_range).qmax))
        return found

    def calibrate(self, model: ir.Model, migrations: list[CalibratedPass],
                  ) -> tuple[ActivationRanges, list[MigrationResult], dict[str, tuple[int, ...]]]:
        """Collect what the activation ranges and every migration need, in one pass over the
        calibration set, then apply the migrations to `model`. Also returns the shapes of
        the observed tensors, which the latency planner costs kernels by."""
        s = self.settings
        plan = plan_quantization(model.graph, self.skip)
        method = RangeMethod(s.method, frozenset(v.name for v in model.graph.inputs))
        # Shared tensors are observed too: the plan after the migrations may need their ranges.
        tensors = list(dict.fromkeys([*plan.observe, *plan.shared]))
        points = method.points(tensors) + [StatisticPoint(t, SHAPE) for t in tensors]
        for migration in migrations:
            points += migration.statistic_points(model)
        statistics = collect(model, points, self.data, s.threads,
                             self._step(len(self.data), f"calibrating ({s.method})"))
        ranges = activation_ranges(statistics, method, tensors, s.activation_bits)
        results = [m.calibrated(statistics, ranges.float_tensors)(model) for m in migrations]
        shapes = {t: found.shape for t in tensors
                  if (found := statistics.get(t, SHAPE)) is not None and found.shape is not None}
        return ranges, results, shapes

    def qdq_pass(self, plan: QuantPlan, ranges: dict[str, Range], **keep: bool) -> QDQPass:
        s = self.settings
        return QDQPass(plan, ranges, s.bit_num, per_channel=s.per_channel,
                       reduce_range=s.reduce_range, act_bits=s.activation_bits, **keep)

    def quantize(self, model: ir.Model, plan: QuantPlan, ranges: dict[str, Range],
                 **keep: bool) -> QDQResult:
        """Q/DQ by `plan`, then the activations onnxruntime has no integer kernel for in the
        integer forms it fuses (counted in the result's `integer_activations`)."""
        qdq: QDQResult = self.qdq_pass(plan, ranges, **keep)(model)
        activations = IntegerActivationsPass(qparams.activation_grid(
            self.settings.activation_bits))(model)
        qdq.integer_activations.update(activations.rewritten)
        return qdq

    def run(self, source: Path, original_names: set[str]) -> tuple[ir.Model, PostTrainingSummary]:
        """The quantized model and what was done."""
        s = self.settings
        model = self.load_float(source, original_names)
        calibration, migrated, shapes = self.calibrate(model, self.migrations())
        ranges = dict(calibration.ranges)
        for result in migrated:
            ranges.update(result.ranges)
        prepared = model.clone()  # what every later step starts again from
        # SmoothQuant's Mul nodes stay float: quantizing their input would undo the smoothing.
        skip = self.skip | smoothing_nodes(model.graph)
        plan = plan_quantization(model.graph, skip, calibration.float_tensors)
        latency = plan_latency(plan, shapes) if s.latency_aware else None
        float_units = latency.keys if latency is not None else frozenset()
        if float_units:
            plan = plan_quantization(model.graph, skip, calibration.float_tensors, float_units)
        debug = s.debug_dir is not None
        qdq = self.quantize(model, plan, ranges, keep_weight_errors=s.bias_correction,
                            keep_weights=debug)
        corrections = None
        if s.bias_correction and qdq.weight_errors:
            shifts = measure_shifts(qdq.model, qdq.weight_errors, self.data, s.threads,
                                    self._step(len(self.data), "bias correction"))
            # Corrected float biases are then quantized by the same pass as any other bias.
            model = prepared.clone()
            corrections = apply_shifts(model.graph, shifts)
            plan = plan_quantization(model.graph, skip, calibration.float_tensors, float_units)
            qdq = self.quantize(model, plan, ranges, keep_weights=debug)
        summary = PostTrainingSummary(
            method=s.method,
            samples=len(self.data),
            bit_num=s.bit_num,
            activation_bits=s.activation_bits,
            per_channel=s.per_channel,
            units=len(plan.units),
            kl_refused=calibration.kl_refused,
            migrations=[Migration(r.technique, r.migrated, r.left_alone) for r in migrated],
            sentinels=calibration.sentinels,
            activation_ranges=qdq.activation_ranges,
            quantize_nodes=qdq.quantize_nodes,
            weights_quantized=qdq.weights_quantized,
            weight_grid=qdq.weight_grid,
            integer_activations=dict(qdq.integer_activations),
            latency_plan=latency,
            bias_corrections=corrections,
        )
        if debug:
            assert s.debug_dir is not None
            stats = layer_report.activation_report(prepared, qdq, self.data, s.threads)
            stats += layer_report.weight_report(qdq)
            summary.layer_report = layer_report.write(s.debug_dir, stats)
        if s.sensitivity:
            summary.sensitivity = self._sensitivity(prepared, skip, calibration, ranges,
                                                    float_units)
        return model, summary

    def _sensitivity(self, prepared: ir.Model, skip: frozenset[str],
                     calibration: ActivationRanges, ranges: dict[str, Range],
                     float_units: frozenset[str]) -> list[sensitivity.UnitSensitivity]:
        """Quantize one node unit at a time and rank the units (--sensitivity)."""
        plan = plan_quantization(prepared.graph, skip, calibration.float_tensors, float_units)
        samples = [sample for _, sample in zip(range(sensitivity.MAX_SAMPLES), self.data,
                                                strict=False)]
        ranking = sensitivity.rank_units(
            prepared, plan, lambda sub: self.qdq_pass(sub, ranges), samples,
            self.settings.threads, self._step(len(plan.units), "sensitivity"))
        if self.settings.debug_dir is not None:
            sensitivity.write(self.settings.debug_dir, ranking)
        return ranking
