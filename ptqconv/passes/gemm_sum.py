"""Split a Gemm that adds a computed tensor back into MatMul + Add.

onnxruntime's simplification fuses MatMul + Add into Gemm whatever the Add's other input is.
With a constant bias that Gemm becomes a QGemm; with a computed C (a recurrent cell's
`x Wx + h Wh`) no integer kernel takes it, so it stayed a float Gemm fed by a weight
DequantizeLinear that ran on every execution of its body. Split, the MatMul runs as
QLinearMatMul and the sum as QLinearAdd.
"""

from __future__ import annotations

import onnx_ir as ir

from ptqconv.graph.naming import NameAllocator
from ptqconv.graph.ops import is_onnx
from ptqconv.graph.subgraphs import all_nodes


def _attribute(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _splittable(node: ir.Node) -> bool:
    if node.op_type != "Gemm" or not is_onnx(node) or len(node.inputs) < 3:
        return False
    c = node.inputs[2]
    return (c is not None and c.const_value is None
            and all(_attribute(node, name, default) == default
                    for name, default in (("alpha", 1.0), ("beta", 1.0), ("transA", 0),
                                          ("transB", 0))))


class SplitGemmSumPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        found = [n for n in all_nodes(model.graph) if _splittable(n)]
        names = NameAllocator(model.graph)
        for gemm in found:
            a, b, c = gemm.inputs[:3]
            out = gemm.outputs[0]
            matmul = ir.node("MatMul", [a, b], name=gemm.name)
            product = matmul.outputs[0]
            product.name = names.new(f"{out.name}_product")
            product.type = out.type
            add = ir.node("Add", [product, c], name=names.new(f"{gemm.name or out.name}_sum"))
            gemm.graph.insert_after(gemm, [matmul, add])
            out.replace_all_uses_with(add.outputs[0], replace_graph_outputs=True)
            name = out.name
            gemm.graph.remove(gemm, safe=True)
            add.outputs[0].name, add.outputs[0].type, add.outputs[0].shape = (
                name, out.type, out.shape)
        return ir.passes.PassResult(model, bool(found))
