"""Bias correction (MindSpore's method, REFERENCE.md §2) for Conv and Gemm.

The quantized layer computes op(x̂, Ŵ) + b where the float layer computes op(x̂, W) + b on the
same quantized input x̂. Their per-channel mean difference is the mean of op(x̂, W - Ŵ), which a
twin node measures in one calibration pass over the QDQ model; the shift is added to the float
bias (created where there is none) before the model is quantized again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ptqconv.calibrate.collector import probe_session, stream
from ptqconv.passes.naming import NameAllocator

CORRECTED_OPS = ("Conv", "Gemm")
# NNCF-style guard against absurd shifts: a mean shift wider than everything the layer output
# spans over the calibration set cannot be a rounding bias; it means too few or
# unrepresentative samples, so the layer is left alone. (Real rounding biases measured in the
# tests reach about half the range.)
MAX_SHIFT_RATIO = 1.0


@dataclass
class Shift:
    node_index: int
    node_name: str
    mean: np.ndarray  # per output channel: E[float_out - quant_out]
    applied: bool = True
    reason: str = ""


def measure_shifts(
    model: ir.Model,
    weight_errors: Mapping[int, tuple[ir.Node, np.ndarray]],
    samples: Iterable[Mapping[str, np.ndarray]],
    threads: int = 1,
    progress=None,
) -> dict[int, tuple[np.ndarray, float]]:
    """Per node index: the per-channel mean of op(x̂, W - Ŵ), and the width of the layer's
    output range (for the guard), for each node of `weight_errors` (index -> node, W - Ŵ).

    `model` is the QDQ model; twin nodes are added to it for the measurement and removed after.
    """
    graph = model.graph
    names = NameAllocator(graph)
    added: list[tuple[ir.Node, ir.Value]] = []
    twins: dict[str, tuple[int, int]] = {}  # twin output -> (node index, channel axis)
    layer_outputs: dict[str, int] = {}  # the layer's own output -> node index
    for index, (node, error) in weight_errors.items():
        delta = ir.Value(name=names.new(f"{node.name or node.op_type}_weight_error"),
                         type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(error.shape),
                         const_value=ir.Tensor(error, name=None))
        delta.const_value.name = delta.name
        graph.register_initializer(delta)
        attributes = {k: v for k, v in node.attributes.items() if k != "beta"}
        twin = ir.Node(node.domain, node.op_type, [node.inputs[0], delta],
                       attributes=list(attributes.values()), name=names.new(f"{node.name}_twin"))
        twin.outputs[0].name = names.new(f"{node.name or node.op_type}_quant_error")
        graph.insert_after(node, twin)
        added.append((twin, delta))
        twins[twin.outputs[0].name] = (index, 1 if node.op_type == "Conv" else -1)
        layer_outputs[node.outputs[0].name] = index
    sums: dict[int, np.ndarray] = {}
    counts = dict.fromkeys(weight_errors, 0)
    low = dict.fromkeys(weight_errors, np.inf)
    high = dict.fromkeys(weight_errors, -np.inf)

    def consume(result: dict[str, np.ndarray]) -> None:
        for name, array in result.items():
            if name in layer_outputs:
                index = layer_outputs[name]
                low[index] = min(low[index], float(array.min()))
                high[index] = max(high[index], float(array.max()))
                continue
            index, axis = twins[name]
            axis %= array.ndim
            mean = array.mean(axis=tuple(i for i in range(array.ndim) if i != axis),
                              dtype=np.float64)
            sums[index] = sums.get(index, 0.0) + mean
            counts[index] += 1

    fetched = [*twins, *layer_outputs]
    try:
        with probe_session(model, fetched, threads) as session:
            stream(session, samples, fetched, consume, progress)
    finally:
        for twin, delta in added:
            graph.remove(twin, safe=True)
            graph.initializers.pop(delta.name)
    return {i: (sums[i] / counts[i], high[i] - low[i]) for i in sums if counts[i]}


def apply_shifts(graph: ir.Graph, shifts: Mapping[int, tuple[np.ndarray, float]]) -> list[Shift]:
    """Add each shift to the float bias of node number `index` of `graph` (a fresh float copy).

    Returns what was done per node, including the layers the guard left alone.
    """
    nodes = list(graph)
    names = NameAllocator(graph)
    done = []
    for index, (mean, width) in sorted(shifts.items()):
        node = nodes[index]
        record = Shift(index, node.name or f"{node.op_type}#{index}", mean)
        done.append(record)
        if not np.all(np.isfinite(mean)) or np.abs(mean).max() > MAX_SHIFT_RATIO * width:
            record.applied = False
            record.reason = (f"shift {np.abs(mean).max():.3g} > {MAX_SHIFT_RATIO:g} x output "
                             f"range {width:.3g}")
            continue
        beta = node.attributes["beta"].as_float() if "beta" in node.attributes else 1.0
        correction = (mean / (beta if node.op_type == "Gemm" else 1.0)).astype(np.float32)
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None and bias.const_value is not None:
            new = bias.const_value.numpy().astype(np.float32) + correction
            if new.shape != correction.shape:
                record.applied, record.reason = False, "bias is not per channel"
                continue
            bias.const_value = ir.Tensor(new, name=bias.name)
        elif bias is None:
            value = ir.Value(name=names.new(f"{record.node_name}_bias"),
                             type=ir.TensorType(ir.DataType.FLOAT),
                             shape=ir.Shape(correction.shape),
                             const_value=ir.Tensor(correction, name=None))
            value.const_value.name = value.name
            graph.register_initializer(value)
            while len(node.inputs) < 2:
                node.resize_inputs(len(node.inputs) + 1)
            node.resize_inputs(3)
            node.replace_input_with(2, value)
        else:
            record.applied, record.reason = False, "bias is not a constant"
    return done
