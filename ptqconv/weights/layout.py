"""How a quantized weight is stored: its grid and DequantizeLinear's axis and block size, and
the weight's integers under that layout.

Three layouts, as DequantizeLinear reads them (docs/reference.md §3):
  per tensor   axis None, one scale;
  per channel  axis = the output-channel axis, one scale per slice along it;
  blocked      axis = the blocked axis, `block_size` > 0 (opset 21): the scale has the
               weight's rank with ceil(n / block_size) along `axis`, so every run of
               `block_size` values along `axis` of every other index has its own scale.
Every range becomes a scale and zero point in `qparams`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ptqconv import qparams


@dataclass(frozen=True)
class WeightLayout:
    """The grid of a weight and the DequantizeLinear layout of its parameters."""

    grid: qparams.Grid
    axis: int | None = None  # None: per tensor
    block_size: int = 0  # > 0: blocks of this many along `axis`

    def with_grid(self, grid: qparams.Grid) -> WeightLayout:
        return WeightLayout(grid, self.axis, self.block_size)


@dataclass(frozen=True)
class IntegerWeight:
    """One weight as stored: integers `q` on `layout.grid` in the weight's shape, the scale
    (float32, or the float16 model's type) and zero point (int64; zeros on symmetric grids)
    in the layout's parameter shape."""

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    layout: WeightLayout

    def dequantized(self) -> np.ndarray:
        s = expand(self.scale, self.layout, self.q.shape)
        z = expand(self.zero_point, self.layout, self.q.shape)
        return qparams.dequantize(self.q, s, z)

    def transposed(self) -> IntegerWeight:
        """The same weight stored transposed (a rank-2 weight only)."""
        axis = None if self.layout.axis is None else 1 - self.layout.axis
        layout = WeightLayout(self.layout.grid, axis, self.layout.block_size)
        scale = self.scale.T if self.layout.block_size else self.scale
        zero_point = self.zero_point.T if self.layout.block_size else self.zero_point
        return IntegerWeight(np.ascontiguousarray(self.q.T), np.ascontiguousarray(scale),
                             np.ascontiguousarray(zero_point), layout)


def blocked(w: np.ndarray, axis: int, block_size: int) -> np.ndarray:
    """w with `axis` split into [blocks, block_size] (the last block padded with zeros: a
    range always contains 0, so padding changes no range)."""
    n = w.shape[axis]
    blocks = -(-n // block_size)
    pad = blocks * block_size - n
    if pad:
        widths = [(0, 0)] * w.ndim
        widths[axis] = (0, pad)
        w = np.pad(w, widths)
    return w.reshape(*w.shape[:axis], blocks, block_size, *w.shape[axis + 1:])


def ranges(w: np.ndarray, layout: WeightLayout) -> tuple[np.ndarray, np.ndarray]:
    """Min and max of every slice that gets its own scale, in the parameter shape."""
    if layout.block_size:
        blocked_w = blocked(w, layout.axis, layout.block_size)
        return blocked_w.min(axis=layout.axis + 1), blocked_w.max(axis=layout.axis + 1)
    return qparams.tensor_range(w, layout.axis)


def mean_magnitudes(w: np.ndarray, layout: WeightLayout) -> np.ndarray:
    """Mean |w| of every slice that gets its own scale, in the parameter shape (a last,
    padded block over its own values)."""
    if layout.block_size:
        sums = np.abs(blocked(w, layout.axis, layout.block_size)).sum(
            axis=layout.axis + 1, dtype=np.float64)
        n = w.shape[layout.axis]
        counts = np.full(sums.shape[layout.axis], layout.block_size, np.float64)
        counts[-1] = n - (counts.size - 1) * layout.block_size
        shape = [1] * sums.ndim
        shape[layout.axis] = -1
        return sums / counts.reshape(shape)
    axes = None if layout.axis is None else tuple(
        d for d in range(w.ndim) if d != layout.axis % w.ndim)
    return np.abs(w).mean(axis=axes, dtype=np.float64)


def parameters(w: np.ndarray, layout: WeightLayout,
               scale_dtype: np.dtype | type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of `w` under `layout`, from its min/max (qparams); on the
    binary grid from its mean magnitude."""
    if layout.grid.binary:
        return qparams.binary_scale(mean_magnitudes(w, layout), scale_dtype)
    rmin, rmax = ranges(w, layout)
    return qparams.scale_zero_point(rmin, rmax, layout.grid, scale_dtype)


def expand(param: np.ndarray, layout: WeightLayout, shape: tuple[int, ...]) -> np.ndarray:
    """A parameter broadcast to the weight's `shape` (a view where it can be)."""
    param = np.asarray(param)
    if layout.axis is None or param.ndim == 0:
        return np.broadcast_to(param, shape)
    axis = layout.axis % len(shape)
    if layout.block_size:
        param = np.repeat(param, layout.block_size, axis=axis)
        param = param[(slice(None),) * axis + (slice(0, shape[axis]),)]
        return param
    view = [1] * len(shape)
    view[axis] = -1
    return np.broadcast_to(param.reshape(view), shape)


def quantize(w: np.ndarray, layout: WeightLayout, scale: np.ndarray,
             zero_point: np.ndarray, dtype: np.dtype | type = np.int32) -> np.ndarray:
    """Round-to-nearest integers of `w` with the given parameters."""
    shape = w.shape
    return qparams.quantize(w, expand(scale, layout, shape), expand(zero_point, layout, shape),
                            layout.grid, dtype=dtype)


def nearest(w: np.ndarray, layout: WeightLayout,
            scale_dtype: np.dtype | type = np.float32) -> IntegerWeight:
    """Round to nearest: the weight's own min/max parameters and its nearest integers."""
    scale, zero_point = parameters(w, layout, scale_dtype)
    return IntegerWeight(quantize(w, layout, scale, zero_point), scale, zero_point, layout)
