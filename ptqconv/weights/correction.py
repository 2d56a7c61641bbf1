"""MindSpore's weight correction for weight quantization (`[weight_quant_param]
bias_correction`, docs/reference.md §6), folded into the DequantizeLinear parameters.

Per output channel, with w_dq the dequantized weight:
    varCorr  = std(w) / std(w_dq)          (used only inside (0, 10))
    meanCorr = mean(w) - mean(w_dq) * varCorr
and MindSpore's run-time weight is w_dq * varCorr + meanCorr. varCorr folds into the scale
exactly (to the scale's rounding); meanCorr only in whole steps into the zero point (affine
grids, within the container), so the part of it below half a step is left out: in practice
most of it (docs/decisions.md, weight correction). Nothing is added to the graph.
"""

from __future__ import annotations

import numpy as np

from ptqconv import qparams
from ptqconv.weights.layout import IntegerWeight

# docs/reference.md §6: varCorr is accepted only inside (0, 10).
VAR_CORR_MAX = 10.0


def correction_factors(w: np.ndarray, w_dq: np.ndarray, axis: int | None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """MindSpore's (varCorr, meanCorr) per slice along `axis` (None: one pair for the tensor),
    shaped to broadcast against `w`; varCorr is 1 where it falls outside (0, 10)."""
    w = np.asarray(w, np.float64)
    w_dq = np.asarray(w_dq, np.float64)
    axes = tuple(i for i in range(w.ndim) if axis is None or i != axis % w.ndim)
    std_w = w.std(axis=axes, keepdims=True)
    std_dq = w_dq.std(axis=axes, keepdims=True)
    tiny = np.finfo(np.float64).eps
    with np.errstate(divide="ignore", invalid="ignore"):
        var = np.where(std_dq > tiny, std_w / std_dq, 1.0)
    var = np.where((var > 0) & (var < VAR_CORR_MAX), var, 1.0)
    mean = w.mean(axis=axes, keepdims=True) - w_dq.mean(axis=axes, keepdims=True) * var
    return var, mean


def corrected(w: np.ndarray, weight: IntegerWeight, channel_axis: int | None) -> IntegerWeight:
    """`weight` (the quantized `w`) with MindSpore's per-channel correction (per tensor when
    `channel_axis` is None) folded into its scale and zero point; the integers are kept."""
    var, mean = correction_factors(w, weight.dequantized(), channel_axis)
    layout = weight.layout
    # The factors of each parameter slice: a block or channel takes its output channel's.
    if layout.axis is None:
        var_p, mean_p = var.reshape(()), mean.reshape(())
    elif layout.block_size:
        var_p, mean_p = var, mean  # [.., 1 along the blocked axis, ..] broadcasts to blocks
    else:
        var_p, mean_p = var.reshape(-1), mean.reshape(-1)
    scale, zero_point = qparams.fold_correction(weight.scale, weight.zero_point, var_p, mean_p,
                                                layout.grid)
    return IntegerWeight(weight.q, scale, zero_point, layout)
