"""DynamicQuant: int8 weights offline, activations quantized at run time by onnxruntime."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import IdentityEliminationPass

from ptqconv import qparams
from ptqconv.errors import PtqUsageError
from ptqconv.passes import residual_sum
from ptqconv.passes.dynamic_lstm import DynamicLSTMPass
from ptqconv.passes.dynamic_quant import DynamicQuantConfig, DynamicQuantPass
from ptqconv.passes.fold_transposed_weights import FoldTransposedWeightsPass
from ptqconv.passes.gather_quant import GatherQuantConfig, GatherQuantPass
from ptqconv.passes.residual_sum import ResidualSum, ResidualSumPass
from ptqconv.passes.weight_quant import WeightRecord
from ptqconv.settings import DynamicQuantSettings

# onnxruntime quantizes activations at run time one scale per tensor (DynamicQuantizeLinear,
# DynamicQuantizeMatMul); MindSpore's ACWL wants one per activation channel.
ACWL_UNSUPPORTED = (
    "[dynamic_quant_param] quant_strategy=ACWL (activations per channel) is not supported: "
    "onnxruntime quantizes activations at run time per tensor only; use ALWC")


def conv_weights(model: ir.Model) -> int:
    """Constant Conv / ConvTranspose weights, which DynamicQuant leaves float."""
    return sum(1 for node in ir.traversal.RecursiveGraphIterator(model.graph)
               if node.op_type in ("Conv", "ConvTranspose") and len(node.inputs) > 1
               and node.inputs[1] is not None and node.inputs[1].const_value is not None)


def dynamic_quant(model: ir.Model, settings: DynamicQuantSettings,
                  ) -> tuple[ir.Model, list[WeightRecord], ResidualSum | None]:
    """`model` with its eligible MatMul / Gemm weights in int8 behind DynamicQuantizeMatMul and
    its embedding tables in int8 before Gather, and what happened to every such weight. Other
    weights (Conv: onnxruntime's ConvInteger is slower than its float Conv) stay float."""
    if settings.strategy == "ACWL":
        raise PtqUsageError(ACWL_UNSUPPORTED)
    config = DynamicQuantConfig(
        grid=qparams.fused_weight_grid(settings.bit_num, settings.reduce_range),
        per_channel=True, min_size=settings.min_size, skip=frozenset(settings.skip))
    # A weight PyTorch's exporter reads again through Identity is one weight of both nodes
    # (as for WeightQuant), whose integers they share.
    IdentityEliminationPass()(model)
    FoldTransposedWeightsPass()(model)
    records = DynamicQuantPass(config)(model).records
    records += DynamicLSTMPass(config)(model).records
    tables = GatherQuantConfig(qparams.weight_only_grid(settings.bit_num), settings.min_size,
                               frozenset(settings.skip))
    records += GatherQuantPass(tables)(model).records
    # Transformers keep float residual Adds before LayerNormalization here too.
    residual = residual_sum.measure(model, settings.target)
    if residual is not None and residual.applied:
        ResidualSumPass()(model)
    return model, records, residual
