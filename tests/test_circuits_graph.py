"""The circuit graph: numbering, names, views, export/import, selection as tensor operations."""

from __future__ import annotations

import json

import networkx as nx
import pytest
import torch

from circuitkit import CircuitkitError
from circuitkit.circuits import (
    Graph, GraphSpec, edge_order, from_nodes, remove_dangling, threshold, top_heads, top_n,
)


def random_graph(spec: GraphSpec, seed: int = 0, p: float = 0.3) -> Graph:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(spec.n_src, spec.n_dst, generator=g)
    member = (torch.rand(spec.n_src, spec.n_dst, generator=g) < p) & spec.real
    return Graph(spec, scores, member, {"method": "random", "seed": seed})


@pytest.mark.parametrize("L,H,parallel", [(1, 1, False), (2, 4, False), (3, 2, True), (4, 4, False), (12, 12, False)])
def test_sizes_match_formulas(L, H, parallel):
    spec = GraphSpec(L, H, parallel)
    assert spec.n_src == 1 + L * (H + 1) and spec.n_dst == L * (3 * H + 1) + 1
    assert len(spec.src_names) == spec.n_src and len(spec.dst_names) == spec.n_dst
    assert spec.real.shape == (spec.n_src, spec.n_dst)
    # count edges from the rule in words
    n = 0
    for layer in range(L):
        n += 3 * H * (1 + layer * (H + 1))  # q/k/v read input, heads and MLPs of earlier layers
        n += 1 + layer * (H + 1) + (0 if parallel else H)  # the MLP also reads its own layer's heads (not parallel)
    n += spec.n_src  # logits read everything
    assert spec.n_real_edges == int(spec.real.sum()) == n


@pytest.mark.parametrize("L,H", [(1, 1), (2, 4), (12, 12)])
def test_attn_only_sizes_match_formulas(L, H):
    spec = GraphSpec(L, H, attn_only=True)
    assert spec.n_src == 1 + L * H and spec.n_dst == L * 3 * H + 1
    assert len(spec.src_names) == spec.n_src and len(spec.dst_names) == spec.n_dst
    # q/k/v of layer l read the input and every head of earlier layers; the logits read every sender
    n = sum(3 * H * (1 + layer * H) for layer in range(L)) + spec.n_src
    assert spec.n_real_edges == int(spec.real.sum()) == n
    # every edge touches a head, except input -> logits
    assert Graph.full(spec).n_attention_edges == n - 1


def test_attn_only_layout_names_and_errors():
    spec = GraphSpec(2, 2, attn_only=True)
    assert spec.node_names == ("input", "a0.h0", "a0.h1", "a1.h0", "a1.h1", "logits")
    assert spec.dst_names == ("a0.h0<q>", "a0.h1<q>", "a0.h0<k>", "a0.h1<k>", "a0.h0<v>", "a0.h1<v>",
                              "a1.h0<q>", "a1.h1<q>", "a1.h0<k>", "a1.h1<k>", "a1.h0<v>", "a1.h1<v>", "logits")
    assert spec.head_src(1, 1) == 4 and spec.head_dst(1, 0, "k") == 8 and spec.logits_dst == 12
    assert [g.hook for g in spec.sender_groups] == ["blocks.0.hook_resid_pre", "blocks.0.attn.hook_z",
                                                    "blocks.1.attn.hook_z"]
    assert not any("mlp" in g.hook for g in spec.receiver_groups)
    assert spec.parse_edge("a0.h1->a1.h0<v>") == (2, 10)
    assert not spec.real[spec.head_src(1, 0), spec.head_dst(1, 1, "q")]  # a head does not feed its own layer
    with pytest.raises(CircuitkitError, match="attention-only"):
        spec.parse_edge("input->m0")
    with pytest.raises(CircuitkitError, match="attention-only"):
        spec.mlp_src(0)
    with pytest.raises(CircuitkitError, match="attention-only"):
        Graph.full(spec).node("m1")
    assert spec != GraphSpec(2, 2) and spec == GraphSpec(2, 2, attn_only=True, model_name="other")


