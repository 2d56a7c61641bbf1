"""Per-layer debug report: how well each quantized tensor matches its float original.

For every quantized activation, calibration samples stream through the float model and the
QDQ model in lockstep (memory independent of the sample count):
- local figures compare the float tensor with its own quantize-dequantize (range choice):
  clip rate, rmse / scale (about 0.289 when rounding is the only error; TFLite suggests
  skipping above 0.7), local SQNR;
- cumulative figures compare the float tensor with the QDQ model's dequantized tensor (all
  upstream error included): cosine similarity and SQNR, as MindSpore's debug dump does.
Weights get the same local figures from their values. Tensors are ranked by the mean of their
per-channel SQNR (a channel crushed by another channel's range counts fully; whole-tensor SQNR
is dominated by the loudest channel). Written as CSV and JSON, with a suggested
skip_quant_node list.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from ptqconv import qparams, runtime
from ptqconv.passes.qdq import QDQResult

QUANTILE_BINS = 4096
# TFLite's guidance: rmse/scale above this is a candidate to keep in float.
RMSE_SCALE_SKIP = 0.7
LOCAL_SQNR_SKIP_DB = 20.0


@dataclass
class TensorStats:
    """Streaming statistics of one quantized tensor."""

    name: str
    kind: str  # "activation" | "weight"
    node: str  # the node that produces (or owns) it
    bits: int
    scale: float  # per-tensor scale, or the mean of per-channel scales
    zero_point: int | None
    lo: float  # representable float range
    hi: float
    count: int = 0
    minimum: float = math.inf
    maximum: float = -math.inf
    total: float = 0.0
    total_sq: float = 0.0
    clipped: int = 0
    local_err_sq: float = 0.0
    cum_dot: float = 0.0
    cum_ref_sq: float = 0.0
    cum_out_sq: float = 0.0
    cum_err_sq: float = 0.0
    hist: np.ndarray = field(default_factory=lambda: np.zeros(QUANTILE_BINS, np.int64))
    channel_axis: int | None = None  # None: axis 1 for rank >= 4, else the last axis
    channel_signal: np.ndarray | None = None
    channel_noise: np.ndarray | None = None

    def _per_channel(self, x: np.ndarray, err: np.ndarray) -> None:
        if x.ndim < 2:
            return
        axis = self.channel_axis if self.channel_axis is not None else (
            1 if x.ndim >= 4 else x.ndim - 1)
        others = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
        signal = np.square(x, dtype=np.float64).sum(axis=others)
        noise = np.square(err, dtype=np.float64).sum(axis=others)
        if self.channel_signal is None:
            self.channel_signal, self.channel_noise = signal, noise
        elif self.channel_signal.shape == signal.shape:
            self.channel_signal += signal
            self.channel_noise += noise

    def channel_sqnr(self) -> float:
        """Mean over channels of each channel's SQNR in dB: a channel crushed by another
        channel's range counts as much as the dominant one (whole-tensor SQNR hides it)."""
        if self.channel_signal is None:
            return _sqnr(self.total_sq, self.local_err_sq)
        alive = self.channel_signal > 0
        if not alive.any():
            return math.inf
        noise = np.maximum(self.channel_noise[alive], self.channel_signal[alive] * 1e-12)
        return float(np.mean(10 * np.log10(self.channel_signal[alive] / noise)))

    def update(self, x: np.ndarray, local: np.ndarray, cumulative: np.ndarray | None) -> None:
        self._per_channel(x, local.astype(np.float64) - x)
        x64 = x.astype(np.float64).ravel()
        self.count += x64.size
        self.minimum = min(self.minimum, float(x64.min()))
        self.maximum = max(self.maximum, float(x64.max()))
        self.total += float(x64.sum())
        self.total_sq += float(x64 @ x64)
        # Clipped: beyond the grid by more than half a step, i.e. worse than rounding (a
        # rounded zero point alone moves one end of the grid by up to half a step).
        half = self.scale / 2
        self.clipped += int(np.count_nonzero((x64 < self.lo - half) | (x64 > self.hi + half)))
        err = local.astype(np.float64).ravel() - x64
        self.local_err_sq += float(err @ err)
        # Quartiles from a histogram over the representable range (clipped values at its ends).
        span = max(self.hi - self.lo, 1e-12)
        idx = np.clip(((x64 - self.lo) / span * QUANTILE_BINS).astype(np.int64), 0,
                      QUANTILE_BINS - 1)
        self.hist += np.bincount(idx, minlength=QUANTILE_BINS)
        if cumulative is not None:
            out = cumulative.astype(np.float64).ravel()
            self.cum_dot += float(x64 @ out)
            self.cum_ref_sq += float(x64 @ x64)
            self.cum_out_sq += float(out @ out)
            diff = out - x64
            self.cum_err_sq += float(diff @ diff)

    def quartiles(self) -> list[float]:
        cumulative = np.cumsum(self.hist)
        span = self.hi - self.lo
        result = []
        for q in (0.25, 0.5, 0.75):
            i = int(np.searchsorted(cumulative, q * cumulative[-1]))
            result.append(self.lo + (i + 0.5) / QUANTILE_BINS * span)
        return result

    def row(self) -> dict[str, object]:
        n = max(self.count, 1)
        mean = self.total / n
        q1, median, q3 = self.quartiles() if self.count else (math.nan,) * 3
        rmse = math.sqrt(self.local_err_sq / n)
        cosine = (self.cum_dot / math.sqrt(self.cum_ref_sq * self.cum_out_sq)
                  if self.cum_ref_sq and self.cum_out_sq else math.nan)
        return {
            # MindSpore's debug-dump column names where they exist.
            "tensor_name": self.name, "kind": self.kind, "node_name": self.node,
            "bits": self.bits, "scale": self.scale, "zero_point": self.zero_point,
            "min": self.minimum, "q1": q1, "median": median, "q3": q3, "max": self.maximum,
            "mean": mean, "var": max(self.total_sq / n - mean * mean, 0.0),
            "clip_rate": self.clipped / n,
            "rmse_over_scale": rmse / self.scale if self.scale else math.nan,
            "local_sqnr_db": _sqnr(self.total_sq, self.local_err_sq),
            "channel_sqnr_db": self.channel_sqnr(),
            "cos_similarity": cosine,
            "sqnr_db": _sqnr(self.cum_ref_sq, self.cum_err_sq) if self.cum_ref_sq else math.nan,
        }


