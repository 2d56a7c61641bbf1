"""Minimum s-t cut of a small directed graph (Edmonds-Karp), for two-label planning problems
whose costs are per-node plus per-disagreement: the cut is the cheapest labelling."""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable

# Residual capacity below this is used up (floating-point leftovers of subtractions).
EPSILON = 1e-9


def source_side(edges: Iterable[tuple[Hashable, Hashable, float]], source: Hashable,
                sink: Hashable) -> set[Hashable]:
    """The nodes on the source side of a minimum cut separating `source` from `sink`.

    `edges` are (tail, head, capacity); parallel edges add up. Deterministic: nodes and edges
    are visited in the order given, and among equal cuts the smallest source side is returned.
    """
    residual: dict[Hashable, dict[Hashable, float]] = {source: {}, sink: {}}
    for tail, head, capacity in edges:
        residual.setdefault(tail, {})
        residual.setdefault(head, {})
        residual[tail][head] = residual[tail].get(head, 0.0) + capacity
        residual[head].setdefault(tail, 0.0)
    while True:
        parent = _augmenting_path(residual, source, sink)
        if parent is None:
            break
        path, node = [], sink
        while node != source:
            path.append((parent[node], node))
            node = parent[node]
        flow = min(residual[u][v] for u, v in path)
        for u, v in path:
            residual[u][v] -= flow
            residual[v][u] += flow
    return _reachable(residual, source)


def _augmenting_path(residual: dict[Hashable, dict[Hashable, float]], source: Hashable,
                     sink: Hashable) -> dict[Hashable, Hashable] | None:
    parent: dict[Hashable, Hashable] = {}
    queue = deque([source])
    seen = {source}
    while queue:
        node = queue.popleft()
        for head, capacity in residual[node].items():
            if capacity > EPSILON and head not in seen:
                seen.add(head)
                parent[head] = node
                if head == sink:
                    return parent
                queue.append(head)
    return None


def _reachable(residual: dict[Hashable, dict[Hashable, float]], source: Hashable,
               ) -> set[Hashable]:
    seen = {source}
    queue = deque([source])
    while queue:
        node = queue.popleft()
        for head, capacity in residual[node].items():
            if capacity > EPSILON and head not in seen:
                seen.add(head)
                queue.append(head)
    return seen
