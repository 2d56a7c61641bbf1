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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from ptqconv import qparams, runtime
from ptqconv.graph.naming import values_by_name
from ptqconv.passes.qdq import QDQResult

QUANTILE_BINS = 4096
# TFLite's guidance: rmse/scale above this is a candidate to keep in float.
RMSE_SCALE_SKIP = 0.7
LOCAL_SQNR_SKIP_DB = 20.0
CSV_NAME = "layer_report.csv"
JSON_NAME = "layer_report.json"


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

    def _channel_sums(self, x: np.ndarray, err: np.ndarray,
                      ) -> tuple[np.ndarray, np.ndarray] | None:
        """Per-channel sums of squares of `x` and of `err`, added to the running ones; None
        for tensors of rank < 2."""
        if x.ndim < 2:
            return None
        axis = (self.channel_axis if self.channel_axis is not None else (
            1 if x.ndim >= 4 else x.ndim - 1)) % x.ndim
        # (before, channel, 1, after): one batched dot product per channel, no transposed copy.
        shape = (math.prod(x.shape[:axis]), x.shape[axis], 1, -1)
        x4, err4 = x.reshape(shape), err.reshape(shape)
        signal = _row_dots(x4).sum(axis=0, dtype=np.float64)
        noise = _row_dots(err4).sum(axis=0, dtype=np.float64)
        if self.channel_signal is None or self.channel_noise is None:
            self.channel_signal, self.channel_noise = signal.copy(), noise.copy()
        elif self.channel_signal.shape == signal.shape:
            self.channel_signal += signal
            self.channel_noise += noise
        return signal, noise

    def channel_sqnr(self) -> float:
        """Mean over channels of each channel's SQNR in dB: a channel crushed by another
        channel's range counts as much as the dominant one (whole-tensor SQNR hides it)."""
        if self.channel_signal is None or self.channel_noise is None:
            return _sqnr(self.total_sq, self.local_err_sq)
        alive = self.channel_signal > 0
        if not alive.any():
            return math.inf
        noise = np.maximum(self.channel_noise[alive], self.channel_signal[alive] * 1e-12)
        return float(np.mean(10 * np.log10(self.channel_signal[alive] / noise)))

    def update(self, x: np.ndarray, local: np.ndarray, cumulative: np.ndarray | None) -> None:
        """Add one sample: `x` the float tensor, `local` its own quantize-dequantize,
        `cumulative` the quantized model's tensor (None: nothing upstream). Element-wise work
        is one float32 pass per figure; the sums of a sample are float32 (pairwise, or BLAS per
        channel), added up over samples in float64 (docs/decisions.md, layer report cost)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        err = np.subtract(local, x, dtype=np.float32)
        flat, err_flat = x.reshape(-1), err.reshape(-1)
        self.count += flat.size
        self.minimum = min(self.minimum, float(flat.min()))
        self.maximum = max(self.maximum, float(flat.max()))
        self.total += float(flat.sum(dtype=np.float64))
        sums = self._channel_sums(x, err)
        if sums is None:
            signal, noise = _dot(flat, flat), _dot(err_flat, err_flat)
        else:
            signal, noise = float(sums[0].sum()), float(sums[1].sum())
        self.total_sq += signal
        self.local_err_sq += noise
        # Clipped: beyond the grid by more than half a step, i.e. worse than rounding (a
        # rounded zero point alone moves one end of the grid by up to half a step).
        half = self.scale / 2
        self.clipped += int(np.count_nonzero(flat < self.lo - half)
                            + np.count_nonzero(flat > self.hi + half))
        # Quartiles from a histogram over the representable range (clipped values at its ends).
        bins = np.subtract(flat, np.float32(self.lo), dtype=np.float32)
        bins *= np.float32(QUANTILE_BINS / max(self.hi - self.lo, 1e-12))
        np.clip(bins, 0, QUANTILE_BINS - 1, out=bins)
        self.hist += np.bincount(bins.astype(np.intp), minlength=QUANTILE_BINS)
        if cumulative is not None:
            out = np.ascontiguousarray(cumulative, dtype=np.float32).reshape(-1)
            self.cum_dot += _dot(flat, out)
            self.cum_ref_sq += signal
            self.cum_out_sq += _dot(out, out)
            diff = np.subtract(out, flat, dtype=np.float32)
            self.cum_err_sq += _dot(diff, diff)

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


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """a . b of two float32 vectors by numpy's pairwise float32 sum: about 1e-8 relative on
    a million values (BLAS's float32 dot: 1e-5, which a cosine near 1 shows), two to three
    times cheaper than accumulating in float64."""
    return float(np.multiply(a, b).sum())


def _row_dots(x4: np.ndarray) -> np.ndarray:
    """The dot product of every row of `x4` (shape (n, c, 1, k)) with itself, shape (n, c)."""
    return np.matmul(x4, x4.transpose(0, 1, 3, 2))[:, :, 0, 0]


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
    progress: Callable[[int], None] | None = None,
) -> list[TensorStats]:
    """Stream `samples` through the float model and the QDQ model in lockstep and collect
    statistics for every activation the QDQ pass quantized in the main graph. Both models
    run a sample ahead, each in its own thread, while the statistics of the previous sample
    are taken."""
    grid = qdq.activation_grid
    owners = {v.name: "(model input)" for v in float_model.graph.inputs}
    owners.update((v.name, n.name or n.op_type) for n in float_model.graph for v in n.outputs)
    stats = {}
    # A main-graph tensor read only inside an If / Loop body is dequantized there: its
    # quantized value cannot be fetched, as a body tensor's cannot.
    fetchable = values_by_name(qdq.model.graph)
    for name, params in qdq.activations.items():
        if name not in owners or qdq.dequantized.get(name) not in fetchable:
            continue
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

    def consume(sample: Mapping[str, np.ndarray], outputs: list[dict[str, np.ndarray]]) -> None:
        reference, quantized = outputs
        for name, out in zip(names, dequantized, strict=True):
            x = sample[name] if name in inputs else reference[name]
            params = qdq.activations[name]
            local = qparams.fake_quantize(x, params.scale, params.zero_point, grid)
            stats[name].update(x, local, quantized[out])

    with runtime.probe(float_model, fetched, threads, label="layer report") as reference, \
            runtime.probe(qdq.model, dequantized, threads, label="layer report") as quantized:
        runtime.stream_together([(reference, fetched), (quantized, dequantized)], samples,
                                consume, progress)
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
    """Where the report goes, its rows, and the worst rows by per-channel SQNR."""

    path: Path
    rows: list[dict[str, object]]
    worst: list[dict[str, object]]
    suggested_skip: list[str]

    @property
    def tensors(self) -> int:
        return len(self.rows)


def build(directory: Path, stats: list[TensorStats], top: int = 10) -> LayerReport:
    """The report of `stats`, to be written into `directory` by `save`."""
    rows = [s.row() for s in stats]
    worst = sorted(rows, key=lambda r: (r["channel_sqnr_db"], -r["rmse_over_scale"]))[:top]
    suggestions = sorted({str(r["node_name"]) for r in worst
                          if r["channel_sqnr_db"] < LOCAL_SQNR_SKIP_DB
                          or r["rmse_over_scale"] > RMSE_SCALE_SKIP})
    return LayerReport(directory / CSV_NAME, rows, worst, suggestions)


def save(report: LayerReport, csv_path: Path, json_path: Path) -> None:
    """Write the report as CSV and JSON (the caller decides where, then moves them)."""
    rows = report.rows
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["tensor_name"])
        writer.writeheader()
        writer.writerows(rows)
    json_path.write_text(json.dumps(
        {"schema": "ptqconv.layer_report/1", "tensors": [_json(r) for r in rows],
         "worst": [r["tensor_name"] for r in report.worst],
         "suggested_skip_quant_node": report.suggested_skip},
        indent=1) + "\n")


def _json(row: dict[str, object]) -> dict[str, object]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in row.items()}
