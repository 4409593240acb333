import pytest

from pipeline import dag

GRAPH = {"ingest": [], "pretrain": ["ingest"], "ft_a": ["pretrain", "ingest"], "ft_b": ["pretrain"],
         "report": ["ft_a", "ft_b"]}


def test_topological_order_puts_inputs_first_and_keeps_config_order():
    order = dag.topological_order(GRAPH)
    assert order == ["ingest", "pretrain", "ft_a", "ft_b", "report"]
    for node, ups in GRAPH.items():
        assert all(order.index(u) < order.index(node) for u in ups)


def test_topological_order_rejects_cycles():
    with pytest.raises(ValueError, match="cycle"):
        dag.topological_order({"a": ["b"], "b": ["a"]})


def test_find_cycle_reports_the_loop_in_data_flow_order():
    assert dag.find_cycle(GRAPH) is None
    cycle = dag.find_cycle({"a": ["c"], "b": ["a"], "c": ["b"], "d": []})
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"a", "b", "c"}
    # Each step goes from an input to its consumer.
    graph = {"a": ["c"], "b": ["a"], "c": ["b"]}
    for up, down in zip(cycle, cycle[1:]):
        assert up in graph[down]


def test_closures():
    assert dag.downstream_closure(GRAPH, ["pretrain"]) == {"pretrain", "ft_a", "ft_b", "report"}
    assert dag.downstream_closure(GRAPH, ["ft_b"]) == {"ft_b", "report"}
    assert dag.upstream_closure(GRAPH, ["ft_a"]) == {"ft_a", "pretrain", "ingest"}
