"""The conversion: settings -> load -> WeightQuant or PostTraining -> save -> accuracy gate."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnx_ir as ir

from ptqconv import modelio
from ptqconv.accuracy_target import latency_ms, meet_target
from ptqconv.calibrate.dataset import CalibrationSet, graph_inputs
from ptqconv.evaluate.comparison import compare_models, gate_failures
from ptqconv.passes.generated_names import value_names
from ptqconv.post_training import PostTraining
from ptqconv.report import ConversionReport, GateReport
from ptqconv.settings import ConvertSettings, DataSource, GateSettings, PostTrainingSettings
from ptqconv.target import detect
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
    pt = None
    # The working copy may keep its weights in the temporary directory until saved.
    with tempfile.TemporaryDirectory(prefix="ptqconv-") as workdir:
        if isinstance(mode, PostTrainingSettings):
            # Checked on the graph already loaded, before the simplification and calibration.
            data = open_data(model, settings.model_file, mode.calibration)
            original_names = value_names(model.graph)
            del model
            simplified = modelio.simplify_with_onnxruntime(settings.model_file, Path(workdir))
            pt = PostTraining(mode, data, progress)
            model, report.post_training = pt.run(simplified, original_names)
        else:
            data = (open_data(model, settings.model_file, mode.calibration)
                    if mode.calibration is not None else None)
            model, report.weights, report.weight_quant = weight_quant(
                model, mode, settings.model_file.parent, progress, data)
        report.opset_after = model.opset_imports.get("", 1)
        report.size_after = modelio.files_size(modelio.save_model(model, settings.output_file))
        if eval_data is not None and settings.gate is not None:
            report.gate = accuracy_gate(eval_data, settings, settings.gate)
            if report.gate.failures and pt is not None:
                _meet_target(pt, settings, settings.gate, eval_data, report, progress)
    report.seconds = time.perf_counter() - start
    return report


def _meet_target(pt: PostTraining, settings: ConvertSettings, gate: GateSettings,
                 data: CalibrationSet, report: ConversionReport,
                 progress: ProgressFactory | None) -> None:
    """Keep the most harmful units float until the gate passes; write that model."""
    assert report.gate is not None
    repaired, target = meet_target(pt, settings.model_file, data, gate, report.gate, progress)
    report.target = target
    if repaired is None:
        return
    sample = next(iter(data))
    target.size_before = report.size_after
    target.cpu = detect().why.removeprefix("detected: ")
    target.latency_ms = {
        "float": latency_ms(settings.model_file, sample, gate.threads),
        "quantized": latency_ms(settings.output_file, sample, gate.threads),
        "written": latency_ms(repaired, sample, gate.threads)}
    report.size_after = modelio.files_size(modelio.save_model(repaired, settings.output_file))
    target.size_after = report.size_after
    report.gate = accuracy_gate(data, settings, gate)


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