def test_attn_only_round_trips_and_selection(tmp_path):
    spec = GraphSpec(3, 2, attn_only=True, model_name="attn-only-3l")
    g = random_graph(spec, seed=4)
    back = Graph.load(g.save(tmp_path / "c.json"))
    assert back.spec == spec and back.spec.attn_only
    assert torch.equal(back.scores, g.scores) and torch.equal(back.in_graph, g.in_graph)
    nxg = Graph.from_networkx(g.to_networkx())
    assert nxg.spec == spec and torch.equal(nxg.in_graph, g.in_graph)
    # a file from before attention-only support has no attn_only key: it describes a model with MLPs
    old = GraphSpec(2, 2).summary()
    del old["attn_only"]
    assert GraphSpec.from_summary(old) == GraphSpec(2, 2)
    # a summary whose attn_only disagrees with its node list is refused
    d = g.to_dict()
    d["model"]["attn_only"] = False
    with pytest.raises(CircuitkitError, match="node list does not match"):
        Graph.from_dict(d)
    heads = torch.tensor([[True, False], [False, False], [False, True]])
    kept = from_nodes(spec, heads)
    assert torch.equal(kept.head_mask, heads) and kept.n_mlps == 0 and kept.mlp_mask.shape == (0,)
    assert kept.edge("a0.h0->a2.h1<q>").in_graph and not kept.edge("a0.h1->a2.h1<q>").in_graph
    scores = torch.zeros(spec.n_src)
    scores[spec.head_src(2, 0)] = 3.0
    assert top_heads(Graph.full(spec), 1, scores).head_mask.nonzero().tolist() == [[2, 0]]
    path = ["input->a0.h1<k>", "a0.h1->a2.h0<v>", "a2.h0->logits", "a1.h0->logits"]  # a1.h0 gets no input
    member = torch.zeros_like(spec.real)
    for name in path:
        member[spec.parse_edge(name)] = True
    assert sorted(remove_dangling(g.with_in_graph(member)).edge_names()) == sorted(path[:3])


def test_479_edges_like_auto_circuit():
    assert GraphSpec(4, 4).n_real_edges == 479


def test_index_layout_and_names():
    spec = GraphSpec(3, 2)
    H = 2
    assert spec.head_src(1, 1) == 1 + 1 * (H + 1) + 1 and spec.mlp_src(2) == 1 + 2 * (H + 1) + H
    assert spec.head_dst(1, 0, "k") == 1 * (3 * H + 1) + H + 0 and spec.mlp_dst(1) == 1 * (3 * H + 1) + 3 * H
    assert spec.logits_dst == 3 * (3 * H + 1)
    assert spec.src_names[spec.head_src(1, 1)] == "a1.h1" and spec.src_names[spec.mlp_src(2)] == "m2"
    assert spec.dst_names[spec.head_dst(2, 1, "v")] == "a2.h1<v>" and spec.dst_names[-1] == "logits"
    assert spec.parse_edge("a0.h1->a2.h1<q>") == (spec.head_src(0, 1), spec.head_dst(2, 1, "q"))
    assert spec.parse_edge("input->m0") == (0, spec.mlp_dst(0))
    assert spec.parse_edge("m1->logits") == (spec.mlp_src(1), spec.logits_dst)
    # the MLP reads its own layer's heads, unless attention and MLP run in parallel
    assert spec.real[spec.head_src(1, 0), spec.mlp_dst(1)]
    assert not GraphSpec(3, 2, parallel_attn_mlp=True).real[spec.head_src(1, 0), spec.mlp_dst(1)]
    assert not spec.real[spec.mlp_src(1), spec.head_dst(1, 0, "q")]


def test_lookups_and_views():
    spec = GraphSpec(2, 3)
    g = random_graph(spec)
    e = g.edge("a0.h2->a1.h0<k>")
    assert e.name == "a0.h2->a1.h0<k>" and e.qkv == "k"
    assert e.score == float(g.scores[e.src, e.dst]) and e.in_graph == bool(g.in_graph[e.src, e.dst])
    assert e.src_node.name == "a0.h2" and e.dst_node.name == "a1.h0" and e.dst_node.kind == "head"
    n = g.node("m1")
    assert (n.kind, n.layer, n.head) == ("mlp", 1, None)
    assert n.score == pytest.approx(float(g.scores[spec.mlp_src(1)].sum()))
    assert g.node("a1.h2").head == 2 and g.node("logits").kind == "logits"
    assert [x.name for x in g.edges()] == g.edge_names() and len(g.edge_names()) == g.n_edges
    assert len(list(g.edges(in_graph_only=False))) == spec.n_real_edges
    assert g.head_mask.shape == (2, 3) and g.n_heads == int(g.head_mask.sum())
    assert g.head_scores.shape == (2, 3) and g.node_scores.shape == (spec.n_src,)


