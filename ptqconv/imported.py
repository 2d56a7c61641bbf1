"""Encodings imported from a file (`[full_quant_param] encodings_path`) as fixed grids: which
tensors of the model each entry fixes, as the ONNX grid QuantizeLinear / DequantizeLinear
will hold, and why any other entry is not used.

Activations take the file's scale and offset on a uint8 grid of the file's width (up to 8
bits); wider ones keep the file's range on ptqconv's grid. Weights take the file's scale and
offset on an int8 grid, per channel along the op's channel axis when the file gives one
entry per channel. Biases and other constants follow from what they multiply (int32 bias
scale = input scale x weight scale), so the file's entries for them are not needed. A float
encoding keeps its tensor, or the ops reading its weight, float.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from ptqconv import qparams
from ptqconv.encodings import EncodingsFile, FileEncoding
from ptqconv.errors import PtqUsageError, shown
from ptqconv.graph.naming import node_key
from ptqconv.graph.ops import is_depthwise
from ptqconv.graph.subgraphs import all_nodes, all_values
from ptqconv.graph.weight_slots import weight_slot
from ptqconv.passes.qdq_plan import WEIGHT_OPS
from ptqconv.qparams import Range


@dataclass
class Imported:
    """What the file fixes in one model."""

    activations: dict[str, qparams.Encoding] = field(default_factory=dict)
    ranges: dict[str, Range] = field(default_factory=dict)  # kept range, ptqconv's grid
    weights: dict[str, qparams.Encoding] = field(default_factory=dict)
    float_tensors: frozenset[str] = frozenset()
    float_ops: frozenset[str] = frozenset()  # node keys of ops whose weight stays float
    float_units: frozenset[str] = frozenset()  # node keys of the file's excluded layers
    derived: dict[str, str] = field(default_factory=dict)  # entries made here anyway -> why
    unused: dict[str, str] = field(default_factory=dict)  # entries not used -> why

    @property
    def names(self) -> frozenset[str]:
        """Every tensor whose grid (or float type) the file sets."""
        return frozenset((*self.activations, *self.ranges, *self.weights, *self.float_tensors))

    @property
    def grids(self) -> dict[str, qparams.Encoding]:
        return {**self.activations, **self.weights}


@dataclass(frozen=True)
class _Weight:
    readers: list[ir.Node]
    axis: int
    channels: int


def resolve(file: EncodingsFile, graph: ir.Graph, per_channel: bool = True) -> Imported:
    """The grids `file` fixes in `graph` (and its bodies); PtqUsageError naming the file and
    the tensor when an entry cannot describe the tensor of that name. A one-entry encoding of
    a one-channel weight, which 0.x files cannot tell per channel from per tensor, follows
    `per_channel`."""
    weights: dict[str, _Weight] = {}
    derived: dict[str, str] = {}
    for node in all_nodes(graph):
        slot = weight_slot(node)
        if slot is not None and node.op_type in WEIGHT_OPS:
            value = node.inputs[slot.index]
            shape = value.const_value.shape
            if len(shape) >= 2:
                found = weights.setdefault(value.name, _Weight([], slot.axis, shape[slot.axis]))
                found.readers.append(node)
            if node.op_type in ("Conv", "ConvTranspose", "Gemm") and len(node.inputs) > 2 \
                    and node.inputs[2] is not None and node.inputs[2].const_value is not None:
                derived[node.inputs[2].name] = "a bias: input scale x weight scale"
    values = all_values(graph)
    imported = Imported()
    float_tensors, float_ops = set(), set()
    for name, entry in file.tensors.items():
        value = values.get(name)
        if name in weights:
            weight = weights[name]
            if entry.is_float:
                float_ops |= {node_key(n) for n in weight.readers}
                continue
            encoding = _weight(file, name, entry, weight, per_channel)
            if encoding is None:
                imported.unused[name] = (f"a {entry.bits}-bit weight grid int8 cannot hold: "
                                         "computed from the weights")
            else:
                imported.weights[name] = encoding
        elif name in derived:
            imported.derived[name] = derived[name]
        elif value is None:
            imported.unused[name] = "not in the model"
        elif value.const_value is not None:
            imported.derived[name] = "a constant: its grid follows from its values"
        elif entry.is_float:
            float_tensors.add(name)
        elif entry.scale.size > 1:
            imported.unused[name] = "per-channel activation grids are not supported: calibrated"
        else:
            encoding = qparams.activation_encoding(entry.scale.reshape(()),
                                                   entry.offset.reshape(()), entry.bits)
            if encoding is not None:
                imported.activations[name] = encoding
            else:  # wider than uint8, or not containing 0: its range on ptqconv's grid
                low, high = qparams.encoded_range(entry.scale, entry.offset, entry.bits)
                imported.ranges[name] = Range(float(low[0]), float(high[0]))
    keys = {n.name: node_key(n) for n in graph if n.name}
    keys.update((node_key(n), node_key(n)) for n in graph)
    for layer in file.excluded_layers:
        if layer not in keys:
            imported.unused[f"excluded layer {layer}"] = "not a node of the main graph"
    imported.float_units = frozenset(keys[n] for n in file.excluded_layers if n in keys)
    imported.float_tensors = frozenset(float_tensors)
    imported.float_ops = frozenset(float_ops)
    return imported


def _weight(file: EncodingsFile, name: str, entry: FileEncoding, weight: _Weight,
            per_channel: bool) -> qparams.Encoding | None:
    where = f"{shown(file.path)}: tensor {name!r}"
    if entry.scale.size not in (1, weight.channels):
        raise PtqUsageError(f"{where}: {entry.scale.size} per-channel encodings; the weight has "
                            f"{weight.channels} channels along axis {weight.axis}")
    ranks = {len(n.inputs[weight_slot(n).index].const_value.shape) for n in weight.readers}
    if entry.axis is not None and all(entry.axis % r != weight.axis % r for r in ranks):
        raise PtqUsageError(f"{where}: channel axis {entry.axis}; its op's output channels "
                            f"are on axis {weight.axis}")
    encoding = qparams.weight_encoding(entry.scale, entry.offset, entry.bits, entry.symmetric)
    if encoding is None:
        return None
    one_channel = weight.channels == 1 and per_channel
    if entry.scale.size == 1 and not (entry.per_channel or one_channel):
        return qparams.Encoding(encoding.scale.reshape(()), encoding.zero_point.reshape(()),
                                encoding.grid)
    return encoding


def saturating(imported: Imported, graph: ir.Graph) -> int:
    """Imported weight grids wider than 7 bits read by GEMM kernels, which saturate on x86
    without VNNI (docs/reference.md §3; depthwise convs do not)."""
    wide = {n for n, e in imported.weights.items() if e.grid.qmax > qparams.U8S8_SAFE_WEIGHT}
    return len({v.name for n in all_nodes(graph) for v in n.inputs[1:2]
                if v is not None and v.name in wide and not is_depthwise(n)})
