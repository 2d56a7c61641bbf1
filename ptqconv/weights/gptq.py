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

from dataclasses import dataclass

import numpy as np

from ptqconv import qparams

# GPTQ's defaults (Frantar et al. 2022, §4 and the reference implementation).
DAMPING = 0.01  # of the mean of diag(H)
BLOCK = 128  # columns per lazy batch update
# A failed Cholesky retries with 10x the damping this many times before keeping RTN.
DAMPING_RETRIES = 6

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
    return np.einsum("...rc,...rc->...r", e @ np.asarray(h, dtype), e, dtype=np.float64)


def _add_diagonal(h: np.ndarray, values: np.ndarray) -> None:
    """h[g] += values[g] * I in place, for h [G, C, C]."""
    g, c, _ = h.shape
    h.reshape(g, c * c)[:, :: c + 1] += np.asarray(values, h.dtype)[:, None]


def _unit_upper(h: np.ndarray, dtype: np.dtype | type) -> np.ndarray:
    """A with H = (I + A) D (I + A)^T (only its strictly upper part is read), from the Cholesky
    factor of the column-reversed H. Raises LinAlgError when H is not positive definite."""
    upper = np.linalg.cholesky(h[..., ::-1, ::-1])[..., ::-1, ::-1]  # H = U U^T
    diag = np.diagonal(upper, axis1=-2, axis2=-1)
    return np.divide(upper, diag[..., None, :], dtype=dtype)


def _factor(h: np.ndarray, dtype: np.dtype | type) -> tuple[np.ndarray, np.ndarray]:
    """Damp h [G, C, C] in place and factor it; per group, whether every damping failed."""
    g = h.shape[0]
    mean = np.mean(np.diagonal(h, axis1=-2, axis2=-1), axis=-1)
    _add_diagonal(h, DAMPING * mean)
    try:
        return _unit_upper(h, dtype), np.zeros(g, bool)
    except np.linalg.LinAlgError:
        pass
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
    work = np.array(h, np.float64)
    diag = np.diagonal(work, axis1=-2, axis2=-1).copy()
    dead = diag <= 0
    for i in np.nonzero(dead.any(axis=1))[0]:
        # Isolated with a unit-free diagonal: such a column is rounded to nearest and its
        # zero rows and columns carry no error to the others.
        idx = np.nonzero(dead[i])[0]
        live = diag[i][~dead[i]]
        work[i, idx, :] = 0.0
        work[i, :, idx] = 0.0
        work[i, idx, idx] = live.mean() if live.size else 1.0
    order = np.broadcast_to(np.arange(cols), (g, cols))
    if act_order:
        order = np.argsort(-diag, axis=-1, kind="stable")
        work = work[np.arange(g)[:, None, None], order[:, :, None], order[:, None, :]]
    a, failed = _factor(work, work_dtype)
    del work
    take = order[:, None, :]
    w0 = np.take_along_axis(w, take, axis=-1).astype(work_dtype)
    s = np.take_along_axis(scale, take, axis=-1)
    z = np.take_along_axis(zero_point, take, axis=-1)
    running = w0.copy()
    q = np.zeros((g, rows, cols), np.int32)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        part = running[..., i1:i2].copy()
        errors = np.zeros_like(part)
        a1 = a[:, i1:i2, i1:i2]
        for k in range(i2 - i1):
            col = i1 + k
            qk = qparams.quantize(part[..., k], s[..., col], z[..., col], grid)
            q[..., col] = qk
            err = w0[..., col] - qparams.dequantize(qk, s[..., col], z[..., col])
            errors[..., k] = err
            if k + 1 < i2 - i1:
                part[..., k + 1:] += err[..., None] * a1[:, None, k, k + 1:]
        if i2 < cols:
            running[..., i2:] += errors @ a[:, i1:i2, i2:]
    q = np.take_along_axis(q, np.argsort(order, axis=-1)[:, None, :], axis=-1)
    q[failed] = nearest[failed]
    # Both objectives in one product: float32 for large layers (the guard only compares
    # them), float64 where that is cheap, since a near-singular H makes float32 lose digits
    # of e H e^T (a rank-one H of one sample: 4% off).
    both = qparams.dequantize(np.concatenate([q, nearest], axis=-2),
                              np.concatenate([scale, scale], axis=-2),
                              np.concatenate([zero_point, zero_point], axis=-2))
    exact = both.size * h.shape[-1] <= EXACT_PRODUCT_MACS
    errs = row_errors(np.concatenate([w, w], axis=-2), both, h,
                      dtype=np.float64 if exact else np.float32)
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
