"""Mixed bit (`--bitNum=0`, `[mixed_bit_weight_quant_param]`, docs/reference.md §6): each
layer gets the fewest bits that keep MindSpore's relative weight error at `init_scale`.

MindSpore's error of a quantized layer is the mean over its output channels of
sqrt(||w_c - w_q,c||^2 / ||w_c||^2) (channels with ||w_c||^2 < 1e-10 skipped). MindSpore
searches one per-tensor step (zero point 0) to within 1% of init_scale and stores the
resulting levels, 7-14 bits per layer on mobilenet_v2, entropy-coded in int16. ptqconv keeps
the criterion and its own grids: the width is the smallest whose grid in the layer's layout
(per channel, per tensor or blocked, affine) keeps the error at or below init_scale, stored
in the smallest container that holds it (docs/decisions.md, mixed bit).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ptqconv.weights import layout as layouts
from ptqconv.weights.layout import WeightLayout

# MindSpore's floor under which a channel is left out of the error.
NORM_FLOOR = 1e-10
# The widths searched: 1 bit is the binary grid, a different family; 16 is the widest.
MIN_BITS, MAX_BITS = 2, 16


def relative_error(w: np.ndarray, w_hat: np.ndarray, channel_axis: int | None) -> float:
    """MindSpore's error: mean over the channels along `channel_axis` (None: the tensor is
    one channel) of sqrt(||w - w_hat||^2 / ||w||^2)."""
    w = np.asarray(w, np.float64)
    d = w - np.asarray(w_hat, np.float64)
    if channel_axis is None:
        w2, d2 = w.reshape(1, -1), d.reshape(1, -1)
    else:
        w2 = np.moveaxis(w, channel_axis, 0).reshape(w.shape[channel_axis], -1)
        d2 = np.moveaxis(d, channel_axis, 0).reshape(w.shape[channel_axis], -1)
    norms, errors = np.sum(w2 * w2, axis=1), np.sum(d2 * d2, axis=1)
    keep = norms >= NORM_FLOOR
    # MindSpore starts the sum at 1e-10 and divides by (count + 1e-7).
    return float((1e-10 + np.sum(np.sqrt(errors[keep] / norms[keep]))) / (keep.sum() + 1e-7))


def smallest_bits(w: np.ndarray, layout_for: Callable[[int], WeightLayout],
                  init_scale: float, channel_axis: int | None,
                  scale_dtype: np.dtype | type = np.float32) -> tuple[int, float]:
    """The fewest bits whose round-to-nearest weight (`layout_for(bits)`) keeps
    `relative_error` at or below `init_scale`, and that error; MAX_BITS when none does."""
    error = float("inf")
    for bits in range(MIN_BITS, MAX_BITS + 1):
        found = layouts.nearest(w, layout_for(bits), scale_dtype)
        error = relative_error(w, found.dequantized(), channel_axis)
        if error <= init_scale:
            return bits, error
    return MAX_BITS, error
