"""Questions about nodes and values: standard ONNX operator (the only ones the passes rewrite),
depthwise, quantized, scalar constants, a Conv's SAME pads."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import onnx_ir as ir

# The default domain has two spellings.
ONNX_DOMAINS = ("", "ai.onnx")


def is_onnx(node: ir.Node) -> bool:
    return node.domain in ONNX_DOMAINS


# Ops that only a quantized model holds: quantization itself and onnxruntime's integer kernels
# (default and com.microsoft domains), besides every QLinear* and *Integer op.
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QGemm", "QAttention",
    "QEmbedLayerNormalization", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM",
    "MatMulIntegerToFloat", "MatMulNBits", "MatMulBnb4", "GatherBlockQuantized",
    "QOrderedMatMul", "QOrderedAttention", "QOrderedLayerNormalization"})


def in_skip(node: ir.Node, skip: Collection[str]) -> bool:
    """Whether skip_quant_node names `node`, by its name or op type, or names what
    onnxruntime's simplification fused into it: "mm/MatMulAddFusion" is the MatMul "mm" and
    its bias Add, become a Gemm, so "mm" and "MatMul" still name it."""
    if node.name in skip or node.op_type in skip:
        return True
    parts = fusion_parts(node.name or "")
    if parts is None:
        return False
    head, fused = parts
    return head in skip or any(fused.startswith(s) for s in skip if s[:1].isupper())


def fusion_parts(name: str) -> tuple[str, str] | None:
    """("mm", "MatMulAdd") for "mm/MatMulAddFusion", the name onnxruntime's simplification
    gives a node it fused from "mm" (the op types fused, in order); None for other names."""
    head, _, fusion = name.rpartition("/")
    if not head or not fusion.endswith("Fusion") or fusion == "Fusion":
        return None
    return head, fusion.removesuffix("Fusion")


def is_quantized(node: ir.Node) -> bool:
    """A node of a model that is quantized already (QDQ or integer kernels)."""
    op = node.op_type
    return op in QUANTIZED_OPS or op.startswith("QLinear") or op.endswith("Integer")


def is_depthwise(node: ir.Node) -> bool:
    """A Conv with one input channel per group (and more than one group)."""
    if node.op_type != "Conv" or "group" not in node.attributes:
        return False
    weight = node.inputs[1].const_value if len(node.inputs) > 1 else None
    return (node.attributes["group"].as_int() > 1 and weight is not None
            and weight.shape[1] == 1)


def scalar_constant(value: ir.Value | None) -> float | None:
    """The number a constant value of one element holds (any rank), else None."""
    if value is None or value.const_value is None:
        return None
    array = value.const_value.numpy()
    if array.size != 1 or array.dtype.kind not in "fiu":
        return None
    return float(array.reshape(()))


def same_pads(spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
              dilations: Sequence[int], auto_pad: str) -> tuple[list[int], list[int]]:
    """ONNX's begin and end pads for auto_pad SAME_UPPER / SAME_LOWER / VALID."""
    if auto_pad == "VALID":
        return [0] * len(kernel), [0] * len(kernel)
    begins, ends = [], []
    for n, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
        total = max(0, (-(-n // s) - 1) * s + (k - 1) * d + 1 - n)
        small = total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else total - small)
        ends.append(total - begins[-1])
    return begins, ends


# Ops whose output shape, or order, depends on the values they read: what follows them can
# differ in shape or order between a float model and its quantized copy.
DATA_DEPENDENT_OPS = frozenset({"NonMaxSuppression", "NonZero", "Unique", "Compress"})
# Outputs that pick elements by comparing values (op: output indices): rounding two close
# values differently picks another element, so what is computed from them jumps. TopK's
# values (output 0) are its input's largest values whatever their order: they stay close.
SELECTING_OUTPUTS = {"TopK": (1,), "ArgMax": (0,), "ArgMin": (0,)}


def data_dependent_outputs(graph: ir.Graph) -> frozenset[str]:
    """Names of the graph outputs computed from a data-dependent op's output (DATA_DEPENDENT_OPS,
    in this graph: the boxes a NonMaxSuppression kept) or from indices chosen by comparing
    values (SELECTING_OUTPUTS: the boxes of TopK's best scores)."""
    pending = [v for n in graph if is_onnx(n) for i, v in enumerate(n.outputs)
               if n.op_type in DATA_DEPENDENT_OPS or i in SELECTING_OUTPUTS.get(n.op_type, ())]
    seen: set[ir.Value] = set()
    while pending:
        value = pending.pop()
        if value in seen:
            continue
        seen.add(value)
        pending.extend(out for user, _ in value.uses() for out in user.outputs)
    return frozenset(v.name for v in graph.outputs if v in seen)
