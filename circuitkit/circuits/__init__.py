"""Circuits: the edge graph, ablation, attribution and selection.

Read in this order: :mod:`~circuitkit.circuits.graph` (numbering, :class:`Graph`),
:mod:`~circuitkit.circuits.interventions` (running a model with edges ablated),
:mod:`~circuitkit.circuits.attribution` (scoring methods by name),
:mod:`~circuitkit.circuits.selection` (scores -> circuit),
:mod:`~circuitkit.circuits.positions` (the same edges at every token position), :mod:`~circuitkit.circuits.agreement`
(method vs method), :mod:`~circuitkit.circuits.discover` (the CLI).

Typical use::

    graph = attribute(model, ds, "eap-ig")              # scores for every real edge
    circuit = top_n(graph, 200)                          # 200 best edges, dangling ones removed
    faithfulness(model, circuit, ds).explained           # (m(C) - m(∅)) / (m(N) - m(∅))
"""

from circuitkit.circuits.agreement import Agreement, agreement, compare_scores
from circuitkit.circuits.attribution import (LEVELS, METHODS, POSITION_METHODS, Method, Option, attribute, attribute_nodes,
                                             get_method, method_names, register_method)
from circuitkit.circuits.graph import Edge, Graph, GraphSpec, Node, check_graph_support
from circuitkit.circuits.interventions import (
    Ablation, AblationValues, Faithfulness, capture_senders, explained_effect, faithfulness, graph_hooks_enabled, metric_with_graph,
    metric_with_graphs, patched, patched_masks, run_with_graph,
)
from circuitkit.circuits.positions import (
    PositionEdge, PositionGraph, Positions, attribute_positions, exact_position_scores,
)
from circuitkit.circuits.selection import (
    edge_order, from_nodes, greedy, remove_dangling, threshold, top_heads, top_n,
)

__all__ = [
    "Ablation", "AblationValues", "Agreement", "Edge", "Faithfulness", "Graph", "GraphSpec", "LEVELS", "METHODS", "Method",
    "Node", "Option", "POSITION_METHODS", "PositionEdge", "PositionGraph", "Positions", "agreement", "attribute",
    "attribute_nodes", "attribute_positions", "capture_senders", "check_graph_support", "compare_scores",
    "edge_order", "exact_position_scores", "explained_effect", "faithfulness", "from_nodes", "get_method",
    "graph_hooks_enabled", "greedy", "method_names", "metric_with_graph", "metric_with_graphs", "patched",
    "patched_masks", "register_method", "remove_dangling", "run_with_graph", "threshold", "top_heads", "top_n",
]
