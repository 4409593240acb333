"""Pure graph functions over a stage DAG given as ``{stage: [upstream stages]}``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

__all__ = ["find_cycle", "topological_order", "downstream_closure", "upstream_closure"]

Graph = Mapping[str, Sequence[str]]


def find_cycle(graph: Graph) -> list[str] | None:
    """Return one cycle as a path ``[a, b, ..., a]``, or None when the graph is acyclic."""
    white, grey, black = 0, 1, 2
    color = {node: white for node in graph}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        color[node] = grey
        stack.append(node)
        for up in graph.get(node, ()):
            if up not in color:
                continue  # dangling names are reported elsewhere
            if color[up] == grey:
                return stack[stack.index(up):] + [up]
            if color[up] == white:
                found = visit(up)
                if found:
                    return found
        stack.pop()
        color[node] = black
        return None

    for node in graph:
        if color[node] == white:
            found = visit(node)
            if found:
                # Report in data-flow order (upstream first) for a readable message.
                return list(reversed(found))
    return None


def topological_order(graph: Graph) -> list[str]:
    """Stages ordered so that every stage comes after its inputs.

    Ties keep the config's order, so the same config always gives the same order.
    Raises ValueError on a cycle.
    """
    order: list[str] = []
    placed: set[str] = set()
    remaining = list(graph)
    while remaining:
        progressed = False
        for node in list(remaining):
            if all(up in placed or up not in graph for up in graph[node]):
                order.append(node)
                placed.add(node)
                remaining.remove(node)
                progressed = True
        if not progressed:
            raise ValueError(f"cycle among stages: {', '.join(remaining)}")
    return order


def downstream_closure(graph: Graph, roots: Iterable[str]) -> set[str]:
    """The roots and every stage that (transitively) consumes one of them."""
    consumers: dict[str, list[str]] = {node: [] for node in graph}
    for node, ups in graph.items():
        for up in ups:
            consumers.setdefault(up, []).append(node)
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        todo.extend(consumers.get(node, ()))
    return seen


def upstream_closure(graph: Graph, roots: Iterable[str]) -> set[str]:
    """The roots and every stage they (transitively) read from."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        todo.extend(graph.get(node, ()))
    return seen
