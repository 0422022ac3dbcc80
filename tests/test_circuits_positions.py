"""Position-resolved edge graphs (circuitkit/circuits/positions.py): attribution against plain
autograd and exact patching, the patched pass with per-position masks, selection and dangling
edges across positions, JSON / networkx round trips, task position roles, ``discover --level``.

References are computed independently: plain autograd on TransformerLens's own split q/k/v
inputs, single-edge ablations through the general patched pass, reachability in networkx.
"""

from __future__ import annotations

import json

import networkx as nx
import pytest
import torch

from circuitkit import CircuitkitError
from circuitkit.circuits import (
    Graph, GraphSpec, PositionGraph, Positions, attribute, attribute_positions,
    exact_position_scores, faithfulness, greedy, metric_with_graphs, remove_dangling, threshold, top_heads, top_n,
)
from circuitkit.cli import main
from circuitkit.models import build_model, save_model, toy_config
from circuitkit.sparsity import load_model
from circuitkit.tasks import get_task
from circuitkit.tasks.vocab import VOCAB
from independent import sender_cache  # tests/independent.py

pytestmark = pytest.mark.usefixtures("one_thread")
FLAGS = ("use_split_qkv_input", "use_hook_mlp_in")


@pytest.fixture(scope="module")
def small():
    return build_model(toy_config("toy-2l", seed=3))


@pytest.fixture(scope="module")
def toy_addition():
    return load_model("toy-addition")


@pytest.fixture(scope="module")
def add_ds():
    return get_task("addition").dataset(8, seed=1)


def reference_position_eap(model, batch, steps: int | None = None) -> torch.Tensor:  # [pos, n_src, n_dst]
    """EAP (EAP-IG with ``steps``) per position with plain autograd: TransformerLens's split q/k/v
    inputs, ``hook_mlp_in`` and the last ``hook_resid_post`` keep their gradients, which are dotted
    with ``a^corrupt - a^clean`` summed over examples and d_model only."""
    spec = GraphSpec.from_model(model)

    clean, corrupt = sender_cache(model, batch.clean), sender_cache(model, batch.corrupt)  # [b, pos, n_src, d_model]
    names = [f"blocks.{l}.hook_{x}" for l in range(model.cfg.n_layers) for x in ("q_input", "k_input", "v_input",
                                                                                 "mlp_in")]
    names.append(f"blocks.{model.cfg.n_layers - 1}.hook_resid_post")
    total = 0
    for alpha in ([1.0] if steps is None else [k / steps for k in range(1, steps + 1)]):
        kept = {}

        def keep(act, hook):
            act.retain_grad()
            kept[hook.name] = act

        def embed(act, hook, alpha=alpha):
            return (corrupt[:, :, 0] + alpha * (clean[:, :, 0] - corrupt[:, :, 0])).requires_grad_(True)

        for f in FLAGS:
            setattr(model.cfg, f, True)
        try:
            logits = model.run_with_hooks(batch.clean, fwd_hooks=[("blocks.0.hook_resid_pre", embed)]
                                          + [(n, keep) for n in names])
            batch.metric_values(logits).mean().backward()
        finally:
            for f in FLAGS:
                setattr(model.cfg, f, False)
            model.zero_grad(set_to_none=True)
        grads = [kept[n].grad if kept[n].grad is not None else torch.zeros_like(kept[n]) for n in names]
        grads = torch.cat([g if g.ndim == 4 else g[:, :, None] for g in grads], 2)  # [b, pos, n_dst, d_model]
        total = total + grads / (1 if steps is None else steps)
    return torch.einsum("bpsd,bprd->psr", corrupt - clean, total) * spec.real


# ---------------------------------------------------------------- attribution

@pytest.mark.parametrize("steps", [None, 3])
def test_position_eap_matches_plain_autograd(small, steps):
    """Catches a position axis mixed up with the batch axis, a lost LayerNorm correction at
    position level, and scores put at the wrong position (sums over positions would hide all three)."""
    ds = get_task("addition").dataset(6, seed=0)
    method, opts = ("eap", {}) if steps is None else ("eap-ig", {"steps": steps})
    got = attribute_positions(small, ds, method, batch_size=4, **opts).scores  # two batches: weights per batch
    expected = reference_position_eap(small, ds, steps)
    assert torch.allclose(got, expected, atol=2e-5, rtol=1e-4), (got - expected).abs().max()


