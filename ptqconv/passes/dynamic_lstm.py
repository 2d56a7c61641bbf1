"""Dynamic quantization of LSTM: ai.onnx LSTM -> com.microsoft DynamicQuantizeLSTM.

onnxruntime's contrib op runs the LSTM with int8 input and recurrence weights, each gate row
with its own scale, quantizing the activations at run time as `DynamicQuantizeMatMul` does;
`quantize_dynamic` makes it of every LSTM. Its weights are stored transposed against the
standard op's: W [directions, input, 4 x hidden], R [directions, hidden, 4 x hidden]. On a
2-core AVX2 CPU it ran at 0.88-1.04x the float LSTM (docs/decisions.md, dynamic LSTM). GRU
and RNN have no such kernel and stay float.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ptqconv import qparams
from ptqconv.graph.initializers import add_initializer
from ptqconv.graph.naming import NameAllocator, take_place
from ptqconv.graph.ops import is_onnx
from ptqconv.passes.dynamic_quant import MS_DOMAIN, DynamicQuantConfig, drop_unused
from ptqconv.passes.weight_quant import WeightRecord

STORAGE = "int8 (DynamicQuantizeLSTM)"


@dataclass
class DynamicLSTMResult(ir.passes.PassResult):
    records: list[WeightRecord] = field(default_factory=list)


class DynamicLSTMPass(ir.passes.InPlacePass):
    def __init__(self, config: DynamicQuantConfig):
        super().__init__()
        self.config = config

    def call(self, model: ir.Model) -> DynamicLSTMResult:
        graph = model.graph
        names = NameAllocator(graph)
        result = DynamicLSTMResult(model, False)
        for node in list(graph):
            if not is_onnx(node) or node.op_type != "LSTM":
                continue
            weights = [node.inputs[i] if len(node.inputs) > i else None for i in (1, 2)]
            if any(w is None or w.const_value is None for w in weights):
                continue
            records = [WeightRecord(name=w.name or "", op_type="LSTM",
                                    nodes=(node.name or "LSTM",),
                                    shape=tuple(w.const_value.shape), quantized=False,
                                    float_bytes=w.const_value.nbytes) for w in weights]
            reason = self._skip_reason(graph, node, weights)
            for record in records:
                record.reason = reason
            if not reason:
                self._replace(graph, names, node, weights)
                for record in records:
                    record.quantized, record.storage = True, STORAGE
                result.modified = True
            result.records += records
        if result.modified:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        return result

    def _skip_reason(self, graph: ir.Graph, node: ir.Node, weights: list[ir.Value]) -> str:
        cfg = self.config
        if node.name in cfg.skip or "LSTM" in cfg.skip:
            return f"skip_quant_node ({node.name or 'LSTM'})"
        if node.attributes.get_int("layout", 0) != 0:
            return "layout=1 (batch first): DynamicQuantizeLSTM takes the sequence first"
        for w in weights:
            tensor = w.const_value
            if tensor.dtype != ir.DataType.FLOAT or len(tensor.shape) != 3:
                return "W and R must be 3-D float32"
            if w.name not in graph.initializers or w.is_graph_output():
                return "not an initializer of the main graph only"
            if any(user is not node for user, _ in w.uses()):
                return "shared with another node"
        if sum(w.const_value.size for w in weights) <= cfg.min_size:
            return f"W and R hold <= quantWeightSize {cfg.min_size} elements"
        return ""

    def _replace(self, graph: ir.Graph, names: NameAllocator, node: ir.Node,
                 weights: list[ir.Value]) -> None:
        quantized = []
        for w in weights:
            array = w.const_value.numpy()  # [directions, 4 x hidden, inputs]
            rows = array.reshape(-1, array.shape[-1])  # one gate row of one direction each
            rmin, rmax = qparams.tensor_range(rows, axis=0)
            scale, _ = qparams.scale_zero_point(rmin, rmax, self.config.grid)  # symmetric
            q = qparams.quantize(rows, scale, np.zeros_like(scale, np.int64), self.config.grid,
                                 0, dtype=np.int8).reshape(array.shape)
            base = w.name or "weight"
            quantized.append((
                add_initializer(graph, names.new(f"{base}_quantized"),
                                np.ascontiguousarray(q.transpose(0, 2, 1))),
                add_initializer(graph, names.new(f"{base}_scale"),
                                scale.reshape(array.shape[:2]).astype(np.float32)),
                add_initializer(graph, names.new(f"{base}_zero_point"),
                                np.zeros(array.shape[:2], np.int8))))
        (w_q, w_scale, w_zp), (r_q, r_scale, r_zp) = quantized
        rest = [node.inputs[i] if len(node.inputs) > i else None for i in range(3, 8)]
        attributes = {k: v for k, v in node.attributes.items() if k != "layout"}
        fused = ir.node("DynamicQuantizeLSTM",
                        [node.inputs[0], w_q, r_q, *rest, w_scale, w_zp, r_scale, r_zp],
                        attributes=attributes, domain=MS_DOMAIN,
                        num_outputs=len(node.outputs),
                        name=names.new(f"{node.name or 'LSTM'}_dynamic"))
        graph.insert_after(node, fused)
        for old, new in zip(node.outputs, fused.outputs, strict=True):
            take_place(old, new)
        graph.remove(node, safe=True)
        drop_unused(graph, weights)