def test_scores_live_only_on_real_edges_and_membership_is_checked():
    spec = GraphSpec(2, 2)
    g = Graph(spec, torch.ones(spec.n_src, spec.n_dst), spec.real.clone())
    assert torch.equal(g.scores != 0, spec.real)
    bad = spec.real.clone()
    bad[spec.mlp_src(1), spec.head_dst(0, 0, "q")] = True
    with pytest.raises(CircuitkitError, match="not a real edge"):
        Graph(spec, torch.zeros(spec.n_src, spec.n_dst), bad)
    with pytest.raises(CircuitkitError, match="shape"):
        Graph(spec, torch.zeros(3, 3), spec.real)


@pytest.mark.parametrize("name,match", [
    ("a0.h9->a1.h0<q>", "unknown sender"), ("a0.h0->a1.h0<x>", "unknown receiver"), ("nonsense", "bad edge name"),
    ("m1->a0.h0<q>", "not an edge"), ("logits->m1", "unknown sender"),
])
def test_unknown_edge_names(name, match):
    g = Graph.full(GraphSpec(2, 2))
    with pytest.raises(CircuitkitError, match=match):
        g.edge(name)


def test_unknown_node_name():
    with pytest.raises(CircuitkitError, match="unknown node 'a5.h0'"):
        Graph.full(GraphSpec(2, 2)).node("a5.h0")


def test_json_round_trip_is_exact(tmp_path):
    spec = GraphSpec(3, 2, model_name="toy", d_model=32)
    g = random_graph(spec, seed=3)
    g = g.with_scores(g.scores * torch.tensor(1e-7) + torch.tensor(1.0 / 3.0))  # awkward float32 values
    data = json.loads(g.to_json())  # plain data
    assert data["model"]["n_layers"] == 3 and data["nodes"][0] == "input"
    assert len(data["edges"]) == len(data["scores"]) == len(data["in_graph"]) == spec.n_real_edges
    back = Graph.load(g.save(tmp_path / "c.json"))
    assert torch.equal(back.scores, g.scores) and torch.equal(back.in_graph, g.in_graph)
    assert back.spec == spec and back.spec.model_name == "toy" and back.metadata == {"method": "random", "seed": 3}


def test_json_errors():
    g = random_graph(GraphSpec(2, 2))
    d = g.to_dict()
    with pytest.raises(CircuitkitError, match="not a circuitkit graph"):
        Graph.from_dict({"edges": []})
    d2 = dict(d, edges=["a0.h0->a0.h1<q>"] + d["edges"][1:])
    with pytest.raises(CircuitkitError, match="not an edge"):
        Graph.from_dict(d2)
    with pytest.raises(CircuitkitError, match="does not parse"):
        Graph.from_json("{")


def test_networkx_round_trip_is_exact():
    g = random_graph(GraphSpec(3, 3), seed=1)
    nxg = g.to_networkx()
    assert isinstance(nxg, nx.DiGraph)
    real_edges = [(u, v) for u, v, a in nxg.edges(data=True) if not a["internal"]]
    assert len(real_edges) == g.spec.n_real_edges
    assert nxg.edges["a0.h1", "a2.h0<q>"]["score"] == g.edge("a0.h1->a2.h0<q>").score
    assert nxg.has_edge("a2.h0<q>", "a2.h0")  # ports lead into their head
    back = Graph.from_networkx(nxg)
    assert torch.equal(back.scores, g.scores) and torch.equal(back.in_graph, g.in_graph)
    # the in-graph subgraph: every pruned circuit edge lies on an input -> logits path
    pruned = remove_dangling(g)
    sub = pruned.to_networkx(in_graph_only=True)
    for u, v, a in sub.edges(data=True):
        if not a["internal"]:
            assert nx.has_path(sub, "input", u) and nx.has_path(sub, v, "logits")


