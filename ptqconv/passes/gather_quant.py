"""Embedding tables: Gather(float table, ids) -> the same rows from an int8 table.

Only the gathered rows are dequantized, at run time, as onnxruntime's quantize_dynamic does:
dequantizing the whole table before the Gather would cost a pass over it every inference.
Per table (DynamicQuant, like quantize_dynamic): DequantizeLinear(Gather(int8 table, ids)).
Per row (PostTraining): Mul(Cast(Gather(int8 table, ids)), Gather(row scales, ids)), symmetric,
since a row's scale has to be gathered with it; on all_minilm_l6_v2 per row costs 0.00006 of
embedding cosine where per table costs 0.0003 (docs/decisions.md, embedding tables).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ptqconv import qparams
from ptqconv.graph.gathered_rows import dequantize_gathered
from ptqconv.graph.initializers import add_initializer
from ptqconv.graph.naming import NameAllocator
from ptqconv.graph.ops import is_onnx
from ptqconv.passes.weight_quant import FLOAT16_SCALE_OPSET, WeightRecord

FLOAT_TABLES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16})
STORAGE = "int8 (Gather, then DequantizeLinear)"
STORAGE_PER_ROW = "int8 per row (Gather, then Cast and Mul by the gathered row scales)"


@dataclass
class GatherQuantConfig:
    grid: qparams.Grid  # per table: any 8-bit grid; per row: a symmetric one
    min_size: int = 0
    skip: frozenset[str] = field(default_factory=frozenset)
    per_row: bool = False


@dataclass
class GatherQuantResult(ir.passes.PassResult):
    records: list[WeightRecord] = field(default_factory=list)


class GatherQuantPass(ir.passes.InPlacePass):
    def __init__(self, config: GatherQuantConfig):
        super().__init__()
        self.config = config
        self.opset = 1  # the model's, read by `call`

    def call(self, model: ir.Model) -> GatherQuantResult:
        graph = model.graph
        names = NameAllocator(graph)
        result = GatherQuantResult(model, False)
        # Gathers inside Loop or If bodies too: an EmbeddingBag exported by TorchScript
        # gathers each bag's rows of the main graph's table in a Loop.
        self.opset = model.opset_imports.get("", 1)
        for node in list(ir.traversal.RecursiveGraphIterator(graph)):
            if not is_onnx(node) or node.op_type != "Gather" or node.inputs[0] is None:
                continue
            table = node.inputs[0]
            tensor = table.const_value
            if tensor is None:
                continue
            record = WeightRecord(name=table.name or "", op_type="Gather",
                                  nodes=(node.name or "Gather",), shape=tuple(tensor.shape),
                                  quantized=False, float_bytes=tensor.nbytes)
            record.reason = self._skip_reason(graph, node, table)
            if not record.reason:
                self._replace(graph, names, node, table)
                record.quantized = result.modified = True
                record.storage = STORAGE_PER_ROW if self.config.per_row else STORAGE
            result.records.append(record)
        return result

    def _skip_reason(self, graph: ir.Graph, node: ir.Node, table: ir.Value) -> str:
        cfg = self.config
        tensor = table.const_value
        assert tensor is not None
        if node.name in cfg.skip or "Gather" in cfg.skip:
            return f"skip_quant_node ({node.name or 'Gather'})"
        if tensor.dtype not in FLOAT_TABLES:
            return f"dtype {tensor.dtype.name.lower()} (only float32 and float16 tables)"
        if len(tensor.shape) < 2:
            return f"rank {len(tensor.shape)} < 2"
        if table.name not in graph.initializers or table.is_graph_output():
            return "not an initializer of the main graph only"
        if any(user is not node for user, _ in table.uses()):
            return "shared with another node"
        if tensor.size <= cfg.min_size:
            return f"{tensor.size} elements <= quantWeightSize {cfg.min_size}"
        if cfg.per_row and node.attributes.get_int("axis", 0) % len(tensor.shape) != 0:
            return "gathers along an axis other than the rows"
        return ""

    def _replace(self, graph: ir.Graph, names: NameAllocator, node: ir.Node,
                 table: ir.Value) -> None:
        grid, per_row = self.config.grid, self.config.per_row
        # A float16 table (a float16 model's) gathers float16 rows: its scales are float16,
        # rounded up so that each row still fits the grid. Per table before opset 19,
        # DequantizeLinear takes float32 scales only: float32, then a Cast to float16.
        float_type = table.const_value.dtype
        scale_type = float_type
        if not per_row and self.opset < FLOAT16_SCALE_OPSET:
            scale_type = ir.DataType.FLOAT
        weights = table.const_value.numpy().astype(np.float32, copy=False)
        axis = 0 if per_row else None
        rmin, rmax = qparams.tensor_range(weights, axis=axis)
        scale, zero_point = qparams.scale_zero_point(rmin, rmax, grid, scale_type.numpy())
        q = qparams.quantize(weights, scale, zero_point, grid, axis=axis, dtype=np.int8)
        base = table.name or "table"
        integers = add_initializer(graph, names.new(f"{base}_quantized"), q)
        dequantize_gathered(graph, names, node, integers, scale,
                            None if per_row else zero_point.astype(np.int8), per_row, base,
                            float_type, scale_type)
        graph.initializers.pop(table.name)
