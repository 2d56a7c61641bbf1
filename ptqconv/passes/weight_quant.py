"""Weight-only quantization: float weights -> integer initializer + DequantizeLinear."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ptqconv import qparams
from ptqconv.graph.initializers import add_initializer
from ptqconv.graph.naming import NameAllocator
from ptqconv.graph.weight_slots import WeightSlot, weight_slot

# onnxruntime's MatMulNBits is wrong for int2 weights unless N % 4 == 0: such weights keep the
# int2 grid in an int4 container (docs/decisions.md, int2 weights).
_INT2_FUSED_OPS = ("MatMul", "Gemm")
# float16 weights dequantize through a float16 scale, which DequantizeLinear takes from opset 19.
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)
FLOAT16_SCALE_OPSET = 19


@dataclass
class WeightRecord:
    """What happened to one weight, for the run summary."""

    name: str
    op_type: str
    nodes: tuple[str, ...]
    shape: tuple[int, ...]
    quantized: bool
    reason: str = ""
    storage: str = ""
    float_bytes: int = 0


@dataclass
class WeightQuantConfig:
    grid: qparams.Grid
    min_size: int = 0  # quantWeightSize: quantize only when element count > this
    min_channel: int = 16  # quantWeightChannel: convs only when output channels > this
    skip: frozenset[str] = field(default_factory=frozenset)  # node names or op types
    per_channel: bool = True  # False: one scale (and zero point) per weight tensor


@dataclass
class WeightQuantResult(ir.passes.PassResult):
    records: list[WeightRecord] = field(default_factory=list)  # every weight met, in order


class WeightQuantPass(ir.passes.InPlacePass):
    """Replace each eligible constant weight by integers, a per-channel scale (and zero point)
    and a DequantizeLinear node; the result records every weight it met."""

    def __init__(self, config: WeightQuantConfig, progress: Callable[[int], None] | None = None):
        super().__init__()
        self.config = config
        self.progress = progress

    def call(self, model: ir.Model) -> WeightQuantResult:
        graph = model.graph
        slots: dict[ir.Value, list[WeightSlot]] = {}
        for node in graph:
            slot = weight_slot(node)
            if slot is not None:
                slots.setdefault(node.inputs[slot.index], []).append(slot)
        names = NameAllocator(graph)
        result = WeightQuantResult(model, False)
        for value, value_slots in slots.items():
            record = self._record(value, value_slots)
            reason = self._skip_reason(graph, value, value_slots)
            if reason:
                record.reason = reason
            else:
                record.storage = self._quantize(graph, names, value, value_slots).name.lower()
                record.quantized = result.modified = True
            result.records.append(record)
            if self.progress is not None:
                self.progress(record.float_bytes)
        return result

    @staticmethod
    def _record(value: ir.Value, slots: list[WeightSlot]) -> WeightRecord:
        tensor = value.const_value
        return WeightRecord(
            name=value.name or "",
            op_type=slots[0].node.op_type,
            nodes=tuple(s.node.name or s.node.op_type for s in slots),
            shape=tuple(tensor.shape),
            quantized=False,
            float_bytes=tensor.nbytes,
        )

    def _skip_reason(self, graph: ir.Graph, value: ir.Value, slots: list[WeightSlot]) -> str:
        cfg = self.config
        tensor = value.const_value
        for slot in slots:
            if slot.node.name in cfg.skip or slot.node.op_type in cfg.skip:
                return f"skip_quant_node ({slot.node.name or slot.node.op_type})"
        if value.name not in graph.initializers or graph.initializers[value.name] is not value:
            return "not an initializer of the main graph"
        if value.is_graph_output():
            return "also a graph output"
        if tensor.dtype not in FLOAT_TYPES:
            return (f"dtype {tensor.dtype.name.lower()} "
                    "(only float32 and float16 weights are quantized)")
        weight_uses = {(s.node, s.index) for s in slots}
        for user, index in value.uses():
            if (user, index) not in weight_uses:
                return f"also a non-weight input of {user.op_type} {user.name or ''}".rstrip()
        if len(tensor.shape) < 2:
            return f"rank {len(tensor.shape)} < 2"
        if len({s.axis for s in slots}) > 1:
            return "shared by ops that need different channel axes"
        size = tensor.size
        if size <= cfg.min_size:
            return f"{size} elements <= quantWeightSize {cfg.min_size}"
        channels = max(s.channels for s in slots)
        if slots[0].node.op_type in ("Conv", "ConvTranspose") and channels <= cfg.min_channel:
            return f"{channels} output channels <= quantWeightChannel {cfg.min_channel}"
        return ""

    def _quantize(
        self, graph: ir.Graph, names: NameAllocator, value: ir.Value, slots: list[WeightSlot]
    ) -> ir.DataType:
        grid = self.config.grid
        axis = slots[0].axis
        weights = value.const_value.numpy()
        float_type = value.const_value.dtype  # the dequantized weight's, via the scale's type
        if weights.dtype != np.float32:
            weights = weights.astype(np.float32)
        shape = weights.shape
        if (
            grid.storage == ir.DataType.INT2
            and shape[axis] % 4
            and any(s.node.op_type in _INT2_FUSED_OPS for s in slots)
        ):
            grid = grid.with_storage(ir.DataType.INT4)
        per = axis if self.config.per_channel else None
        rmin, rmax = qparams.tensor_range(weights, per)
        scale, zero_point = qparams.scale_zero_point(rmin, rmax, grid, float_type.numpy())
        storage_np = grid.storage.numpy()
        q = qparams.quantize(weights, scale, zero_point, grid, per, dtype=storage_np)
        del weights

        name = value.name
        inputs = [
            add_initializer(graph, names.new(f"{name}_quantized"), q, grid.storage),
            add_initializer(graph, names.new(f"{name}_scale"), scale, float_type),
        ]
        if not grid.symmetric:
            inputs.append(add_initializer(graph, names.new(f"{name}_zero_point"),
                                          zero_point.astype(storage_np), grid.storage))
        dequant = ir.node(
            "DequantizeLinear", inputs, {"axis": axis} if per is not None else {},
            name=names.new(f"{name}_DequantizeLinear")
        )
        graph.insert_before(slots[0].node, dequant)
        out = dequant.outputs[0]
        out.type = ir.TensorType(float_type)
        out.shape = ir.Shape(shape)
        # The dequantized value keeps the weight's name, so consumers and debug tools that
        # refer to it by name still find it.
        graph.initializers.pop(name)
        value.replace_all_uses_with(out)
        value.name = None
        out.name = name
        return grid.storage

