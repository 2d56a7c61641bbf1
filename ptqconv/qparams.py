"""Range -> scale / zero point math: the one module every pass and observer uses.

A `Grid` says which integers a tensor may take and in which ONNX container they are stored;
`scale_zero_point` turns float ranges into quantization parameters for a grid, and
`quantize` / `dequantize` apply them with ONNX's QuantizeLinear semantics (round half to even).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import onnx_ir as ir

# docs/reference.md §2: "enforce a minimum range so scale is never 0".
MIN_RANGE = 1e-8

_SIGNED_CONTAINERS = (
    (2, ir.DataType.INT2),
    (4, ir.DataType.INT4),
    (8, ir.DataType.INT8),
    (16, ir.DataType.INT16),
)
_UNSIGNED_CONTAINERS = (
    (2, ir.DataType.UINT2),
    (4, ir.DataType.UINT4),
    (8, ir.DataType.UINT8),
    (16, ir.DataType.UINT16),
)


class Range(NamedTuple):
    """A float range [low, high] to quantize."""

    low: float
    high: float


def container_for(bits: int, signed: bool = True) -> ir.DataType:
    """The smallest native ONNX integer type that holds `bits`-bit values."""
    for width, dtype in _SIGNED_CONTAINERS if signed else _UNSIGNED_CONTAINERS:
        if bits <= width:
            return dtype
    raise ValueError(f"no integer container for {bits} bits")


@dataclass(frozen=True)
class Grid:
    """The integers [qmin, qmax] a quantized tensor may take, and how they are stored.

    `binary` is the 1-bit grid {-1, +1} (zero point 0): with an integer zero point a 2-level
    affine grid always contains 0, which would waste one of the two levels on weights that are
    centred on zero.
    """

    bits: int
    qmin: int
    qmax: int
    storage: ir.DataType
    symmetric: bool
    binary: bool = False

    @property
    def levels(self) -> int:
        return 2 if self.binary else self.qmax - self.qmin + 1

    def with_storage(self, storage: ir.DataType) -> Grid:
        return Grid(self.bits, self.qmin, self.qmax, storage, self.symmetric, self.binary)


def weight_only_grid(bits: int) -> Grid:
    """Grid for weight-only quantization at 1–16 bits, stored in the smallest native type.

    Affine (asymmetric per channel) from 2 bits up: it uses all 2**bits levels of the
    container, which matters most at 2–4 bits, and the DequantizeLinear -> float op chain that
    weight-only models run has no symmetric-weight requirement (onnxruntime's MatMulNBits
    fusion takes zero points). 1 bit is the symmetric binary grid, see `Grid`.
    """
    if not 1 <= bits <= 16:
        raise ValueError(f"weight bits must be in [1, 16], got {bits}")
    if bits == 1:
        return Grid(1, -1, 1, ir.DataType.INT2, symmetric=True, binary=True)
    half = 1 << (bits - 1)
    return Grid(bits, -half, half - 1, container_for(bits), symmetric=False)


def _reduce_axes(ndim: int, axis: int | None) -> tuple[int, ...]:
    return tuple(i for i in range(ndim) if axis is None or i != axis % ndim)


def tensor_range(x: np.ndarray, axis: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Min and max of `x`, over everything (axis None) or per slice along `axis`."""
    axes = _reduce_axes(x.ndim, axis)
    return np.min(x, axis=axes), np.max(x, axis=axes)


