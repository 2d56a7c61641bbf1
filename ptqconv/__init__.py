"""ptqconv: post-training quantization of ONNX models, with MindSpore Lite's converter flags."""

from __future__ import annotations

from ptqconv.convert import convert as _convert
from ptqconv.errors import PtqError, PtqUsageError
from ptqconv.options import ConvertOptions, QuantType
from ptqconv.report import ConversionReport

__all__ = [
    "ConversionReport",
    "ConvertOptions",
    "PtqError",
    "PtqUsageError",
    "QuantType",
    "convert",
]
__version__ = "0.1.0"


def convert(
    model_file: str,
    output_file: str,
    quant_type: str | QuantType = QuantType.WEIGHT_QUANT,
    bit_num: int = 8,
    quant_weight_size: int = 0,
    quant_weight_channel: int = 16,
    config_file: str | None = None,
    skip_quant_node: tuple[str, ...] | list[str] | str | None = None,
) -> ConversionReport:
    """Quantize an ONNX model file; the same validation and pipeline as the `ptqconv` CLI.

    >>> ptqconv.convert("model.onnx", "model_w8.onnx", "WeightQuant", bit_num=8)
    """
    options = ConvertOptions.create(
        model_file,
        output_file,
        quant_type,
        bit_num,
        quant_weight_size,
        quant_weight_channel,
        config_file,
        skip_quant_node,
    )
    return _convert(options)
