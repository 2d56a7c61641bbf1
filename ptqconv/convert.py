"""The conversion pipeline: options -> load -> passes (and calibration) -> save -> report."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import onnx_ir as ir

from ptqconv import modelio, qparams
from ptqconv.benchmark import compare_models, gate_failures
from ptqconv.calibrate.dataset import CalibrationSet, graph_inputs
from ptqconv.metrics import model_mean_bias_percent
from ptqconv.options import ConvertOptions, QuantType
from ptqconv.passes.generated_names import value_names
from ptqconv.passes.weight_quant import (
    FLOAT16_SCALE_OPSET,
    WeightQuantConfig,
    WeightQuantPass,
)
from ptqconv.post_training import PostTraining, ProgressFactory
from ptqconv.report import ConversionReport


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
            data = CalibrationSet.open(graph_inputs(model.graph, options.model_file),
                                       options.config.calibrate_path,
                                       options.config.calibrate_size, dict(options.input_shape))
            original_names = value_names(model.graph)
            del model
            simplified = modelio.simplify_with_onnxruntime(options.model_file, Path(workdir))
            model, lines = PostTraining(simplified, data, options, progress,
                                        original_names).run()
            report.details += lines
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
    return CalibrationSet.open(graph_inputs(model.graph, options.model_file), config.eval_path,
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
    half = any(v.dtype == ir.DataType.FLOAT16 for v in model.graph.initializers.values())
    model = modelio.ensure_opset(
        model, max(modelio.opset_for({grid.storage}), FLOAT16_SCALE_OPSET if half else 0),
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
