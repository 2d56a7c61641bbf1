"""Dynamic quantization: MatMul / Gemm with constant weights -> DynamicQuantizeMatMul.

onnxruntime's contrib op `com.microsoft.DynamicQuantizeMatMul(A, B, b_scale, b_zero_point,
bias)` quantizes A to uint8 at run time (one scale per tensor) and runs the U8S8 integer GEMM
on the int8 weights B; the output is float. It is what onnxruntime's own optimizer makes of
quantize_dynamic's DynamicQuantizeLinear + MatMulInteger + Cast + Mul chain, emitted directly
with the bias folded in (docs/decisions.md, dynamic quantization). Weights are symmetric
int8 per output column (ALWC) or per tensor (ACWL's weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ptqconv import qparams
from ptqconv.graph.initializers import add_initializer
from ptqconv.graph.naming import NameAllocator, take_place
from ptqconv.graph.ops import is_onnx
from ptqconv.passes.weight_quant import WeightRecord

MS_DOMAIN = "com.microsoft"
FLOAT_WEIGHTS = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16})
STORAGE = "int8 (DynamicQuantizeMatMul)"


@dataclass
class DynamicQuantConfig:
    grid: qparams.Grid  # symmetric int8 weights (7-bit where the U8S8 GEMM saturates)
    per_channel: bool = True  # one scale per output column; False: per tensor
    min_size: int = 0
    skip: frozenset[str] = field(default_factory=frozenset)


@dataclass
class DynamicQuantResult(ir.passes.PassResult):
    records: list[WeightRecord] = field(default_factory=list)


@dataclass
class _Candidate:
    node: ir.Node
    weights: np.ndarray  # [K, N] as the product uses it
    bias: np.ndarray | None
    bias_add: ir.Node | None
    transposed: bool = False  # Gemm transB: `weights` is the stored weight transposed
    float16: bool = False  # a float16 product: run in float32 between two Casts


class DynamicQuantPass(ir.passes.InPlacePass):
    """Replace each eligible MatMul / Gemm by a DynamicQuantizeMatMul; the result records every
    constant weight of a MatMul or Gemm it met."""

    def __init__(self, config: DynamicQuantConfig):
        super().__init__()
        self.config = config
        # (weight, transposed) -> its int8 weights, scale and zero point: nodes that share a
        # float weight share its integers.
        self._integers: dict[tuple[int, bool], list[ir.Value]] = {}
        # A float16 input -> its float32 Cast, shared by the products that read it.
        self._float32: dict[int, ir.Value] = {}

    def call(self, model: ir.Model) -> DynamicQuantResult:
        graph = model.graph
        names = NameAllocator(graph)
        result = DynamicQuantResult(model, False)
        for node in list(graph):
            if not is_onnx(node) or node.op_type not in ("MatMul", "Gemm"):
                continue
            weight = node.inputs[1] if len(node.inputs) > 1 else None
            if weight is None or weight.const_value is None:
                continue
            tensor = weight.const_value
            record = WeightRecord(name=weight.name or "", op_type=node.op_type,
                                  nodes=(node.name or node.op_type,),
                                  shape=tuple(tensor.shape), quantized=False,
                                  float_bytes=tensor.nbytes)
            found = self._candidate(graph, node, weight)
            if isinstance(found, str):
                record.reason = found
            else:
                self._replace(graph, names, found)
                record.quantized = result.modified = True
                record.storage = STORAGE
            result.records.append(record)
        if result.modified:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        return result

    def _candidate(self, graph: ir.Graph, node: ir.Node, weight: ir.Value) -> _Candidate | str:
        """The rewrite of `node`, or why it keeps its float weight."""
        cfg = self.config
        if node.name in cfg.skip or node.op_type in cfg.skip:
            return f"skip_quant_node ({node.name or node.op_type})"
        tensor = weight.const_value
        assert tensor is not None
        if tensor.dtype not in FLOAT_WEIGHTS:
            return f"dtype {tensor.dtype.name.lower()} (float32 and float16 weights only)"
        if len(tensor.shape) != 2:
            return f"rank {len(tensor.shape)} (a 2-D weight is needed)"
        if weight.name not in graph.initializers or weight.is_graph_output():
            return "not an initializer of the main graph only"
        for user, index in weight.uses():
            if not (is_onnx(user) and user.op_type in ("MatMul", "Gemm") and index == 1):
                return f"also read by {user.op_type} {user.name or ''}".rstrip()
        if tensor.size <= cfg.min_size:
            return f"{tensor.size} elements <= quantWeightSize {cfg.min_size}"
        weights = tensor.numpy().astype(np.float32, copy=False)
        bias, bias_add = None, None
        if node.op_type == "Gemm":
            attrs = {k: v.value for k, v in node.attributes.items()}
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 \
                    or attrs.get("beta", 1.0) != 1.0:
                return "Gemm with transA, alpha or beta"
            transposed = bool(attrs.get("transB", 0))
            if transposed:
                weights = weights.T
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                bias = _vector(node.inputs[2], weights.shape[1])
                if bias is None:
                    return "Gemm bias is not a constant vector of the output width"
        else:
            bias_add, bias = _bias_add(node, weights.shape[1])
        return _Candidate(node, np.ascontiguousarray(weights, np.float32), bias, bias_add,
                          node.op_type == "Gemm" and transposed,
                          tensor.dtype == ir.DataType.FLOAT16)

    def _replace(self, graph: ir.Graph, names: NameAllocator, c: _Candidate) -> None:
        cfg = self.config
        base = c.node.inputs[1].name or "weight"
        key = (id(c.node.inputs[1]), c.transposed)
        integers = self._integers.get(key)
        if integers is None:
            axis = 1 if cfg.per_channel else None
            rmin, rmax = qparams.tensor_range(c.weights, axis)
            scale, _ = qparams.scale_zero_point(rmin, rmax, cfg.grid)
            q = qparams.quantize(c.weights, scale, np.zeros_like(scale, np.int64), cfg.grid,
                                 axis, dtype=np.int8)
            integers = self._integers[key] = [
                add_initializer(graph, names.new(f"{base}_quantized"), q),
                add_initializer(graph, names.new(f"{base}_scale"), scale),
                add_initializer(graph, names.new(f"{base}_zero_point"),
                                np.zeros(scale.shape, np.int8)),
            ]
        x = c.node.inputs[0]
        assert x is not None
        before: list[ir.Node] = []
        if c.float16:
            # onnxruntime's CPU provider computes a float16 model in float32 behind Casts
            # anyway; DynamicQuantizeMatMul takes float32 only.
            cast = self._float32.get(id(x))
            if cast is None:
                node = ir.node("Cast", [x], {"to": ir.DataType.FLOAT},
                               name=names.new(f"{x.name or base}_to_float32"))
                node.outputs[0].name = names.new(f"{x.name or base}_float32")
                node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
                node.outputs[0].shape = x.shape
                before.append(node)
                cast = self._float32[id(x)] = node.outputs[0]
            x = cast
        inputs = [x, *integers]
        if c.bias is not None:
            inputs.append(add_initializer(graph, names.new(f"{base}_bias"), c.bias))
        last = c.bias_add if c.bias_add is not None else c.node
        fused = ir.node("DynamicQuantizeMatMul", inputs, domain=MS_DOMAIN,
                        name=names.new(f"{c.node.name or base}_dynamic"))
        after = [fused]
        if c.float16:
            fused.outputs[0].name = names.new(f"{c.node.name or base}_dynamic_float32")
            fused.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
            fused.outputs[0].shape = last.outputs[0].shape
            after.append(ir.node("Cast", [fused.outputs[0]], {"to": ir.DataType.FLOAT16},
                                 name=names.new(f"{c.node.name or base}_to_float16")))
        if before:
            graph.insert_before(c.node, before)
        graph.insert_after(last, after)
        # The float constants the rewrite replaces, dropped once nothing reads them.
        replaced = [c.node.inputs[1], *(c.bias_add.inputs if c.bias_add else c.node.inputs[2:])]
        take_place(last.outputs[0], after[-1].outputs[0])
        graph.remove([n for n in (c.bias_add, c.node) if n is not None], safe=True)
        drop_unused(graph, [v for v in replaced if v is not None])


def _vector(value: ir.Value, width: int) -> np.ndarray | None:
    tensor = value.const_value
    if tensor is None or tensor.dtype not in FLOAT_WEIGHTS:
        return None
    array = tensor.numpy()
    if array.size != width or array.ndim > 2 or (array.ndim == 2 and array.shape[0] != 1):
        return None
    return np.ascontiguousarray(array.reshape(width), np.float32)


def _bias_add(node: ir.Node, width: int) -> tuple[ir.Node | None, np.ndarray | None]:
    """The Add of a constant [N] vector that alone reads the MatMul's output, and the vector."""
    out = node.outputs[0]
    users = out.uses()
    if len(users) != 1 or out.is_graph_output():
        return None, None
    add, _ = users[0]
    if not is_onnx(add) or add.op_type != "Add":
        return None, None
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    if other is None or other is out:
        return None, None
    bias = _vector(other, width)
    return (add, bias) if bias is not None else (None, None)


def drop_unused(graph: ir.Graph, values: list[ir.Value]) -> None:
    """Remove the initializers among `values` that nothing reads any more."""
    for value in values:
        if value.name in graph.initializers and graph.initializers[value.name] is value \
                and not value.uses() and not value.is_graph_output():
            graph.initializers.pop(value.name)
