"""Control-flow bodies: which nodes hold subgraphs, where a value lives, and paths to bodies.

ptqconv quantizes inside the bodies of If, Loop and Scan (docs/reference.md §3); the
subgraphs of other ops (SequenceMap, custom domains) stay float. onnx-ir gives a body's
reference to an outer-scope value the outer Value object itself, so a value has one owner
graph and its uses may lie in several.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import onnx_ir as ir

from ptqconv.graph.ops import is_onnx

# Control-flow ops and the attributes that hold their bodies.
CONTROL_FLOW = {"If": ("then_branch", "else_branch"), "Loop": ("body",), "Scan": ("body",)}
# Bodies that run once per iteration, whose scan outputs stack a value over the iterations.
LOOPS = ("Loop", "Scan")


@dataclass(frozen=True)
class Body:
    """Subgraph `attribute` of `node`, inside the bodies `path` (outermost first)."""

    node: ir.Node
    attribute: str
    graph: ir.Graph
    path: tuple[Body, ...] = ()

    @property
    def quantizable(self) -> bool:
        return is_onnx(self.node) and self.attribute in CONTROL_FLOW.get(self.node.op_type, ())

    @property
    def label(self) -> str:
        """`Loop time_loop.body`, for the summary."""
        return f"{self.node.op_type} {self.node.name or self.node.outputs[0].name}." \
               f"{self.attribute}"

    @property
    def in_loop(self) -> bool:
        """Whether this body runs inside (or is) the body of a Loop or Scan."""
        return any(b.node.op_type in LOOPS for b in (*self.path, self))


def graph_attributes(node: ir.Node) -> Iterator[tuple[str, ir.Graph]]:
    for name, attr in node.attributes.items():
        if attr.type == ir.AttributeType.GRAPH:
            yield name, attr.as_graph()
        elif attr.type == ir.AttributeType.GRAPHS:
            for index, graph in enumerate(attr.as_graphs()):
                yield f"{name}[{index}]", graph


def bodies(graph: ir.Graph, path: tuple[Body, ...] = ()) -> list[Body]:
    """Every subgraph under `graph`, outer bodies before the ones they hold."""
    found = []
    for node in graph:
        for name, sub in graph_attributes(node):
            body = Body(node, name, sub, path)
            found.append(body)
            found += bodies(sub, (*path, body))
    return found


def owner(value: ir.Value) -> ir.Graph | None:
    """The graph that defines `value` (graph input, initializer or node output)."""
    producer = value.producer()
    return producer.graph if producer is not None else value.graph


def all_values(graph: ir.Graph) -> dict[str, ir.Value]:
    """Every value defined in `graph` and its subgraphs, by name (names are unique model-wide
    once passes.unique_names ran)."""
    found: dict[str, ir.Value] = {}
    for each in (graph, *graph.subgraphs()):
        found.update((v.name, v) for v in each.inputs if v.name)
        found.update(each.initializers)
        for node in each:
            found.update((v.name, v) for v in node.outputs if v.name)
    return found


def all_nodes(graph: ir.Graph) -> Iterator[ir.Node]:
    """The nodes of `graph` and of every subgraph under it."""
    return ir.traversal.RecursiveGraphIterator(graph)
