"""ptqconv: post-training quantization of ONNX models, with MindSpore Lite's converter flags.

    report = ptqconv.convert("model.onnx", "model_w4.onnx", "WeightQuant", bit_num=4)
    report = ptqconv.convert("model.onnx", "model_int8.onnx", "PostTraining",
                             config_file="quant.ini")
    report.post_training.units, report.size_after, report.format()

    check = ptqconv.benchmark("model_int8.onnx", "model.onnx", in_data_dir="input:eval")
    check.passed, check.comparisons

`convert` takes the converter's flags as keyword arguments (see `ConvertSettings.create`),
`benchmark` the benchmark's (`ptqconv benchmark`; see `BenchmarkSettings.create`).
"""

from __future__ import annotations

import os

# onnxruntime's telemetry writes a session file (.ses) into TMPDIR when it is imported; a
# converter leaves nothing behind. Set before any module imports onnxruntime.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from typing import Any

# Imported for its effect, before anything imports onnx_ir: sympy loads only when used.
import ptqconv.lazy  # noqa: F401
from ptqconv.errors import PtqError, PtqUsageError
from ptqconv.evaluate.report import BenchmarkReport
from ptqconv.report import ConversionReport
from ptqconv.settings import ConvertSettings
from ptqconv.values import QuantType

__all__ = [
    "BenchmarkReport",
    "ConversionReport",
    "ConvertSettings",
    "PtqError",
    "PtqUsageError",
    "QuantType",
    "benchmark",
    "convert",
]
__version__ = "0.1.0"


def convert(model_file: str | os.PathLike, output_file: str | os.PathLike,
            quant_type: str | QuantType | None = None, **flags: Any) -> ConversionReport:
    """Quantize an ONNX model file, with the same checks and pipeline as the `ptqconv` CLI.

    `flags` are `ConvertSettings.create`'s: bit_num, quant_weight_size, quant_weight_channel,
    config_file, skip_quant_node, fmk, input_shape, debug_dir, accuracy_threshold,
    cosine_threshold, sensitivity, input_data_format, fp16, encodings_file. Paths may be
    str, bytes or os.PathLike. Raise PtqUsageError or PtqError with a one-line message
    that names the keywords (bit_num) where the command line's names its flags (--bitNum).
    """
    import inspect

    from ptqconv.arguments import as_keywords, known_keywords
    from ptqconv.conversion import convert as run

    keywords = list(inspect.signature(ConvertSettings.create).parameters)
    known_keywords("convert", flags, keywords[3:])
    try:
        return run(ConvertSettings.create(model_file, output_file, quant_type, **flags))
    except PtqError as exc:  # name what the caller typed: bit_num, not --bitNum
        exc.args = (as_keywords(str(exc), keywords), *exc.args[1:])
        raise


def benchmark(model_file: str | os.PathLike, reference_model: str | os.PathLike | None = None,
              **flags: Any) -> BenchmarkReport:
    """Compare a quantized model with its float one on input samples and time both, as the
    `ptqconv benchmark` command does.

    `flags` are `BenchmarkSettings.create`'s: in_data_dir, in_data_file, benchmark_data_file,
    input_shape, accuracy_threshold, cosine_distance_threshold, report_file,
    graph_optimization_level, num_threads, loop_count, warm_up_loop_count, input_shapes,
    input_data_format, config_file. Errors are `convert`'s: one line, naming the keywords.
    """
    import inspect

    from ptqconv.arguments import as_keywords, known_keywords
    from ptqconv.evaluate import BenchmarkSettings
    from ptqconv.evaluate import benchmark as run

    keywords = list(inspect.signature(BenchmarkSettings.create).parameters)
    known_keywords("benchmark", flags, keywords[2:])
    try:
        return run(BenchmarkSettings.create(model_file, reference_model, **flags))
    except PtqError as exc:
        exc.args = (as_keywords(str(exc), keywords), *exc.args[1:])
        raise
