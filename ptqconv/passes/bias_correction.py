"""Bias correction (MindSpore's method, docs/reference.md §2) for Conv and Gemm.

The quantized layer computes op(x̂, Ŵ) + b where the float layer computes op(x̂, W) + b on the
same quantized input x̂. Their per-channel mean difference is the mean of op(x̂, W - Ŵ), which a
twin node measures in one calibration pass over the QDQ model; the shift is added to the float
bias (created where there is none) before the model is quantized again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ptqconv import runtime
from ptqconv.graph.initializers import add_initializer, set_constant
from ptqconv.graph.naming import NameAllocator, node_key
from ptqconv.passes.qdq import WeightError

logger = logging.getLogger(__name__)
# A mean shift wider than this times the layer's output range over the calibration set is a
# calibration artefact, not a rounding bias: the layer is left alone (docs/decisions.md).
MAX_SHIFT_RATIO = 1.0


@dataclass(frozen=True)
class MeasuredShift:
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


def measure_shifts(
    model: ir.Model,
    weight_errors: Mapping[str, WeightError],
    samples: Iterable[Mapping[str, np.ndarray]],
    threads: int = 1,
    progress: Callable[[int], None] | None = None,
) -> dict[str, MeasuredShift]:
    """The shift of each layer of `weight_errors` (by node key), measured on the QDQ `model`
    by twin nodes op(x̂, W - Ŵ), which are added for the measurement and removed after."""
    graph = model.graph
    names = NameAllocator(graph)
    added: list[tuple[ir.Node, ir.Value]] = []
    twins: dict[str, tuple[str, int]] = {}  # twin output -> (node key, channel axis)
    layer_outputs: dict[str, str] = {}  # the layer's own output -> node key
    for key, (node, error) in ((k, (e.node, e.error)) for k, e in weight_errors.items()):
        delta = add_initializer(graph, names.new(f"{node.name or node.op_type}_weight_error"),
                                error)
        attributes = {k: v for k, v in node.attributes.items() if k != "beta"}
        twin = ir.Node(node.domain, node.op_type, [node.inputs[0], delta],
                       attributes=list(attributes.values()), name=names.new(f"{node.name}_twin"))
        twin.outputs[0].name = names.new(f"{node.name or node.op_type}_quant_error")
        graph.insert_after(node, twin)
        added.append((twin, delta))
        twins[twin.outputs[0].name] = (key, 1 if node.op_type == "Conv" else -1)
        layer_outputs[node.outputs[0].name] = key
    sums: dict[str, np.ndarray] = {}
    counts = dict.fromkeys(weight_errors, 0)
    low = dict.fromkeys(weight_errors, np.inf)
    high = dict.fromkeys(weight_errors, -np.inf)

    def consume(result: dict[str, np.ndarray]) -> None:
        for name, array in result.items():
            if name in layer_outputs:
                key = layer_outputs[name]
                low[key] = min(low[key], float(array.min()))
                high[key] = max(high[key], float(array.max()))
                continue
            key, axis = twins[name]
            axis %= array.ndim
            mean = array.mean(axis=tuple(i for i in range(array.ndim) if i != axis),
                              dtype=np.float64)
            sums[key] = sums.get(key, 0.0) + mean
            counts[key] += 1

    fetched = [*twins, *layer_outputs]
    try:
        with runtime.probe(model, fetched, threads, label="bias correction") as session:
            runtime.stream(session, samples, fetched, consume, progress)
    finally:
        for twin, delta in added:
            graph.remove(twin, safe=True)
            graph.initializers.pop(delta.name)
    return {k: MeasuredShift(sums[k] / counts[k], high[k] - low[k]) for k in sums if counts[k]}


def apply_shifts(graph: ir.Graph, shifts: Mapping[str, MeasuredShift]) -> list[Correction]:
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
    beta = node.attributes["beta"].as_float() if "beta" in node.attributes else 1.0
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
