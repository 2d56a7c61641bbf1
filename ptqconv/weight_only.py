"""WeightQuant: integer weights behind DequantizeLinear, activations stay float."""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir

from ptqconv import modelio, qparams
from ptqconv.errors import PtqUsageError
from ptqconv.passes.weight_quant import (
    FLOAT16_SCALE_OPSET,
    WeightQuantConfig,
    WeightQuantPass,
    WeightRecord,
)
from ptqconv.settings import WeightQuantSettings

ProgressFactory = Callable[[int, str], Callable[[int], None]]


def weight_quant(model: ir.Model, settings: WeightQuantSettings, base_dir,
                 progress: ProgressFactory | None = None,
                 ) -> tuple[ir.Model, list[WeightRecord]]:
    """`model` with its eligible weights quantized, and what happened to every weight.

    The opset is raised as far as the integer containers need (float16 scales need 19).
    """
    missing = not_built(settings)
    if missing:
        raise PtqUsageError(missing)
    grid = qparams.weight_only_grid(settings.bit_num)
    half = any(v.dtype == ir.DataType.FLOAT16 for v in model.graph.initializers.values())
    model = modelio.ensure_opset(
        model, max(modelio.opset_for({grid.storage}), FLOAT16_SCALE_OPSET if half else 0),
        base_dir)
    config = WeightQuantConfig(grid=grid, min_size=settings.min_size,
                               min_channel=settings.min_channel, skip=frozenset(settings.skip),
                               per_channel=settings.per_channel)
    step = progress(modelio.tensor_bytes(model), "quantizing weights") if progress else None
    result = WeightQuantPass(config, progress=step)(model)
    return model, result.records


def not_built(settings: WeightQuantSettings) -> str:
    """Why the settings ask for a weight algorithm that is not built yet ("" when none)."""
    if settings.mixed_bit is not None:
        return ("[common_quant_param] bit_num=0 (mixed bit weight quantization, "
                "[mixed_bit_weight_quant_param]) is not supported yet; give bit_num 1-16")
    if settings.quant_strategy == "GPTQ":
        return ("[weight_quant_param] quant_strategy=GPTQ is not supported yet; "
                "MAX_MIN (round to nearest) is")
    if settings.bias_correction:
        return ("[weight_quant_param] bias_correction=true (weight correction of each "
                "channel's mean and variance) is not supported yet; set it to false")
    return ""