def test_remove_dangling_on_hand_made_graph():
    spec = GraphSpec(2, 2)
    g = Graph.empty(spec)
    keep = ["input->a0.h0<v>", "a0.h0->a1.h1<q>", "a1.h1->logits",  # a real path
            "input->m0", "m0->a1.h0<k>",  # a1.h0 never reaches logits: dangling
            "a0.h1->logits",  # a0.h1 gets no input: dangling
            "a1.h1->m1"]  # m1 has no way out: dangling
    member = g.in_graph.clone()
    for name in keep:
        s, d = spec.parse_edge(name)
        member[s, d] = True
    pruned = remove_dangling(g.with_in_graph(member))
    assert sorted(pruned.edge_names()) == sorted(["input->a0.h0<v>", "a0.h0->a1.h1<q>", "a1.h1->logits"])
    assert pruned.n_heads == 2 and pruned.n_mlps == 0
    assert remove_dangling(Graph.full(spec)).n_edges == spec.n_real_edges
    assert remove_dangling(Graph.empty(spec)).n_edges == 0


def test_selection_rules():
    spec = GraphSpec(2, 2)
    g = random_graph(spec, seed=2)
    order = edge_order(g)
    s = g.scores[order[:, 0], order[:, 1]].abs()
    assert bool((s[:-1] >= s[1:]).all()) and len(order) == spec.n_real_edges
    t = top_n(g, 10, prune=False)
    assert t.n_edges == 10 and bool((g.scores[t.in_graph].abs().min() >= g.scores[spec.real & ~t.in_graph].abs().max()))
    assert top_n(g, 10).n_edges <= 10 and torch.equal(top_n(g, 10).in_graph, remove_dangling(t).in_graph)
    th = threshold(g, 1.0, prune=False)
    assert torch.equal(th.in_graph, spec.real & (g.scores.abs() >= 1.0))
    assert torch.equal(threshold(g, 1.0, absolute=False, prune=False).in_graph, spec.real & (g.scores >= 1.0))
    assert top_n(g, 10 ** 6, prune=False).n_edges == spec.n_real_edges
    with pytest.raises(CircuitkitError):
        top_n(g, -1)
    assert torch.equal(g.in_graph, random_graph(spec, seed=2).in_graph)  # the input graph is untouched


def test_node_selection():
    spec = GraphSpec(2, 2)
    heads = torch.tensor([[True, False], [False, True]])
    g = from_nodes(spec, heads)
    assert torch.equal(g.head_mask, heads) and g.n_mlps == 2
    assert g.edge("a0.h0->a1.h1<q>").in_graph and not g.edge("a0.h1->a1.h1<q>").in_graph
    assert not g.edge("input->a0.h1<q>").in_graph and g.edge("input->logits").in_graph
    scores = torch.zeros(spec.n_src)
    scores[spec.head_src(1, 0)] = -5.0
    scores[spec.head_src(0, 1)] = 2.0
    th = top_heads(Graph.full(spec), 1, scores)
    assert th.head_mask.nonzero().tolist() == [[1, 0]]
    assert top_heads(Graph.full(spec), 2, scores, keep_mlps=False).n_mlps == 0
    with pytest.raises(CircuitkitError):
        top_heads(Graph.full(spec), 5)


def test_attention_edges_are_the_edges_touching_a_head():
    """Counted independently from the edge names: an edge is an attention edge iff a head is at one end."""
    spec = GraphSpec(3, 2)
    g = Graph.full(spec)
    names = g.edge_names()
    by_name = sum(1 for n in names if ".h" in n.split("->")[0] or ".h" in n.split("->")[1])
    assert g.n_attention_edges == by_name
    # the backbone: input->m_l, m_i->m_j (i<j), m_l->logits, input->logits
    L = spec.n_layers
    assert g.n_edges - g.n_attention_edges == L + L * (L - 1) // 2 + L + 1
    assert Graph.empty(spec).n_attention_edges == 0
