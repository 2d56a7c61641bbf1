"""Fresh, deterministic value and node names for graph rewrites."""

from __future__ import annotations

import onnx_ir as ir


class NameAllocator:
    """Hands out names not yet used by any value or node of `graph` (or earlier calls)."""

    def __init__(self, graph: ir.Graph):
        self._used: set[str] = set()
        for node in ir.traversal.RecursiveGraphIterator(graph):
            self._used.add(node.name or "")
            self._used.update(v.name or "" for v in (*node.inputs, *node.outputs) if v is not None)
        self._used.update(v.name or "" for v in graph.inputs)
        self._used.update(graph.initializers)

    def new(self, base: str) -> str:
        name, counter = base, 1
        while name in self._used:
            name = f"{base}_{counter}"
            counter += 1
        self._used.add(name)
        return name


def values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    """Graph inputs, initializers and node outputs of the top-level graph, by name."""
    values = {v.name: v for v in graph.inputs}
    values.update(graph.initializers)
    for node in graph:
        values.update((v.name, v) for v in node.outputs if v.name)
    return values


def take_place(old: ir.Value, new: ir.Value) -> None:
    """`new` in place of `old`: its type and shape, every reader, graph output and the name,
    so consumers and users keep the name they knew."""
    new.type, new.shape = old.type, old.shape
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    name, old.name = old.name, None
    new.name = name


def node_key(node: ir.Node) -> str:
    """A name for `node` that stays the same in every clone of its graph: its first output's
    (unique in SSA form, unlike node names, which ONNX does not require to be)."""
    output = node.outputs[0].name if node.outputs else None
    return output or node.name or ""
