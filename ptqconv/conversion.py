"""The conversion: settings -> load -> WeightQuant or PostTraining -> save -> accuracy gate."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnx_ir as ir

from ptqconv import modelio, runtime
from ptqconv.calibrate.dataset import CalibrationSet, graph_inputs
from ptqconv.evaluate.comparison import compare_models, gate_failures
from ptqconv.passes.generated_names import value_names
from ptqconv.post_training import PostTraining
from ptqconv.report import ConversionReport, GateReport
from ptqconv.settings import ConvertSettings, DataSource, GateSettings, PostTrainingSettings
from ptqconv.weight_only import weight_quant

ProgressFactory = Callable[[int, str], Callable[[int], None]]


def convert(settings: ConvertSettings,
            progress: ProgressFactory | None = None) -> ConversionReport:
    """Quantize `settings.model_file` into `settings.output_file` and report what was done.

    `progress(total, label)` may return a callback that is fed amounts of work done.
    """
    start = time.perf_counter()
    report = ConversionReport(settings.model_file, settings.output_file,
                              settings.quant_type.value, settings.bit_num)
    model = modelio.load_model(settings.model_file)
    report.size_before = modelio.files_size(modelio.model_files(settings.model_file, model))
    report.opset_before = model.opset_imports.get("", 1)
    # Checked now, before any long work.
    eval_data = open_data(model, settings.model_file, settings.gate.data) if settings.gate \
        else None
    mode = settings.mode
    # The working copy may keep its weights in the temporary directory until saved.
    with tempfile.TemporaryDirectory(prefix="ptqconv-") as workdir:
        if isinstance(mode, PostTrainingSettings):
            # Checked on the graph already loaded, before the simplification and calibration.
            data = open_data(model, settings.model_file, mode.calibration)
            original_names = value_names(model.graph)
            del model
            simplified = modelio.simplify_with_onnxruntime(settings.model_file, Path(workdir))
            model, report.post_training = PostTraining(mode, data, progress).run(
                simplified, original_names)
        else:
            model, report.weights = weight_quant(model, mode, settings.model_file.parent,
                                                 progress)
        report.opset_after = model.opset_imports.get("", 1)
        report.size_after = modelio.files_size(modelio.save_model(model, settings.output_file))
    if isinstance(mode, PostTrainingSettings) and mode.measure_latency and (
            report.post_training is not None):
        # On a calibration sample, the way onnxruntime runs both files for a user.
        report.post_training.latency = runtime.compare_latency(
            {"float": settings.model_file, "quantized": settings.output_file}, next(iter(data)))
    if eval_data is not None and settings.gate is not None:
        report.gate = accuracy_gate(eval_data, settings, settings.gate)
    report.seconds = time.perf_counter() - start
    return report


def open_data(model: ir.Model, model_file: Path, source: DataSource) -> CalibrationSet:
    """The samples of `source` for the inputs of the loaded `model`, all checked."""
    return CalibrationSet.open(graph_inputs(model.graph, model_file), source.paths,
                               source.size, dict(source.shapes), what=source.what)


def accuracy_gate(data: CalibrationSet, settings: ConvertSettings,
                  gate: GateSettings) -> GateReport:
    """Compare the written model with the float one on held-out samples (MindSpore's
    benchmark figures) and say why it misses the thresholds, if it does."""
    comparisons = compare_models(settings.output_file, settings.model_file, data, "all",
                                 gate.threads)
    return GateReport(len(data), comparisons,
                      gate_failures(comparisons, gate.accuracy_threshold, gate.cosine_threshold))
