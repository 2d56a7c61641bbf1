"""Tensors inside If / Loop / Scan bodies made observable: onnxruntime only returns the main
graph's outputs, so a copy of the model threads each body tensor out, one level at a time:

  Loop / Scan body -> an extra scan output: the tensor stacked over the iterations;
  If branch        -> an extra branch output; the other branch outputs an empty tensor.

What arrives is the tensor itself, every execution of it in one array (empty when an If took
the other branch), so every accumulator works on it as on a main-graph tensor. An If inside
a Loop or Scan cannot do that: scan outputs must keep one shape over the iterations, so an
empty placeholder cannot cross the loop. There each execution gives its [min, max] instead
((+inf, -inf) when not taken) and only min/max statistics are exact (`per_execution`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ptqconv.graph.naming import NameAllocator
from ptqconv.graph.subgraphs import LOOPS, Body, all_values, bodies, owner


@dataclass(frozen=True)
class Exposed:
    """Where a body tensor arrives: the main-graph output `output`, and whether it holds one
    [min, max] pair per execution instead of the values."""

    output: str
    per_execution: bool


def per_execution(model: ir.Model) -> frozenset[str]:
    """Body tensors that only min/max statistics can observe (in an If inside a loop)."""
    found = set()
    for body in bodies(model.graph):
        path = (*body.path, body)
        if any(b.node.op_type == "If" and any(o.node.op_type in LOOPS for o in path[:i])
               for i, b in enumerate(path)):
            found |= {v.name for v in _defined(body.graph)}
    return frozenset(found)


def _defined(graph: ir.Graph) -> list[ir.Value]:
    return [*graph.inputs, *(v for node in graph for v in node.outputs)]


def expose(model: ir.Model, names: list[str]) -> tuple[ir.Model, dict[str, Exposed]]:
    """A copy of `model` with every body tensor of `names` threaded out to a main-graph value
    (see the module docstring); `model` is not modified. Names of main-graph values map to
    themselves (a model without subgraphs is returned as it is)."""
    if next(model.graph.subgraphs(), None) is None:
        return model, {name: Exposed(name, False) for name in names}
    copy = ir.from_proto(ir.to_proto(model))
    graph = copy.graph
    values = all_values(graph)
    paths = {b.graph: (*b.path, b) for b in bodies(graph)}
    minmax = per_execution(copy)
    names_ = NameAllocator(graph)
    exposed: dict[str, Exposed] = {}
    for name in names:
        value = values.get(name)
        home = owner(value) if value is not None else None
        if home is None or home is graph:
            exposed[name] = Exposed(name, False)
            continue
        pairs = name in minmax
        base = f"ptq_observe_{name}"
        carried = _min_max(home, names_, value, base) if pairs else value
        for body in reversed(paths[home]):
            carried = _lift(body, carried, pairs, names_, base)
        exposed[name] = Exposed(carried.name, pairs)
    return copy, exposed


def _append(graph: ir.Graph, names: NameAllocator, op: str, inputs: list[ir.Value], base: str,
            attributes: dict | None = None) -> ir.Value:
    node = ir.node(op, inputs, attributes, name=names.new(f"{base}_{op}"))
    node.outputs[0].name = names.new(base)
    graph.append(node)
    return node.outputs[0]


def _constant(graph: ir.Graph, names: NameAllocator, array: np.ndarray, base: str) -> ir.Value:
    return _append(graph, names, "Constant", [], base, {"value": ir.tensor(array)})


def _min_max(graph: ir.Graph, names: NameAllocator, value: ir.Value, base: str) -> ir.Value:
    """[min(value), max(value)] as a float32 [2], computed in `graph`."""
    one = _constant(graph, names, np.array([1], np.int64), f"{base}_shape")
    low = _append(graph, names, "ReduceMin", [value], f"{base}_min", {"keepdims": 0})
    high = _append(graph, names, "ReduceMax", [value], f"{base}_max", {"keepdims": 0})
    pair = [_append(graph, names, "Reshape", [v, one], f"{base}_{side}")
            for v, side in ((low, "low"), (high, "high"))]
    out = _append(graph, names, "Concat", pair, f"{base}_pair", {"axis": 0})
    out.type, out.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape([2])
    return out


def _as_output(graph: ir.Graph, names: NameAllocator, value: ir.Value, base: str) -> None:
    out = _append(graph, names, "Identity", [value], base)
    out.type = value.type
    graph.outputs.append(out)


def _lift(body: Body, inner: ir.Value, pairs: bool, names: NameAllocator,
          base: str) -> ir.Value:
    """`inner`, a value of `body`, as a new output of the node that holds it."""
    node = body.node
    _as_output(body.graph, names, inner, f"{base}_out")
    if node.op_type == "If":
        other = node.attributes["else_branch" if body.attribute == "then_branch"
                                else "then_branch"].as_graph()
        dtype = (inner.dtype or ir.DataType.FLOAT).numpy()
        filler = (np.array([np.inf, -np.inf], np.float32) if pairs
                  else np.zeros((0,), dtype))
        _as_output(other, names, _constant(other, names, filler, f"{base}_not_taken"),
                   f"{base}_not_taken_out")
    elif node.op_type == "Scan":
        for attr in ("scan_output_axes", "scan_output_directions"):
            if attr in node.attributes:
                given = list(node.attributes[attr].as_ints())
                node.attributes[attr] = ir.AttrInt64s(attr, [*given, 0])
    node.resize_outputs(len(node.outputs) + 1)
    lifted = node.outputs[-1]
    lifted.name = names.new(f"{base}_lifted")
    lifted.type = inner.type
    return lifted
