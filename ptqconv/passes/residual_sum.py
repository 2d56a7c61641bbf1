"""Residual Adds before LayerNormalization written as Sum, which onnxruntime does not fuse.

onnxruntime (1.32, CPU) fuses Add -> LayerNormalization into its SkipLayerNormalization
kernel, which on x86 without VNNI runs 3-6x slower than the two ops it replaces (docs/
decisions.md, SkipLayerNormalization). Sum of two inputs is the same float addition under
another name, so the written model computes what the model says, bit for bit as onnxruntime
runs it unfused (its fused kernel rounds the normalization slightly differently, about
1e-7 relative). Whether the fusion
is slower is measured on the CPU at conversion time (`runtime.skip_layer_norm_ms`), not
assumed: this pass only rewrites.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import onnx_ir as ir

from ptqconv import runtime
from ptqconv.errors import PtqError
from ptqconv.graph.ops import is_onnx
from ptqconv.target import Target, detect


def residual_adds(model: ir.Model) -> list[ir.Node]:
    """The Adds onnxruntime would fuse into SkipLayerNormalization: two inputs, output read
    only by a LayerNormalization as its input, not a graph output."""
    found = []
    for graph in model.graphs():
        outputs = set(graph.outputs)
        for node in graph:
            if not is_onnx(node) or node.op_type != "Add" or len(node.inputs) != 2:
                continue
            out = node.outputs[0]
            uses = list(out.uses())
            if out in outputs or len(uses) != 1:
                continue
            user, index = uses[0]
            if is_onnx(user) and user.op_type == "LayerNormalization" and index == 0:
                found.append(node)
    return found


@dataclass
class ResidualSumResult(ir.passes.PassResult):
    rewritten: list[str] = field(default_factory=list)  # node names


class ResidualSumPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ResidualSumResult:
        result = ResidualSumResult(model, False)
        for node in residual_adds(model):
            node.op_type = "Sum"
            result.rewritten.append(node.name or "")
            result.modified = True
        return result


# Tokens the fusion is timed at when the model's are not static (onnxruntime's simplified
# graphs carry no intermediate shapes).
DEFAULT_TOKENS = 128
# Written as Sum only when unfused measured at most this fraction of the fused time: timing
# noise must not flip the choice, so that the same command writes the same file (the gap is
# 3-6x on transformer shapes; within 15% either way on tiny ones, docs/decisions.md).
MARGIN = 2 / 3


@dataclass(frozen=True)
class ResidualSum:
    """What was measured for the residual Adds and whether they were written as Sum."""

    adds: int
    shape: tuple[int, int]  # [tokens, hidden] the fusion was timed at
    fused_ms: float
    unfused_ms: float
    cpu: str

    @property
    def applied(self) -> bool:
        return self.unfused_ms <= MARGIN * self.fused_ms


def measure(model: ir.Model, target: Target) -> ResidualSum | None:
    """Time onnxruntime's SkipLayerNormalization fusion against the unfused spelling on this
    CPU, at the model's hidden size (its LayerNormalization scale) and token count
    (DEFAULT_TOKENS when not static). None when the model has nothing to fuse or is
    converted for another kind of CPU than this one."""
    adds = residual_adds(model)
    if not adds or target.name != detect().name:
        return None
    add = adds[0]
    norm = next(user for user, _ in add.outputs[0].uses())
    scale = norm.inputs[1].const_value if len(norm.inputs) > 1 and norm.inputs[1] else None
    shape = add.outputs[0].shape
    dims = [d if isinstance(d, int) else None for d in shape] if shape is not None else []
    hidden = scale.shape[-1] if scale is not None and len(scale.shape) else (
        dims[-1] if dims else None)
    if not isinstance(hidden, int):
        return None
    known = dims[:-1] and all(d is not None for d in dims[:-1])
    tokens = math.prod(dims[:-1]) if known else DEFAULT_TOKENS
    try:
        timed = runtime.skip_layer_norm_ms(hidden, tokens)
    except PtqError:  # a figure, not a reason to fail: the Adds stay as they are
        return None
    return ResidualSum(len(adds), (tokens, hidden), timed.ms["fused"], timed.ms["unfused"],
                       timed.cpu)
