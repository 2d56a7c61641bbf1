"""Weight ranges shrunk where rounding then loses less (GPTQ's starting grid).

Each output row's (or block's) min/max range is scaled by the factor in SHRINK_FACTORS whose
nearest rounding has the least squared error weighted by the diagonal of the layer's input
second moments: the part of GPTQ's objective tr(E H E^T) that each weight carries on its own. A
narrower range clips a few large weights and rounds every other one on a finer grid; at 4
bits the finer grid usually wins (docs/decisions.md, GPTQ range search). Factor 1 (the
weight's own range) is a candidate, so a row's weighted error never grows.
"""

from __future__ import annotations

import numpy as np

from ptqconv import qparams
from ptqconv.weights import layout as layouts

# From the weight's own range down to half of it, in steps of 2%.
SHRINK_FACTORS = np.linspace(1.0, 0.5, 26)


def shrunk_rows(w: np.ndarray, importance: np.ndarray, grid: qparams.Grid,
                scale_dtype: np.dtype | type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point [G, R] for the rows of w [G, R, C], each row's range shrunk by the
    factor with the least `importance`-weighted (broadcast to w: [G, 1, C]) rounding error."""
    w = np.asarray(w, np.float32)
    low, high = w.min(axis=-1), w.max(axis=-1)
    # float32 products (relative error ~1e-6: only a near tie could pick another factor).
    weights = np.broadcast_to(np.asarray(importance, np.float32), w.shape)
    best_scale = best_zero = best_error = None
    # In place, without quantize's and dequantize's dtype conversions (fake_quantize): those
    # took most of the 26 factors' time.
    buf = np.empty_like(w)
    for factor in SHRINK_FACTORS:
        scale, zero = qparams.scale_zero_point(low * factor, high * factor, grid, scale_dtype)
        s, z = scale[..., None], zero[..., None]
        qparams.fake_quantize(w, s, z, grid, out=buf)
        np.subtract(w, buf, out=buf)
        error = np.einsum("grc,grc->gr", np.square(buf, out=buf), weights)
        if best_error is None:
            best_scale, best_zero, best_error = scale, zero, error
            continue
        better = error < best_error
        best_scale = np.where(better, scale, best_scale)
        best_zero = np.where(better, zero, best_zero)
        best_error = np.where(better, error, best_error)
    assert best_scale is not None and best_zero is not None
    return best_scale.astype(scale_dtype), best_zero


def shrunk_blocks(w: np.ndarray, importance: np.ndarray, layout: layouts.WeightLayout,
                  scale_dtype: np.dtype | type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point, in `layout`'s blocked parameter shape, of w with each block's
    range shrunk as `shrunk_rows` shrinks a row's (`importance` in w's shape). The last
    block's padding is zeros of no importance: it moves no range."""
    assert layout.axis is not None and layout.block_size
    axis = layout.axis % w.ndim

    def as_rows(a: np.ndarray) -> np.ndarray:  # every block a row of [1, blocks, block_size]
        blocked = np.moveaxis(layouts.blocked(a, axis, layout.block_size), axis + 1, -1)
        return blocked.reshape(1, -1, layout.block_size)

    params = np.moveaxis(layouts.blocked(w, axis, layout.block_size), axis + 1, -1).shape[:-1]
    scale, zero = shrunk_rows(as_rows(np.asarray(w, np.float32)),
                              as_rows(np.asarray(importance, np.float32)), layout.grid,
                              scale_dtype)
    return scale.reshape(params), zero.reshape(params)
