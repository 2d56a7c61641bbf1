"""The conversion pipeline: options -> load -> passes -> save -> report."""

from __future__ import annotations

import time
from collections.abc import Callable

from ptqconv import modelio, qparams
from ptqconv.errors import PtqError
from ptqconv.options import ConvertOptions, QuantType
from ptqconv.passes.weight_quant import WeightQuantConfig, WeightQuantPass
from ptqconv.report import ConversionReport

ProgressFactory = Callable[[int, str], Callable[[int], None]]


def convert(options: ConvertOptions, progress: ProgressFactory | None = None) -> ConversionReport:
    """Quantize `options.model_file` into `options.output_file` and report what was done.

    `progress(total, label)` may return a callback that is fed amounts of work done.
    """
    start = time.perf_counter()
    report = ConversionReport(
        options.model_file, options.output_file, options.quant_type.value, options.bit_num
    )
    model = modelio.load_model(options.model_file)
    report.size_before = modelio.files_size(modelio.model_files(options.model_file, model))
    report.opset_before = model.opset_imports.get("", 1)
    if options.quant_type is not QuantType.WEIGHT_QUANT:
        raise PtqError(f"--quantType={options.quant_type.value} is not available yet")

    grid = qparams.weight_only_grid(options.bit_num)
    model = modelio.ensure_opset(
        model, modelio.opset_for({grid.storage}), options.model_file.parent
    )
    config = WeightQuantConfig(
        grid=grid,
        min_size=options.quant_weight_size,
        min_channel=options.quant_weight_channel,
        skip_nodes=frozenset(options.skip_quant_node),
        skip_op_types=frozenset(options.skip_quant_node),
    )
    total = modelio.tensor_bytes(model)
    step = progress(total, "quantizing weights") if progress else None
    weight_pass = WeightQuantPass(config, progress=step)
    weight_pass(model)
    report.weights = weight_pass.records
    report.opset_after = model.opset_imports.get("", 1)

    report.size_after = modelio.files_size(modelio.save_model(model, options.output_file))
    report.seconds = time.perf_counter() - start
    return report
