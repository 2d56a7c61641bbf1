"""GPTQ for the Conv, Gemm and MatMul weights of a float graph (`quant_strategy=GPTQ`).

Each weight's layer declares the second moment of its input (`calibrate.moments`) as a
statistic point; points are collected in streaming passes over the calibration samples,
as many layers per pass as fit `MEMORY_BUDGET`, and each pass's layers are solved
(`weights.gptq`) before the next pass starts, so memory is bounded by the budget (or the
largest layer's matrices, when larger), not by the model or the number of samples.

GPTQ keeps the layout it is given and starts from round-to-nearest's scale and zero point,
each output channel's range shrunk where the rounding error weighted by the input's second
moments is smaller (`weights.clipping`); it changes only the integers on that grid, so its
output is written exactly like a rounded weight. Weights it cannot handle (ConvTranspose,
Gather, batched MatMul weights, transA Gemms, weights shared by layers of different kinds)
keep the integers they came with.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ptqconv.calibrate.collector import collect
from ptqconv.calibrate.moments import DenseMoment, Im2colMoment
from ptqconv.calibrate.statistics import Statistic, StatisticPoint, Statistics, unique_points
from ptqconv.graph.ops import is_onnx
from ptqconv.weights import layout as layouts
from ptqconv.weights.clipping import shrunk_blocks, shrunk_rows
from ptqconv.weights.gptq import GPTQResult, conv_rows, gptq
from ptqconv.weights.layout import IntegerWeight, WeightLayout

logger = logging.getLogger(__name__)
ProgressFactory = Callable[[int, str], Callable[[int], None]]
# Second moments held at once (float64): ResNet-18's 730 MB fit one pass, BERT-base's
# 1.08 GB take two (docs/decisions.md, GPTQ memory budget).
MEMORY_BUDGET = 1 << 30
# Columns in decreasing order of diag(H) for MatMul/Gemm weights, whose inputs have outlier
# channels in transformers; not for convs (docs/decisions.md, GPTQ act order).
ACT_ORDER_DENSE = True


@dataclass(frozen=True)
class Layer:
    """A weight GPTQ can round: how its matrix is laid out and the second moments of the
    inputs it multiplies (several when the weight is shared)."""

    weight: str
    conv: bool  # else a MatMul/Gemm weight
    group: int
    rows_first: bool  # a Gemm B stored [N, K] (transB=1)
    points: tuple[StatisticPoint, ...]
    nbytes: int  # of its matrices, float64

    @property
    def act_order(self) -> bool:
        return ACT_ORDER_DENSE and not self.conv


def _ints(node: ir.Node, name: str, default: list[int]) -> tuple[int, ...]:
    attr = node.attributes.get(name)
    return tuple(default if attr is None else attr.as_ints())


def _int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def _statistic(node: ir.Node, index: int, shape: tuple[int, ...],
               samples: int) -> tuple[Statistic, bool, int] | None:
    """The statistic of `node`'s input for its weight at `index`, whether it is a conv,
    and its group count; None when GPTQ does not handle this use."""
    op = node.op_type
    if not is_onnx(node) or index != 1 or node.inputs[0] is None or not node.inputs[0].name:
        return None
    if op == "Conv" and len(shape) in (3, 4):
        group = _int(node, "group", 1)
        kernel = tuple(shape[2:])
        rank = len(kernel)
        auto = node.attributes.get("auto_pad")
        args = (shape[1] * group, kernel, _ints(node, "strides", [1] * rank),
                _ints(node, "pads", [0] * (2 * rank)), _ints(node, "dilations", [1] * rank),
                group, auto.as_string() if auto is not None else "NOTSET", samples)
        return Statistic(Im2colMoment, args), True, group
    if op == "MatMul" and len(shape) == 2:
        return Statistic(DenseMoment, (shape[0],)), False, 1
    if op == "Gemm" and len(shape) == 2 and not _int(node, "transA", 0):
        cols = shape[1] if _int(node, "transB", 0) else shape[0]
        return Statistic(DenseMoment, (cols,)), False, 1
    return None


def layers(graph: ir.Graph, weights: Iterable[str], samples: int) -> dict[str, Layer]:
    """The weights of `weights` (initializer names) GPTQ can round, in graph order."""
    wanted = set(weights)
    found: dict[str, Layer] = {}
    for value in graph.initializers.values():
        name = value.name or ""
        if name not in wanted or value.const_value is None:
            continue
        shape = tuple(value.const_value.shape)
        uses = list(value.uses())
        made = [_statistic(node, index, shape, samples) for node, index in uses]
        if not uses or any(m is None for m in made):
            continue
        kinds = {(m[1], m[2]) for m in made if m is not None}
        flips = {_int(node, "transB", 0) for node, _ in uses if node.op_type == "Gemm"}
        ops = {node.op_type for node, _ in uses}
        if len(kinds) > 1 or len(flips) > 1 or ("MatMul" in ops and flips == {1}):
            continue
        conv, group = next(iter(kinds))
        points = tuple(unique_points(StatisticPoint(node.inputs[0].name, m[0])
                                     for (node, _), m in zip(uses, made, strict=True)
                                     if m is not None))
        cols = math.prod(shape[1:]) if conv else (shape[1] if flips == {1} else shape[0])
        found[name] = Layer(name, conv, group, flips == {1}, points,
                            len(points) * group * cols * cols * 8)
    order = {v.name: i for i, v in enumerate(_weights_in_order(graph))}
    return dict(sorted(found.items(), key=lambda item: order.get(item[0], len(order))))


def _weights_in_order(graph: ir.Graph) -> list[ir.Value]:
    """Initializers in the order the graph's nodes first read them."""
    seen: dict[ir.Value, None] = {}
    for node in graph:
        for value in node.inputs:
            if value is not None and value.is_initializer():
                seen.setdefault(value, None)
    return list(seen)


