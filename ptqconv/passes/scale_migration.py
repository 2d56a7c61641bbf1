"""Per-channel scale migration between an activation and the weights that read it.

An activation X whose channels differ widely in range loses the small channels to a single
per-tensor uint8 scale. Dividing channel k of X by s_k and multiplying the weight rows that
read channel k by s_k leaves every product unchanged and moves range into the weights, which
are quantized per output channel anyway. SmoothQuant (`smooth_quant`) and cross-layer
equalization (`equalize`) differ only in where the 1 / s goes; both pick s here, from the
calibration statistics, by minimising the output noise the two roundings predict.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Candidate migration strengths a in s_k = max|X_k|^a / max|W_k|^(1-a), chosen per activation:
# a single value suits no model (docs/decisions.md, migration strength).
ALPHAS = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
SCALE_LIMITS = (1e-4, 1e4)


@dataclass
class Reader:
    """How one weight op reads X, per group of a grouped op: [G, K/G, N/G] blocks joining the
    K input channels to the N outputs (G = 1 for a MatMul, K for a depthwise conv).

    `square[g, k, n]` sums the squared weights joining input k to output n of group g over the
    kernel, `absmax[g, k, n]` is their largest magnitude, `taps` how many inputs of a channel
    each output value reads, and `levels` the weight grid's largest integer. Blocks, not dense
    [K, N] matrices with zeros between groups: the strength search evaluates the noise ten
    times per activation and build, which dense depthwise readers made 2.3 ms a call
    (mobilenet_v2's AUTO: 3.2 s of 19).
    """

    square: np.ndarray
    absmax: np.ndarray
    taps: int
    levels: int

    def __post_init__(self) -> None:
        # What the search reads on every call, and s does not change.
        self.square_rows = self.square.sum(axis=2).reshape(-1)
        self.channel_max = self.absmax.max(axis=2).reshape(-1)

    @property
    def channels(self) -> int:
        return self.square.shape[0] * self.square.shape[1]

    @classmethod
    def matmul(cls, w: np.ndarray, levels: int) -> Reader:
        """A MatMul weight [K, N]."""
        w = w.astype(np.float64)[None]
        return cls(np.square(w), np.abs(w), 1, levels)

    @classmethod
    def conv(cls, w: np.ndarray, group: int, levels: int) -> Reader:
        """A Conv weight [N, K / group, *kernel]."""
        n_out, k_per_group = w.shape[:2]
        # Kernel sums of a few squares in float32 (relative error ~1e-7), then float64: 3x
        # faster than converting whole weights, which cost 0.1 s of a ResNet-18 conversion.
        flat = w.reshape(group, n_out // group, k_per_group, -1).astype(np.float32, copy=False)
        square = np.einsum("gnkt,gnkt->gkn", flat, flat).astype(np.float64)
        absmax = np.abs(flat).max(axis=3).transpose(0, 2, 1).astype(np.float64)
        return cls(square, absmax, flat.shape[3], levels)


def predicted_noise(s: np.ndarray, lo: np.ndarray, hi: np.ndarray, mean_square: np.ndarray,
                    readers: list[Reader], act_levels: int) -> float:
    """Output noise power after migrating by `s`: activation rounding (dx^2 / 12) * sum W'^2
    plus weight rounding sum_n (dw_n^2 / 12) * taps * sum_k E[X'_k^2] over the inputs n reads,
    with dx the per-tensor step of X' = X / s and dw_n the per-output step of W' = diag(s) W."""
    dx = (max(float(np.max(hi / s)), 0.0) - min(float(np.min(lo / s)), 0.0)) / act_levels
    noise = 0.0
    for r in readers:
        groups, per_group = r.square.shape[:2]
        noise += dx**2 / 12 * float(s**2 @ r.square_rows)
        dw = (r.absmax * s.reshape(groups, per_group, 1)).max(axis=1) / r.levels  # [G, N/G]
        reach = r.taps * (mean_square / s**2).reshape(groups, per_group).sum(axis=1)  # [G]
        noise += float((dw**2 / 12 * reach[:, None]).sum())
    return noise


def choose_scales(
    lo: np.ndarray, hi: np.ndarray, mean_square: np.ndarray, readers: list[Reader],
    act_levels: int, clip_max: float | None = None, centred: bool = True,
) -> tuple[float, np.ndarray]:
    """The strength a and factors s with the least predicted noise (a = 0: s = 1, no change).

    `centred` normalises s to a geometric mean of 1, for when only relative factors matter.
    `clip_max` is set when X = Clip(Y, 0, clip_max) and 1 / s is folded into Y: a channel the
    clip reached must keep s = 1, and the others may not be scaled past the clip.
    """
    act = np.maximum(np.abs(lo), np.abs(hi)).astype(np.float64)
    wmax = np.max([r.channel_max for r in readers], axis=0)
    ones = np.ones_like(act)
    best = (predicted_noise(ones, lo, hi, mean_square, readers, act_levels), 0.0, ones)
    for alpha in ALPHAS[1:]:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            s = act**alpha / wmax ** (1 - alpha)
        s = np.where(np.isfinite(s) & (s > 0), s, 1.0)
        s = np.clip(s, *SCALE_LIMITS)
        if clip_max is not None:
            s = _respect_clip(s, hi, clip_max)
        elif centred:
            s /= np.exp(np.mean(np.log(s)))
        noise = predicted_noise(s, lo, hi, mean_square, readers, act_levels)
        if noise < best[0]:
            best = (noise, alpha, s)
    return best[1], best[2].astype(np.float32)


# A channel whose maximum is this close to the clip was clipped on calibration data.
_CLIPPED = 1.0 - 1e-5


def _respect_clip(s: np.ndarray, hi: np.ndarray, clip_max: float) -> np.ndarray:
    """Scale s so that no unclipped channel of X / s passes `clip_max`; clipped ones keep 1.

    clip(Y / s, 0, c) equals clip(Y, 0, c) / s only where the clip never acts, i.e. on
    channels whose maximum stayed below c and which X / s keeps below c.
    """
    clipped = hi >= clip_max * _CLIPPED
    free = ~clipped & (hi > 0)
    out = np.ones_like(s)
    if free.any():
        out[free] = s[free] * np.max(hi[free] / (clip_max * s[free]))
    return out
