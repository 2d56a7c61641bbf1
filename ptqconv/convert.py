"""The conversion pipeline: options -> load -> passes (and calibration) -> save -> report."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnx_ir as ir

from ptqconv import layer_report, modelio, qparams, sensitivity
from ptqconv.benchmark import compare_models, gate_failures
from ptqconv.calibrate.collector import observe
from ptqconv.calibrate.dataset import CalibrationSet, graph_inputs
from ptqconv.calibrate.observers import (
    KL_SQNR_FLOOR_DB,
    OBSERVERS,
    ChannelRange,
    MinMaxObserver,
    Observer,
)
from ptqconv.metrics import model_mean_bias_percent
from ptqconv.options import ConvertOptions, QuantType
from ptqconv.passes import equalize, smooth_quant
from ptqconv.passes.bias_correction import apply_shifts, measure_shifts
from ptqconv.passes.qdq import QDQPass, weight_grid_for
from ptqconv.passes.qdq_plan import plan_quantization
from ptqconv.passes.weight_quant import WeightQuantConfig, WeightQuantPass
from ptqconv.report import ConversionReport

ProgressFactory = Callable[[int, str], Callable[[int], None]]
# Per-axis DequantizeLinear, which QDQ weights need, arrived in opset 13.
QDQ_MIN_OPSET = 13
# Activations beyond this magnitude are mask sentinels (e.g. -3.4e38), left in float.
SENTINEL_RANGE = 1e15


def convert(options: ConvertOptions, progress: ProgressFactory | None = None) -> ConversionReport:
    """Quantize `options.model_file` into `options.output_file` and report what was done.

    `progress(total, label)` may return a callback that is fed amounts of work done.
    """
    start = time.perf_counter()
    report = ConversionReport(options.model_file, options.output_file,
                              options.quant_type.value, options.bit_num)
    model = modelio.load_model(options.model_file)
    report.size_before = modelio.files_size(modelio.model_files(options.model_file, model))
    report.opset_before = model.opset_imports.get("", 1)
    eval_data = _eval_data(model, options)  # checked now, before any long work
    # The working copy may keep its weights in the temporary directory until saved.
    with tempfile.TemporaryDirectory(prefix="ptqconv-") as workdir:
        if options.quant_type is QuantType.WEIGHT_QUANT:
            model = _weight_quant(model, options, report, progress)
        else:
            assert options.config is not None  # ConvertOptions.create guarantees it
            # Checked on the graph already loaded, before the simplification and calibration.
            data = CalibrationSet.open(graph_inputs(model.graph), options.config.calibrate_path,
                                       options.config.calibrate_size, dict(options.input_shape))
            del model
            simplified = modelio.simplify_with_onnxruntime(options.model_file, Path(workdir))
            model = _post_training(simplified, data, options, report, progress)
        report.opset_after = model.opset_imports.get("", 1)
        report.size_after = modelio.files_size(modelio.save_model(model, options.output_file))
    if eval_data is not None:
        _accuracy_gate(eval_data, options, report)
    report.seconds = time.perf_counter() - start
    return report


def _eval_data(model: ir.Model, options: ConvertOptions) -> CalibrationSet | None:
    config = options.config
    if options.accuracy_threshold is None and options.cosine_threshold is None:
        return None
    assert config is not None  # ConvertOptions.create guarantees eval_path with a threshold
    return CalibrationSet.open(graph_inputs(model.graph), config.eval_path,
                               config.eval_size or 2**31, dict(options.input_shape),
                               what="eval data")


def _accuracy_gate(data: CalibrationSet, options: ConvertOptions,
                   report: ConversionReport) -> None:
    """Compare the written model with the float one on held-out samples (MindSpore's
    benchmark figures) and record why it misses the thresholds, if it does."""
    threads = options.config.thread_num if options.config else 1
    comparisons = compare_models(options.output_file, options.model_file, data, "all", threads)
    report.details.append(f"  accuracy gate on {len(data)} eval samples "
                          f"(mean bias {model_mean_bias_percent(comparisons):.3f}%):")
    for name, comparison in comparisons.items():
        r = comparison.result()
        top1 = "" if r["top1_agreement"] is None else f", top-1 {r['top1_agreement']:.3f}"
        report.details.append(f"    {name}: mean bias {r['mean_bias_percent']:.3f}%, cosine "
                              f"{r['cosine']:.5f}, SQNR {r['sqnr_db']:.1f} dB{top1}")
    report.gate_failures = gate_failures(comparisons, options.accuracy_threshold,
                                         options.cosine_threshold)


def _weight_quant(model: ir.Model, options: ConvertOptions, report: ConversionReport,
                  progress: ProgressFactory | None) -> ir.Model:
    grid = qparams.weight_only_grid(options.bit_num)
    model = modelio.ensure_opset(model, modelio.opset_for({grid.storage}),
                                 options.model_file.parent)
    config = WeightQuantConfig(
        grid=grid,
        min_size=options.quant_weight_size,
        min_channel=options.quant_weight_channel,
        skip=frozenset(options.skip_quant_node),
    )
    step = progress(modelio.tensor_bytes(model), "quantizing weights") if progress else None
    weight_pass = WeightQuantPass(config, progress=step)
    weight_pass(model)
    report.weights = weight_pass.records
    return model


def _post_training(source: Path, data: CalibrationSet, options: ConvertOptions,
                   report: ConversionReport, progress: ProgressFactory | None) -> ir.Model:
    """Calibrate on `data` and quantize the (simplified) float model at `source`."""
    config = options.config
    assert config is not None  # ConvertOptions.create guarantees it for PostTraining
    model = modelio.load_model(source)
    skip = frozenset(options.skip_quant_node)
    act_bits = config.activation_bit_num or options.bit_num
    model = modelio.ensure_opset(model, QDQ_MIN_OPSET, source.parent)
    smooth_names = ({g.activation for g in smooth_quant.find_groups(model.graph, skip)}
                    if config.smooth_quant else set())
    # Equalization rescales per output channel, which per-tensor weights would pay for.
    equalize_names = ({g.activation for g in equalize.find_groups(model.graph, skip)}
                      if config.equalize and config.per_channel else set()) - smooth_names
    first = plan_quantization(model.graph, skip)
    method = OBSERVERS[config.activation_quant_method]
    model_inputs = {v.name for v in model.graph.inputs}

    def make_observer(name: str) -> Observer:
        # Clipping a model input throws information away before the first layer, and inputs
        # are often discrete (pixels, tokens), which misleads histogram methods.
        inner = MinMaxObserver() if name in model_inputs else method()
        if name in smooth_names:
            return ChannelRange(inner)
        return ChannelRange(inner, axis=1) if name in equalize_names else inner

    step = progress(len(data), f"calibrating ({config.activation_quant_method})") \
        if progress else None
    # Shared tensors are observed too: the second plan below may need their own ranges.
    tensors = list(dict.fromkeys([*first.observe, *first.shared, *sorted(smooth_names),
                                  *sorted(equalize_names)]))
    observers = observe(model, tensors, data, make_observer, config.thread_num, step)
    ranges = {name: obs.compute_range(act_bits) for name, obs in observers.items()}
    kl_refused = sum(obs.kl_refused for obs in observers.values())
    # Attention masks fill with float32's lowest value; a tensor whose range reaches such
    # sentinels is not a signal, and quantizing it would erase everything else it carries.
    # Tensors that turned out not to be float32 stay unquantized as well.
    sentinels = sorted(n for n, (lo, hi) in ranges.items()
                       if not (abs(lo) < SENTINEL_RANGE and abs(hi) < SENTINEL_RANGE))
    float_tensors = frozenset(sentinels) | (frozenset(tensors) - frozenset(observers))
    ranges = {n: r for n, r in ranges.items() if n not in float_tensors}
    channel_stats = {n: (o.channel_min, o.channel_max, o.channel_mean_square)
                     for n, o in observers.items()
                     if isinstance(o, ChannelRange) and o.channel_min is not None
                     and n not in float_tensors}

    def prepare(graph_model: ir.Model) -> dict[str, tuple[float, float]]:
        """The graph edits made before QDQ: equalization and SmoothQuant; returns the ranges
        of the tensors they changed or made."""
        if not channel_stats:
            return {}
        grid = qparams.fused_weight_grid(options.bit_num, config.reduce_range)
        new_ranges = equalize.equalize(
            equalize.find_groups(graph_model.graph, skip),
            {n: channel_stats[n] for n in equalize_names if n in channel_stats},
            2**act_bits - 1,
            lambda conv: weight_grid_for(conv, options.bit_num, config.reduce_range).qmax)
        groups = smooth_quant.find_groups(graph_model.graph, skip)
        new_ranges.update(smooth_quant.smooth(graph_model.graph, groups,
                                              {n: channel_stats[n] for n in smooth_names
                                               if n in channel_stats},
                                              2**act_bits - 1, grid.qmax))
        return new_ranges

    def reload() -> ir.Model:
        fresh = modelio.ensure_opset(modelio.load_model(source), QDQ_MIN_OPSET, source.parent)
        prepare(fresh)
        return fresh

    smoothed = prepare(model)
    equalized = [n for n in smoothed if n in equalize_names]
    ranges.update(smoothed)
    # SmoothQuant's Mul nodes stay float: quantizing their input would undo the smoothing.
    skip = skip | smooth_quant.smoothing_nodes(model.graph)
    plan = plan_quantization(model.graph, skip, float_tensors)
    debug = options.debug_dir is not None

    def qdq_pass(quant_plan, **keep: bool) -> QDQPass:
        return QDQPass(quant_plan, ranges, options.bit_num, per_channel=config.per_channel,
                       reduce_range=config.reduce_range, act_bits=act_bits, **keep)

    qdq = qdq_pass(plan, keep_weight_errors=config.bias_correction, keep_weights=debug)
    qdq(model)
    if config.bias_correction and qdq.weight_errors:
        step = progress(len(data), "bias correction") if progress else None
        shifts = measure_shifts(model, qdq.weight_errors, data, config.thread_num, step)
        # Start again from the float graph: corrected float biases are then quantized by the
        # same pass as any other bias.
        model = reload()
        corrected = apply_shifts(model.graph, shifts)
        plan = plan_quantization(model.graph, skip, float_tensors)
        qdq = qdq_pass(plan, keep_weights=debug)
        qdq(model)
        applied = [c for c in corrected if c.applied]
        bias_lines = [f"  bias correction: {len(applied)} of {len(corrected)} layers"]
        bias_lines += [f"    {c.node_name}: skipped, {c.reason}"
                       for c in corrected if not c.applied][:10]
    else:
        bias_lines = []
    report.details += [
        f"  calibration: {config.activation_quant_method} on {len(data)} samples",
        *([f"  KL thresholds refused: {kl_refused} (clipping would leave below "
             f"{KL_SQNR_FLOOR_DB:g} dB SQNR; observed range used)"] if kl_refused else []),
        *([f"  activations: {act_bits}-bit"] if act_bits != options.bit_num else []),
        f"  node units quantized: {len(plan.units)}",
        *([f"  equalized: {len(equalized)} Conv -> Conv activations"] if equalized else []),
        *([f"  SmoothQuant: {len(smoothed) - len(equalized)} MatMul inputs"]
          if len(smoothed) > len(equalized) else []),
        *([f"  kept float (mask-like range beyond {SENTINEL_RANGE:g}): {', '.join(sentinels)}"]
          if sentinels else []),
        f"  activations quantized: {len(qdq.act_params)} ranges, "
        f"{sum(1 for n in model.graph if n.op_type == 'QuantizeLinear')} QuantizeLinear nodes",
        f"  weights quantized: {qdq.weights_quantized} (int8 symmetric"
        f"{' per-channel' if config.per_channel else ''}, levels "
        f"[{qdq.weight_grid.qmin}, {qdq.weight_grid.qmax}]"
        f"{', reduce_range' if qdq.weight_grid.qmax < 2 ** (options.bit_num - 1) - 1 else ''})",
        *bias_lines,
    ]
    if debug:
        report.details += _layer_report(reload(), model, qdq, data, options)
    if options.sensitivity:
        float_model = reload()
        unit_plan = plan_quantization(float_model.graph, skip, float_tensors)
        samples = [sample for _, sample in zip(range(sensitivity.MAX_SAMPLES), data,
                                                strict=False)]
        step = progress(len(unit_plan.units), "sensitivity") if progress else None
        ranking = sensitivity.rank_units(float_model, unit_plan, ranges, qdq_pass, samples,
                                         config.thread_num, step)
        report.details += sensitivity.write(options.debug_dir, ranking)
    return model


def _layer_report(float_model: ir.Model, model: ir.Model, qdq: QDQPass, data: CalibrationSet,
                  options: ConvertOptions) -> list[str]:
    """Per-layer float-vs-quantized statistics over the calibration set (--debugDir)."""
    owners = {v.name: "(model input)" for v in float_model.graph.inputs}
    owners.update((v.name, n.name or n.op_type) for n in float_model.graph for v in n.outputs)
    tensors = {}
    for name, dequantized in qdq.dequantized.items():
        params = qdq.activation_params(name)
        if params is not None:
            tensors[name] = (dequantized, params[0], params[1])
    stats = layer_report.activation_report(float_model, model, tensors, owners,
                                           qdq.act_grid.bits, data, options.config.thread_num)
    stats += layer_report.weight_report(qdq.weight_params)
    return layer_report.write(options.debug_dir, stats)

