"""Evaluation: compare a quantized model with its float model (`ptqconv benchmark` and the
converter's accuracy gate).

    settings = BenchmarkSettings.create("model_int8.onnx", "model.onnx", in_data_dir="x:eval")
    report = benchmark(settings)    # report.passed, report.comparisons, report.to_dict()
"""

from ptqconv.evaluate.options import BenchmarkSettings
from ptqconv.evaluate.report import BenchmarkReport
from ptqconv.evaluate.run import benchmark

__all__ = ["BenchmarkReport", "BenchmarkSettings", "benchmark"]
