"""The exact integer result of an elementwise function between two uint8 grids: a 256-entry
table, computed the way onnxruntime's DequantizeLinear -> fn -> QuantizeLinear computes it
(float32 dequantization, fn in float64 rounded to float32 once, float32 division, round half
to even, saturation). The reference the integer activation forms are checked against."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def lookup_table(fn: Callable[[np.ndarray], np.ndarray], in_scale: float, in_zp: int,
                 out_scale: float, out_zp: int) -> np.ndarray:
    """table[q] = saturate(round_half_even(fn((q - in_zp) * in_scale) / out_scale) + out_zp)."""
    q = np.arange(256, dtype=np.int32)
    x = (q - np.int32(in_zp)).astype(np.float32) * np.float32(in_scale)
    with np.errstate(over="ignore", invalid="ignore"):
        y = np.asarray(fn(x.astype(np.float64)), np.float64).astype(np.float32)
        v = y / np.float32(out_scale)
    v = np.clip(v, np.float32(-out_zp), np.float32(255 - out_zp))
    return np.clip(np.rint(v).astype(np.int32) + out_zp, 0, 255).astype(np.uint8)


def hard_sigmoid(alpha: float, beta: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: np.clip(np.float32(alpha) * x + np.float32(beta), 0.0, 1.0)


def hard_swish(x: np.ndarray) -> np.ndarray:
    return x * np.clip(x / 6.0 + 0.5, 0.0, 1.0)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))