def scale_zero_point(
    rmin: np.ndarray | float, rmax: np.ndarray | float, grid: Grid,
    scale_dtype: np.dtype | type = np.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """Scale (`scale_dtype`, float32 unless given) and zero point (int64) that map
    [rmin, rmax] onto `grid`.

    docs/reference.md §2: scale = (max - min) / (qmax - qmin), zp = round(qmin - min / scale),
    clamped into [qmin, qmax]; the range is widened to contain 0 so that 0 is exact (padding
    and ReLU outputs rely on it). Symmetric grids use max(|min|, |max|) and zero point 0.
    A float16 scale (float16 models: DequantizeLinear outputs the scale's type) is rounded
    up, never down, so the range still fits the grid; the zero point follows that scale.
    """
    rmin = np.minimum(np.asarray(rmin, dtype=np.float64), 0.0)
    rmax = np.maximum(np.asarray(rmax, dtype=np.float64), 0.0)
    if grid.symmetric:
        absmax = np.maximum(np.maximum(-rmin, rmax), MIN_RANGE / 2)
        scale = _representable(absmax / _half_span(grid), scale_dtype)
        zero_point = np.zeros_like(scale, dtype=np.int64)
    else:
        span = np.maximum(rmax - rmin, MIN_RANGE)
        exact = span / (grid.qmax - grid.qmin)
        scale = _representable(exact, scale_dtype)
        # A rounded-up narrow scale moves the grid: the zero point must follow it.
        divisor = exact if scale.dtype == np.float32 else scale.astype(np.float64)
        zero_point = np.clip(np.rint(grid.qmin - rmin / divisor), grid.qmin, grid.qmax)
        zero_point = zero_point.astype(np.int64)
    # A channel holding only zeros (pruned) is exact on any grid; the floor's scale (1e-10)
    # would make its int32 bias scale, input x weight, too fine for its bias, which saturated
    # (a pruned conv's output cosine 0.72). It takes its neighbours' largest scale.
    return _neighbours_for_empty(scale, (rmax - rmin) <= 0), zero_point


def _half_span(grid: Grid) -> float:
    """Steps from 0 to the top of a symmetric grid; binary levels sit at the centres of the
    two halves of [-absmax, absmax]."""
    return 2.0 if grid.binary else (grid.qmax - grid.qmin) / 2.0


def _neighbours_for_empty(scale: np.ndarray, empty: np.ndarray) -> np.ndarray:
    """`scale` with the slices that hold only zeros (`empty`) at the largest scale of the
    others, where there are others."""
    if np.ndim(scale) and empty.any() and not empty.all():
        return np.where(empty, scale[~empty].max(), scale).astype(scale.dtype)
    return scale


def binary_scale(mean_abs: np.ndarray | float, scale_dtype: np.dtype | type = np.float32
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of the binary grid {-1, +1} for slices whose mean magnitude is
    `mean_abs`: sign(w) * mean|w| is the least-squares binary approximation of w (BWN /
    XNOR-Net). Half the largest magnitude, the min/max grid's level, is worse than all-zero
    weights on a Gaussian channel (relative error 1.0 against 0.6)."""
    mean_abs = np.asarray(mean_abs, np.float64)
    # An all-zero slice (pruned) takes its neighbours' largest level, as in scale_zero_point.
    scale = _neighbours_for_empty(
        _representable(np.maximum(mean_abs, MIN_RANGE / 4), scale_dtype), mean_abs <= 0)
    return scale, np.zeros_like(scale, dtype=np.int64)


INT32_MAX = 2**31 - 1


def bias_scale_floor(bias: np.ndarray, input_scale: float, channels: int
                     ) -> np.ndarray | None:
    """The least weight scale, per tensor (`channels` 1) or per output channel, at which the
    int32 bias of a layer, at scale input scale x weight scale, holds `bias`; None when the
    shapes do not pair. A (near) constant input has a floor-sized scale, and its layer's
    biases saturated (onnxruntime's quantizer raises the weight scale likewise)."""
    need = np.abs(np.asarray(bias, np.float64)).reshape(-1)
    if channels == 1:
        need = np.asarray(need.max(initial=0.0))
    elif need.size != channels:
        if need.size % channels:
            return None
        # A grouped ConvTranspose: output o reads channel o mod (M / groups) of the weight.
        need = need.reshape(-1, channels).max(axis=0)
    # 1e-4 above the least scale that holds it: float32 rounding must not tip it back over.
    return need / (np.float64(input_scale) * INT32_MAX) * 1.0001


def widened_range(rmin: np.ndarray, rmax: np.ndarray, grid: Grid, min_scale: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """[rmin, rmax] widened so that `scale_zero_point` gives at least `min_scale`."""
    lo, hi = np.minimum(rmin, 0.0), np.maximum(rmax, 0.0)
    if grid.symmetric:
        half = min_scale * _half_span(grid)
        return np.minimum(lo, -half), np.maximum(hi, half)
    return lo, np.maximum(hi, lo + min_scale * (grid.qmax - grid.qmin))


def fixed_scale_zero_point(low: float, high: float, grid: Grid) -> tuple[np.float32, np.int64]:
    """The grid of an output whose range is known in advance: (high - low) split into as many
    steps as the grid has levels, so the step is 1/k for the ranges used (Softmax [0, 1]:
    1/256, which onnxruntime's QLinearSoftmax requires; Tanh [-1, 1]: 1/128, zp 128), and the
    top value saturates half a step below `high`."""
    scale = np.float32((high - low) / (grid.qmax - grid.qmin + 1))
    return scale, np.int64(np.rint(grid.qmin - low / np.float64(scale)))


def _representable(scale: np.ndarray, dtype: np.dtype | type) -> np.ndarray:
    """`scale` in `dtype`: float32 to nearest; narrower types rounded up to a positive value."""
    if np.dtype(dtype) == np.float32:
        return scale.astype(np.float32)
    narrow = np.asarray(scale).astype(dtype)
    low = narrow.astype(np.float64) < scale
    narrow = np.where(low, np.nextafter(narrow, np.asarray(np.inf, dtype)), narrow)
    return np.maximum(narrow, np.finfo(dtype).smallest_subnormal).astype(dtype)


def _broadcast(param: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    if axis is None or param.ndim == 0:
        return param
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return param.reshape(shape)


def quantize(
    x: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray,
    grid: Grid,
    axis: int | None = None,
    dtype: np.dtype | type = np.int32,
) -> np.ndarray:
    """Integers of `x` on `grid` as `dtype`, rounding half to even like QuantizeLinear."""
    s = _broadcast(np.asarray(scale, np.float32), x.ndim, axis)
    if grid.binary:
        return np.where(x >= 0, 1, -1).astype(dtype)
    # float32 carries 24 bits: enough to round onto grids of up to 12 bits exactly, not 16.
    work = np.float32 if grid.qmax - grid.qmin < 4096 else np.float64
    q = np.asarray(np.divide(x, s, dtype=work))  # 0-d input gives a scalar otherwise
    np.rint(q, out=q)
    q += _broadcast(np.asarray(zero_point, work), x.ndim, axis)
    np.clip(q, grid.qmin, grid.qmax, out=q)
    return q.astype(dtype)


def dequantize(
    q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None = None
) -> np.ndarray:
    """Float values of integers `q`: (q - zero_point) * scale, as DequantizeLinear computes."""
    s = _broadcast(np.asarray(scale, np.float32), q.ndim, axis)
    z = _broadcast(np.asarray(zero_point, np.int64), q.ndim, axis)
    return ((q.astype(np.int64) - z) * s).astype(np.float32)


def exact_in_float32(grid: Grid) -> bool:
    """Whether float32 arithmetic gives `quantize` and `dequantize` results bit for bit:
    below 4096 levels the integers, q - zero point and the float32 steps are exact in float32,
    and (q - zp) * scale, a product of two float32 values, is rounded once, as in float64 then
    to float32 (`fake_quantize` relies on it too)."""
    return not grid.binary and grid.qmax - grid.qmin < 4096


def fake_quantize(x: np.ndarray, scale: float | np.ndarray, zero_point: int | np.ndarray,
                  grid: Grid, out: np.ndarray | None = None) -> np.ndarray:
    """Quantize-dequantize of `x` as float32 (scale and zero point scalars or broadcast to x),
    bit for bit what `quantize` then `dequantize` give, without their integer temporaries:
    the layer report runs it on every activation of every sample, GPTQ's range search on
    every weight per shrink factor. `out`: a float32 array of x's shape to write into."""
    if not exact_in_float32(grid):
        q = dequantize(quantize(x, scale, zero_point, grid), scale, zero_point)
        if out is None:
            return q
        out[...] = q
        return out
    s = np.asarray(scale, np.float32)
    z = np.asarray(zero_point, np.float32)
    # Integers and float32 steps below 4096 levels are exact in float32, and the final product
    # of two float32 values is rounded once, as DequantizeLinear's is.
    q = np.asarray(np.divide(x, s, dtype=np.float32, out=out))
    np.rint(q, out=q)
    q += z
    np.clip(q, grid.qmin, grid.qmax, out=q)
    q -= z
    q *= s
    return q


def container_range(storage: ir.DataType) -> tuple[int, int]:
    """The integers an ONNX integer type holds (a zero point may use all of them)."""
    for width, dtype in _SIGNED_CONTAINERS:
        if dtype == storage:
            return -(1 << (width - 1)), (1 << (width - 1)) - 1
    for width, dtype in _UNSIGNED_CONTAINERS:
        if dtype == storage:
            return 0, (1 << width) - 1
    raise ValueError(f"{storage} is not an integer container")


def fold_correction(scale: np.ndarray, zero_point: np.ndarray, factor: np.ndarray,
                    shift: np.ndarray, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Parameters whose dequantized values are (q - zp) * scale * factor + shift as nearly
    as integers allow (MindSpore's weight correction, docs/reference.md §6): the factor folds
    into the scale (kept in its dtype), the shift into the zero point in whole steps, on affine
    grids and only while the zero point fits the container. All arrays broadcast together."""
    new_scale = (np.asarray(scale, np.float64) * factor).astype(np.asarray(scale).dtype)
    zero_point = np.asarray(zero_point, np.int64)
    if grid.symmetric:
        return new_scale, np.broadcast_to(zero_point, new_scale.shape).copy()
    steps = np.rint(np.asarray(shift, np.float64) / new_scale.astype(np.float64))
    low, high = container_range(grid.storage)
    return new_scale, np.clip(zero_point - steps, low, high).astype(np.int64)


def activation_grid(bits: int) -> Grid:
    """uint8 asymmetric activations, [0, 2**bits - 1] in the uint8 container (docs/reference.md §3).

    Below 8 bits the grid is narrowed inside uint8, so onnxruntime still fuses integer kernels.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"activation bits must be in [1, 8], got {bits}")
    return Grid(bits, 0, 2**bits - 1, ir.DataType.UINT8, symmetric=False)


def fused_weight_grid(bits: int, reduce_range: bool = True) -> Grid:
    """int8 symmetric weights with zero point 0, [-(2**(bits-1) - 1), 2**(bits-1) - 1].

    onnxruntime's U8S8 kernels (QLinearConv, QGemm, ...) want symmetric int8 weights
    (docs/reference.md §3); the narrow range keeps -128 out. `reduce_range` caps weights at
    7 bits ([-63, 63]) against the int16 saturation of x86 CPUs without VNNI
    (docs/decisions.md, reduce_range). 1 bit uses the binary grid {-1, +1}, since the narrow
    grid would be {0}.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"weight bits must be in [1, 8], got {bits}")
    if bits == 1:
        return Grid(1, -1, 1, ir.DataType.INT8, symmetric=True, binary=True)
    half = (1 << (bits - 1)) - 1
    if reduce_range:
        half = min(half, U8S8_SAFE_WEIGHT)
    return Grid(bits, -half, half, ir.DataType.INT8, symmetric=True)


# 255 * 63 * 2 = 32130 fits int16: the largest weight magnitude without U8S8 saturation.
U8S8_SAFE_WEIGHT = 63


@dataclass(frozen=True)
class Encoding:
    """The grid one quantized tensor is on: scale and zero point (0-d, or 1-d along its
    channel axis) mapping to `grid`, as its QuantizeLinear / DequantizeLinear hold them."""

    scale: np.ndarray  # float32
    zero_point: np.ndarray  # int64
    grid: Grid


# AIMET / QNN encodings describe every grid in an unsigned view: real = (q_u + offset) * scale
# with q_u in [0, 2**bits - 1] (docs/reference.md §5).


def used_bits(grid: Grid) -> int:
    """The bits a grid spans: 7 for the [-63, 63] weights of `reduce_range`, whatever bit
    width the setting says."""
    return grid.qmax.bit_length() + (1 if grid.qmin < 0 else 0)


def offsets(encoding: Encoding) -> np.ndarray:
    """QNN's offset of each channel: -zero point, in the unsigned view of a signed grid."""
    zero_point = encoding.zero_point.astype(np.int64)
    if encoding.grid.qmin < 0:
        return -(zero_point + (1 << (used_bits(encoding.grid) - 1)))
    return -zero_point


def encoded_range(scale: np.ndarray, offset: np.ndarray, bits: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """AIMET's min and max of a grid: offset * scale and (offset + 2**bits - 1) * scale."""
    low = offset.astype(np.float64) * scale.astype(np.float64)
    return low, low + ((1 << bits) - 1) * scale.astype(np.float64)


def activation_encoding(scale: np.ndarray, offset: np.ndarray, bits: int) -> Encoding | None:
    """The uint8 grid of an activation's QNN encoding (zero point = -offset); None above 8
    bits, which uint8 cannot hold, or when the zero point falls off the grid."""
    grid = Grid(bits, 0, (1 << bits) - 1, ir.DataType.UINT8, symmetric=False)
    zero_point = -offset.astype(np.int64)
    if bits > 8 or np.any((zero_point < grid.qmin) | (zero_point > grid.qmax)):
        return None
    return Encoding(scale.astype(np.float32), zero_point, grid)


def weight_encoding(scale: np.ndarray, offset: np.ndarray, bits: int, symmetric: bool
                    ) -> Encoding | None:
    """The int8 grid of a weight's QNN encoding (zero point = -offset - 2**(bits - 1)); None
    above 8 bits or when the zero point falls off the grid. A symmetric encoding has zero
    point 0 on [-2**(bits-1), 2**(bits-1) - 1] (AIMET's offset -2**(bits-1)), or on the
    narrow [-(2**(bits-1) - 1), 2**(bits-1) - 1] (its "strict" offset -2**(bits-1) + 1)."""
    half = 1 << (bits - 1)
    offset = offset.astype(np.int64)
    if bits > 8:
        return None
    if symmetric:
        strict = bool(np.all(offset == -half + 1))
        if not (strict or np.all(offset == -half)):
            return None
        grid = Grid(bits, -half + strict, half - 1, ir.DataType.INT8, symmetric=True)
        return Encoding(scale.astype(np.float32), np.zeros_like(offset), grid)
    grid = Grid(bits, -half, half - 1, ir.DataType.INT8, symmetric=False)
    zero_point = -offset - half
    if np.any((zero_point < grid.qmin) | (zero_point > grid.qmax)):
        return None
    return Encoding(scale.astype(np.float32), zero_point, grid)


def range_encoding(low: np.ndarray, high: np.ndarray, bits: int, symmetric: bool
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Scale and QNN offset of a min/max-only encoding, as AIMET computes them
    (scale = (max - min) / (2**bits - 1), offset = round(min / scale); symmetric:
    scale = absmax / (2**(bits-1) - 1), offset = -2**(bits-1))."""
    if symmetric:
        half = (1 << (bits - 1)) - 1
        grid = Grid(bits, -half, half, ir.DataType.INT8, symmetric=True)
        scale, _ = scale_zero_point(low, high, grid)
        return scale, np.full(np.shape(scale), -(half + 1), np.int64)
    grid = Grid(bits, 0, (1 << bits) - 1, ir.DataType.UINT8, symmetric=False)
    scale, zero_point = scale_zero_point(low, high, grid)
    return scale, -zero_point
