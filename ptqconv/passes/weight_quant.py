"""Weight-only quantization: float weights -> integer initializer + DequantizeLinear.

`WeightQuantPass.plan` decides, for every weight, whether it is quantized and its layout
(per channel, per tensor, or blocked along the reduction axis); the pass writes each planned
weight from the integers it is given (GPTQ, mixed bits, corrected parameters) or else rounds
it to nearest.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ptqconv import qparams
from ptqconv.graph.folded_dequantize import folded_dequantize, folds
from ptqconv.graph.gathered_rows import dequantize_gathered
from ptqconv.graph.initializers import add_initializer
from ptqconv.graph.naming import NameAllocator
from ptqconv.graph.ops import is_depthwise, is_onnx
from ptqconv.graph.weight_slots import (
    WeightSlot,
    recurrent_weight_slots,
    transposed_weight_slot,
    weight_slot,
)
from ptqconv.passes.matmulnbits_relu import nbits_layout
from ptqconv.passes.qdq_plan import WEIGHT_OPS
from ptqconv.weights import layout as layouts
from ptqconv.weights.correction import corrected
from ptqconv.weights.layout import IntegerWeight, WeightLayout
from ptqconv.weights.sum_rounding import sum_preserving

# onnxruntime's MatMulNBits is wrong for int2 weights unless N % 4 == 0: such weights keep the
# int2 grid in an int4 container (docs/decisions.md, int2 weights). So do int2 weights read
# through a Transpose (x @ W.T): onnxruntime 1.32's optimizer moves the Transpose onto the
# int2 initializer and its constant folding then fails to load the model.
_INT2_FUSED_OPS = ("MatMul", "Gemm")
# float16 weights dequantize through a float16 scale, which DequantizeLinear takes from opset 19.
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)
FLOAT16_SCALE_OPSET = 19
# DequantizeLinear's block_size arrived in opset 21.
BLOCKED_OPSET = 21
# Blocks run along the reduction axis of these ops' rank-2 weights (MatMulNBits) and along
# the rows of Gather tables. A Conv's weight [M, C/group, k...] is blocked along its input
# channels (axis 1), where it has at least a block of them; a depthwise conv's, one input
# channel per group, cannot be (docs/decisions.md, blocked convs).
BLOCKED_OPS = ("MatMul", "Gemm", "Gather")
BLOCKED_CONV_AXIS = 1


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
    bits: int = 0
    layout: str = ""  # "per channel", "per tensor", "blocks of 32"
    method: str = ""  # "nearest" or "GPTQ"


@dataclass
class WeightQuantConfig:
    grid: qparams.Grid
    min_size: int = 0  # quantWeightSize: quantize only when element count > this
    min_channel: int = 16  # quantWeightChannel: convs only when output channels > this
    skip: frozenset[str] = field(default_factory=frozenset)  # node names or op types
    per_channel: bool = True  # False: one scale (and zero point) per weight tensor
    block_size: int = 0  # > 0: MatMul/Gemm/Gather/Conv weights in blocks of this many
    correct: bool = False  # MindSpore's weight correction of the weights rounded here
    keep_sums: bool = True  # Conv kernels rounded to nearest keep their sums (sum_rounding)
    # Weights a Gather reads (tables), per row on this grid instead of `grid` and blocks.
    table_grid: qparams.Grid | None = None
    # Depthwise conv weights (9 values a channel for 3x3) on this grid instead of `grid`.
    depthwise_grid: qparams.Grid | None = None


@dataclass
class Target:
    """One weight met by the pass: its uses, its record and, when it is quantized, its
    layout. `transposed`: a Gemm B with transB=1 that is stored [K, N] with transB cleared,
    so that onnxruntime can fuse it into MatMulNBits (blocks along axis 0, scales per
    column; `passes.matmulnbits_relu.nbits_layout`)."""

    value: ir.Value
    slots: list[WeightSlot]
    record: WeightRecord
    layout: WeightLayout | None = None
    transposed: bool = False

    @property
    def name(self) -> str:
        return self.value.name or ""

    @property
    def channel_axis(self) -> int:
        """The output-channel axis of the weight as it is in the float graph."""
        return self.slots[0].axis


@dataclass
class WeightQuantResult(ir.passes.PassResult):
    records: list[WeightRecord] = field(default_factory=list)  # every weight met, in order


# Weights read only by these ops (which onnxruntime has no weight-only kernel for) are written
# as Cast -> Sub -> Mul, folded at load, where the type allows (`graph.folded_dequantize`).
FOLDED_AT_LOAD_OPS = frozenset({"Conv", "ConvTranspose"})


def folds_at_load(slots: list[WeightSlot], float_type: ir.DataType) -> bool:
    """Whether a weight read by `slots` is written for onnxruntime to dequantize at load:
    Conv weights that `graph.folded_dequantize.folds`."""
    return all(s.node.op_type in FOLDED_AT_LOAD_OPS for s in slots) and folds(float_type)


def _gathers_rows(slot: WeightSlot, integer: IntegerWeight) -> bool:
    """Whether `slot` is a Gather of whole rows whose integers Gather can read (int8, int16:
    not int4 or int2), so that only the rows gathered are dequantized: before the Gather, the
    whole table was dequantized on every inference (docs/decisions.md, weight-only tables)."""
    layout = integer.layout
    return (slot.node.op_type == "Gather" and slot.index == 0
            and slot.node.attributes.get_int("axis", 0) == 0
            and layout.grid.storage not in (ir.DataType.INT4, ir.DataType.INT2)
            and not layout.block_size and layout.axis in (None, 0))


class WeightQuantPass(ir.passes.InPlacePass):
    """Replace each eligible constant weight by integers, a per-channel scale (and zero point)
    and a DequantizeLinear node; the result records every weight it met."""

    def __init__(self, config: WeightQuantConfig, progress: Callable[[int], None] | None = None,
                 integers: Mapping[str, IntegerWeight] | None = None,
                 grids: Mapping[str, qparams.Grid] | None = None):
        super().__init__()
        self.config = config
        self.progress = progress
        self.integers = integers or {}  # by weight name: written as given
        self.grids = grids or {}  # by weight name: instead of config.grid (mixed bit)

    def plan(self, graph: ir.Graph) -> list[Target]:
        """Every weight of `graph` in order: why it stays float, or its layout."""
        slots: dict[ir.Value, list[WeightSlot]] = {}
        for node in ir.traversal.RecursiveGraphIterator(graph):
            if node.graph is graph:
                found = weight_slot(node) or transposed_weight_slot(node)
                found_slots = [found] if found is not None else recurrent_weight_slots(node)
            else:
                # In a Loop or If body only tables: an EmbeddingBag exported by TorchScript
                # gathers each bag's rows of the main graph's table in a Loop.
                found = weight_slot(node) if node.op_type == "Gather" else None
                found_slots = [found] if found is not None else []
            for slot in found_slots:
                slots.setdefault(node.inputs[slot.index], []).append(slot)
        targets = []
        for value, value_slots in slots.items():
            target = Target(value, value_slots, self._record(value, value_slots))
            reason = self._skip_reason(graph, value, value_slots)
            if reason:
                target.record.reason = reason
            else:
                self._layout(target)
                self._no_smaller(target)
            targets.append(target)
        return targets + self._unreached(graph, slots)

    def _unreached(self, graph: ir.Graph, slots: dict[ir.Value, list[WeightSlot]]
                   ) -> list[Target]:
        """Float constants a Conv / MatMul / Gemm reads that are no weight slot (a MatMul's
        constant first input; a weight behind a Reshape): they stay float, and the summary
        says so instead of leaving them out of its count."""
        found: dict[ir.Value, Target] = {}
        for node in graph:
            if not is_onnx(node) or node.op_type not in WEIGHT_OPS:
                continue
            for index, value in enumerate(node.inputs[:2]):
                if value is None or value in slots:
                    continue
                source, reason = value, f"the {node.op_type}'s first input (A): only B is a weight"
                producer = value.producer()
                if producer is not None and producer.inputs and producer.op_type in (
                        "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Cast", "Transpose"):
                    source = producer.inputs[0]
                    reason = (f"read through a {producer.op_type}: weights are quantized where "
                              "an op reads them directly")
                elif producer is not None or index or node.op_type not in ("MatMul", "Gemm"):
                    continue
                tensor = source.const_value if source is not None else None
                if (tensor is None or source in slots or source in found
                        or source.name not in graph.initializers
                        or tensor.dtype not in FLOAT_TYPES or tensor.size <= self.config.min_size):
                    continue
                record = WeightRecord(source.name or "", node.op_type, (node.name or node.op_type,),
                                      tuple(tensor.shape), False, reason,
                                      float_bytes=tensor.nbytes)
                found[source] = Target(source, [], record)
        return list(found.values())

    @staticmethod
    def _no_smaller(target: Target) -> None:
        """A weight whose integers take as many bytes as its floats (a float16 model's at 9-16
        bits: int16) stays float: scales on top, it would only grow the file."""
        assert target.layout is not None
        storage = target.layout.grid.storage
        float_type = target.value.const_value.dtype
        if storage.bitwidth >= float_type.bitwidth:
            target.layout = None
            target.record.bits, target.record.layout = 0, ""
            target.record.reason = (f"{storage.name.lower()} takes as many bytes as its "
                                    f"{float_type.name.lower()} values")

    def _layout(self, target: Target) -> None:
        table = (self.config.table_grid is not None and target.name not in self.grids
                 and any(s.node.op_type == "Gather" for s in target.slots))
        depthwise = (self.config.depthwise_grid is not None and target.name not in self.grids
                     and all(is_depthwise(s.node) for s in target.slots))
        grid = (self.config.table_grid if table else self.config.depthwise_grid if depthwise
                else self.grids.get(target.name, self.config.grid))
        assert grid is not None
        target.layout = self.layout_for(target, grid, blocks=not table)
        # A Gemm B with transB=1 is stored [K, N] where MatMulNBits could then take it.
        layout = target.layout
        target.transposed = target.channel_axis == 0 and target.slots[0].node.op_type == "Gemm" \
            and nbits_layout(layout.grid.storage, target.record.shape[::-1],
                             None if layout.axis is None else 1 - layout.axis,
                             layout.block_size)
        target.record.bits = target.layout.grid.bits
        target.record.layout = (f"blocks of {target.layout.block_size}"
                                if target.layout.block_size else
                                "per tensor" if target.layout.axis is None else "per channel")

    def layout_for(self, target: Target, grid: qparams.Grid, blocks: bool = True
                   ) -> WeightLayout:
        """The layout of `target` (as the float graph holds it) on `grid`; `blocks`: as the
        config's block_size says, else per channel."""
        cfg = self.config
        shape = target.record.shape
        axis = target.channel_axis
        ops = {s.node.op_type for s in target.slots}
        if grid.storage == ir.DataType.INT2 and ("Transpose" in ops or (
                shape[axis] % 4 and ops & set(_INT2_FUSED_OPS))):
            grid = grid.with_storage(ir.DataType.INT4)
        if blocks and cfg.block_size and len(shape) == 2 and len(ops) == 1 \
                and ops <= set(BLOCKED_OPS):
            # Blocks along the reduction axis (the rows of a Gather table); a Gemm B with
            # transB=1 is stored transposed, as MatMulNBits fuses only [K, N] blocks.
            return WeightLayout(grid, 1 - axis, cfg.block_size)
        if blocks and cfg.block_size and ops == {"Conv"} and len(shape) >= 3 \
                and shape[BLOCKED_CONV_AXIS] >= cfg.block_size:
            return WeightLayout(grid, BLOCKED_CONV_AXIS, cfg.block_size)
        if cfg.per_channel:
            return WeightLayout(grid, axis)
        return WeightLayout(grid)

    def call(self, model: ir.Model) -> WeightQuantResult:
        graph = model.graph
        names = NameAllocator(graph)
        result = WeightQuantResult(model, False)
        for target in self.plan(graph):
            record = target.record
            if target.layout is not None:
                record.storage = self._quantize(graph, names, target).name.lower()
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

    def _quantize(self, graph: ir.Graph, names: NameAllocator, target: Target) -> ir.DataType:
        value, slots = target.value, target.slots
        layout = target.layout
        assert layout is not None
        float_type = value.const_value.dtype  # the dequantized weight's, via the scale's type
        integer = self.integers.get(target.name)
        if integer is None:
            weights = value.const_value.numpy()
            if weights.dtype != np.float32:
                weights = weights.astype(np.float32)
            integer = layouts.nearest(weights, layout, float_type.numpy())
            if self.config.keep_sums and all(slot.node.op_type == "Conv" for slot in slots):
                integer = sum_preserving(weights, integer)
            if self.config.correct:
                integer = corrected(weights, integer,
                                    None if layout.axis is None else target.channel_axis)
            del weights
        target.record.method = "nearest"
        if target.transposed:
            integer = integer.transposed()
            for slot in slots:
                slot.node.attributes["transB"] = ir.AttrInt64("transB", 0)
        grid = integer.layout.grid
        storage_np = grid.storage.numpy()
        name = value.name
        integers = add_initializer(graph, names.new(f"{name}_quantized"),
                                   integer.q.astype(storage_np), grid.storage)
        graph.initializers.pop(name)
        gathers = [s for s in slots if _gathers_rows(s, integer)]
        per_row = integer.layout.axis is not None
        # Per row the zero points are gathered as floats; per table DequantizeLinear takes
        # one in the integers' type.
        zero_point = None if grid.symmetric else (
            integer.zero_point if per_row else np.asarray(integer.zero_point, storage_np))
        for slot in gathers:
            dequantize_gathered(graph, names, slot.node, integers, integer.scale, zero_point,
                                per_row, name, float_type)
        rest = [s for s in slots if s not in gathers]
        if not rest:
            return grid.storage
        if folds_at_load(rest, float_type):
            made = folded_dequantize(graph, names, name, integers, integer, float_type)
        else:
            inputs = [
                integers,
                add_initializer(graph, names.new(f"{name}_scale"),
                                np.asarray(integer.scale, float_type.numpy()), float_type),
            ]
            if not grid.symmetric:
                inputs.append(add_initializer(graph, names.new(f"{name}_zero_point"),
                                              integer.zero_point.astype(storage_np),
                                              grid.storage))
            attributes = {} if integer.layout.axis is None else {"axis": integer.layout.axis}
            if integer.layout.block_size:
                attributes["block_size"] = integer.layout.block_size
            made = [ir.node("DequantizeLinear", inputs, attributes,
                            name=names.new(f"{name}_DequantizeLinear"))]
            made[0].outputs[0].type = ir.TensorType(float_type)
            made[0].outputs[0].shape = ir.Shape(integer.q.shape)
        # Before its first reader, or first of all where that is in a body.
        graph.insert_before(rest[0].node if rest[0].node.graph is graph else next(iter(graph)),
                            made)
        out = made[-1].outputs[0]
        for slot in rest:
            slot.node.replace_input_with(slot.index, out)
        # The dequantized value keeps the weight's name, so consumers and debug tools that
        # refer to it by name still find it.
        value.name = None
        out.name = name
        return grid.storage
