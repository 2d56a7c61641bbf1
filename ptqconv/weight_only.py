"""WeightQuant: integer weights behind DequantizeLinear, activations stay float.

Steps: with per-tensor weights and calibration samples, equalize Conv -> Relu -> Conv
chains where the samples measure a gain (`passes.weight_equalize`); plan every weight's
layout (`passes.weight_quant`); with mixed bit, each layer's bits (`weights.mixed_bit`,
init_scale searched on the calibration samples with auto_tune); raise the opset as far as
the containers need; with GPTQ, the layers' input second moments in budgeted streaming
passes and the integers they give (`passes.gptq`); with bias correction, MindSpore's weight
correction folded into the parameters and, when calibration data is given, the expected
output shift op(E[x], W - Ŵ) added to Conv/Gemm biases (`passes.bias_correction`); then the
pass writes the DequantizeLinear nodes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx_ir as ir

from ptqconv import modelio, qparams, runtime
from ptqconv.calibrate.collector import collect
from ptqconv.calibrate.dataset import CalibrationSet
from ptqconv.calibrate.statistics import Statistics
from ptqconv.evaluate import held_out
from ptqconv.evaluate.held_out import SampleErrors
from ptqconv.evaluate.metrics import OutputComparison, squared_error
from ptqconv.graph.naming import node_key
from ptqconv.passes import bias_correction, gptq, residual_sum
from ptqconv.passes.bias_correction import apply_shifts, expected_shifts
from ptqconv.passes.fold_recurrent_weights import FoldRecurrentWeightsPass
from ptqconv.passes.identity_elimination import IdentityEliminationPass
from ptqconv.passes.matmulnbits_relu import MatMulNBitsReluPass
from ptqconv.passes.qdq import CORRECTED_OPS, WeightError, is_shallow
from ptqconv.passes.residual_sum import ResidualSumPass
from ptqconv.passes.weight_equalize import WeightEqualizePass
from ptqconv.passes.weight_quant import (
    BLOCKED_OPSET,
    FLOAT16_SCALE_OPSET,
    Target,
    WeightQuantConfig,
    WeightQuantPass,
    WeightQuantResult,
    WeightRecord,
)
from ptqconv.post_training import TIE
from ptqconv.report import WeightQuantSummary
from ptqconv.settings import DEPTHWISE_BITS, LOW_BIT_TABLE_BITS, WeightQuantSettings
from ptqconv.target import detect
from ptqconv.weights import layout as layouts
from ptqconv.weights.correction import corrected
from ptqconv.weights.layout import IntegerWeight, WeightLayout
from ptqconv.weights.mixed_bit import smallest_bits

ProgressFactory = Callable[[int, str], Callable[[int], None]]
# docs/reference.md §6: auto_tune searches init_scale for an output cosine of about 0.995;
# the search stops within 1% of the init_scale that reaches it (MindSpore's tolerance).
AUTO_TUNE_COSINE = 0.995
AUTO_TUNE_TOLERANCE = 0.01
# init_scale stays inside (0, 1): the search doubles and halves within these bounds.
AUTO_TUNE_BOUNDS = (1e-4, 0.5)


def weight_quant(model: ir.Model, settings: WeightQuantSettings, base_dir: Path,
                 progress: ProgressFactory | None = None, data: CalibrationSet | None = None,
                 ) -> tuple[ir.Model, list[WeightRecord], WeightQuantSummary]:
    """`model` with its eligible weights quantized, what happened to every weight, and what
    the weight algorithms did. `data`: the calibration samples, when the settings name some.
    """
    summary = WeightQuantSummary(settings.quant_strategy, settings.per_channel,
                                 settings.block_size, settings.bias_correction,
                                 low_bit_recipe=settings.low_bit_recipe)
    # PyTorch's exporter stores a weight two modules share (tied, or equal as deep-copied
    # layers are before training) once and reads it again through Identity: without the
    # Identity the weight is one weight of both nodes, quantized once.
    IdentityEliminationPass()(model)
    FoldRecurrentWeightsPass()(model)
    config = WeightQuantConfig(
        grid=qparams.weight_only_grid(settings.bit_num or 8), min_size=settings.min_size,
        min_channel=settings.min_channel, skip=frozenset(settings.skip),
        per_channel=settings.per_channel, block_size=settings.block_size,
        correct=settings.bias_correction, keep_sums=settings.keep_kernel_sums,
        table_grid=(qparams.weight_only_grid(LOW_BIT_TABLE_BITS) if settings.low_bit_recipe
                    else None),
        # Blocks, given or the recipe's, at fewer bits: a depthwise weight cannot be blocked
        # (docs/decisions.md, blocked convs).
        depthwise_grid=(qparams.weight_only_grid(DEPTHWISE_BITS)
                        if settings.block_size and 0 < settings.bit_num < DEPTHWISE_BITS
                        else None))
    equalize = WeightEqualizePass(frozenset(settings.skip))
    if not settings.per_channel:  # per channel it never gained (docs/decisions.md)
        summary.equalize_chains = len(equalize.find(model.graph))
    if summary.equalize_chains and data is not None:
        # Per tensor it helped and hurt by turns on the corpus (docs/decisions.md,
        # WeightQuant equalization): kept only where the calibration samples measure a gain.
        summary.equalize_errors = _equalize_errors(model, settings, config, equalize, data,
                                                   base_dir)
        if summary.equalize_errors[1] < summary.equalize_errors[0]:
            summary.equalized = equalize(model).chains
    grids: dict[str, qparams.Grid] = {}
    if settings.mixed_bit is not None:
        planner = WeightQuantPass(config)
        if settings.mixed_bit.auto_tune:
            assert data is not None
            init_scale = _auto_tune(model, settings, planner, data, base_dir, summary, progress)
        else:
            init_scale = settings.mixed_bit.init_scale
        summary.init_scale = init_scale
        grids = mixed_grids(model, planner, init_scale, progress)
    quant_pass = WeightQuantPass(config, grids=grids)
    model = modelio.ensure_opset(model, needed_opset(model, quant_pass), base_dir)
    targets = [t for t in quant_pass.plan(model.graph) if t.layout is not None]
    shallow = (_shallow_layouts(quant_pass, targets)
               if settings.mixed_bit is None and (settings.shallow_convs_8bit
                                                  or (settings.shallow_convs_8bit is None
                                                      and data is not None))
               else {})
    integers: dict[str, IntegerWeight] = {}
    alternatives: dict[str, IntegerWeight] = {}
    solved_names: set[str] = set()
    statistics = Statistics({})
    shifted = data is not None and settings.bias_correction
    extra = bias_correction.statistic_points(model.graph) if shifted else []
    if settings.quant_strategy == "GPTQ":
        assert data is not None
        solved = gptq.run(model, {t.name: t.layout for t in targets if t.layout is not None},
                          data, settings.threads, progress, extra, alternatives=shallow)
        integers.update(solved.integers)
        alternatives.update(solved.alternatives)
        solved_names = set(solved.integers)
        statistics = solved.statistics
        summary.gptq = replace(solved.summary(), by_default=settings.strategy_default)
    elif shifted:
        assert data is not None
        step = progress(len(data), "calibrating (bias correction)") if progress else None
        statistics = collect(model, extra, data, settings.threads, step)
    shallow_grids = {**grids, **{name: qparams.weight_only_grid(8) for name in shallow}}
    chosen = bool(shallow) and bool(settings.shallow_convs_8bit)
    if shallow and settings.shallow_convs_8bit is None:
        summary.shallow_unmeasured = _no_room(3 * modelio.tensor_bytes(model))
    if shallow and settings.shallow_convs_8bit is None and not summary.shallow_unmeasured:
        assert data is not None
        step = (progress(3 * len(data), f"shallow convs: {settings.bit_num} or 8 bits")
                if progress else None)
        errors = _candidate_errors(
            model, data, settings.threads, step,
            [lambda m: _written(m, config, grids, integers, statistics, settings, True),
             lambda m: _written(m, config, shallow_grids, {**integers, **alternatives},
                                statistics, settings, True)])
        at_asked, at_eight = errors
        # As AUTO chooses: 8 bits only where their win is beyond a tie with any one sample
        # left out (`evaluate.held_out.beats`; docs/decisions.md, shallow convs in 8 bits).
        chosen = held_out.beats([at_eight], [at_asked], TIE)
        summary.shallow_errors = (held_out.pooled([at_asked]), held_out.pooled([at_eight]))
    if chosen:
        grids, integers = shallow_grids, {**integers, **alternatives}
        summary.shallow_8bit = len(shallow)
    step = progress(modelio.tensor_bytes(model), "quantizing weights") if progress else None
    result, corrections = _written(model, config, grids, integers, statistics, settings,
                                    data is not None, step)
    if shifted:
        summary.bias_corrections = corrections
    for record in result.records:
        if record.quantized and record.name in solved_names:
            record.method = "GPTQ"
    summary.weight_corrections = sum(1 for r in result.records
                                     if r.quantized and settings.bias_correction)
    if config.depthwise_grid is not None:  # below 8 bits, the Conv weights in 8 are these
        summary.depthwise_8bit = sum(1 for r in result.records if r.quantized
                                     and r.op_type == "Conv" and r.bits == DEPTHWISE_BITS
                                     ) - summary.shallow_8bit
    summary.activations_unfused = len(MatMulNBitsReluPass()(model).rewritten)
    # Weight-only models compute in float: their residual Adds fuse like the float model's.
    # WeightQuant names no target: the model runs where it is converted.
    summary.residual_sum = residual_sum.measure(model, detect())
    if summary.residual_sum is not None and summary.residual_sum.applied:
        ResidualSumPass()(model)
    return model, result.records, summary


def _no_room(need: int) -> str:
    """Why `need` bytes of sessions side by side do not fit in half of the memory the
    kernel calls available ("" when they do)."""
    available = runtime.over_half_of_memory(need)
    if available is None:
        return ""
    return (f"the float model and both candidates need about {need / 1e6:.0f} MB, more than "
            f"half of the {available / 1e6:.0f} MB available")


def _shallow_layouts(planner: WeightQuantPass, targets: list[Target]
                     ) -> dict[str, WeightLayout]:
    """The 8-bit layouts of the planned weights below 8 bits read only by shallow convs
    (`passes.qdq.is_shallow`)."""
    eight = qparams.weight_only_grid(8)
    return {t.name: planner.layout_for(t, eight) for t in targets
            if t.layout is not None and t.layout.grid.bits < 8
            and all(is_shallow(s.node) for s in t.slots)}


def _written(model: ir.Model, config: WeightQuantConfig, grids: dict[str, qparams.Grid],
             integers: dict[str, IntegerWeight], statistics: Statistics,
             settings: WeightQuantSettings, data_given: bool,
             progress: Callable[[int], None] | None = None,
             ) -> tuple[WeightQuantResult, list[bias_correction.Correction]]:
    """`model` with its weights written on `grids` (else the config's) from `integers`
    (else rounded to nearest), corrected as the settings say: with calibration data, bias
    shifts from the points of `bias_correction.statistic_points` in `statistics`."""
    quant_pass = WeightQuantPass(config, grids=grids)
    targets = [t for t in quant_pass.plan(model.graph) if t.layout is not None]
    integers = dict(integers)
    if settings.bias_correction:
        for target in targets:
            if target.name in integers:
                integers[target.name] = corrected(_weight(target), integers[target.name],
                                                  _correction_axis(target))
    shifted = data_given and settings.bias_correction
    corrections = _shift_biases(model, targets, integers, statistics) if shifted else []
    quant_pass.integers = integers
    quant_pass.progress = progress
    return quant_pass(model), corrections


def _candidate_errors(model: ir.Model, data: CalibrationSet, threads: int,
                      progress: Callable[[int], None] | None,
                      writers: list[Callable[[ir.Model], object]],
                      ) -> list[SampleErrors]:
    """Each sample's output errors against the float `model` of each copy of `model` that a
    writer quantizes. A sample runs through every model in turn, so only the errors are kept
    (memory flat in the number of samples); the copies' weights are dequantized once, at load:
    the same products at float speed."""
    sessions = []
    for write in writers:
        candidate = model.clone()
        write(candidate)
        sessions.append(runtime.Session(candidate, threads, label="candidate model",
                                        config=runtime.DEQUANTIZE_AT_LOAD))
        del candidate
    reference = runtime.Session(model, threads, label="float model")
    signal: dict[str, list[float]] = {}
    noise: list[dict[str, list[float]]] = [{} for _ in sessions]
    for index, sample in enumerate(data):
        label = f"calibration sample {index}"
        want = {name: r for name, r in reference.run(sample, sample=label).items()
                if np.issubdtype(r.dtype, np.floating)}
        for name, r in want.items():
            signal.setdefault(name, []).append(float(np.square(r.astype(np.float64)).sum()))
        for session, found in zip(sessions, noise, strict=True):
            got = session.run(sample, sample=label)
            for name, r in want.items():
                found.setdefault(name, []).append(squared_error(r, got[name]))
        if progress:
            progress(1 + len(sessions))
    powers = {name: np.asarray(v) for name, v in signal.items()}
    return [SampleErrors({name: np.asarray(v) for name, v in found.items()}, powers)
            for found in noise]


def needed_opset(model: ir.Model, quant_pass: WeightQuantPass) -> int:
    """The opset the planned containers and layouts need (float16 scales need 19)."""
    targets = [t for t in quant_pass.plan(model.graph) if t.layout is not None]
    storages = {t.layout.grid.storage for t in targets if t.layout is not None}
    half = any(v.dtype == ir.DataType.FLOAT16 for v in model.graph.initializers.values())
    blocked = any(t.layout is not None and t.layout.block_size for t in targets)
    return max(modelio.opset_for(storages) if storages else 0,
               FLOAT16_SCALE_OPSET if half else 0, BLOCKED_OPSET if blocked else 0)


def _weight(target: Target) -> np.ndarray:
    return target.value.const_value.numpy().astype(np.float32, copy=False)


def _start(target: Target) -> IntegerWeight:
    """Round-to-nearest parameters (and integers) of `target`, which GPTQ keeps."""
    assert target.layout is not None
    return layouts.nearest(_weight(target), target.layout, target.value.const_value.dtype.numpy())


def _correction_axis(target: Target) -> int | None:
    """The axis MindSpore's correction goes per channel along: the output channels, unless
    the weight has a single scale."""
    assert target.layout is not None
    return None if target.layout.axis is None else target.channel_axis


def _shift_biases(model: ir.Model, targets: list[Target], integers: dict[str, IntegerWeight],
                  statistics: Statistics) -> list[bias_correction.Correction]:
    """Add op(E[x], W - Ŵ) to the biases of the Conv/Gemm layers of `targets`; the
    integers of those weights are made final here (nearest where GPTQ did not run)."""
    errors: dict[str, WeightError] = {}
    for target in targets:
        users = [s.node for s in target.slots if s.node.op_type in CORRECTED_OPS]
        if not users or len(users) != len(target.slots):
            continue
        weight = _weight(target)
        if target.name not in integers:
            integer = _start(target)
            integers[target.name] = corrected(weight, integer, _correction_axis(target))
        error = weight - integers[target.name].dequantized()
        for node in users:
            errors[node_key(node)] = WeightError(node, error, node.inputs[0].name or "")
    shifts = expected_shifts(errors, statistics, {})
    return apply_shifts(model.graph, shifts)


def mixed_grids(model: ir.Model, planner: WeightQuantPass, init_scale: float,
                progress: ProgressFactory | None = None) -> dict[str, qparams.Grid]:
    """Each eligible weight's grid at the fewest bits that keep MindSpore's relative error
    at or below `init_scale`."""
    targets = [t for t in planner.plan(model.graph) if t.layout is not None]
    step = progress(len(targets), "mixed bit") if progress else None
    grids = {}
    for target in targets:
        scale_dtype = target.value.const_value.dtype.numpy()
        bits, _ = smallest_bits(
            _weight(target), lambda b, t=target: planner.layout_for(t, qparams.weight_only_grid(b)),
            init_scale, _correction_axis(target), scale_dtype)
        grids[target.name] = qparams.weight_only_grid(bits)
        if step:
            step(1)
    return grids


def _auto_tune(model: ir.Model, settings: WeightQuantSettings, planner: WeightQuantPass,
               data: CalibrationSet, base_dir: Path, summary: WeightQuantSummary,
               progress: ProgressFactory | None) -> float:
    """The largest init_scale whose round-to-nearest model keeps the output cosine against
    the float model at AUTO_TUNE_COSINE or above on the calibration samples."""
    assert settings.mixed_bit is not None
    session = runtime.Session(model, settings.threads, label="float model")
    references = [session.run(sample, sample=f"calibration sample {i}")
                  for i, sample in enumerate(data)]
    tried: dict[float, float] = {}

    def cosine(init_scale: float) -> float:
        if init_scale not in tried:
            grids = mixed_grids(model, planner, init_scale)
            candidate = model.clone()
            quant_pass = WeightQuantPass(planner.config, grids=grids)
            candidate = modelio.ensure_opset(candidate, needed_opset(candidate, quant_pass),
                                             base_dir)
            quant_pass(candidate)
            tried[init_scale] = _output_cosine(candidate, data, references, settings.threads)
            summary.auto_tune.append((init_scale, tried[init_scale]))
        return tried[init_scale]

    step = progress(settings.mixed_bit.max_iterations, "auto_tune") if progress else None
    low_bound, high_bound = AUTO_TUNE_BOUNDS
    scale = min(max(settings.mixed_bit.init_scale, low_bound), high_bound)
    good, bad = (scale, None) if cosine(scale) >= AUTO_TUNE_COSINE else (None, scale)
    for _ in range(settings.mixed_bit.max_iterations):
        if step:
            step(1)
        if good is None:
            assert bad is not None
            if bad <= low_bound:
                return low_bound
            trial = max(bad / 2, low_bound)
        elif bad is None:
            if good >= high_bound:
                return high_bound
            trial = min(good * 2, high_bound)
        else:
            if bad / good <= 1 + AUTO_TUNE_TOLERANCE:
                break
            trial = math.sqrt(good * bad)
        if cosine(trial) >= AUTO_TUNE_COSINE:
            good = trial
        else:
            bad = trial
    return good if good is not None else low_bound


def _equalize_errors(model: ir.Model, settings: WeightQuantSettings,
                     config: WeightQuantConfig, equalize: WeightEqualizePass,
                     data: CalibrationSet, base_dir: Path) -> tuple[float, float]:
    """1 - output cosine against float on the calibration samples of the model rounded to
    nearest, without and with equalization."""
    session = runtime.Session(model, settings.threads, label="float model")
    references = [session.run(sample, sample=f"calibration sample {i}")
                  for i, sample in enumerate(data)]
    errors = []
    for equalized in (False, True):
        candidate = model.clone()
        if equalized:
            equalize(candidate)
        quant_pass = WeightQuantPass(replace(config, correct=False))
        candidate = modelio.ensure_opset(candidate, needed_opset(candidate, quant_pass),
                                         base_dir)
        quant_pass(candidate)
        errors.append(1.0 - _output_cosine(candidate, data, references, settings.threads))
    return errors[0], errors[1]


def _output_cosine(model: ir.Model, data: CalibrationSet, references: list[dict],
                   threads: int) -> float:
    """The lowest over outputs of the cosine against `references`, pooled over `data`."""
    session = runtime.Session(model, threads, label="auto_tune candidate")
    comparisons: dict[str, OutputComparison] = {}
    for index, sample in enumerate(data):
        got = session.run(sample, sample=f"calibration sample {index}")
        for name, reference in references[index].items():
            if np.issubdtype(reference.dtype, np.floating):
                comparisons.setdefault(name, OutputComparison(name)).update(
                    reference, got[name])
    return min((c.cosine for c in comparisons.values()), default=1.0)
