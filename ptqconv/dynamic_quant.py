"""DynamicQuant: int8 weights offline, activations quantized at run time by onnxruntime."""

from __future__ import annotations

import onnx_ir as ir

from ptqconv import qparams
from ptqconv.errors import PtqUsageError
from ptqconv.graph.weight_slots import recurrent_weight_slots, weight_slot
from ptqconv.passes import residual_sum
from ptqconv.passes.dynamic_lstm import DynamicLSTMPass
from ptqconv.passes.dynamic_quant import DynamicQuantConfig, DynamicQuantPass
from ptqconv.passes.fold_recurrent_weights import FoldRecurrentWeightsPass
from ptqconv.passes.fold_transposed_weights import FoldTransposedWeightsPass
from ptqconv.passes.gather_quant import GatherQuantConfig, GatherQuantPass
from ptqconv.passes.identity_elimination import IdentityEliminationPass
from ptqconv.passes.residual_sum import ResidualSum, ResidualSumPass
from ptqconv.passes.weight_quant import WeightRecord
from ptqconv.settings import DynamicQuantSettings

# onnxruntime quantizes activations at run time one scale per tensor (DynamicQuantizeLinear,
# DynamicQuantizeMatMul); MindSpore's ACWL wants one per activation channel.
ACWL_UNSUPPORTED = (
    "[dynamic_quant_param] quant_strategy=ACWL (activations per channel) is not supported: "
    "onnxruntime quantizes activations at run time per tensor only; use ALWC")


# Weights of these ops stay float here, by the summary's label: onnxruntime's ConvInteger
# runs slower than its float Conv, and it has no dynamic int8 GRU or RNN.
FLOAT_KINDS = {"Conv": "Conv", "ConvTranspose": "Conv", "GRU": "GRU/RNN", "RNN": "GRU/RNN"}


def float_weights(model: ir.Model) -> dict[str, int]:
    """Constant weights of the ops DynamicQuant leaves float (W and R of a GRU or RNN), by
    FLOAT_KINDS label: the weights WeightQuant would find there."""
    found: dict[str, int] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        kind = FLOAT_KINDS.get(node.op_type)
        if kind is None:
            continue
        count = (len(recurrent_weight_slots(node)) if kind == "GRU/RNN"
                 else int(weight_slot(node) is not None))
        if count:
            found[kind] = found.get(kind, 0) + count
    return found


def dynamic_quant(model: ir.Model, settings: DynamicQuantSettings,
                  ) -> tuple[ir.Model, list[WeightRecord], ResidualSum | None, dict[str, int]]:
    """`model` with its eligible MatMul / Gemm weights in int8 behind DynamicQuantizeMatMul and
    its embedding tables in int8 before Gather, what happened to every such weight, and the
    weights left float by kind (FLOAT_KINDS)."""
    if settings.strategy == "ACWL":
        raise PtqUsageError(ACWL_UNSUPPORTED)
    config = DynamicQuantConfig(
        grid=qparams.fused_weight_grid(settings.bit_num, settings.reduce_range),
        per_channel=True, min_size=settings.min_size, skip=frozenset(settings.skip))
    # A weight PyTorch's exporter reads again through Identity is one weight of both nodes
    # (as for WeightQuant), whose integers they share.
    IdentityEliminationPass()(model)
    FoldRecurrentWeightsPass()(model)
    kept = float_weights(model)
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
    return model, records, residual, kept
