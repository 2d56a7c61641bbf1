"""Bias correction (MindSpore's method, docs/reference.md §2) for Conv and Gemm.

The quantized layer computes op(x, Ŵ) + b where the float layer computes op(x, W) + b; their
per-channel mean difference over the calibration set is E[op(x, W - Ŵ)] = op(E[x], W - Ŵ),
since the op is linear in x. So the shift needs only the mean of each layer's input, which
the one streaming collection gathers (`statistic_points`), and no pass of its own: for a Conv
it is the weight error applied to the mean input map and averaged over output positions
(padding and strides included), for a Gemm the weight error applied to the mean input row.
MindSpore measures op(x̂, W - Ŵ) on the quantized input x̂; the two differ by
op(E[x̂ - x], W - Ŵ), a product of two rounding errors. The shift is added to the float bias
(created where there is none) before the model is quantized again.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ptqconv.calibrate.observers import MinMaxObserver
from ptqconv.calibrate.statistics import Accumulator, Statistic, StatisticPoint, Statistics
from ptqconv.graph.initializers import add_initializer, set_constant
from ptqconv.graph.naming import NameAllocator, node_key
from ptqconv.graph.ops import same_pads
from ptqconv.passes.calibrated import Divided
from ptqconv.passes.qdq import CORRECTED_OPS, WeightError

logger = logging.getLogger(__name__)
# A mean shift wider than this times the layer's output range over the calibration set is a
# calibration artefact, not a rounding bias: the layer is left alone (docs/decisions.md).
MAX_SHIFT_RATIO = 1.0


class InputMean(Accumulator):
    """The element-wise mean of a tensor over the samples (and its leading axis)."""

    def __init__(self) -> None:
        self.total: np.ndarray | None = None
        self.count = 0
        self.varying = False  # the shape changed between samples: no single mean

    def update(self, x: np.ndarray) -> None:
        if x.ndim == 0 or self.varying:
            return
        # One sample (the usual batch of 1) is its own sum: no float64 pass over it.
        part = (x if x.shape[0] == 1 and x.dtype == np.float32
                else x.sum(axis=0, keepdims=True, dtype=np.float64).astype(np.float32))
        if self.total is None:
            self.total = np.array(part)
        elif self.total.shape != part.shape:
            self.varying = True
            return
        else:
            self.total += part
        self.count += x.shape[0]

    def merge(self, other: InputMean) -> None:
        if other.total is None:
            return
        if self.total is None:
            self.total, self.count = other.total.copy(), other.count
            self.varying = other.varying
        elif self.total.shape != other.total.shape:
            self.varying = True
        else:
            self.total = self.total + other.total
            self.count += other.count
            self.varying |= other.varying

    def mean(self) -> np.ndarray | None:
        if self.total is None or self.varying or not self.count:
            return None
        return self.total.astype(np.float64) / self.count


MEAN = Statistic(InputMean)
OUTPUT_RANGE = Statistic(MinMaxObserver)


@dataclass(frozen=True)
class Shift:
    """E[float_out - quant_out] per output channel of one layer, and the width of the layer's
    output range over the calibration set (for the guard)."""

    mean: np.ndarray
    output_width: float


@dataclass
class Correction:
    """What bias correction did to one layer."""

    node: str  # node key (graph.naming.node_key)
    node_name: str
    mean: np.ndarray
    applied: bool = True
    reason: str = ""


def _corrected(node: ir.Node) -> bool:
    return (node.op_type in CORRECTED_OPS and len(node.inputs) > 1 and node.inputs[0] is not None
            and node.inputs[1] is not None and node.inputs[1].const_value is not None)


def statistic_points(graph: ir.Graph) -> list[StatisticPoint]:
    """What bias correction needs: the mean input and the output range of every layer it may
    correct."""
    points = []
    for node in graph:
        if _corrected(node):
            points += [StatisticPoint(node.inputs[0].name, MEAN),
                       StatisticPoint(node.outputs[0].name, OUTPUT_RANGE)]
    return points


def expected_shifts(weight_errors: Mapping[str, WeightError], statistics: Statistics,
                    divided: Mapping[str, Divided]) -> dict[str, Shift]:
    """The shift of each layer of `weight_errors` (by node key), from the mean of its input in
    `statistics` (collected on the float model; `divided` says which tensors the migrated
    model holds divided per channel). Layers without the statistics are left out."""
    shifts = {}
    for key, found in weight_errors.items():
        node, error = found.node, found.error
        mean_stat = statistics.get(found.input_name, MEAN)
        out_stat = statistics.get(key, OUTPUT_RANGE)
        mean = mean_stat.mean() if mean_stat is not None else None
        if mean is None or out_stat is None or not out_stat.seen:
            continue
        if found.input_name in divided:
            d = divided[found.input_name]
            mean = mean / _along(d.factors, mean.ndim, d.axis)
        width = out_stat.max - out_stat.min
        if key in divided:  # the output is scaled too: bound its widest channel
            width = width * float(np.max(1.0 / divided[key].factors))
        shift = (_conv_shift(node, error, mean) if node.op_type == "Conv"
                 else _gemm_shift(node, error, mean))
        if shift is not None:
            shifts[key] = Shift(shift, width)
    return shifts


def _along(factors: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return factors.reshape(shape)


def _ints(node: ir.Node, name: str, default: list[int]) -> list[int]:
    attr = node.attributes.get(name)
    return default if attr is None else list(attr.as_ints())


def _conv_shift(node: ir.Node, error: np.ndarray, mean: np.ndarray) -> np.ndarray | None:
    """Per output channel: the weight error convolved with the mean input, averaged over the
    output positions."""
    spatial = mean.shape[2:]
    kernel = error.shape[2:]
    rank = len(kernel)
    if len(spatial) != rank:
        return None
    strides = _ints(node, "strides", [1] * rank)
    dilations = _ints(node, "dilations", [1] * rank)
    group = node.attributes["group"].as_int() if "group" in node.attributes else 1
    begins, ends = _pads(node, spatial, kernel, strides, dilations)
    padded = np.pad(mean[0], [(0, 0), *zip(begins, ends, strict=True)])
    out = [(n + b + e - d * (k - 1) - 1) // s + 1 for n, b, e, d, k, s
           in zip(spatial, begins, ends, dilations, kernel, strides, strict=True)]
    if min(out) < 1:
        return None
    channels = mean.shape[1]
    # window[c, *offset]: the mean over output positions of the input each kernel tap reads.
    window = np.empty((channels, *kernel))
    axes = tuple(range(1, rank + 1))
    for offset in itertools.product(*(range(k) for k in kernel)):
        taps = tuple(slice(o * d, o * d + (n - 1) * s + 1, s)
                     for o, d, n, s in zip(offset, dilations, out, strides, strict=True))
        window[(slice(None), *offset)] = padded[(slice(None), *taps)].mean(axis=axes)
    outputs, per_group = error.shape[0], error.shape[1]
    w = error.astype(np.float64).reshape(group, outputs // group, per_group, -1)
    x = window.reshape(group, per_group, -1)
    return np.einsum("gock,gck->go", w, x).reshape(outputs)


def _pads(node: ir.Node, spatial: tuple[int, ...], kernel: tuple[int, ...],
          strides: list[int], dilations: list[int]) -> tuple[list[int], list[int]]:
    rank = len(kernel)
    auto = node.attributes["auto_pad"].as_string() if "auto_pad" in node.attributes else "NOTSET"
    if auto in ("SAME_UPPER", "SAME_LOWER", "VALID"):
        return same_pads(spatial, kernel, strides, dilations, auto)
    pads = _ints(node, "pads", [0] * (2 * rank))
    return pads[:rank], pads[rank:]


def _gemm_shift(node: ir.Node, error: np.ndarray, mean: np.ndarray) -> np.ndarray | None:
    """Per output column: alpha x (the mean input row times the weight error)."""
    attrs = node.attributes
    if "transA" in attrs and attrs["transA"].as_int():
        return None  # the mean over the leading axis would average columns, not rows
    alpha = attrs.get_float("alpha", 1.0)
    b = error.T if "transB" in attrs and attrs["transB"].as_int() else error
    row = mean.reshape(-1)
    if row.shape[0] != b.shape[0]:
        return None
    return alpha * (row @ b.astype(np.float64))


def apply_shifts(graph: ir.Graph, shifts: Mapping[str, Shift]) -> list[Correction]:
    """Add each shift to the float bias of the node with that key in `graph` (a fresh float
    copy), creating a bias where there is none. Returns what was done per layer, including
    the layers the guard left alone."""
    names = NameAllocator(graph)
    done = []
    for position, node in enumerate(list(graph)):
        key = node_key(node)
        if key not in shifts:
            continue
        mean, width = shifts[key].mean, shifts[key].output_width
        record = Correction(key, node.name or f"{node.op_type}#{position}", mean)
        done.append(record)
        if not np.all(np.isfinite(mean)) or np.abs(mean).max() > MAX_SHIFT_RATIO * width:
            record.applied = False
            record.reason = (f"shift {np.abs(mean).max():.3g} > {MAX_SHIFT_RATIO:g} x output "
                             f"range {width:.3g}")
        else:
            _add_to_bias(graph, names, node, record)
        if not record.applied:
            logger.debug("bias correction: %s left alone: %s", record.node_name, record.reason)
    return done


def _add_to_bias(graph: ir.Graph, names: NameAllocator, node: ir.Node,
                 record: Correction) -> None:
    beta = node.attributes.get_float("beta", 1.0)
    correction = (record.mean / (beta if node.op_type == "Gemm" else 1.0)).astype(np.float32)
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None and bias.const_value is not None:
        new = bias.const_value.numpy().astype(np.float32) + correction
        if new.shape != correction.shape:
            record.applied, record.reason = False, "bias is not per channel"
            return
        set_constant(bias, new)
    elif bias is None:
        value = add_initializer(graph, names.new(f"{record.node_name}_bias"), correction)
        while len(node.inputs) < 2:
            node.resize_inputs(len(node.inputs) + 1)
        node.resize_inputs(3)
        node.replace_input_with(2, value)
    else:
        record.applied, record.reason = False, "bias is not a constant"