@pytest.mark.parametrize("ablation", ["patching", "mean", "zero"])
def test_position_eap_sums_to_component_eap(toy_addition, add_ds, ablation):
    """The invariant: Σ_p eap(u@p -> v@p) = eap(u -> v), for each ablation (and for eap-ig)."""
    pos = attribute_positions(toy_addition, add_ds, "eap", ablation=ablation)
    comp = attribute(toy_addition, add_ds, "eap", ablation=ablation)
    assert torch.allclose(pos.scores.sum(0), comp.scores, atol=1e-5, rtol=1e-4)
    assert torch.allclose(pos.component.scores, comp.scores, atol=1e-5, rtol=1e-4)
    if ablation == "patching":
        ig = attribute_positions(toy_addition, add_ds, "eap-ig", steps=2)
        assert torch.allclose(ig.scores.sum(0), attribute(toy_addition, add_ds, "eap-ig", steps=2).scores,
                              atol=1e-5, rtol=1e-4)


def test_positions_after_the_last_answer_score_zero(toy_addition, add_ds):
    """Addition reads logits at '=' .. 'S1'; nothing at the last position 'S0' reaches them. Catches
    scores shifted by one position."""
    g = attribute_positions(toy_addition, add_ds, "eap")
    last = g.positions.index("S0")
    assert last == add_ds.seq_len - 1 and int(add_ds.answer_pos.max()) == last - 1
    assert float(g.scores[last].abs().max()) == 0.0
    assert float(g.scores[last - 1].abs().max()) > 0.0
    exact = exact_position_scores(toy_addition, add_ds[:2], at=["S0"])
    assert float(exact.abs().max()) < 1e-5


def test_exact_position_patching_is_the_single_edge_ablation(small):
    """Each exact score equals the metric change of the general patched pass with that one edge
    at that one position ablated (k/v at a key position, q at a query position, into logits)."""
    ds = get_task("addition").dataset(4, seed=2)
    at = [2, 6, 9]
    exact = exact_position_scores(small, ds, at=at)
    assert float(exact[[p for p in range(ds.seq_len) if p not in at]].abs().max()) == 0.0
    full = PositionGraph.full(small, ds)
    names = ["input@A0->a1.h2<k>@A0", "a0.h1@=->a1.h0<q>@=", "a0.h3@=->a1.h1<v>@=", "m0@S2->logits@S2",
             "input@S2->m0@S2", "a1.h2@S2->logits@S2"]
    graphs = [full]
    for name in names:
        member = full.in_graph.clone()
        member[full.parse_edge(name)] = False
        graphs.append(full.with_in_graph(member))
    m = metric_with_graphs(small, graphs, ds).mean(1).double()
    for i, name in enumerate(names):
        assert float(exact[full.parse_edge(name)]) == pytest.approx(float(m[i + 1] - m[0]), abs=2e-5), name


def test_eap_ig_agrees_with_exact_position_patching(toy_addition):
    """On the shipped toy-addition, at the two sum digits that carry most of the effect (exact
    patching there only, to stay fast; 4 examples). Measured: Pearson 0.85 (eap-ig), 0.66 (eap),
    13 of the 20 largest exact scores among eap-ig's top 20. Catches position-level scores that
    are right in sum but not per position (they would not correlate at all)."""
    ds = get_task("addition").dataset(4, seed=0)
    at = ["S3", "S2"]
    idx = [ds.position_labels.index(p) for p in at]
    exact = exact_position_scores(toy_addition, ds, at=at)
    ig = attribute_positions(toy_addition, ds, "eap-ig").scores
    eap = attribute_positions(toy_addition, ds, "eap").scores
    real = GraphSpec.from_model(toy_addition).real
    e, i, a = (t[idx][:, real].flatten().double() for t in (exact, ig, eap))
    r_ig, r_eap = torch.corrcoef(torch.stack([e, i]))[0, 1], torch.corrcoef(torch.stack([e, a]))[0, 1]
    assert r_ig >= 0.75, r_ig
    assert r_eap >= 0.5, r_eap
    top = set(e.abs().argsort(descending=True)[:20].tolist())
    assert len(top & set(i.abs().argsort(descending=True)[:20].tolist())) >= 10


# ---------------------------------------------------------------- the patched pass and faithfulness

