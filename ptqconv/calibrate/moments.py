"""Second moments of layer inputs, H = sum of x^T x over every input row a layer's weight
multiplies, which GPTQ weighs its rounding errors with (`weights.gptq`).

A MatMul/Gemm input [..., K] gives a [K, K] matrix (`DenseMoment`); a Conv input gives one
[C/g * prod(k)]^2 matrix per group over its im2col patches (`Im2colMoment`), columns in the
order of the weight reshaped to [M, -1]. Patches are never all materialised: they are copied
a chunk of output rows at a time from a strided view of the padded input, buffered until a
BLAS call has enough rows to run at speed, multiplied out in float32 (numpy calls syrk for
P^T P) and added into a float64 sum. Memory: the sum, plus one buffer of at most
`MAX_BUFFER` values (twice that while it is joined), whatever the number of samples.

A Conv of stride 1 and dilation 1 with one group and a kernel of more than one tap, whose
patches are all kept, takes no patches: its matrix is a [kh*kw]^2 grid of [C, C] blocks, the
block of taps (a, b) being the sum of x(u) x(u + b - a)^T over the input positions u that tap
a reads. Blocks of the same lag b - a differ only by the window u runs over, which moves by
one row or column from tap to tap, so each lag takes one full product and, for each further
tap, the two strips that enter and leave the window (`_lagged_blocks`): 12.5 instead of 40.5
multiplies of [C, C] per position for 3x3 kernels, the same sums up to float32 rounding
(docs/decisions.md, second moments by lag). Inputs are buffered up to `CHUNK` values (a sample
larger than that takes the patch path) and at most three copies of that size are alive.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from ptqconv.calibrate.statistics import Accumulator
from ptqconv.graph.ops import same_pads

# Patch values copied at once (16 MB of float32), and the most buffered before a multiply.
CHUNK = 1 << 22
MAX_BUFFER = 1 << 23
# Rows buffered before a multiply: syrk on 2048 rows ran 1.7x faster per row than on 910
# (K = 4608; docs/decisions.md, second moments).
MIN_ROWS = 2048
# Early conv layers have far more patches than their matrix needs: keep every s-th output
# row and column so about this many patches per matrix column remain (docs/decisions.md).
ROWS_PER_COLUMN = 32


class _Moment(Accumulator):
    """A float64 sum of P^T P per group over buffered float32 row chunks P [G, rows, cols]."""

    def __init__(self, groups: int, cols: int) -> None:
        self.groups, self.cols = groups, cols
        self.total: np.ndarray | None = None
        self.rows = 0
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._flush_at = min(max(CHUNK, MIN_ROWS * cols * groups), MAX_BUFFER)

    def _add(self, rows: np.ndarray) -> None:
        if self._buffer and self._buffered + rows.size > self._flush_at:
            self._flush()
        self._buffer.append(rows)
        self._buffered += rows.size
        if self._buffered >= self._flush_at:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        p = self._buffer[0] if len(self._buffer) == 1 else np.concatenate(self._buffer, axis=1)
        self._buffer, self._buffered = [], 0
        if self.total is None:
            self.total = np.zeros((self.groups, self.cols, self.cols), np.float64)
        if self.groups == 1:
            self.total[0] += p[0].T @ p[0]
        else:
            self.total += np.matmul(p.transpose(0, 2, 1), p)

    def matrices(self) -> np.ndarray | None:
        """The sums, [G, cols, cols] float64; None before any update."""
        self._flush()
        return self.total

    def merge(self, other: _Moment) -> None:
        found = other.matrices()
        if found is None:
            return
        self._flush()
        self.total = found.copy() if self.total is None else self.total + found
        self.rows += other.rows

    @property
    def nbytes(self) -> int:
        return self.groups * self.cols * self.cols * 8


class DenseMoment(_Moment):
    """sum x^T x over every row of a MatMul/Gemm input [..., K]."""

    def __init__(self, cols: int) -> None:
        super().__init__(1, cols)

    def update(self, x: np.ndarray) -> None:
        if x.ndim == 0 or x.shape[-1] != self.cols:
            return
        flat = x.reshape(-1, self.cols)
        step = max(1, CHUNK // self.cols)
        for r0 in range(0, flat.shape[0], step):
            self._add(np.array(flat[None, r0:r0 + step], np.float32))
        self.rows += flat.shape[0]


def output_size(size: int, k: int, stride: int, begin: int, end: int, dilation: int) -> int:
    return (size + begin + end - dilation * (k - 1) - 1) // stride + 1


class Im2colMoment(_Moment):
    """Per-group im2col second moments of one Conv's input (NCHW, or NCW for Conv1d).

    `pads` are ONNX's (begins..., ends...), or resolved from `auto_pad` on the first input.
    With `samples` given, layers with many more patches than their matrices need keep every
    s-th output row and column (the offset rotating per update so that samples cover every
    position): s = floor(sqrt(patches / (ROWS_PER_COLUMN * cols))).
    """

    def __init__(self, channels: int, kernel: tuple[int, ...], strides: tuple[int, ...],
                 pads: tuple[int, ...], dilations: tuple[int, ...], group: int = 1,
                 auto_pad: str = "NOTSET", samples: int = 0) -> None:
        if channels % group:
            raise ValueError(f"{channels} channels do not split into {group} groups")
        super().__init__(group, channels // group * math.prod(kernel))
        self.channels, self.kernel, self.strides = channels, kernel, strides
        self.pads, self.dilations, self.auto_pad = pads, dilations, auto_pad
        self.samples = samples
        self.stride: int | None = None
        self._updates = 0
        # Padded channels-last inputs [n, H, W, C] waiting for `_lagged_blocks`.
        self._padded: list[np.ndarray] = []
        self._padded_values = 0
        self._padded_pads = (0, 0, 0, 0)
        self._pairs: list[tuple[int, int]] = []
        self._blocks: np.ndarray | None = None  # [pairs, C, C] float64, folded by `matrices`

    def update(self, x: np.ndarray) -> None:
        rank = len(self.kernel)
        if x.ndim != rank + 2 or rank not in (1, 2) or x.shape[1] != self.channels:
            return
        if rank == 1:  # Conv1d as Conv2d of height 1
            x = x[:, :, None, :]
        kernel = (1, *self.kernel) if rank == 1 else self.kernel
        strides = (1, *self.strides) if rank == 1 else self.strides
        dilations = (1, *self.dilations) if rank == 1 else self.dilations
        spatial = x.shape[2:]
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER", "VALID"):
            begins, ends = same_pads(spatial[-rank:], self.kernel, self.strides,
                                     self.dilations, self.auto_pad)
        else:
            begins, ends = list(self.pads[:rank]), list(self.pads[rank:])
        if rank == 1:
            begins, ends = [0, *begins], [0, *ends]
        oh, ow = (output_size(n, k, s, b, e, d) for n, k, s, b, e, d
                  in zip(spatial, kernel, strides, begins, ends, dilations, strict=True))
        if oh <= 0 or ow <= 0:
            return
        if self.stride is None:
            patches = x.shape[0] * oh * ow * max(self.samples, 1)
            self.stride = max(1, math.isqrt(patches // max(ROWS_PER_COLUMN * self.cols, 1)))
            if not self.samples:
                self.stride = 1
        n = x.shape[0]
        hp, wp = (size + b + e for size, b, e in zip(spatial, begins, ends, strict=True))
        if (self.stride == 1 and self.groups == 1 and math.prod(kernel) > 1
                and all(s == 1 for s in strides) and all(d == 1 for d in dilations)
                and self.channels * hp * wp <= CHUNK):
            # Padded and channels-last in one copy.
            xs = np.zeros((n, hp, wp, self.channels), np.float32)
            xs[:, begins[0]:begins[0] + spatial[0], begins[1]:begins[1] + spatial[1]] = (
                x.transpose(0, 2, 3, 1))
            self._buffer_padded(xs, (begins[0], begins[1], ends[0], ends[1]))
            self._updates += 1
            self.rows += n * oh * ow
            return
        padded = np.pad(x.astype(np.float32, copy=False),
                        ((0, 0), (0, 0), (begins[0], ends[0]), (begins[1], ends[1])))
        cg = self.channels // self.groups
        kh, kw = kernel
        s_n, s_c, s_h, s_w = padded.strides
        # [N, G, Cg, OH, OW, kh, kw]: every patch, as a view.
        view = np.lib.stride_tricks.as_strided(
            padded, shape=(n, self.groups, cg, oh, ow, kh, kw),
            strides=(s_n, cg * s_c, s_c, strides[0] * s_h, strides[1] * s_w,
                     dilations[0] * s_h, dilations[1] * s_w), writeable=False)
        if self.stride > 1:
            offset = self._updates % self.stride
            view = view[:, :, :, min(offset, oh - 1)::self.stride][
                :, :, :, :, min(offset, ow - 1)::self.stride]
        self._updates += 1
        rows_out, cols_out = view.shape[3], view.shape[4]
        per_row = cols_out * self.groups * self.cols
        for i in range(n):
            step = max(1, CHUNK // max(per_row, 1))
            for r0 in range(0, rows_out, step):
                part = view[i, :, :, r0:r0 + step]  # [G, Cg, R, OW, kh, kw]
                rows = np.ascontiguousarray(part.transpose(0, 2, 3, 1, 4, 5))
                self._add(rows.reshape(self.groups, -1, self.cols))
        self.rows += n * rows_out * cols_out

    def _buffer_padded(self, xs: np.ndarray, pads: tuple[int, int, int, int]) -> None:
        if self._padded and (self._padded[0].shape[1:] != xs.shape[1:]
                             or self._padded_pads != pads):
            self._flush_padded()  # a new input size: its windows differ
        self._padded_pads = pads
        self._padded.append(xs)
        self._padded_values += xs.size
        if self._padded_values >= CHUNK:
            self._flush_padded()

    def _flush_padded(self) -> None:
        if not self._padded:
            return
        xs = self._padded[0] if len(self._padded) == 1 else np.concatenate(self._padded)
        self._padded, self._padded_values = [], 0
        kernel = self.kernel if len(self.kernel) == 2 else (1, *self.kernel)
        if self._blocks is None:
            # Contiguous float64 sums per tap pair a <= b: adding into the strided
            # [C, taps, C, taps] layout every flush cost more than the products (ResNet-18,
            # 512 channels).
            taps = math.prod(kernel)
            self._pairs = [(a, b) for a in range(taps) for b in range(a, taps)]
            self._blocks = np.zeros((len(self._pairs), self.channels, self.channels),
                                    np.float64)
        index = {pair: i for i, pair in enumerate(self._pairs)}
        for a, b, block in _lagged_blocks(xs, kernel, self._padded_pads):
            self._blocks[index[a, b]] += block

    def _flush(self) -> None:
        self._flush_padded()
        super()._flush()

    def matrices(self) -> np.ndarray | None:
        self._flush()
        if self._blocks is not None:
            # The pairs a <= b and their transposes cover every block once: assigned into a
            # fresh matrix rather than added to zeros, unless a merge put sums there first.
            fresh = self.total is None
            if fresh:
                self.total = np.empty((1, self.cols, self.cols), np.float64)
            c, taps = self.channels, self.cols // self.channels
            grid = self.total[0].reshape(c, taps, c, taps)
            for (a, b), block in zip(self._pairs, self._blocks, strict=True):
                if a == b:  # strips' products are general matrix products: symmetrise
                    block = (block + block.T) * 0.5
                if fresh:
                    grid[:, a, :, b] = block
                    grid[:, b, :, a] = block.T
                else:
                    grid[:, a, :, b] += block
                    if a != b:
                        grid[:, b, :, a] += block.T
            self._blocks = None
        return self.total


def _lagged_blocks(xs: np.ndarray, kernel: tuple[int, int],
                   pads: tuple[int, int, int, int] = (0, 0, 0, 0)
                   ) -> Iterator[tuple[int, int, np.ndarray]]:
    """(a, b, block) for every pair of taps a <= b (flat indices into the kernel) of a stride-1
    conv over padded channels-last inputs xs [n, H, W, C] (`pads`: the zero rows and columns
    at top, left, bottom, right): block = sum over output positions y of x(y + a) x(y + b)^T,
    float32 [C, C]; the pairs b < a are the transposes."""
    kh, kw = kernel
    _, hp, wp, c = xs.shape
    oh, ow = hp - kh + 1, wp - kw + 1
    top, left, bottom, right = pads

    def product(lag: tuple[int, int], row: int, col: int, rows: int, cols: int
                ) -> tuple[np.ndarray, np.ndarray] | None:
        """The factors X, X' of X^T X' = sum of x(u) x(u + lag)^T over u in the window, trimmed
        to where neither is padding (zeros); None where nothing is left, as for about half
        the strips of a conv padded by one on every side."""
        di, dj = lag
        r0, r1 = max(row, top, top - di), min(row + rows, hp - bottom, hp - bottom - di)
        c0, c1 = max(col, left, left - dj), min(col + cols, wp - right, wp - right - dj)
        if r0 >= r1 or c0 >= c1:
            return None
        return (xs[:, r0:r1, c0:c1].reshape(-1, c),
                xs[:, r0 + di:r1 + di, c0 + dj:c1 + dj].reshape(-1, c))

    def moved(block: np.ndarray, lag: tuple[int, int], enter: tuple[int, int],
              leave: tuple[int, int], rows: int, cols: int) -> np.ndarray:
        """block with the strip at `enter` added and the one at `leave` taken out, in one
        product: [E; -L]^T [E'; L']."""
        lefts, rights = [], []
        for sign, (r, col) in ((1, enter), (-1, leave)):
            found = product(lag, r, col, rows, cols)
            if found is not None:
                lefts.append(found[0] if sign > 0 else -found[0])
                rights.append(found[1])
        if not lefts:
            return block
        if len(lefts) == 1:
            return block + lefts[0].T @ rights[0]
        return block + np.concatenate(lefts).T @ np.concatenate(rights)

    def walk(lag: tuple[int, int], first_col: int, base: np.ndarray
             ) -> Iterator[tuple[int, int, np.ndarray]]:
        """Every tap pair of `lag` from the one whose first tap is at (0, first_col): one row
        down, then along the row, one column at a time."""
        di, dj = lag
        row_start = base
        for ai in range(kh - di):
            if ai:
                row_start = moved(row_start, lag, (ai + oh - 1, first_col), (ai - 1, first_col),
                                  1, ow)
            block = row_start
            for aj in range(first_col, min(kw, kw - dj)):
                if aj > first_col:
                    block = moved(block, lag, (ai, aj + ow - 1), (ai, aj - 1), oh, 1)
                yield ai * kw + aj, (ai + di) * kw + aj + dj, block

    # Lags (di, dj) with dj >= 0 start from tap (0, 0); lag (di, -j) from tap (0, j). Lags with
    # di = 0 and dj < 0 are transposes of (0, -dj).
    for first_col in range(kw):
        lags = ([(di, dj) for di in range(kh) for dj in range(kw)] if first_col == 0
                else [(di, -first_col) for di in range(1, kh)])
        for lag in lags:
            found = product(lag, 0, first_col, oh, ow)
            if found is None:
                base = np.zeros((c, c), np.float32)
            else:
                base = found[0].T @ (found[0] if lag == (0, 0) else found[1])
            yield from walk(lag, first_col, base)