def rounds(found: Sequence[Layer], budget: int | None = None) -> list[list[Layer]]:
    """`found` split into passes, in order, each holding at most `budget` bytes of matrices
    (MEMORY_BUDGET when None; a layer larger than the budget gets a pass of its own)."""
    budget = MEMORY_BUDGET if budget is None else budget
    passes: list[list[Layer]] = []
    held: dict[StatisticPoint, int] = {}
    for layer in found:
        per_point = layer.nbytes // max(len(layer.points), 1)
        new = {p: per_point for p in layer.points if p not in held}
        if passes and sum(held.values()) + sum(new.values()) > budget:
            passes.append([])
            held = {p: per_point for p in layer.points}
        else:
            if not passes:
                passes.append([])
            held.update(new)
        passes[-1].append(layer)
    return passes


def _rows(array: np.ndarray, layer: Layer) -> np.ndarray:
    """A weight-shaped array as GPTQ's [G, rows, cols]."""
    if layer.conv:
        return conv_rows(array, layer.group)
    return (array if layer.rows_first else array.T)[None]


def _weight_shaped(rows: np.ndarray, layer: Layer, shape: tuple[int, ...]) -> np.ndarray:
    """GPTQ's [G, rows, cols] back in the weight's shape (`_rows` undone)."""
    if layer.conv:
        return rows.reshape(shape)
    return rows[0] if layer.rows_first else rows[0].T


def _shrunk(layer: Layer, weight: np.ndarray, start: IntegerWeight,
            h: np.ndarray) -> IntegerWeight:
    """`start` with each output channel's (or conv block's) range shrunk where rounding loses
    less (`weights.clipping`); per-tensor layouts and MatMul/Gemm blocks keep theirs."""
    row_axis = 0 if layer.conv or layer.rows_first else 1
    layout = start.layout
    rows = _rows(weight, layer)
    importance = np.diagonal(h, axis1=-2, axis2=-1)[:, None, :]
    if layout.block_size:
        if not layer.conv:
            # Shrunk, MatMul blocks lost all_minilm_l6_v2 0.0007 of cosine where conv blocks
            # gained (docs/decisions.md, blocked convs).
            return start
        scale, zero_point = shrunk_blocks(
            weight, np.broadcast_to(importance, rows.shape).reshape(weight.shape), layout,
            np.asarray(start.scale).dtype)
        return IntegerWeight(start.q, scale, zero_point, layout)
    if layout.axis is None or layout.axis % weight.ndim != row_axis:
        return start
    scale, zero_point = shrunk_rows(rows, importance, layout.grid,
                                    np.asarray(start.scale).dtype)
    return IntegerWeight(start.q, scale.reshape(np.shape(start.scale)),
                         zero_point.reshape(np.shape(start.zero_point)), layout)