def test_position_graph_runs_like_its_component_graph(toy_addition, add_ds):
    """A component circuit placed at every position computes what the circuit computes; ablating
    everything at the last position changes nothing; ablating everything is the corrupted run."""
    comp = top_n(attribute(toy_addition, add_ds, "eap"), 40)
    pos = PositionGraph.from_component(comp, add_ds)
    last = PositionGraph.full(toy_addition, add_ds)
    member = last.in_graph.clone()
    member[-1] = False
    m = metric_with_graphs(toy_addition, [comp, pos, last.with_in_graph(member)], add_ds).mean(1)
    f = faithfulness(toy_addition, pos, add_ds)
    assert float(m[0]) == pytest.approx(float(m[1]), abs=1e-4)
    assert float(m[2]) == pytest.approx(f.m_full, abs=1e-4)
    with torch.no_grad():
        corrupted = add_ds.metric_values(toy_addition(add_ds.corrupt), None)
    # the corrupted run scored against the clean answers
    assert f.m_empty == pytest.approx(float(corrupted.mean()), abs=1e-4)
    assert f.m_circuit == pytest.approx(float(m[0]), abs=1e-4) and f.n_edges == 12 * comp.n_edges


def test_selection_on_position_graphs(toy_addition, add_ds):
    g = attribute_positions(toy_addition, add_ds, "eap-ig", steps=2)
    raw = top_n(g, 30, prune=False)
    best = g.scores[g.real_mask].abs().topk(30).values
    assert raw.n_edges == 30 and torch.allclose(g.scores[raw.in_graph].abs().sort(descending=True).values, best)
    cut = float(best[-1])
    assert torch.equal(threshold(g, cut, prune=False).in_graph, g.real_mask & (g.scores.abs() >= cut))
    # pruning keeps what a circuit computes under PATCHING (catches edges pruned that carry signal)
    pruned = top_n(g, 30)
    m = metric_with_graphs(toy_addition, [raw, pruned], add_ds).mean(1)
    assert float(m[0]) == pytest.approx(float(m[1]), abs=1e-4)
    heads = top_heads(g, 3)  # by the position-summed node scores, every edge between kept nodes at every position
    assert isinstance(heads, PositionGraph) and heads.n_heads == 3
    assert torch.equal(heads.in_graph, PositionGraph.from_component(top_heads(g.component, 3), g.positions).in_graph)
    c = greedy(toy_addition, g, add_ds, 0.8)
    assert c.metadata["reached"] and faithfulness(toy_addition, c, add_ds).explained >= 0.8 - 1e-6
    assert c.n_edges < g.n_real_edges and isinstance(c, PositionGraph)


def test_dangling_edges_follow_attention_across_positions():
    """A path through a head's key at an earlier position reaches later queries; through a key at
    a later position it reaches nothing (catches a reversed or missing cross-position rule)."""
    spec = GraphSpec(n_layers=2, n_heads=2)
    g = PositionGraph.empty(spec, 6)
    keep = ["input@1->a0.h0<k>@1", "a0.h0@4->logits@4",  # key at 1, query at 4: a path
            "input@5->a0.h1<v>@5", "a0.h1@2->logits@2",  # value at 5 read at query 2: no path
            "input@3->a1.h0<q>@3", "a1.h0@3->m1@3"]  # m1 reaches nothing
    member = g.in_graph.clone()
    for name in keep:
        member[g.parse_edge(name)] = True
    out = remove_dangling(g.with_in_graph(member))
    assert sorted(out.edge_names()) == sorted(keep[:2])


def test_dangling_matches_networkx_reachability(toy_addition, add_ds):
    g = top_n(attribute_positions(toy_addition, add_ds, "eap"), 150, prune=False)
    nxg = g.to_networkx(in_graph_only=True)
    starts = [n for n in nxg if n.startswith("input@")]
    ends = [n for n in nxg if n.startswith("logits@")]
    from_input = set(starts).union(*(nx.descendants(nxg, s) for s in starts))
    to_logits = set(ends).union(*(nx.ancestors(nxg, e) for e in ends))
    expected = {d["name"] for u, v, d in nxg.edges(data=True)
                if not d["internal"] and u in from_input and v in to_logits}
    got = set(remove_dangling(g).edge_names())
    assert got == expected and 0 < len(got) < 150


# ---------------------------------------------------------------- names, JSON, networkx

