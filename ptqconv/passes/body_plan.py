"""Quantization plans for the bodies of If, Loop and Scan, one graph at a time.

onnxruntime fuses Q/DQ inside control-flow bodies exactly as in the main graph, as long as
each DequantizeLinear lives in the body that reads it (docs/reference.md §3), so every body is
planned by `qdq_plan.plan_quantization` with the same unit rules. What differs is the cost: a
body runs once per iteration (or per step of a streaming model), and on small weight ops the
Q/DQ around them cost more than the integer kernel saves. A weight op of a body is therefore
quantized only from BODY_MIN_MACS multiply-adds per execution (from shape inference at the
calibration inputs' shapes), and a body left without an integer weight op stays float
entirely (its elementwise units alone would only add work).
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from ptqconv.graph.naming import node_key
from ptqconv.graph.ops import in_skip
from ptqconv.graph.subgraphs import Body, all_nodes, bodies
from ptqconv.graph.weight_slots import weight_slot
from ptqconv.passes.qdq_plan import WEIGHT_OPS, QuantPlan, plan_quantization

# Below this many multiply-adds per execution a body's weight op stays float: on an AVX2 CPU
# without VNNI a recurrent cell (six [1, H] x [H, H] MatMuls) ran 1.06x float at H = 181 and
# 0.92-0.97x at H = 256 (docs/decisions.md, body gate).
BODY_MIN_MACS = 65536
UNFUSED = ("onnxruntime did not fuse it into an integer kernel (its DequantizeLinear would "
           "run every execution)")


@dataclass
class BodyPlan:
    """The plan of one body, and why each of its weight ops that stays float does."""

    body: Body
    plan: QuantPlan
    kept_float: dict[str, str] = field(default_factory=dict)  # node key -> reason
    reason: str = ""  # why the whole body stays float, if it does


def plan_model(graph: ir.Graph, skip: frozenset[str] = frozenset(),
               float_tensors: frozenset[str] = frozenset(),
               float_nodes: frozenset[ir.Node] = frozenset(),
               unfused: frozenset[str] = frozenset(),
               macs: Mapping[str, int] | None = None,
               float_units: frozenset[str] = frozenset()) -> QuantPlan:
    """The plan of `graph` (`plan_quantization`), with the plans of the If / Loop / Scan bodies
    under it in `bodies`. `unfused` are node keys of body weight ops onnxruntime did not fuse
    in an earlier build, kept float now; `macs` the multiply-adds of body weight ops by node
    key (`body_macs`; weight elements where missing); `float_units` node keys of the main
    graph that are not units (kept float for speed, see plan_quantization)."""
    plan = plan_quantization(graph, skip, float_tensors, float_nodes, float_units)
    for body in bodies(graph):
        if not all(b.quantizable for b in body.path):
            continue  # under a subgraph ptqconv does not quantize: said once, there
        if not body.quantizable:
            plan.bodies.append(BodyPlan(body, QuantPlan(), reason=(
                f"subgraph of {body.node.op_type}: only If, Loop and Scan bodies are "
                "quantized")))
            continue
        plan.bodies.append(_plan_body(body, skip, float_tensors, unfused, macs or {}))
    return plan


def _plan_body(body: Body, skip: frozenset[str], float_tensors: frozenset[str],
               unfused: frozenset[str], macs: Mapping[str, int]) -> BodyPlan:
    kept: dict[str, str] = {}
    for node in body.graph:
        if node.op_type not in WEIGHT_OPS:
            continue
        key = node_key(node)
        slot = weight_slot(node)
        work = macs.get(key) or (slot.node.inputs[slot.index].const_value.size
                                 if slot is not None else None)
        if key in unfused:
            kept[key] = UNFUSED
        elif work is not None and work < BODY_MIN_MACS:
            kept[key] = (f"{work} multiply-adds per execution, fewer than {BODY_MIN_MACS}: "
                         "integer kernels do not pay for their Q/DQ on every execution")
    float_nodes = frozenset(n for n in body.graph if node_key(n) in kept)
    plan = plan_quantization(body.graph, skip, float_tensors, float_nodes)
    for node in body.graph:
        key = node_key(node)
        if node.op_type in WEIGHT_OPS and node not in plan.units and key not in kept:
            kept[key] = ("skip_quant_node" if in_skip(node, skip)
                         else "an input or its output stays float (not observed in "
                         "calibration, or not float32)")
    if not any(n.op_type in WEIGHT_OPS for n in plan.units):
        return BodyPlan(body, QuantPlan(), kept, "no weight op left to run as an integer "
                        "kernel" if kept else "no Conv, Gemm or MatMul")
    return BodyPlan(body, plan, kept)


def body_macs(model: ir.Model, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Multiply-adds per execution of each weight op inside a body (by node key), from onnx
    shape inference with the model inputs at `shapes`: weight elements times output elements
    per output channel. Ops whose output shape stays unknown are left out."""
    weight_ops = [n for b in bodies(model.graph) for n in b.graph
                  if n.op_type in WEIGHT_OPS and weight_slot(n) is not None]
    if not weight_ops:
        return {}
    copy = model.clone()
    for value in copy.graph.inputs:
        if value.name in shapes:
            value.shape = ir.Shape(shapes[value.name])
    with contextlib.suppress(Exception):  # no shapes: the gate counts weight elements
        copy = common_passes.ShapeInferencePass(strict_mode=False)(copy).model
    found = {}
    inferred = {node_key(n): n for b in bodies(copy.graph) for n in b.graph}
    for node in weight_ops:
        out = inferred[node_key(node)].outputs[0].shape
        slot = weight_slot(node)
        if out is None or not all(isinstance(d, int) for d in out) or len(out) < 2:
            continue
        channels = out[1] if node.op_type.startswith("Conv") else out[-1]
        weight = slot.node.inputs[slot.index].const_value.size
        found[node_key(node)] = weight * math.prod(out) // max(channels, 1)
    return found


def every_plan(plan: QuantPlan, graph: ir.Graph) -> list[tuple[ir.Graph, QuantPlan]]:
    """The plan of `graph` and of each body, with the graph each rewrites."""
    return [(graph, plan), *((b.body.graph, b.plan) for b in plan.bodies)]


def integer_kernel(op_type: str) -> bool:
    """Whether onnxruntime runs this (optimized) op on integers."""
    return op_type.startswith("QLinear") or op_type in ("QGemm", "MatMulIntegerToFloat",
                                                        "ConvInteger", "MatMulInteger")


def unfused(optimized: ir.Model, weight_inputs: dict[str, str],
            keys: frozenset[str]) -> frozenset[str]:
    """Of the weight ops `keys`, those whose weight onnxruntime still dequantizes for a float
    op in `optimized` (its graph after optimization; `weight_inputs`: QDQResult's)."""
    readers: dict[str, list[str]] = {}
    for node in all_nodes(optimized.graph):
        for value in node.inputs:
            if value is not None and value.name:
                readers.setdefault(value.name, []).append(node.op_type)
    return frozenset(key for key in keys if key in weight_inputs
                     and any(not integer_kernel(op) for op in readers.get(weight_inputs[key], ())))


def integer_kernels(optimized: ir.Model, renamed: dict[str, str]) -> dict[tuple[str, str], Counter]:
    """The integer kernels onnxruntime runs in each body of `optimized`, by (node key of the
    control-flow node in the float model, attribute)."""
    found = {}
    for body in bodies(optimized.graph):
        key = node_key(body.node)
        found[(renamed.get(key, key), body.attribute)] = Counter(
            n.op_type for n in body.graph if integer_kernel(n.op_type))
    return found
