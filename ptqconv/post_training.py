"""PostTraining: calibrate -> scale migrations -> QDQ -> bias correction -> debug outputs.

Every pass that needs calibration statistics declares them first; one streaming collection
over the calibration set serves them all (`calibrate.collector.collect`). What the settings
leave open (the range method when it is AUTO, and bias correction, equalization, SmoothQuant
when their keys are absent) is decided by measurement: the statistics are collected split, a
choice made on one part of the samples is scored by the error of the model's outputs against
the float model on the other part, and the choice that scores best is rebuilt from every
sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from ptqconv import modelio, qparams, runtime
from ptqconv.calibrate.collector import collect
from ptqconv.calibrate.dataset import CalibrationSet
from ptqconv.calibrate.ranges import (
    ActivationRanges,
    RangeMethod,
    activation_ranges,
    candidate_points,
)
from ptqconv.calibrate.statistics import (
    FoldValues,
    Statistic,
    StatisticPoint,
    Statistics,
    folded,
)
from ptqconv.debug import layer_report, sensitivity
from ptqconv.errors import PtqError
from ptqconv.graph.naming import node_key
from ptqconv.passes import bias_correction, gptq
from ptqconv.passes.bias_correction import Correction, apply_shifts, expected_shifts
from ptqconv.passes.calibrated import MigrationPass, MigrationResult
from ptqconv.passes.equalize import EqualizePass
from ptqconv.passes.fold_casts import FoldInitializerCastsPass
from ptqconv.passes.generated_names import PrefixGeneratedNamesPass
from ptqconv.passes.qdq import QDQPass, QDQResult, weight_grid_for
from ptqconv.passes.qdq_plan import QuantPlan, output_units, plan_quantization
from ptqconv.passes.smooth_quant import SmoothQuantPass, smoothing_nodes
from ptqconv.qparams import Range
from ptqconv.report import Measured, Migration, PostTrainingSummary
from ptqconv.settings import AUTO, PostTrainingSettings
from ptqconv.weights.layout import IntegerWeight, WeightLayout

ProgressFactory = Callable[[int, str], Callable[[int], None]]
# Per-axis DequantizeLinear, which QDQ weights need, arrived in opset 13.
QDQ_MIN_OPSET = 13
# The range methods AUTO measures, in the order it tries them.
CANDIDATE_METHODS = ("MAX_MIN", "KL", "MSE", "REMOVAL_OUTLIER")
# What a setting left open starts from before it is measured, and what it is when too few
# samples leave nothing to measure on (docs/decisions.md, AUTO).
FALLBACK_METHOD = "MSE"
# The calibration samples are dealt into this many folds (fewer for fewer samples); with
# less than TINY samples every fold is scored with ranges from the others, with less than
# CROSS_VALIDATE two folds (one held-out slice picked badly on small sets:
# docs/decisions.md, AUTO), above it one, at most MAX_HELD_OUT of its samples.
FOLDS = 4
TINY = 16
CROSS_VALIDATE = 64
MAX_HELD_OUT = 64
# A technique worse than the best so far by this factor on the first fold is not scored on
# the next.
FLIP_MARGIN = 1.2


@dataclass(frozen=True)
class Choice:
    """What one quantized model is built with."""

    method: str
    bias_correction: bool
    equalize: bool
    smooth_quant: bool
    float_outputs: bool = False  # the elementwise units that write model outputs stay float
    float_units: frozenset[str] = frozenset()  # node keys kept float to meet an accuracy target

    def label(self) -> str:
        switches = [name for name, on in (("bias correction", self.bias_correction),
                                          ("equalization", self.equalize),
                                          ("SmoothQuant", self.smooth_quant),
                                          ("float outputs", self.float_outputs)) if on]
        if self.float_units:
            switches.append(f"{len(self.float_units)} units float")
        return " + ".join([self.method, *switches])

    def float_nodes(self, graph: ir.Graph) -> frozenset[ir.Node]:
        """The nodes of `graph` this choice keeps float."""
        found = set(output_units(graph)) if self.float_outputs else set()
        found |= {n for n in graph if node_key(n) in self.float_units}
        return frozenset(found)


@dataclass
class Built:
    """One quantized model and how it was made."""

    model: ir.Model
    qdq: QDQResult
    plan: QuantPlan
    ranges: dict[str, Range]
    calibration: ActivationRanges
    migrations: list[MigrationResult]
    corrections: list[Correction] | None
    prepared: ir.Model  # the float model after the migrations, before QDQ
    skip: frozenset[str]
    float_nodes: frozenset[ir.Node]  # of `prepared`


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
        return modelio.ensure_opset(model, QDQ_MIN_OPSET, source.parent)

    # --- building one choice -----------------------------------------------------------

    def migrations(self, choice: Choice) -> list[MigrationPass]:
        """The scale migrations `choice` asks for, in the order they are applied."""
        s = self.settings
        levels = 2**s.activation_bits - 1
        found: list[MigrationPass] = []
        # Equalization rescales per output channel, which per-tensor weights would pay for.
        if choice.equalize and s.per_channel:
            found.append(EqualizePass(
                self.skip, levels,
                lambda conv: weight_grid_for(conv, s.bit_num, s.reduce_range).qmax))
        if choice.smooth_quant:
            found.append(SmoothQuantPass(
                self.skip, levels, qparams.fused_weight_grid(s.bit_num, s.reduce_range).qmax))
        return found

    def qdq_pass(self, plan: QuantPlan, ranges: dict[str, Range], **options: Any) -> QDQPass:
        s = self.settings
        return QDQPass(plan, ranges, s.bit_num, per_channel=s.per_channel,
                       reduce_range=s.reduce_range, act_bits=s.activation_bits, **options)

    def build(self, float_model: ir.Model, choice: Choice, statistics: Statistics,
              tensors: list[str], shared: bool, migrations: dict | None = None,
              weights: dict | None = None,
              integers: dict[str, IntegerWeight] | None = None) -> Built:
        """The model `choice` makes from a clone of `float_model`, with the ranges of
        `tensors`, the migrations and the bias shifts drawn from `statistics` (`shared`:
        collected for several range methods, see `RangeMethod`). `migrations` and `weights`
        cache migrated models and quantized weights between builds that share them;
        `integers` are weights rounded elsewhere (GPTQ), by name."""
        s = self.settings
        method = RangeMethod(choice.method, frozenset(v.name for v in float_model.graph.inputs),
                             shared=shared)
        calibration = activation_ranges(statistics, method, tensors, s.activation_bits)
        key = (id(statistics), choice.equalize, choice.smooth_quant, calibration.float_tensors)
        if migrations is not None and key in migrations:
            prepared, migrated = migrations[key]
        else:
            prepared = float_model.clone()  # what every later step starts again from
            migrated = [m.calibrated(statistics, calibration.float_tensors)(prepared)
                        for m in self.migrations(choice)]
            if migrations is not None:
                migrations[key] = (prepared, migrated)
        model = prepared.clone()
        ranges = dict(calibration.ranges)
        for result in migrated:
            ranges.update(result.ranges)
        # SmoothQuant's Mul nodes stay float: quantizing their input would undo the smoothing.
        skip = self.skip | smoothing_nodes(model.graph)
        plan = plan_quantization(model.graph, skip, calibration.float_tensors,
                                 choice.float_nodes(model.graph))
        debug = s.debug_dir is not None
        qdq: QDQResult = self.qdq_pass(plan, ranges, keep_weight_errors=choice.bias_correction,
                                       keep_weights=debug, weights=weights,
                                       integer_weights=integers)(model)
        corrections = None
        if choice.bias_correction and qdq.weight_errors:
            divided = {name: d for result in migrated for name, d in result.divided.items()}
            shifts = expected_shifts(qdq.weight_errors, statistics, divided)
            # Corrected float biases are then quantized by the same pass as any other bias.
            model = prepared.clone()
            corrections = apply_shifts(model.graph, shifts)
            plan = plan_quantization(model.graph, skip, calibration.float_tensors,
                                     choice.float_nodes(model.graph))
            qdq = self.qdq_pass(plan, ranges, keep_weights=debug, weights=weights,
                                integer_weights=integers)(model)
        return Built(model, qdq, plan, ranges, calibration, migrated, corrections, prepared,
                     skip, choice.float_nodes(prepared.graph))

    # --- the run -------------------------------------------------------------------------

    def open_choices(self) -> list[str]:
        """The settings left to measurement."""
        s = self.settings
        open_ = ["method"] if s.method == AUTO else []
        return open_ + [name for name in ("bias_correction", "equalize", "smooth_quant")
                        if getattr(s, name) is None]

    def start(self) -> Choice:
        """The choice the settings force, with the fallbacks where they leave it open."""
        s = self.settings
        return Choice(
            method=FALLBACK_METHOD if s.method == AUTO else s.method,
            bias_correction=bool(s.bias_correction),
            equalize=True if s.equalize is None else s.equalize,
            smooth_quant=True if s.smooth_quant is None else s.smooth_quant)

    def run(self, source: Path, original_names: set[str]) -> tuple[ir.Model, PostTrainingSummary]:
        """The quantized model and what was done."""
        s = self.settings
        model = self.load_float(source, original_names)
        plan = plan_quantization(model.graph, self.skip)
        # Shared tensors are observed too: the plan after the migrations may need their ranges.
        tensors = list(dict.fromkeys([*plan.observe, *plan.shared]))
        choice = self.start()
        measured: list[Measured] = []
        folds = _folds(len(self.data))
        shared = bool(self.open_choices() and folds)
        if shared:
            statistics = self._collect_folds(model, choice, tensors, folds)
            choice, measured = self.decide(model, choice, tensors, statistics, folds)
            statistics = statistics.view()
        else:
            method = RangeMethod(choice.method, frozenset(v.name for v in model.graph.inputs))
            points = method.points(tensors)
            for migration in self.migrations(choice):
                points += migration.statistic_points(model)
            if choice.bias_correction:
                points += bias_correction.statistic_points(model.graph)
            statistics = collect(model, points, self.data, s.threads,
                                 self._step(len(self.data), f"calibrating ({s.method})"))
        built = self.build(model, choice, statistics, tensors, shared)
        solved = None
        if s.quant_strategy == "GPTQ":
            # The choice was measured with nearest weights; GPTQ rounds the chosen model's.
            solved = self.gptq(built)
            built = self.build(model, choice, statistics, tensors, shared,
                               integers=solved.integers)
        # What a later rebuild with some units float (an accuracy target) starts from.
        self._rebuild = (model, choice, statistics, tensors, shared,
                         solved.integers if solved else None, built)
        summary = self._summary(built, choice, measured, folds)
        if solved is not None:
            summary.gptq = solved.summary()
        if s.debug_dir is not None:
            stats = layer_report.activation_report(built.prepared, built.qdq, self.data,
                                                   s.threads)
            stats += layer_report.weight_report(built.qdq)
            summary.layer_report = layer_report.write(s.debug_dir, stats)
        if s.sensitivity:
            summary.sensitivity = self._sensitivity(built)
        return built.model, summary

    def ranking(self) -> list[sensitivity.UnitSensitivity]:
        """The units of the model `run` made, most harmful first (each quantized alone)."""
        return self._sensitivity(self._rebuild[-1])

    def with_float_units(self, keys: frozenset[str]) -> ir.Model:
        """The model `run` made, rebuilt with the units of node keys `keys` kept float."""
        model, choice, statistics, tensors, shared, integers, _ = self._rebuild
        return self.build(model, replace(choice, float_units=keys), statistics, tensors,
                          shared, integers=integers).model

    def gptq(self, built: Built) -> gptq.Solved:
        """GPTQ integers for the weights `built` quantizes, on the grids and axes QDQPass
        gives them, from the second moments of their inputs in the migrated float model."""
        s = self.settings
        plan = plan_quantization(built.prepared.graph, built.skip,
                                 built.calibration.float_tensors, built.float_nodes)
        targets = {}
        for planned in plan.weights:
            value = planned.node.inputs[planned.index]
            if value is not None and value.name:
                grid = weight_grid_for(planned.node, s.bit_num, s.reduce_range)
                targets[value.name] = WeightLayout(grid, planned.axis if s.per_channel
                                                   else None)
        return gptq.run(built.prepared, targets, self.data, s.threads, self.progress)

    # --- measured choices ----------------------------------------------------------------

    def _collect_folds(self, model: ir.Model, start: Choice, tensors: list[str],
                       folds: int) -> Statistics:
        """One pass serving every candidate: each range method's statistic and each
        migration's, over `folds` folds of the samples, and the float model's outputs on the
        samples choices are scored on."""
        s = self.settings
        inputs = frozenset(v.name for v in model.graph.inputs)
        methods = CANDIDATE_METHODS if s.method == AUTO else (s.method,)
        points = candidate_points(methods, inputs, tensors, folds)
        for migration in self.migrations(replace(start, equalize=True, smooth_quant=True)):
            points += [folded(point, folds) for point in migration.statistic_points(model)]
        if s.bias_correction is not False:
            points += [folded(p, folds) for p in bias_correction.statistic_points(model.graph)]
        scored = _scored_folds(len(self.data), folds)
        points += [StatisticPoint(v.name, Statistic(FoldValues, (folds, scored, MAX_HELD_OUT)))
                   for v in model.graph.outputs if v.name not in inputs]
        label = "calibrating (AUTO)" if s.method == AUTO else f"calibrating ({s.method})"
        return collect(model, points, self.data, s.threads,
                       self._step(len(self.data), label))

    def decide(self, float_model: ir.Model, start: Choice, tensors: list[str],
               statistics: Statistics, folds: int) -> tuple[Choice, list[Measured]]:
        """The open settings, each kept where it lowers the output error on samples that
        did not set the ranges: the range method and bias correction together (successive
        halving over the folds: each round scores the better half on one more fold), then
        each other technique against the best so far."""
        scored = _scored_folds(len(self.data), folds)
        kept = Statistic(FoldValues, (folds, scored, MAX_HELD_OUT))
        references = {name: found.values for v in float_model.graph.outputs
                      if (found := statistics.get(name := v.name, kept)) is not None}
        if not references:  # nothing float to compare: keep what the settings say
            return start, []
        scorer = _Scorer(self, float_model, tensors, statistics, folds, scored, references)
        open_ = self.open_choices()
        methods = CANDIDATE_METHODS if "method" in open_ else (start.method,)
        correctable = bool(bias_correction.statistic_points(float_model.graph))
        corrections = ((False, True) if "bias_correction" in open_ and correctable
                       else (start.bias_correction,))
        alive = [replace(start, method=m, bias_correction=b)
                 for m in methods for b in corrections]
        step = self._step(len(alive) * 2 + 3 * len(scored), "choosing")
        for fold in scored:
            for choice in alive:
                scorer.add(choice, fold)
                if step:
                    step(1)
            if len(alive) > 2:
                alive = sorted(alive, key=scorer.error)[:max(2, (len(alive) + 1) // 2)]
        best = min(alive, key=scorer.error)
        for name, flipped in (("equalize", replace(best, equalize=False)),
                              ("smooth_quant", replace(best, smooth_quant=False)),
                              ("float_outputs", replace(best, float_outputs=True))):
            if name == "float_outputs":
                if not output_units(float_model.graph):
                    continue
            elif name not in open_ or not self._changes(float_model, best, flipped):
                continue
            for count, fold in enumerate(scored, 1):
                scorer.add(flipped, fold)
                if step:
                    step(1)
                # Clearly worse on the folds so far: not worth another build.
                if scorer.error(flipped) > FLIP_MARGIN * scorer.error(best, scored[:count]):
                    break
            else:
                if scorer.error(flipped) < scorer.error(best):
                    best = flipped
        return best, scorer.measured(start)

    def _changes(self, float_model: ir.Model, a: Choice, b: Choice) -> bool:
        """Whether `b` can make a different model from `a` (a technique with no candidate
        in the graph makes none)."""
        if a.bias_correction != b.bias_correction:
            return True
        changed = [m for m in self.migrations(replace(a, equalize=True, smooth_quant=True))
                   if (m.technique == "equalization" and a.equalize != b.equalize)
                   or (m.technique == "SmoothQuant" and a.smooth_quant != b.smooth_quant)]
        return any(m.find(float_model.graph)[0] for m in changed)

    # --- reporting -----------------------------------------------------------------------

    def _summary(self, built: Built, choice: Choice, measured: list[Measured],
                 folds: int) -> PostTrainingSummary:
        s = self.settings
        return PostTrainingSummary(
            method=choice.method,
            samples=len(self.data),
            bit_num=s.bit_num,
            activation_bits=s.activation_bits,
            per_channel=s.per_channel,
            target=s.target,
            reduce_range=s.reduce_range,
            units=len(built.plan.units),
            kl_refused=built.calibration.kl_refused,
            migrations=[Migration(r.technique, r.migrated, r.left_alone)
                        for r in built.migrations],
            sentinels=built.calibration.sentinels,
            activation_ranges=built.qdq.activation_ranges,
            quantize_nodes=built.qdq.quantize_nodes,
            weights_quantized=built.qdq.weights_quantized,
            weight_grid=built.qdq.weight_grid,
            bias_corrections=built.corrections,
            chosen=choice.label(),
            measured=measured,
            held_out=(sum(len(_fold_samples(len(self.data), folds, f))
                          for f in _scored_folds(len(self.data), folds)) if measured else 0),
            scored_folds=len(_scored_folds(len(self.data), folds)) if measured else 0,
            open_choices=self.open_choices(),
        )

    def _sensitivity(self, built: Built) -> list[sensitivity.UnitSensitivity]:
        """Quantize one node unit at a time and rank the units (--sensitivity)."""
        plan = plan_quantization(built.prepared.graph, built.skip,
                                 built.calibration.float_tensors, built.float_nodes)
        samples = [sample for _, sample in zip(range(sensitivity.MAX_SAMPLES), self.data,
                                                strict=False)]
        ranking = sensitivity.rank_units(
            built.prepared, plan, lambda sub: self.qdq_pass(sub, built.ranges), samples,
            self.settings.threads, self._step(len(plan.units), "sensitivity"))
        if self.settings.debug_dir is not None:
            sensitivity.write(self.settings.debug_dir, ranking)
        return ranking


class _Scorer:
    """Scores choices fold by fold: each is built from the other folds' statistics and its
    outputs compared with the float model's on the fold's samples; the error is pooled over
    the folds scored so far."""

    def __init__(self, pt: PostTraining, float_model: ir.Model, tensors: list[str],
                 statistics: Statistics, folds: int, scored: tuple[int, ...],
                 references: dict[str, dict[int, np.ndarray]]) -> None:
        self.pt, self.float_model, self.tensors = pt, float_model, tensors
        self.references = references
        self.samples = {f: _fold_samples(len(pt.data), folds, f) for f in scored}
        self.held = {f: pt.data.subset(indices) for f, indices in self.samples.items()}
        self.views = {f: statistics.view(without=f) for f in scored}
        self.migrations: dict = {}
        self.weights: dict = {}
        # choice -> fold -> (noise, signal) per output
        self.sums: dict[Choice, dict[int, tuple[dict[str, float], dict[str, float]]]] = {}

    def add(self, choice: Choice, fold: int) -> None:
        noise = dict.fromkeys(self.references, 0.0)
        signal = dict.fromkeys(self.references, 0.0)
        built = self.pt.build(self.float_model, choice, self.views[fold], self.tensors, True,
                              migrations=self.migrations, weights=self.weights)
        _output_error(_lean(built.model), self.held[fold], self.samples[fold],
                      self.references, self.pt.settings.threads, noise, signal)
        self.sums.setdefault(choice, {})[fold] = (noise, signal)

    def error(self, choice: Choice, folds: Iterable[int] | None = None) -> float:
        """The error pooled over `folds` (every fold `choice` was scored on: None)."""
        scored = self.sums[choice]
        chosen = [f for f in (scored if folds is None else folds) if f in scored]
        noise = {n: sum(scored[f][0][n] for f in chosen) for n in self.references}
        signal = {n: sum(scored[f][1][n] for f in chosen) for n in self.references}
        return _mean_ratio(noise, signal)

    def measured(self, start: Choice) -> list[Measured]:
        """Every choice scored, in the order first scored, described by how it differs
        from `start`."""
        return [Measured(_difference(start, choice), choice.label(), self.error(choice),
                         len(folds)) for choice, folds in self.sums.items()]


def _difference(start: Choice, choice: Choice) -> str:
    parts = [f"range method {choice.method}"]
    if choice.bias_correction:
        parts.append("bias correction")
    if choice.equalize != start.equalize:
        parts.append(f"equalization {'on' if choice.equalize else 'off'}")
    if choice.smooth_quant != start.smooth_quant:
        parts.append(f"SmoothQuant {'on' if choice.smooth_quant else 'off'}")
    if choice.float_outputs:
        parts.append("model outputs float")
    return " + ".join(parts)


def _folds(samples: int) -> int:
    """How many folds the calibration samples are dealt into; 0 when there are too few to
    hold any out."""
    return 0 if samples < 2 else min(FOLDS, samples)


def _scored_folds(samples: int, folds: int) -> tuple[int, ...]:
    """The folds choices are scored on, the largest first: every fold for tiny sets, two
    for small ones, one for the rest."""
    if samples < TINY:
        return tuple(range(folds))
    if samples < CROSS_VALIDATE:
        return (0, 2)
    return (0,)


def _fold_samples(samples: int, folds: int, fold: int) -> list[int]:
    """The indices of the samples of `fold` that are scored (at most MAX_HELD_OUT)."""
    return [i for i in range(samples) if i % folds == fold][:MAX_HELD_OUT]


def _mean_ratio(noise: dict[str, float], signal: dict[str, float]) -> float:
    """Mean over outputs of their pooled noise-to-signal ratio."""
    ratios = [noise[n] / signal[n] if signal[n] else (0.0 if not noise[n] else math.inf)
              for n in noise]
    error = float(np.mean(ratios)) if ratios else 0.0
    return error if math.isfinite(error) else math.inf


def _lean(model: ir.Model) -> ir.Model:
    """`model` without the types and shapes of its intermediate values, which onnxruntime
    infers again: serializing them is most of the cost of scoring a throwaway build."""
    outputs = set(model.graph.outputs)
    for node in model.graph:
        for value in node.outputs:
            if value not in outputs:
                value.type, value.shape = None, None
    return model


def _output_error(model: ir.Model, samples: CalibrationSet, indices: list[int],
                  references: dict[str, dict[int, np.ndarray]], threads: int,
                  noise: dict[str, float], signal: dict[str, float]) -> None:
    """Add the squared error of each float output on `samples` (sample indices `indices`)
    against the float model's, and the float output's power, to `noise` and `signal`.
    Pooled over samples, so a sample whose output is near zero cannot dominate."""
    try:  # as it will be deployed: onnxruntime's default graph optimizations
        session = runtime.Session(model, threads, label="scoring")
    except PtqError:
        session = runtime.Session(model, threads, label="scoring", own_graph=True)
    for index, sample in zip(indices, samples, strict=True):
        got = session.run(sample, list(references), f"held-out sample {index}")
        for name, values in references.items():
            reference = values[index].astype(np.float64)
            noise[name] += float(np.square(got[name].astype(np.float64) - reference).sum())
            signal[name] += float(np.square(reference).sum())