def test_json_and_networkx_round_trip(toy_addition, add_ds, tmp_path):
    g = top_n(attribute_positions(toy_addition, add_ds, "eap"), 80).with_metadata(note="x")
    back = PositionGraph.load(g.save(tmp_path / "g.json"))
    assert torch.equal(back.scores, g.scores) and torch.equal(back.in_graph, g.in_graph)
    assert back.positions == g.positions and back.metadata["note"] == "x"
    nxb = PositionGraph.from_networkx(g.to_networkx())
    assert torch.equal(nxb.scores, g.scores) and torch.equal(nxb.in_graph, g.in_graph)
    d = json.loads((tmp_path / "g.json").read_text())
    assert len(d["edges"]) == 12 * GraphSpec.from_model(toy_addition).n_real_edges
    with pytest.raises(CircuitkitError, match="position-resolved"):
        PositionGraph.from_dict(Graph.full(toy_addition).to_dict())


def test_edge_names_carry_positions(small):
    g = PositionGraph.full(small, get_task("addition").dataset(2))
    e = g.edge("a0.h1@=->a1.h3<k>@=")
    assert (e.pos, e.qkv, e.position) == (6, "k", "=") and e.name == "a0.h1@=->a1.h3<k>@="
    assert g.parse_edge("a0.h1@6->a1.h3<k>@6") == g.parse_edge("a0.h1@=->a1.h3<k>@=")
    for bad, msg in [("a0.h1@3->a1.h3<k>@4", "same position"), ("a0.h1@Z->a1.h3<k>@Z", "unknown position"),
                     ("a0.h1->a1.h3<k>", "@position"), ("a1.h1@3->a0.h3<k>@3", "not an edge")]:
        with pytest.raises(CircuitkitError, match=msg):
            g.parse_edge(bad)
    with pytest.raises(CircuitkitError, match="own position"):
        Positions(("0", "2"))
    with pytest.raises(CircuitkitError, match="prompts have"):
        metric_with_graphs(small, [PositionGraph.full(small, 5)], get_task("addition").dataset(2))


def test_task_position_roles_match_the_tokens():
    """Catches role names that are off by one position."""
    add = get_task("addition").dataset(5, seed=0)
    lab = add.position_labels
    assert (add.clean[:, lab.index("=")] == VOCAB.id("=")).all()
    assert (add.clean[:, lab.index("+")] == VOCAB.id("+")).all()
    assert (add.clean[:, lab.index("A0")] == VOCAB.id("0") + add.labels["a"] % 10).all()
    assert (add.clean[:, lab.index("S0")] == VOCAB.id("0") + (add.labels["a"] + add.labels["b"]) % 10).all()
    ioi = get_task("ioi").dataset(5, seed=0)
    assert (ioi.clean[:, ioi.position_labels.index("S")] == ioi.labels["s"]).all()
    assert (ioi.answer_pos[:, 0] == ioi.position_labels.index("end")).all()
    gt = get_task("greater-than").dataset(5, seed=0)
    assert (gt.answer_pos[:, 0] == gt.position_labels.index("end")).all()
    assert get_task("induction").dataset(3).position_labels is None  # its roles move: by index
    assert Positions.of(get_task("induction").dataset(3)).labels[:3] == ("0", "1", "2")
    with pytest.raises(CircuitkitError, match="position_labels"):
        type(add)(**{**add.__dict__, "position_labels": ("x",) * add.seq_len})


# ---------------------------------------------------------------- the command

def test_discover_at_position_level(tmp_path, small, capsys):
    save_model(small, tmp_path / "m", card={"name": "m", "tasks": ["addition"]})
    out = tmp_path / "out"
    rc = main(["discover", "--model", str(tmp_path / "m"), "--task", "addition", "--level", "position",
               "--method", "eap", "--edges", "25", "--n", "8", "--out", str(out), "--no-progress"])
    assert rc == 0
    g = PositionGraph.load(out / "circuit.json")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["level"] == "position" and summary["edges"] == g.n_edges <= 25
    assert summary["real_edges"] == g.n_real_edges
    capsys.readouterr()
    assert main(["discover", "--model", str(tmp_path / "m"), "--task", "addition", "--level", "position",
                 "--method", "acdc", "--out", str(tmp_path / "o2")]) == 2
    assert "no position-level variant" in capsys.readouterr().err and not (tmp_path / "o2").exists()
