"""GPTQ (Frantar et al. 2022): round a layer's weights column by column, each column's
rounding error fed back into the columns not yet rounded, weighted by the second moment H of
the layer's inputs, so that the layer's output error tr((W - Q) H (W - Q)^T) stays small.

Conventions: a problem is W [G, R, C] (G independent groups: a grouped or depthwise conv's
groups, else 1; rows are output channels, columns inputs) against H [G, C, C] = sum of x^T x
over the inputs x of each group. The scale and zero point are given per weight value,
broadcast to W's shape, so per-channel, per-tensor and block-wise layouts are all the same
problem here: GPTQ changes only the integers, never the DequantizeLinear parameters (which
`passes.gptq` may have narrowed first, `weights.clipping`).

The sweep is GPTQ's in its LDL form (QuIP, Chee et al. 2023, Thm. 6, the same algorithm):
with H = (I + A) D (I + A)^T, A strictly upper triangular, column k is rounded from
w_k + sum_{i<k} (w_i - q_i) A[i, k]. One Cholesky factorisation of the column-reversed H
replaces GPTQ's Cholesky, inverse and second Cholesky; damping is 1% of the mean diagonal and
columns go in lazy blocks of 128 (GPTQ's defaults); act order (columns by decreasing diag(H))
is optional.

Robustness: an input that was 0 on every sample (diag(H) <= 0) keeps its nearest value and
neither receives nor spreads error; a failed Cholesky retries with 10x the damping, then keeps
the nearest integers; the guard gives each output row back its nearest integers when GPTQ's
objective on that row is not lower (the objective splits by row; unguarded GPTQ lost to
rounding on tiny layers, docs/decisions.md, GPTQ guard).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ptqconv import qparams

# GPTQ's defaults (Frantar et al. 2022, §4 and the reference implementation).
DAMPING = 0.01  # of the mean of diag(H)
BLOCK = 128  # columns per lazy batch update
# A failed Cholesky retries with 10x the damping this many times before keeping RTN.
DAMPING_RETRIES = 6

# Factorisations of H from this many columns go in blocks of CHOLESKY_BLOCK (`_upper_cholesky`).
BLOCKED_CHOLESKY = 2048
CHOLESKY_BLOCK = 256

# Objective products up to this many multiply-adds are computed in float64.
EXACT_PRODUCT_MACS = 1 << 26


@dataclass
class GPTQResult:
    """Integers `q` (int32, W's shape) and, per group, the objective tr(E H E^T) of the
    result and of round-to-nearest with the same parameters; `fallback` marks the groups that
    kept round-to-nearest because H could not be factored; `rows_nearest` counts the rows the
    guard gave back to round-to-nearest."""

    q: np.ndarray
    error: np.ndarray
    nearest_error: np.ndarray
    fallback: np.ndarray
    rows_nearest: int


def row_errors(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray,
               dtype: np.dtype | type = np.float64) -> np.ndarray:
    """Per row of [G, R, C]: e H e^T with e = w - w_hat, as float64 (product in `dtype`)."""
    e = (np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)).astype(dtype)
    return _row_products(e, h)


def _row_products(e: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Per row of e [G, R, C]: e H e^T as float64, the product in e's dtype."""
    return np.einsum("...rc,...rc->...r", e @ np.asarray(h, e.dtype), e, dtype=np.float64)


def _float32_exact(grid: qparams.Grid, zero_point: np.ndarray) -> bool:
    """Whether float32 steps give `qparams.quantize` and `qparams.dequantize` bit for bit:
    on a grid of `qparams.exact_in_float32` with zero points below 2**23 (any its container
    holds), q - zero point is exact in float32 too."""
    if not qparams.exact_in_float32(grid):
        return False
    return not zero_point.size or (int(zero_point.min()) > -(1 << 23)
                                   and int(zero_point.max()) < 1 << 23)


def _objectives(w: np.ndarray, integers: tuple[np.ndarray, ...], scale: np.ndarray,
                zero_point: np.ndarray, h: np.ndarray, dtype: np.dtype | type, lean: bool
                ) -> np.ndarray:
    """`row_errors` of w (float32) against each of `integers` dequantized, their rows
    stacked [G, n * R] as in one product, without `row_errors`' float64 copies: a float32
    difference is the float64 one rounded (53 >= 2 * 24 + 2 bits: rounding twice is
    rounding once)."""
    rows = w.shape[-2]
    e = np.empty((*w.shape[:-2], len(integers) * rows, w.shape[-1]), dtype)
    for i, q in enumerate(integers):
        part = e[..., i * rows:(i + 1) * rows, :]
        if lean:  # dequantized in float32 (`_float32_exact`)
            w_hat = np.subtract(q, zero_point, dtype=np.float32)
            w_hat *= scale
        else:
            w_hat = qparams.dequantize(q, scale, zero_point)
        np.subtract(w, w_hat, out=part, dtype=dtype)
    return _row_products(e, h)


def _add_diagonal(h: np.ndarray, values: np.ndarray) -> None:
    """h[g] += values[g] * I in place, for h [G, C, C]."""
    g, c, _ = h.shape
    h.reshape(g, c * c)[:, :: c + 1] += np.asarray(values, h.dtype)[:, None]


def _unit_upper(h: np.ndarray, dtype: np.dtype | type, overwrite: bool = False) -> np.ndarray:
    """A with H = (I + A) D (I + A)^T (only its strictly upper part is read), from the Cholesky
    factor of the column-reversed H. Raises LinAlgError when H is not positive definite.
    `overwrite`: a large h (float64, C-contiguous) becomes scratch, also when it raises."""
    if h.shape[-1] < BLOCKED_CHOLESKY:
        upper = np.linalg.cholesky(h[..., ::-1, ::-1])[..., ::-1, ::-1]  # H = U U^T
        diag = np.diagonal(upper, axis1=-2, axis2=-1).astype(dtype)
        # Cast, then divide in place: np.divide(..., dtype=dtype) casts its operands first
        # too, but took five times as long over the reversed factor.
        unit = upper.astype(dtype, order="C")
    else:
        # In place: at C = 4608 each fresh 170 MB matrix cost up to 0.4 s of page faults.
        upper = h if overwrite else np.array(h, np.float64)
        for group in upper:
            _upper_cholesky(group)
        diag = np.diagonal(upper, axis1=-2, axis2=-1).astype(dtype)
        unit = _narrowed(upper, dtype)
    unit /= diag[..., None, :]
    return unit


def _narrowed(x: np.ndarray, dtype: np.dtype | type) -> np.ndarray:
    """x (C-contiguous, float64) as `dtype` (no wider) in x's own memory, which it leaves
    scratch: in chunks, each written over values already read."""
    dtype = np.dtype(dtype)
    assert x.flags.c_contiguous and dtype.itemsize <= x.itemsize
    if dtype == x.dtype:
        return x
    flat = x.reshape(-1)
    out = flat.view(np.uint8)[: flat.size * dtype.itemsize].view(dtype)
    step = 1 << 20
    for start in range(0, flat.size, step):
        # The first chunk overlaps its own source: numpy's assignment copies it first.
        out[start:start + step] = flat[start:start + step]
    return out.reshape(x.shape)


def _upper_cholesky(h: np.ndarray) -> None:
    """U with H = U U^T, U upper triangular, in place of the upper triangle of h [C, C] (the
    only part read; the strict lower one is left scratch). Blocked from the bottom right corner
    with a matrix product per block: 1.6-1.9x as fast as numpy's cholesky at C = 4608, where
    that took 40% of GPTQ's time; the same factor up to rounding (under 1 in 10^4 values of a
    float32 A move, by one unit in the last place; ResNet-18's integers did not). Raises
    LinAlgError when H is not positive definite."""
    n = h.shape[0]
    for end in range(n, 0, -CHOLESKY_BLOCK):
        start = max(end - CHOLESKY_BLOCK, 0)
        column = h[:end, start:end]
        if end < n:
            column -= h[:end, end:] @ h[start:end, end:].T
        # The block's upper factor from its upper triangle, as _unit_upper takes H's.
        u = np.linalg.cholesky(column[start:][::-1, ::-1])[::-1, ::-1]
        column[start:] = u
        if start:
            column[:start] = column[:start] @ np.linalg.inv(u).T


def _factor(prepared: Callable[[], np.ndarray], dtype: np.dtype | type
            ) -> tuple[np.ndarray, np.ndarray]:
    """Damp and factor H [G, C, C], a fresh float64 copy from `prepared` (one, unless that
    fails); per group, whether every damping failed."""
    h = prepared()
    g = h.shape[0]
    mean = np.mean(np.diagonal(h, axis1=-2, axis2=-1), axis=-1)
    _add_diagonal(h, DAMPING * mean)
    try:
        return _unit_upper(h, dtype, overwrite=True), np.zeros(g, bool)
    except np.linalg.LinAlgError:
        pass
    h = prepared()  # the first try may have overwritten it
    _add_diagonal(h, DAMPING * mean)
    out = np.zeros(h.shape, dtype)
    failed = np.zeros(g, bool)
    for i in range(g):
        damp = DAMPING
        for _ in range(DAMPING_RETRIES + 1):
            try:
                out[i] = _unit_upper(h[i:i + 1], dtype)[0]
                break
            except np.linalg.LinAlgError:
                _add_diagonal(h[i:i + 1], np.array([9 * damp * mean[i]]))
                damp *= 10
        else:
            failed[i] = True
    return out, failed


def _column_rounding(grid: qparams.Grid, s: np.ndarray, z: np.ndarray, lean: bool
                     ) -> Callable[[np.ndarray, int, np.ndarray], np.ndarray]:
    """round(x, col, out): writes the integers of x [G, R], column `col` of the parameters
    s, z [G, C, R] (views), to `out` and returns their dequantized values, as
    `qparams.quantize` and `qparams.dequantize` give them (`lean`: see `_float32_exact`)."""
    if not lean:
        s, z = np.ascontiguousarray(s), np.ascontiguousarray(z)

        def general(x: np.ndarray, col: int, out: np.ndarray) -> np.ndarray:
            out[...] = qparams.quantize(x, s[:, col], z[:, col], grid)
            return qparams.dequantize(out, s[:, col], z[:, col])
        return general
    # The sweep rounds one [G, R] column at a time, where quantize / dequantize spent most of
    # their time converting dtypes: the same float32 steps in place (`_float32_exact`).
    sf, zf = np.ascontiguousarray(s, np.float32), np.ascontiguousarray(z, np.float32)
    buf = np.empty((s.shape[0], s.shape[2]), np.float32)

    def float32_steps(x: np.ndarray, col: int, out: np.ndarray) -> np.ndarray:
        np.divide(x, sf[:, col], out=buf, dtype=np.float32)
        np.rint(buf, out=buf)
        np.add(buf, zf[:, col], out=buf)
        np.maximum(buf, grid.qmin, out=buf)
        np.minimum(buf, grid.qmax, out=buf)
        out[...] = buf
        np.subtract(buf, zf[:, col], out=buf)
        return np.multiply(buf, sf[:, col], out=buf)
    return float32_steps


def _sweep(w0: np.ndarray, a: np.ndarray, s: np.ndarray, z: np.ndarray, grid: qparams.Grid,
           block: int, lean: bool) -> np.ndarray:
    """The integers [G, R, C] of w0 rounded column by column, each column's error spread
    through A (`_unit_upper`), in lazy blocks of `block` columns; s, z: the parameters."""
    g, rows, cols = w0.shape
    # Columns as rows: each column's vectors are contiguous.
    w0t = np.ascontiguousarray(np.swapaxes(w0, -1, -2))
    round_column = _column_rounding(grid, np.swapaxes(s, -1, -2), np.swapaxes(z, -1, -2), lean)
    q = np.empty((g, cols, rows), np.int32)
    err = np.empty((g, rows), w0.dtype)
    running = w0.copy()
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        part = np.swapaxes(running[..., i1:i2], -1, -2).copy()
        errors = np.empty((g, rows, i2 - i1), w0.dtype)  # [G, R, B] as the product wants
        a1 = a[:, i1:i2, i1:i2]
        for k in range(i2 - i1):
            col = i1 + k
            np.subtract(w0t[:, col], round_column(part[:, k], col, q[:, col]), out=err)
            errors[..., k] = err
            if k + 1 < i2 - i1:
                part[:, k + 1:] += err[:, None, :] * a1[:, k, k + 1:, None]
        if i2 < cols:
            running[..., i2:] += errors @ a[:, i1:i2, i2:]
    return np.ascontiguousarray(np.swapaxes(q, -1, -2))


def gptq(w: np.ndarray, h: np.ndarray, grid: qparams.Grid, scale: np.ndarray,
         zero_point: np.ndarray, *, act_order: bool = False, guard: bool = True,
         block: int = BLOCK, work_dtype: np.dtype | type = np.float32) -> GPTQResult:
    """GPTQ integers of w [G, R, C] against h [G, C, C] on `grid`, with the scale and zero
    point of every weight value (broadcastable to w)."""
    w = np.asarray(w, np.float32)
    g, rows, cols = w.shape
    if np.shape(h) != (g, cols, cols):
        raise ValueError(f"H shape {np.shape(h)} does not match the weight's {w.shape}")
    scale = np.broadcast_to(np.asarray(scale, np.float32), w.shape)
    zero_point = np.broadcast_to(np.asarray(zero_point, np.int64), w.shape)
    nearest = qparams.quantize(w, scale, zero_point, grid)
    h = np.asarray(h)
    diag = np.diagonal(h, axis1=-2, axis2=-1).astype(np.float64)
    dead = diag <= 0
    order = np.argsort(-diag, axis=-1, kind="stable") if act_order else None

    def prepared() -> np.ndarray:
        """GPTQ's own float64 copy of H, in the sweep's column order."""
        work = np.array(h, np.float64)
        for i in np.nonzero(dead.any(axis=1))[0]:
            # Isolated with a unit-free diagonal: such a column is rounded to nearest and its
            # zero rows and columns carry no error to the others.
            idx = np.nonzero(dead[i])[0]
            live = diag[i][~dead[i]]
            work[i, idx, :] = 0.0
            work[i, :, idx] = 0.0
            work[i, idx, idx] = live.mean() if live.size else 1.0
        if order is not None:
            work = work[np.arange(g)[:, None, None], order[:, :, None], order[:, None, :]]
        return work

    a, failed = _factor(prepared, work_dtype)
    lean = _float32_exact(grid, zero_point)
    if order is None:
        q = _sweep(w.astype(work_dtype), a, scale, zero_point, grid, block, lean)
    else:
        take = order[:, None, :]
        q = _sweep(np.take_along_axis(w, take, axis=-1).astype(work_dtype), a,
                   np.take_along_axis(scale, take, axis=-1),
                   np.take_along_axis(zero_point, take, axis=-1), grid, block, lean)
        q = np.take_along_axis(q, np.argsort(order, axis=-1)[:, None, :], axis=-1)
    q[failed] = nearest[failed]
    # Both objectives in one product: float32 for large layers (the guard only compares
    # them), float64 where that is cheap, since a near-singular H makes float32 lose digits
    # of e H e^T (a rank-one H of one sample: 4% off).
    exact = 2 * w.size * cols <= EXACT_PRODUCT_MACS
    if exact:
        h_product = h
    else:  # a float32 H, in A's memory when it fits (A is done with)
        fits = a.dtype == np.float32 and a.flags.c_contiguous
        h_product = a if fits else np.empty(h.shape, np.float32)
        np.copyto(h_product, h, casting="same_kind")
    del a
    errs = _objectives(w, (q, nearest), scale, zero_point, h_product,
                       np.float64 if exact else np.float32, lean)
    err, err_nearest = errs[..., :rows], errs[..., rows:]
    rows_nearest = 0
    if guard:
        worse = err > err_nearest
        rows_nearest = int(worse.sum())
        q[worse] = nearest[worse]
        err = np.where(worse, err_nearest, err)
    return GPTQResult(q, err.sum(-1), err_nearest.sum(-1), failed, rows_nearest)


def conv_rows(w: np.ndarray, group: int) -> np.ndarray:
    """A Conv weight [M, C/g, k...] as [g, M/g, C/g * prod(k)]: the column of input channel c,
    kernel offset (i, j) is c * kh * kw + i * kw + j, the im2col order of `calibrate.moments`."""
    m = w.shape[0]
    if m % group:
        raise ValueError(f"{m} output channels do not split into {group} groups")
    return w.reshape(group, m // group, -1)
