"""PostTraining as steps: calibrate -> prepare (equalization, SmoothQuant) -> QDQ -> bias
correction -> the summary and the optional debug outputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from ptqconv import layer_report, modelio, qparams, sensitivity
from ptqconv.calibrate.collector import observe
from ptqconv.calibrate.dataset import CalibrationSet
from ptqconv.calibrate.observers import (
    KL_SQNR_FLOOR_DB,
    OBSERVERS,
    ChannelRange,
    MinMaxObserver,
    Observer,
)
from ptqconv.config import QuantConfig
from ptqconv.options import ConvertOptions
from ptqconv.passes import equalize, smooth_quant
from ptqconv.passes.bias_correction import apply_shifts, measure_shifts
from ptqconv.passes.fold_casts import FoldInitializerCastsPass
from ptqconv.passes.generated_names import PrefixGeneratedNamesPass
from ptqconv.passes.qdq import QDQPass, weight_grid_for
from ptqconv.passes.qdq_plan import QuantPlan, plan_quantization

ProgressFactory = Callable[[int, str], Callable[[int], None]]
Range = tuple[float, float]
ChannelStats = tuple[np.ndarray, np.ndarray, np.ndarray]
# Per-axis DequantizeLinear, which QDQ weights need, arrived in opset 13.
QDQ_MIN_OPSET = 13
# Activations beyond this magnitude are mask sentinels (e.g. -3.4e38), left in float.
SENTINEL_RANGE = 1e15


@dataclass
class Calibration:
    """What calibration measured, per observed tensor."""

    ranges: dict[str, Range]
    channel_stats: dict[str, ChannelStats]  # for equalization and SmoothQuant
    float_tensors: frozenset[str]  # observed but left in float
    sentinels: list[str]  # of those, the ones with mask-like ranges
    kl_refused: int


class PostTraining:
    """One PostTraining conversion of the simplified float model at `source`."""

    def __init__(self, source: Path, data: CalibrationSet, options: ConvertOptions,
                 progress: ProgressFactory | None, original_names: set[str]) -> None:
        """`original_names`: the value names of the user's model, before simplification."""
        assert options.config is not None  # ConvertOptions.create guarantees it
        self.source, self.data, self.options, self.progress = source, data, options, progress
        self.original_names = original_names
        self.config: QuantConfig = options.config
        self.skip = frozenset(options.skip_quant_node)
        self.act_bits = self.config.activation_bit_num or options.bit_num
        self.model = self.load_float()  # calibrated, then edited in place by run()
        graph = self.model.graph
        self.smooth_names = ({g.activation for g in smooth_quant.find_groups(graph, self.skip)}
                             if self.config.smooth_quant else set())
        # Equalization rescales per output channel, which per-tensor weights would pay for.
        self.equalize_names = ({g.activation for g in equalize.find_groups(graph, self.skip)}
                               if self.config.equalize and self.config.per_channel
                               else set()) - self.smooth_names

    def load_float(self) -> ir.Model:
        model = modelio.load_model(self.source)
        PrefixGeneratedNamesPass(self.original_names)(model)
        FoldInitializerCastsPass()(model)
        # onnxruntime's simplification declares every domain it knows; keep the used ones.
        common_passes.RemoveUnusedOpsetsPass()(model)
        return modelio.ensure_opset(model, QDQ_MIN_OPSET, self.source.parent)

    def _step(self, total: int, label: str) -> Callable[[int], None] | None:
        return self.progress(total, label) if self.progress else None

    def calibrate(self) -> Calibration:
        """Stream the calibration set through the float model into one observer per tensor."""
        model = self.model
        method = OBSERVERS[self.config.activation_quant_method]
        model_inputs = {v.name for v in model.graph.inputs}

        def make_observer(name: str) -> Observer:
            # Clipping a model input throws information away before the first layer, and
            # inputs are often discrete (pixels, tokens), which misleads histogram methods.
            inner = MinMaxObserver() if name in model_inputs else method()
            if name in self.smooth_names:
                return ChannelRange(inner)
            return ChannelRange(inner, axis=1) if name in self.equalize_names else inner

        first = plan_quantization(model.graph, self.skip)
        # Shared tensors are observed too: the plan after preparation may need their ranges.
        tensors = list(dict.fromkeys([*first.observe, *first.shared, *sorted(self.smooth_names),
                                      *sorted(self.equalize_names)]))
        step = self._step(len(self.data), f"calibrating ({self.config.activation_quant_method})")
        observers = observe(model, tensors, self.data, make_observer, self.config.thread_num,
                            step)
        ranges = {name: obs.compute_range(self.act_bits) for name, obs in observers.items()}
        # Attention masks fill with float32's lowest value; a tensor whose range reaches such
        # sentinels is not a signal, and quantizing it would erase everything else it carries.
        # Tensors that turned out not to be float32 stay unquantized as well.
        sentinels = sorted(n for n, (lo, hi) in ranges.items()
                           if not (abs(lo) < SENTINEL_RANGE and abs(hi) < SENTINEL_RANGE))
        float_tensors = frozenset(sentinels) | (frozenset(tensors) - frozenset(observers))
        return Calibration(
            ranges={n: r for n, r in ranges.items() if n not in float_tensors},
            channel_stats={n: (o.channel_min, o.channel_max, o.channel_mean_square)
                           for n, o in observers.items()
                           if isinstance(o, ChannelRange) and o.channel_min is not None
                           and n not in float_tensors},
            float_tensors=float_tensors,
            sentinels=sentinels,
            kl_refused=sum(obs.kl_refused for obs in observers.values()),
        )

    def prepare(self, model: ir.Model, stats: dict[str, ChannelStats]) -> dict[str, Range]:
        """The graph edits made before QDQ, equalization then SmoothQuant; returns the ranges
        of the tensors they changed or made."""
        if not stats:
            return {}
        bits, reduce_range = self.options.bit_num, self.config.reduce_range
        levels = 2**self.act_bits - 1
        new_ranges = equalize.equalize(
            equalize.find_groups(model.graph, self.skip),
            {n: stats[n] for n in self.equalize_names if n in stats}, levels,
            lambda conv: weight_grid_for(conv, bits, reduce_range).qmax)
        new_ranges.update(smooth_quant.smooth(
            model.graph, smooth_quant.find_groups(model.graph, self.skip),
            {n: stats[n] for n in self.smooth_names if n in stats}, levels,
            qparams.fused_weight_grid(bits, reduce_range).qmax))
        return new_ranges

    def qdq_pass(self, plan: QuantPlan, ranges: dict[str, Range], **keep: bool) -> QDQPass:
        return QDQPass(plan, ranges, self.options.bit_num, per_channel=self.config.per_channel,
                       reduce_range=self.config.reduce_range, act_bits=self.act_bits, **keep)

    def run(self) -> tuple[ir.Model, list[str]]:
        """The quantized model and the summary lines."""
        cal = self.calibrate()
        model = self.model
        prepared = self.prepare(model, cal.channel_stats)
        ranges = {**cal.ranges, **prepared}
        # SmoothQuant's Mul nodes stay float: quantizing their input would undo the smoothing.
        skip = self.skip | smooth_quant.smoothing_nodes(model.graph)
        plan = plan_quantization(model.graph, skip, cal.float_tensors)
        debug = self.options.debug_dir is not None
        qdq = self.qdq_pass(plan, ranges, keep_weight_errors=self.config.bias_correction,
                            keep_weights=debug)
        qdq(model)
        bias_lines: list[str] = []
        if self.config.bias_correction and qdq.weight_errors:
            step = self._step(len(self.data), "bias correction")
            shifts = measure_shifts(model, qdq.weight_errors, self.data, self.config.thread_num,
                                    step)
            # Start again from the float graph: corrected float biases are then quantized by
            # the same pass as any other bias.
            model = self._prepared_float(cal)
            corrected = apply_shifts(model.graph, shifts)
            plan = plan_quantization(model.graph, skip, cal.float_tensors)
            qdq = self.qdq_pass(plan, ranges, keep_weights=debug)
            qdq(model)
            applied = [c for c in corrected if c.applied]
            bias_lines = [f"  bias correction: {len(applied)} of {len(corrected)} layers"]
            bias_lines += [f"    {c.node_name}: skipped, {c.reason}"
                           for c in corrected if not c.applied][:10]
        lines = self._summary(cal, prepared, plan, qdq, model) + bias_lines
        if debug:
            lines += self._layer_report(model, qdq, cal)
        if self.options.sensitivity:
            lines += self._sensitivity(skip, cal, ranges)
        return model, lines

    def _prepared_float(self, cal: Calibration) -> ir.Model:
        model = self.load_float()
        self.prepare(model, cal.channel_stats)
        return model

    def _summary(self, cal: Calibration, prepared: dict[str, Range], plan: QuantPlan,
                 qdq: QDQPass, model: ir.Model) -> list[str]:
        bits, config = self.options.bit_num, self.config
        equalized = [n for n in prepared if n in self.equalize_names]
        smoothed = len(prepared) - len(equalized)
        grid = qdq.weight_grid
        return [
            f"  calibration: {config.activation_quant_method} on {len(self.data)} samples",
            *([f"  KL thresholds refused: {cal.kl_refused} (clipping would leave below "
               f"{KL_SQNR_FLOOR_DB:g} dB SQNR; observed range used)"] if cal.kl_refused else []),
            *([f"  activations: {self.act_bits}-bit"] if self.act_bits != bits else []),
            f"  node units quantized: {len(plan.units)}",
            *([f"  equalized: {len(equalized)} Conv -> Conv activations"] if equalized else []),
            *([f"  SmoothQuant: {smoothed} MatMul inputs"] if smoothed else []),
            *([f"  kept float (mask-like range beyond {SENTINEL_RANGE:g}): "
               f"{', '.join(cal.sentinels)}"] if cal.sentinels else []),
            f"  activations quantized: {len(qdq.act_params)} ranges, "
            f"{sum(1 for n in model.graph if n.op_type == 'QuantizeLinear')} QuantizeLinear nodes",
            f"  weights quantized: {qdq.weights_quantized} (int8 symmetric"
            f"{' per-channel' if config.per_channel else ''}, levels [{grid.qmin}, {grid.qmax}]"
            f"{', reduce_range' if grid.qmax < 2 ** (bits - 1) - 1 else ''})",
        ]

    def _layer_report(self, model: ir.Model, qdq: QDQPass, cal: Calibration) -> list[str]:
        """Per-layer float-vs-quantized statistics over the calibration set (--debugDir)."""
        float_model = self._prepared_float(cal)
        owners = {v.name: "(model input)" for v in float_model.graph.inputs}
        owners.update((v.name, n.name or n.op_type) for n in float_model.graph
                      for v in n.outputs)
        tensors = {}
        for name, dequantized in qdq.dequantized.items():
            params = qdq.activation_params(name)
            if params is not None:
                tensors[name] = (dequantized, params[0], params[1])
        stats = layer_report.activation_report(float_model, model, tensors, owners,
                                               qdq.act_grid.bits, self.data,
                                               self.config.thread_num)
        stats += layer_report.weight_report(qdq.weight_params)
        return layer_report.write(self.options.debug_dir, stats)

    def _sensitivity(self, skip: frozenset[str], cal: Calibration,
                     ranges: dict[str, Range]) -> list[str]:
        """Quantize one node unit at a time and rank the units (--sensitivity)."""
        float_model = self._prepared_float(cal)
        unit_plan = plan_quantization(float_model.graph, skip, cal.float_tensors)
        samples = [sample for _, sample in zip(range(sensitivity.MAX_SAMPLES), self.data,
                                                strict=False)]
        step = self._step(len(unit_plan.units), "sensitivity")
        ranking = sensitivity.rank_units(float_model, unit_plan, ranges,
                                         lambda plan: self.qdq_pass(plan, ranges), samples,
                                         self.config.thread_num, step)
        return sensitivity.write(self.options.debug_dir, ranking)