def solve(layer: Layer, weight: np.ndarray, start: IntegerWeight,
          statistics: Statistics) -> tuple[IntegerWeight, GPTQResult] | None:
    """GPTQ integers of `weight` with the parameters of `start`, its rows' (or conv blocks')
    ranges shrunk first; None when its inputs were not observed."""
    total = None
    for point in layer.points:
        moment = statistics.get(point.tensor, point.statistic)
        matrices = moment.matrices() if moment is not None else None
        if matrices is None:
            return None
        total = matrices if total is None else total + matrices
    start = _shrunk(layer, weight, start, total)
    shape = weight.shape
    scale = layouts.expand(start.scale, start.layout, shape)
    zero_point = layouts.expand(start.zero_point, start.layout, shape)
    result = gptq(_rows(weight, layer), total, start.layout.grid,
                  _rows(np.asarray(scale, np.float32), layer), _rows(zero_point, layer),
                  act_order=layer.act_order)
    q = _weight_shaped(result.q, layer, shape)
    # Held until the weights are written: the narrowest integer type that holds the grid.
    grid = start.layout.grid
    narrow = np.int8 if grid.qmin >= -128 and grid.qmax <= 127 else np.int32
    return IntegerWeight(np.ascontiguousarray(q, dtype=narrow), start.scale,
                         start.zero_point, start.layout), result


@dataclass
class Solved:
    """What GPTQ made: integers by weight name, each layer's result, the passes it took,
    and the statistics of the extra points collected in its first pass."""

    integers: dict[str, IntegerWeight] = field(default_factory=dict)
    results: dict[str, GPTQResult] = field(default_factory=dict)
    passes: int = 0
    statistics: Statistics = field(default_factory=lambda: Statistics({}))
    # By weight name: the integers on the layout `run` was given for it in `alternatives`.
    alternatives: dict[str, IntegerWeight] = field(default_factory=dict)

    @property
    def rows_nearest(self) -> int:
        return sum(r.rows_nearest for r in self.results.values())

    def summary(self) -> GPTQSummary:
        done = sum(float(r.error.sum()) for r in self.results.values())
        nearest = sum(float(r.nearest_error.sum()) for r in self.results.values())
        return GPTQSummary(len(self.results), self.passes, self.rows_nearest,
                           done / nearest if nearest > 0 else None)


@dataclass(frozen=True)
class GPTQSummary:
    """What GPTQ did, for the run summary."""

    layers: int
    passes: int  # streaming passes over the calibration samples
    rows_nearest: int  # rows the guard gave back to round-to-nearest
    error_ratio: float | None  # GPTQ's layer objective over round-to-nearest's
    by_default: bool = False  # chosen by ptqconv, not by the config
    # Held-out output error of the model with GPTQ weights and with nearest ones, where
    # ptqconv chose GPTQ and AUTO scored (None: not measured); kept: GPTQ's were written.
    errors: tuple[float, float] | None = None
    kept: bool = True


def run(model: ir.Model, targets: Mapping[str, WeightLayout], samples: Sequence,
        threads: int = 1, progress: ProgressFactory | None = None,
        extra: Sequence[StatisticPoint] = (), budget: int | None = None,
        alternatives: Mapping[str, WeightLayout] | None = None) -> Solved:
    """GPTQ every weight of `targets` (by initializer name, with its layout; the parameters
    are round-to-nearest's) that `layers` accepts, on the float `model` and the calibration
    `samples`; `extra` points are collected in the first pass too. A weight also named in
    `alternatives` is solved on that layout too, from the same second moments."""
    found = layers(model.graph, targets, len(samples))
    plan = rounds(list(found.values()), budget) or ([[]] if extra else [])
    solved = Solved(passes=len(plan))
    weights = model.graph.initializers
    for index, part in enumerate(plan):
        points = unique_points([p for layer in part for p in layer.points]
                               + (list(extra) if index == 0 else []))
        label = "GPTQ statistics" + (f" (pass {index + 1} of {len(plan)})"
                                     if len(plan) > 1 else "")
        statistics = collect(model, points, samples, threads,
                             progress(len(samples), label) if progress else None)
        step = progress(len(part), "GPTQ") if progress and part else None
        for layer in part:
            tensor = weights[layer.weight].const_value
            weight = tensor.numpy().astype(np.float32, copy=False)
            start = layouts.nearest(weight, targets[layer.weight], tensor.dtype.numpy())
            made = solve(layer, weight, start, statistics)
            if made is not None:
                solved.integers[layer.weight], solved.results[layer.weight] = made
                other = (alternatives or {}).get(layer.weight)
                if other is not None:
                    again = solve(layer, weight,
                                  layouts.nearest(weight, other, tensor.dtype.numpy()),
                                  statistics)
                    assert again is not None  # its inputs were observed a moment ago
                    solved.alternatives[layer.weight] = again[0]
            else:
                logger.debug("GPTQ: %s kept its nearest integers (input not observed)",
                             layer.weight)
            if step:
                step(1)
        if index == 0:
            solved.statistics = statistics.subset(extra)
        del statistics
    return solved