def _sqnr(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


def activation_report(
    float_model: ir.Model,
    qdq: QDQResult,
    samples: Iterable[Mapping[str, np.ndarray]],
    threads: int = 1,
) -> list[TensorStats]:
    """Stream `samples` through the float model and the QDQ model in lockstep and collect
    statistics for every activation the QDQ pass quantized."""
    grid = qdq.activation_grid
    owners = {v.name: "(model input)" for v in float_model.graph.inputs}
    owners.update((v.name, n.name or n.op_type) for n in float_model.graph for v in n.outputs)
    stats = {}
    for name, params in qdq.activations.items():
        lo = (grid.qmin - params.zero_point) * params.scale
        hi = (grid.qmax - params.zero_point) * params.scale
        stats[name] = TensorStats(name, "activation", owners.get(name, ""), grid.bits,
                                  params.scale, params.zero_point, lo, hi)
    names = list(stats)
    if not names:  # nothing quantized (a run fetching nothing would fetch everything)
        return []
    inputs = {v.name for v in float_model.graph.inputs}
    fetched = [n for n in names if n not in inputs]
    dequantized = [qdq.dequantized[n] for n in names]
    with runtime.probe(float_model, fetched, threads, label="layer report") as reference, \
            runtime.probe(qdq.model, dequantized, threads, label="layer report") as quantized:
        for sample in samples:
            ref = reference.run(sample, fetched)
            ref.update({n: sample[n] for n in names if n in inputs})
            got = quantized.run(sample, dequantized)
            for name, out in zip(names, dequantized, strict=True):
                params = qdq.activations[name]
                scale, zp = np.float32(params.scale), np.int64(params.zero_point)
                q = qparams.quantize(ref[name], scale, zp, grid)
                local = qparams.dequantize(q, scale, zp)
                stats[name].update(ref[name], local, got[out])
    return list(stats.values())


def weight_report(qdq: QDQResult) -> list[TensorStats]:
    result = []
    for name, weight in qdq.weights.items():
        w, scale, zp, axis, grid = (weight.values, weight.scale, weight.zero_point,
                                    weight.axis, weight.grid)
        owner = weight.owner
        q = qparams.quantize(w, scale, zp, grid, axis)
        local = qparams.dequantize(q, scale, zp, axis)
        stats = TensorStats(name, "weight", owner, grid.bits, float(np.mean(scale)), 0,
                            float(w.min()), float(w.max()), channel_axis=axis)
        stats.update(w, local, local)  # nothing upstream: cumulative equals local
        result.append(stats)
    return result


@dataclass(frozen=True)
class LayerReport:
    """Where the report went, and its worst rows by per-channel SQNR."""

    path: Path
    tensors: int
    worst: list[dict[str, object]]
    suggested_skip: list[str]


def write(directory: Path, stats: list[TensorStats], top: int = 10) -> LayerReport:
    """Write layer_report.csv / .json into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = [s.row() for s in stats]
    with (directory / "layer_report.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["tensor_name"])
        writer.writeheader()
        writer.writerows(rows)
    worst = sorted(rows, key=lambda r: (r["channel_sqnr_db"], -r["rmse_over_scale"]))[:top]
    suggestions = sorted({str(r["node_name"]) for r in worst
                          if r["channel_sqnr_db"] < LOCAL_SQNR_SKIP_DB
                          or r["rmse_over_scale"] > RMSE_SCALE_SKIP})
    (directory / "layer_report.json").write_text(json.dumps(
        {"schema": "ptqconv.layer_report/1", "tensors": [_json(r) for r in rows],
         "worst": [r["tensor_name"] for r in worst], "suggested_skip_quant_node": suggestions},
        indent=1) + "\n")
    return LayerReport(directory / "layer_report.csv", len(rows), worst, suggestions)


def _json(row: dict[str, object]) -> dict[str, object]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in row.items()}
