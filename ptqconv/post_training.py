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

import contextlib
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from ptqconv import encodings, modelio, qparams, runtime
from ptqconv import target as target_module
from ptqconv.calibrate.collector import collect
from ptqconv.calibrate.dataset import CalibrationSet
from ptqconv.calibrate.exposure import per_execution
from ptqconv.calibrate.observers import histogram_values
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
    TensorShape,
    folded,
)
from ptqconv.debug import layer_report, sensitivity
from ptqconv.errors import PtqError
from ptqconv.evaluate import held_out
from ptqconv.evaluate.held_out import SampleErrors
from ptqconv.evaluate.metrics import squared_error
from ptqconv.graph.naming import node_key
from ptqconv.graph.ops import data_dependent_outputs, in_skip
from ptqconv.graph.weight_slots import recurrent_weight_slots, weight_slot
from ptqconv.imported import Imported, resolve, saturating
from ptqconv.passes import bias_correction, gptq, residual_sum
from ptqconv.passes.bias_correction import Correction, apply_shifts, expected_shifts
from ptqconv.passes.body_plan import (
    body_macs,
    every_plan,
    integer_kernels,
    plan_model,
    unfused,
)
from ptqconv.passes.calibrated import MigrationPass, MigrationResult
from ptqconv.passes.equalize import EqualizePass
from ptqconv.passes.float_hard_swish import FloatHardSwishPass
from ptqconv.passes.fold_affine import FoldAffinePass
from ptqconv.passes.fold_casts import FoldInitializerCastsPass
from ptqconv.passes.gather_quant import GatherQuantConfig, GatherQuantPass
from ptqconv.passes.gemm_sum import SplitGemmSumPass
from ptqconv.passes.generated_names import PrefixGeneratedNamesPass
from ptqconv.passes.hard_swish import HardSwishPass
from ptqconv.passes.integer_activations import IntegerActivationsPass
from ptqconv.passes.latency_plan import LatencyPlan, cuts, plan_latency, product_share
from ptqconv.passes.qdq import QDQPass, QDQResult, weight_grid_for
from ptqconv.passes.qdq_plan import (
    WEIGHT_OPS,
    QuantPlan,
    activation_products,
    output_units,
    plan_quantization,
)
from ptqconv.passes.residual_sum import ResidualSum, ResidualSumPass
from ptqconv.passes.shared_body_weights import ShareBodyWeightsPass
from ptqconv.passes.smooth_quant import SmoothQuantPass, smoothing_nodes
from ptqconv.passes.spatial_mean import SpatialMeanPass
from ptqconv.passes.unique_names import UniqueNamesPass
from ptqconv.passes.unused_smoothing import UnusedSmoothingPass
from ptqconv.passes.weight_quant import WeightRecord
from ptqconv.qparams import Range
from ptqconv.report import (
    BodySummary,
    ImportSummary,
    Measured,
    Migration,
    PostTrainingSummary,
)
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
# Output noise-to-signal ratios closer than this are a tie (output cosines within 5e-6): the
# held-out samples cannot tell such choices apart (docs/decisions.md, AUTO ties).
TIE = 1e-5
# AUTO tries attention's MatMuls of two activations in float only where they do at most
# this share of the GEMM work (docs/decisions.md, activation MatMuls float).
MAX_PRODUCT_SHARE = 0.15
# Keeping an unfused body weight op float can leave a neighbour without its integer reader.
MAX_FUSION_ROUNDS = 3
SHAPE = Statistic(TensorShape)


@dataclass(frozen=True)
class Choice:
    """What one quantized model is built with."""

    method: str
    bias_correction: bool
    equalize: bool
    smooth_quant: bool
    float_outputs: bool = False  # the elementwise units that write model outputs stay float
    float_products: bool = False  # the MatMuls of two activations (attention) stay float
    float_units: frozenset[str] = frozenset()  # node keys kept float to meet an accuracy target

    def label(self, applied: frozenset[str] | None = None) -> str:
        """The method and the techniques on; with `applied`, the migrations among them only
        where they changed the model (by `MigrationPass.technique`)."""
        def shown(technique: str, flag: bool) -> bool:
            return flag and (applied is None or technique in applied)

        switches = [name for name, on in (("bias correction", self.bias_correction),
                                          ("equalization", shown("equalization", self.equalize)),
                                          ("SmoothQuant",
                                           shown("SmoothQuant", self.smooth_quant)),
                                          ("float outputs", self.float_outputs),
                                          ("activation MatMuls float", self.float_products))
                    if on]
        if self.float_units:
            switches.append(f"{len(self.float_units)} units float")
        return " + ".join([self.method, *switches])

    def float_nodes(self, graph: ir.Graph) -> frozenset[ir.Node]:
        """The nodes of `graph` this choice keeps float."""
        found = set(output_units(graph)) if self.float_outputs else set()
        found |= activation_products(graph) if self.float_products else set()
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
    choice: Choice
    imported: Imported | None = None  # the grids an encodings file fixed
    tables: list[WeightRecord] = field(default_factory=list)  # embedding tables


def weight_bytes(model: ir.Model, op_types: frozenset[str]) -> int:
    """Bytes of the constant weights of `model`'s `op_types` nodes (main graph)."""
    return sum(v.const_value.nbytes for node in model.graph
               if node.op_type in op_types and (slot := weight_slot(node)) is not None
               and (v := node.inputs[slot.index]).const_value is not None)


@dataclass(frozen=True)
class Probed:
    """A wholly float plan's all-integer model timed against the float models before AUTO
    scored candidates for it: what it ran slower than ("" when not) and the timing."""

    slower: str
    timed: runtime.Latency


class PostTraining:
    """One PostTraining conversion with `settings` on the calibration samples `data`."""

    def __init__(self, settings: PostTrainingSettings, data: CalibrationSet,
                 progress: ProgressFactory | None = None) -> None:
        self.settings, self.data, self.progress = settings, data, progress
        self.skip = frozenset(settings.skip)
        self.min_max: frozenset[str] = frozenset()  # body tensors seen only as [min, max]
        self.unfused: frozenset[str] = frozenset()  # body weight ops onnxruntime did not fuse
        self.macs: dict[str, int] = {}  # multiply-adds of body weight ops (the body gate)
        self.file = settings.encodings_in
        # What the file fixes in the float model: those tensors are not observed, and scale
        # migrations leave alone what they would change (not for a file ptqconv wrote, whose
        # grids were made after the migrations its choices replay).
        self.fixed: frozenset[str] = frozenset()
        # Units kept float for speed (passes/latency_plan.py), planned once from the shapes
        # calibration saw; None: latency_aware=false.
        self.latency: LatencyPlan | None = None
        self.latency_units: frozenset[str] = frozenset()
        # The plan keeps every unit float (and is checked): AUTO then chooses among
        # all-integer candidates, which the latency check writes unless the float plan runs
        # faster (conversion._check_plan).
        self.plan_float = False
        # Set by the conversion where AUTO's candidates would only be all-integer models:
        # given the float model and what builds the plan's and the start choice's all-integer
        # model, times them before any candidate is scored (None: not timed).
        self.probe: Callable[[ir.Model, Callable[[], tuple[ir.Model, ir.Model]]],
                             Probed | None] | None = None
        # What the probe found; all-integer slower: the float plan is settled, unscored.
        self.probed: Probed | None = None
        # Weights GPTQ rounded for the chosen model, by name: every later build uses them.
        self.integers: dict[str, IntegerWeight] | None = None
        # AUTO's held-out samples and float outputs, kept to score a later candidate alike:
        # (references by output and sample, sample indices by fold, the folds' samples).
        self.scoring: tuple[dict, dict, dict] | None = None
        # held_out_errors by model: the latency and dynamic checks may both score the model
        # written (a scoring of BERT-base takes about 4 s).
        self._held_out: weakref.WeakKeyDictionary[ir.Model, list[SampleErrors]] = (
            weakref.WeakKeyDictionary())
        # The chosen candidate's errors on the held-out samples, per scored fold (None:
        # AUTO scored nothing).
        self.chosen_errors: list[SampleErrors] | None = None
        # Measured once per run (`residual_sum.measure`); None: nothing to measure.
        self.residual_sum: ResidualSum | None = None

    def _step(self, total: int, label: str) -> Callable[[int], None] | None:
        return self.progress(total, label) if self.progress else None

    def load_float(self, source: Path, original_names: set[str],
                   input_bytes: int | None = None) -> ir.Model:
        """The simplified float model at `source`, ready to plan: onnxruntime's generated
        names prefixed (`original_names` are the user's), every value name unique across
        control-flow bodies, initializer Casts folded, Gemms that add a computed tensor split
        again, only the opsets used, at least the opset QDQ needs, nothing unread. Identical
        body weights are held once when the simplification made the model bigger than the
        user's `input_bytes` (docs/decisions.md, shared body weights)."""
        model = modelio.load_model(source, check=False)  # onnxruntime's output of a checked one
        grew = (input_bytes is not None and next(model.graph.subgraphs(), None) is not None
                and modelio.files_size(modelio.model_files(source, model)) > input_bytes)
        ir.passes.Sequential(
            PrefixGeneratedNamesPass(original_names),
            UniqueNamesPass(),
            *([ShareBodyWeightsPass()] if grew else []),
            FoldInitializerCastsPass(),
            SplitGemmSumPass(),
            # onnxruntime's simplification declares every domain it knows; keep the used ones.
            common_passes.RemoveUnusedOpsetsPass(),
        )(model)
        model = modelio.ensure_opset(model, QDQ_MIN_OPSET, source.parent)
        # Constants the folds (and onnxruntime's simplification) left unread: onnxruntime
        # warns about each one on every load of the output.
        ir.passes.Sequential(FoldAffinePass(), HardSwishPass(), SpatialMeanPass(),
                             common_passes.RemoveUnusedNodesPass())(model)
        return model

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
                lambda conv: weight_grid_for(conv, s.bit_num, s.reduce_range,
                                             s.shallow_convs_8bit).qmax))
        if choice.smooth_quant:
            found.append(SmoothQuantPass(
                self.skip, levels, qparams.fused_weight_grid(s.bit_num, s.reduce_range).qmax))
        return found

    def qdq_pass(self, plan: QuantPlan, ranges: dict[str, Range], **options: Any) -> QDQPass:
        s = self.settings
        return QDQPass(plan, ranges, s.bit_num, per_channel=s.per_channel,
                       reduce_range=s.reduce_range, act_bits=s.activation_bits,
                       shallow_8bit=s.shallow_convs_8bit, **options)

    def quantize(self, model: ir.Model, plan: QuantPlan, ranges: dict[str, Range],
                 originals: Mapping[str, ir.Value], **options: Any) -> QDQResult:
        """Q/DQ by `plan`; SmoothQuant undone where no reader got quantized, the MatMuls
        given back their weights from `originals` (`smoothing_undone`); then the activations
        onnxruntime has no integer kernel for in the integer forms it fuses (counted in the
        result's `integer_activations`), and float hard-swishes after a DequantizeLinear as
        HardSwish (`float_hard_swish`)."""
        qdq: QDQResult = self.qdq_pass(plan, ranges, **options)(model)
        qdq.smoothing_undone = UnusedSmoothingPass(originals)(model).undone
        activations = IntegerActivationsPass(qparams.activation_grid(
            self.settings.activation_bits))(model)
        qdq.integer_activations.update(activations.rewritten)
        qdq.float_hard_swish = FloatHardSwishPass()(model).rewritten
        if self.residual_sum is not None and self.residual_sum.applied:
            ResidualSumPass()(model)
        return qdq

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
        method = self._range_method(float_model, choice.method, shared)
        calibration = activation_ranges(statistics, method, tensors, s.activation_bits)
        key = (id(statistics), choice.equalize, choice.smooth_quant, calibration.float_tensors)
        if migrations is not None and key in migrations:
            prepared, migrated = migrations[key]
        else:
            prepared = float_model.clone()  # what every later step starts again from
            migrated = [m.calibrated(statistics, calibration.float_tensors, self.fixed)(prepared)
                        for m in self.migrations(choice)]
            # The migrations read the mapped float weights and made scaled copies of some;
            # unmapped, the originals stop counting while the copies are quantized.
            modelio.unmap_weights(float_model)
            modelio.unmap_weights(prepared)
            if migrations is not None:
                migrations[key] = (prepared, migrated)
        model = prepared.clone()
        ranges = dict(calibration.ranges)
        for result in migrated:
            ranges.update(result.ranges)
        float_tensors = calibration.float_tensors
        imported = resolve(self.file, prepared.graph, s.per_channel) if self.file else None
        fixed: dict[str, qparams.Encoding] = {}
        if imported is not None:
            ranges.update(imported.ranges)
            float_tensors |= imported.float_tensors
            fixed = imported.grids
            choice = replace(choice, float_units=choice.float_units | imported.float_ops)
        # SmoothQuant's Mul nodes stay float: quantizing their input would undo the smoothing.
        skip = self.skip | smoothing_nodes(model.graph)
        plan = plan_model(model.graph, skip, float_tensors, choice.float_nodes(model.graph),
                          self.unfused, self.macs, self.latency_units)
        debug = s.debug_dir is not None
        originals = float_model.graph.initializers
        qdq = self.quantize(model, plan, ranges, originals,
                            keep_weight_errors=choice.bias_correction,
                            keep_weights=debug, weights=weights, fixed=fixed,
                            integer_weights=self.integers)
        corrections = None
        if choice.bias_correction and qdq.weight_errors:
            divided = {name: d for result in migrated for name, d in result.divided.items()}
            shifts = expected_shifts(qdq.weight_errors, statistics, divided)
            del qdq, model  # the weight errors are as big as the weights: gone before the rebuild
            # Corrected float biases are then quantized by the same pass as any other bias.
            model = prepared.clone()
            corrections = apply_shifts(model.graph, shifts)
            plan = plan_model(model.graph, skip, float_tensors,
                              choice.float_nodes(model.graph), self.unfused, self.macs,
                              self.latency_units)
            qdq = self.quantize(model, plan, ranges, originals, keep_weights=debug,
                                weights=weights,
                                fixed=fixed, integer_weights=self.integers)
        tables = []
        if s.embedding_quant:
            kept = {n.name for n in choice.float_nodes(model.graph) if n.name}
            tables = GatherQuantPass(GatherQuantConfig(
                qparams.fused_weight_grid(8, reduce_range=False), skip=self.skip | kept,
                per_row=True))(model).records
        return Built(model, qdq, plan, ranges, calibration, migrated, corrections, prepared,
                     skip, choice.float_nodes(prepared.graph), choice, imported, tables)

    def _range_method(self, model: ir.Model, method: str, shared: bool = False) -> RangeMethod:
        return RangeMethod(method, frozenset(v.name for v in model.graph.inputs), shared,
                           self.min_max, self.histogram_values)

    @property
    def histogram_values(self) -> int:
        """What KL / MSE histograms bin of each sample of a tensor (0: every value)."""
        return histogram_values(len(self.data)) if self.settings.histogram_sampling else 0

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

    def replayed(self, model: ir.Model) -> Choice | None:
        """The choice recorded in an encodings file ptqconv wrote, under what the settings
        force: its grids were made with those migrations and that bias correction, so they
        are rebuilt (and not measured again)."""
        recorded = self.file.choices if self.file is not None else None
        if recorded is None:
            return None
        s, start = self.settings, self.start()

        def pick(name: str, forced: Any, default: Any) -> Any:
            return forced if forced is not None else recorded.get(name, default)

        keys = resolve(self.file, model.graph).float_units
        return Choice(
            method=s.method if s.method != AUTO else str(recorded.get("method", start.method)),
            bias_correction=bool(pick("bias_correction", s.bias_correction, False)),
            equalize=bool(pick("equalize", s.equalize, start.equalize)),
            smooth_quant=bool(pick("smooth_quant", s.smooth_quant, start.smooth_quant)),
            float_outputs=bool(recorded.get("float_outputs", False)),
            float_products=bool(recorded.get("float_products", False)),
            float_units=keys)

    def encodings(self, built: Built) -> dict[str, Any]:
        """The encodings document of `built`'s model (--encodingsFile), recording the choice
        it was built with so that importing it rebuilds the same model."""
        s, choice = self.settings, built.choice
        names = {node_key(n): n.name or node_key(n) for n in built.prepared.graph}
        schemes = {"MAX_MIN": "post_training_tf", "REMOVAL_OUTLIER": "post_training_percentile"}
        args = {"activation_bitwidth": s.activation_bits, "dtype": "int",
                "is_symmetric": "True", "param_bitwidth": s.bit_num,
                "per_channel_quantization": str(s.per_channel),
                "quant_scheme": schemes.get(choice.method, "post_training_tf_enhanced"),
                encodings.CHOICES_KEY: {
                    "method": choice.method, "bias_correction": choice.bias_correction,
                    "equalize": choice.equalize, "smooth_quant": choice.smooth_quant,
                    "float_outputs": choice.float_outputs,
                    "float_products": choice.float_products,
                    # The weights written: GPTQ's where it was chosen and kept.
                    "quant_strategy": "GPTQ" if self.integers else "MAX_MIN"}}
        return encodings.document(built.qdq.activation_encodings, built.qdq.param_encodings,
                                  # What the latency plan kept float too: an import that
                                  # calibrates nothing has no shapes to plan from.
                                  sorted(names.get(k, k) for k in
                                         choice.float_units | self.latency_units), args)

    def run(self, source: Path, original_names: set[str], input_bytes: int | None = None
            ) -> tuple[Built, PostTrainingSummary]:
        """The quantized model, how it was built, and what was done (`input_bytes`: the
        user's model files, which the float model is not to outgrow)."""
        s = self.settings
        model = self.load_float(source, original_names, input_bytes)
        self.residual_sum = residual_sum.measure(model, s.target)
        self.min_max = per_execution(model)
        self.macs = body_macs(model, self.data.shapes)
        fixed = (resolve(self.file, model.graph, s.per_channel).names if self.file
                 else frozenset())
        replay = self.replayed(model)
        self.fixed = fixed if replay is None else frozenset()
        plan = plan_model(model.graph, self.skip, macs=self.macs)
        # Shared tensors are observed too: the plan after the migrations may need their ranges.
        tensors = list(dict.fromkeys(t for _, p in every_plan(plan, model.graph)
                                     for t in (*p.observe, *p.shared) if t not in fixed))
        choice = replay or self.start()
        measured: list[Measured] = []
        folds = _folds(len(self.data))
        shared = bool(self.open_choices() and folds)
        if shared:
            statistics = self._collect_folds(model, choice, tensors, folds)
            self._plan_latency(plan, statistics, tensors)
            self.plan_float = self._plan_float(model)
            if replay is None and self.plan_float and self.probe is not None:
                self.probed = self._probe(model, choice, statistics.view(), tensors)
            if replay is None and (self.integer_open or self._has_units(model)):
                with self._every_unit(self.plan_float):
                    choice, measured = self.decide(model, choice, tensors, statistics, folds)
            statistics = statistics.view()
        else:
            points = self._range_method(model, choice.method).points(tensors)
            for migration in self.migrations(choice):
                points += migration.statistic_points(model)
            if choice.bias_correction:
                points += bias_correction.statistic_points(model.graph)
            points += self._shape_points(tensors)
            statistics = collect(model, points, self.data, s.threads,
                                 self._step(len(self.data), f"calibrating ({s.method})"))
            self._plan_latency(plan, statistics, tensors)
            self.plan_float = self._plan_float(model)

        def rebuild() -> Built:
            return self.build(model, choice, statistics, tensors, shared)

        solved = None
        strategy = s.quant_strategy
        if replay is not None and s.strategy_default:  # what the replayed file's model had
            assert self.file is not None and self.file.choices is not None
            strategy = str(self.file.choices.get("quant_strategy", strategy))
        if strategy == "GPTQ":
            # The choice was measured with nearest weights; GPTQ rounds the chosen model's
            # (all-integer's where the plan keeps every unit float: the model checked after).
            with self._every_unit(self.integer_open):
                solved = self.gptq(rebuild())
            self.integers = solved.integers
        built, kernels = self._fused_build(rebuild)
        # ptqconv's choice of GPTQ, not the config's, is kept where the held-out samples
        # score it below the chosen candidate's nearest weights. Its own figure is in-sample
        # (GPTQ saw those samples), so it is refused only when plainly worse (docs/decisions.md,
        # GPTQ by default).
        nearest_error = next((m.error for m in measured if m.choice == choice.label()), None)
        errors: tuple[float, float] | None = None
        if solved is not None and s.strategy_default and nearest_error is not None \
                and replay is None:
            scored = built
            if self.plan_float:
                with self._every_unit():
                    scored, _ = self._fused_build(rebuild)
            gptq_error = self.held_out_error(scored.model)
            del scored
            assert gptq_error is not None
            errors = (gptq_error, nearest_error)
            if gptq_error > nearest_error:
                self.integers = None
                built, kernels = self._fused_build(rebuild)
        # What a later rebuild with some units float (an accuracy target) starts from.
        self._rebuild = (model, choice, statistics, tensors, shared, built)
        summary = self._summary(built, choice, measured, folds)
        if solved is not None:
            summary.gptq = replace(solved.summary(), by_default=s.strategy_default,
                                   errors=errors, kept=self.integers is not None)
        summary.bodies = _body_summaries(built, kernels)
        summary.unobserved = built.calibration.unobserved
        summary.min_max_only = len(self.min_max & set(tensors))
        if self.file is not None and built.imported is not None:
            summary.imported = self._import_summary(built, replay is not None)
        return built, replace(summary, **self._diagnostics(built))

    def _diagnostics(self, built: Built) -> dict[str, Any]:
        """The per-layer report (--debugDir) and the sensitivity ranking (--sensitivity) of
        `built`, as summary fields (none asked: none)."""
        s = self.settings
        fields: dict[str, Any] = {}
        if s.debug_dir is not None:
            stats = layer_report.activation_report(
                built.prepared, built.qdq, self.data, s.threads,
                self._step(len(self.data), "layer report"))
            stats += layer_report.weight_report(built.qdq)
            report = layer_report.build(s.debug_dir, stats)
            # SmoothQuant's Mul is ptqconv's node, no name to skip: its readers are.
            smoothers = smoothing_nodes(built.prepared.graph)
            readers = {n.name: sorted(u.name for v in n.outputs for u, _ in v.uses() if u.name)
                       for n in built.prepared.graph if n.name in smoothers}
            fields["layer_report"] = replace(report, suggested_skip=sorted(
                {r for name in report.suggested_skip for r in readers.get(name) or [name]}))
        if s.sensitivity:
            fields["sensitivity"] = self._sensitivity(built)
        return fields

    def ranking(self) -> list[sensitivity.UnitSensitivity]:
        """The units of the model `run` made, most harmful first (each quantized alone)."""
        return self._sensitivity(self._rebuild[-1])

    def with_float_units(self, keys: frozenset[str]) -> Built:
        """The model `run` made, rebuilt with the units of node keys `keys` kept float."""
        model, choice, statistics, tensors, shared, _ = self._rebuild
        return self.build(model, replace(choice, float_units=keys), statistics, tensors,
                          shared)

    def gptq(self, built: Built) -> gptq.Solved:
        """GPTQ integers for the weights `built` quantizes, on the grids and axes QDQPass
        gives them, from the second moments of their inputs in the migrated float model."""
        s = self.settings
        plan = plan_quantization(built.prepared.graph, built.skip,
                                 built.calibration.float_tensors, built.float_nodes,
                                 self.latency_units)
        targets = {}
        for planned in plan.weights:
            value = planned.node.inputs[planned.index]
            if value is not None and value.name:
                grid = weight_grid_for(planned.node, s.bit_num, s.reduce_range,
                                       s.shallow_convs_8bit)
                targets[value.name] = WeightLayout(grid, planned.axis if s.per_channel
                                                   else None)
        return gptq.run(built.prepared, targets, self.data, s.threads, self.progress)

    def _fused_build(self, rebuild: Callable[[], Built]
                     ) -> tuple[Built, dict[tuple[str, str], Counter]]:
        """What `rebuild` builds, rebuilt with every body weight op onnxruntime did not fuse
        kept float (its DequantizeLinear would run on every execution of the body), and the
        integer kernels of each body as onnxruntime optimized it."""
        built = rebuild()
        for _ in range(MAX_FUSION_ROUNDS):
            keys = frozenset(node_key(n) for b in built.plan.bodies for n in b.plan.units
                             if n.op_type in WEIGHT_OPS)
            if not keys:
                return built, {}
            optimized = runtime.optimized(built.model, self.settings.threads)
            missed = unfused(optimized, built.qdq.weight_inputs, keys)
            if not missed:
                break
            self.unfused |= missed
            built = rebuild()
        return built, integer_kernels(optimized, built.qdq.renamed)

    # --- measured choices ----------------------------------------------------------------

    def _has_units(self, model: ir.Model) -> bool:
        """Whether anything is left to quantize once the latency plan kept its units float
        (nothing left: no choice to measure)."""
        plan = plan_model(model.graph, self.skip, macs=self.macs,
                          float_units=self.latency_units)
        return any(p.units for _, p in every_plan(plan, model.graph))

    @staticmethod
    def _shape_points(tensors: list[str]) -> list[StatisticPoint]:
        """The shapes of the observed tensors: what the latency planner costs kernels by and
        AUTO sizes attention's share of the work by."""
        return [StatisticPoint(t, SHAPE) for t in tensors]

    def _plan_latency(self, plan: QuantPlan, statistics: Statistics,
                      tensors: list[str]) -> None:
        """Plan once which main-graph units stay float for speed; every candidate built
        after keeps them float."""
        if not self.settings.latency_aware:
            return
        self.latency = plan_latency(plan, _shapes(statistics, tensors))
        self.latency_units = self.latency.keys

    def _collect_folds(self, model: ir.Model, start: Choice, tensors: list[str],
                       folds: int) -> Statistics:
        """One pass serving every candidate: each range method's statistic and each
        migration's, over `folds` folds of the samples, and the float model's outputs on the
        samples choices are scored on."""
        s = self.settings
        inputs = frozenset(v.name for v in model.graph.inputs)
        methods = CANDIDATE_METHODS if s.method == AUTO else (s.method,)
        points = candidate_points(methods, inputs, tensors, folds, self.min_max,
                                  self.histogram_values)
        for migration in self.migrations(replace(start, equalize=True, smooth_quant=True)):
            points += [folded(point, folds) for point in migration.statistic_points(model)]
        if s.bias_correction is not False:
            points += [folded(p, folds) for p in bias_correction.statistic_points(model.graph)]
        scored = _scored_folds(len(self.data), folds)
        points += [StatisticPoint(name, Statistic(FoldValues, (folds, scored, MAX_HELD_OUT)))
                   for name in _scored_outputs(model.graph, inputs)]
        points += self._shape_points(tensors)
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
        self.scoring = (references, scorer.samples, scorer.held)
        open_ = self.open_choices()
        methods = CANDIDATE_METHODS if "method" in open_ else (start.method,)
        correctable = bool(bias_correction.statistic_points(float_model.graph))
        corrections = ((False, True) if "bias_correction" in open_ and correctable
                       else (start.bias_correction,))
        candidates = [replace(start, method=m, bias_correction=b)
                      for m in methods for b in corrections]
        alive = list(candidates)
        step = self._step(len(alive) * 2 + 3 * len(scored), "choosing")
        for fold in scored:
            for choice in alive:
                scorer.add(choice, fold)
                if step:
                    step(1)
            # Not after the last fold: every candidate scored on all folds is weighed by the
            # tie rule below (a sweep's deeplab dropped MAX_MIN within TIE of the best).
            if len(alive) > 2 and fold != scored[-1]:
                ranked = sorted(alive, key=scorer.error)
                # Candidates tied with the best so far are not dropped on noise (a fold whose
                # outputs saturate scores every candidate about 1e-13: ppocr_mobile_v2_cls
                # kept MSE over MAX_MIN on it, 80x the error on the eval split).
                keep = max(2, (len(alive) + 1) // 2)
                alive = [c for i, c in enumerate(ranked)
                         if i < keep or not scorer.beats(ranked[0], c)]
        # A win by less than TIE, or one that a single held-out sample carries, is a tie:
        # prefer the candidate listed first (the simplest method, no bias correction).
        lowest = min(alive, key=scorer.error)
        best = next(c for c in candidates if c in alive and not scorer.beats(lowest, c))
        # Each technique flips the best so far, earlier flips kept included.
        flips = (("equalize", {"equalize": False}), ("smooth_quant", {"smooth_quant": False}),
                 ("float_outputs", {"float_outputs": True}),
                 ("float_products", {"float_products": True}))
        for name, change in flips:
            flipped = replace(best, **change)
            if name == "float_outputs":
                if not output_units(float_model.graph):
                    continue
            elif name == "float_products":
                if not self._light_products(float_model, statistics, tensors):
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
                if scorer.beats(flipped, best):
                    best = flipped
        self.chosen_errors = [scorer.per_sample[best][f] for f in scored]
        return best, scorer.measured(start)

    def _light_products(self, float_model: ir.Model, statistics: Statistics,
                        tensors: list[str]) -> bool:
        """Whether the model has MatMuls of two activations that are quantized (not kept
        float for speed already) and light: at most MAX_PRODUCT_SHARE of the GEMM work, so
        that keeping them float cannot cost much latency."""
        plan = plan_model(float_model.graph, self.skip, macs=self.macs,
                          float_units=self.latency_units)
        products = activation_products(float_model.graph) & set(plan.units)
        if not products:
            return False
        return product_share(plan, _shapes(statistics, tensors),
                             frozenset(products)) <= MAX_PRODUCT_SHARE

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

    def _import_summary(self, built: Built, replayed: bool) -> ImportSummary:
        imported, qdq = built.imported, built.qdq
        assert imported is not None and self.file is not None
        used = qdq.imported
        unused, derived = dict(imported.unused), dict(imported.derived)
        shared = {n: root for _, p in every_plan(built.plan, built.model.graph)
                  for n, root in p.shared.items()}
        for name in (*imported.activations, *imported.weights):
            if name in shared:
                derived[name] = "shares its input's grid"
            elif name not in used:
                unused[name] = "not quantized in this model"
        activations = set(qdq.activation_encodings)
        roots = {n for n in activations if n not in shared}
        return ImportSummary(
            self.file.path, self.file.version,
            activations=sum(1 for n in used if n in imported.activations),
            regridded=sum(1 for n in imported.ranges if n in roots),
            weights=sum(1 for n in used if n in imported.weights),
            float_tensors=len(imported.float_tensors), float_ops=len(imported.float_ops),
            calibrated=len(roots - used - set(imported.ranges) - set(built.plan.fixed)),
            computed=qdq.weights_quantized - sum(1 for n in used if n in imported.weights),
            unused=unused, derived=derived,
            choices=built.choice.label(_applied(built)) if replayed else "",
            saturating=(saturating(imported, built.prepared.graph)
                        if self.settings.target.saturates else 0))

    def latency_planned(self) -> tuple[LatencyPlan, Built] | None:
        """The model `run` made, rebuilt with the units the latency cost model keeps float
        (`run` did not plan: latency_aware off); None when the model keeps none float."""
        latency = plan_latency(*self._costed())
        if not latency.keys:
            return None
        return latency, self._rebuilt(latency)

    def latency_cuts(self, latency: LatencyPlan) -> list[tuple[LatencyPlan, Built]]:
        """`latency_planned`'s plan cut to its first units (`latency_plan.cuts`), each built."""
        plan, shapes = self._costed()
        found = []
        for keep in cuts(latency):
            cut = plan_latency(plan, shapes, keep)
            found.append((cut, self._rebuilt(cut)))
        return found

    def _costed(self) -> tuple[QuantPlan, dict[str, tuple[int, ...]]]:
        """The main graph's plan of `run`'s model and its calibration shapes, as the latency
        cost model takes them."""
        model, _, statistics, tensors, _, _ = self._rebuild
        return plan_model(model.graph, self.skip, macs=self.macs), _shapes(statistics, tensors)

    def all_integer(self) -> tuple[LatencyPlan, Built]:
        """The model `run` made, rebuilt with no unit kept float for speed (`run` planned:
        latency_aware on)."""
        latency = LatencyPlan()
        return latency, self._rebuilt(latency)

    @property
    def integer_open(self) -> bool:
        """Whether the plan keeps every unit float and all-integer may still be written
        (the probe did not find it slower)."""
        return self.plan_float and not (self.probed is not None and self.probed.slower)

    def _probe(self, model: ir.Model, choice: Choice, statistics: Statistics,
               tensors: list[str]) -> Probed | None:
        """The probe's timing of the start choice's all-integer model beside the plan's."""
        assert self.probe is not None

        def build() -> tuple[ir.Model, ir.Model]:
            plan, _ = self._fused_build(lambda: self.build(model, choice, statistics, tensors,
                                                           True))
            with self._every_unit():
                integer, _ = self._fused_build(lambda: self.build(model, choice, statistics,
                                                                  tensors, True))
            return plan.model, integer.model

        return self.probe(model, build)

    def _plan_float(self, model: ir.Model) -> bool:
        """Whether the latency plan keeps every unit float and the latency check will time
        all-integer against it on this machine."""
        return (self.settings.latency_check and bool(self.latency_units)
                and not self._has_units(model))

    @contextlib.contextmanager
    def _every_unit(self, active: bool = True) -> Iterator[None]:
        """Within: builds keep no unit float for speed (`active`), as all-integer does."""
        kept = self.latency, self.latency_units
        if active:
            self.latency, self.latency_units = LatencyPlan(), frozenset()
        try:
            yield
        finally:
            self.latency, self.latency_units = kept

    def _rebuilt(self, latency: LatencyPlan) -> Built:
        """`run`'s model and choice built with `latency`'s units float; the plan `run` used
        stays in force for later rebuilds unless `adopt` replaces it."""
        model, choice, statistics, tensors, shared, _ = self._rebuild
        kept = self.latency, self.latency_units
        self.latency, self.latency_units = latency, latency.keys
        try:
            built, _ = self._fused_build(lambda: self.build(
                model, choice, statistics, tensors, shared))
        finally:
            self.latency, self.latency_units = kept
        return built

    def adopt(self, latency: LatencyPlan, built: Built,
              summary: PostTrainingSummary) -> PostTrainingSummary:
        """Keep `latency_planned`'s model: later rebuilds start from it, and `summary` (of
        `run`) describes it."""
        self.latency, self.latency_units = latency, latency.keys
        self._rebuild = (*self._rebuild[:5], built)
        # The per-layer report and the ranking describe the model written: this one now.
        return replace(summary, **self._built_fields(built), **self._diagnostics(built),
                       latency_plan=latency)

    def float_weight_bytes(self, op_types: frozenset[str]) -> int:
        """Bytes of the constant weights of the float model's `op_types` nodes (main graph)."""
        return weight_bytes(self._rebuild[0], op_types)

    def held_out_errors(self, model: ir.Model) -> list[SampleErrors] | None:
        """`model`'s output errors on the samples AUTO scored its candidates on, per scored
        fold, as the candidates' (None: AUTO scored nothing). The model written was
        calibrated on them too, so its own figures are, if anything, flattering."""
        if self.scoring is None:
            return None
        if model not in self._held_out:
            references, samples, held = self.scoring
            self._held_out[model] = [
                _output_error(model, held[fold], indices, references, self.settings.threads)
                for fold, indices in samples.items()]
        return self._held_out[model]

    def held_out_error(self, model: ir.Model) -> float | None:
        """held_out_errors pooled as the candidates' errors are (None: AUTO scored
        nothing)."""
        errors = self.held_out_errors(model)
        return None if errors is None else held_out.pooled(errors)

    def describe(self, built: Built, summary: PostTrainingSummary) -> PostTrainingSummary:
        """`summary` (of `run`) with the figures of `built` (a rebuild: the accuracy-target
        repair's), so that it describes the model written."""
        return replace(summary, repaired=True, **self._built_fields(built))

    def _built_fields(self, built: Built) -> dict[str, Any]:
        """The summary's figures that describe one built model."""
        return dict(
            histogram_sampled=built.calibration.sampled,
            units=len(built.plan.units),
            skipped=sorted(n.name or n.op_type for n in built.plan.skipped
                           if in_skip(n, self.skip)),
            kl_refused=built.calibration.kl_refused,
            migrations=[Migration(r.technique, r.migrated, r.left_alone)
                        for r in built.migrations],
            sentinels=built.calibration.sentinels,
            activation_ranges=built.qdq.activation_ranges,
            quantize_nodes=built.qdq.quantize_nodes,
            weights_quantized=built.qdq.weights_quantized,
            shallow_8bit=built.qdq.shallow_8bit,
            bias_widened=built.qdq.bias_widened,
            weight_grid=built.qdq.weight_grid,
            embedding_tables=[r for r in built.tables if r.quantized],
            bias_corrections=built.corrections,
            integer_activations=dict(built.qdq.integer_activations),
            float_hard_swish=built.qdq.float_hard_swish,
            smoothing_undone=len(built.qdq.smoothing_undone),
            recurrent_float=sum(len(recurrent_weight_slots(node)) for node
                                in ir.traversal.RecursiveGraphIterator(built.model.graph)),
        )

    def _summary(self, built: Built, choice: Choice, measured: list[Measured],
                 folds: int) -> PostTrainingSummary:
        s = self.settings
        return PostTrainingSummary(
            tie=TIE,
            method=choice.method,
            samples=len(self.data),
            bit_num=s.bit_num,
            activation_bits=s.activation_bits,
            per_channel=s.per_channel,
            target=s.target,
            host_saturates=target_module.detect().saturates,
            histogram_values=self.histogram_values,
            reduce_range=s.reduce_range,
            residual_sum=self.residual_sum,
            latency_plan=self.latency,
            **self._built_fields(built),
            chosen=choice.label(),
            chosen_shown=choice.label(_applied(built)),
            measured=measured,
            held_out=(sum(len(_fold_samples(len(self.data), folds, f))
                          for f in _scored_folds(len(self.data), folds)) if measured else 0),
            scored_folds=len(_scored_folds(len(self.data), folds)) if measured else 0,
            open_choices=self.open_choices(),
        )

    def _sensitivity(self, built: Built) -> list[sensitivity.UnitSensitivity]:
        """Quantize one node unit at a time and rank the units (--sensitivity)."""
        plan = plan_quantization(built.prepared.graph, built.skip,
                                 built.calibration.float_tensors, built.float_nodes,
                                 self.latency_units)
        samples = [sample for _, sample in zip(range(sensitivity.MAX_SAMPLES), self.data,
                                                strict=False)]
        return sensitivity.rank_units(
            built.prepared, plan, lambda sub: self.qdq_pass(sub, built.ranges), samples,
            self.settings.threads, self._step(len(plan.units), "sensitivity"))


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
        # choice -> fold -> its errors on each of the fold's samples
        self.per_sample: dict[Choice, dict[int, SampleErrors]] = {}

    def add(self, choice: Choice, fold: int) -> None:
        built = self.pt.build(self.float_model, choice, self.views[fold], self.tensors, True,
                              migrations=self.migrations, weights=self.weights)
        self.per_sample.setdefault(choice, {})[fold] = _output_error(
            _lean(built.model), self.held[fold], self.samples[fold], self.references,
            self.pt.settings.threads)

    def error(self, choice: Choice, folds: Iterable[int] | None = None) -> float:
        """The error pooled over `folds` (every fold `choice` was scored on: None)."""
        scored = self.per_sample[choice]
        return held_out.pooled([scored[f] for f in (scored if folds is None else folds)
                                if f in scored])

    def beats(self, a: Choice, b: Choice) -> bool:
        """Whether `a` has less error than `b` beyond TIE on the folds both were scored on,
        with any one held-out sample left out too (held_out.beats)."""
        common = [f for f in self.per_sample[a] if f in self.per_sample[b]]
        return held_out.beats([self.per_sample[a][f] for f in common],
                              [self.per_sample[b][f] for f in common], TIE)

    def measured(self, start: Choice) -> list[Measured]:
        """Every choice scored, in the order first scored, described by how it differs
        from `start`."""
        return [Measured(_difference(start, choice), choice.label(), self.error(choice),
                         len(folds)) for choice, folds in self.per_sample.items()]


def _scored_outputs(graph: ir.Graph, inputs: frozenset[str]) -> list[str]:
    """The outputs AUTO scores candidates on: what a NonMaxSuppression kept (or TopK picked)
    changes order and number with any rounding, so the outputs before such an op where the
    model has any, else all of them."""
    outputs = [v.name for v in graph.outputs if v.name not in inputs]
    dependent = data_dependent_outputs(graph)
    return [n for n in outputs if n not in dependent] or outputs


def _applied(built: Built) -> frozenset[str]:
    """The migrations that changed `built`'s model (the others are left out of labels)."""
    return frozenset(r.technique for r in built.migrations if r.migrated)


def _body_summaries(built: Built, kernels: dict[tuple[str, str], Counter]
                    ) -> list[BodySummary]:
    """What each control-flow body got, and why what stayed float did."""
    found = []
    for body_plan in built.plan.bodies:
        body = body_plan.body
        names = {node_key(n): f"{n.op_type} {n.name or node_key(n)}" for n in body.graph}
        found.append(BodySummary(
            body.label, len(body_plan.plan.units),
            sum(1 for n in body_plan.plan.units if n.op_type in WEIGHT_OPS),
            dict(sorted(kernels.get((node_key(body.node), body.attribute), Counter()).items())),
            {names.get(k, k): why for k, why in body_plan.kept_float.items()},
            body_plan.reason))
    return found


def _shapes(statistics: Statistics, tensors: list[str]) -> dict[str, tuple[int, ...]]:
    """The largest shape each of `tensors` took in calibration, where seen."""
    return {t: found.shape for t in tensors
            if (found := statistics.get(t, SHAPE)) is not None and found.shape is not None}


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
    if choice.float_products:
        parts.append("activation MatMuls float")
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
                  references: dict[str, dict[int, np.ndarray]], threads: int
                  ) -> SampleErrors:
    """The squared error of each float output on each of `samples` (sample indices
    `indices`) against the float model's, and the float output's power."""
    try:  # as it will be deployed: onnxruntime's default graph optimizations
        session = runtime.Session(model, threads, label="scoring")
    except PtqError:
        session = runtime.Session(model, threads, label="scoring", own_graph=True)
    noise = {name: np.zeros(len(indices)) for name in references}
    signal = {name: np.zeros(len(indices)) for name in references}
    for i, (index, sample) in enumerate(zip(indices, samples, strict=True)):
        got = session.run(sample, list(references), f"held-out sample {index}")
        for name, values in references.items():
            reference = values[index].astype(np.float64)
            noise[name][i] = squared_error(reference, got[name])
            signal[name][i] = float(np.square(reference).sum())
    return SampleErrors(noise, signal)
