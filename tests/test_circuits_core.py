"""Interventions, attribution methods, selection with a model, the discover CLI, and errors.

Everything runs on a random 2-layer toy model and the addition task; the references are
computed independently with TransformerLens's own hooks, caches and plain autograd.
"""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest
import torch
from transformer_lens import HookedTransformer

from circuitkit import CircuitkitError
from circuitkit.circuits import (
    Ablation, Graph, GraphSpec, agreement, attribute, attribute_nodes, compare_scores, faithfulness, get_method,
    greedy, metric_with_graphs, patched, run_with_graph, threshold, top_n,
)
from circuitkit.models import build_model, save_model, toy_config
from circuitkit.tasks import get_task
from circuitkit.tasks import Metric
from independent import sender_cache  # tests/independent.py

FLAGS = ("use_attn_result", "use_split_qkv_input", "use_hook_mlp_in")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return build_model(toy_config("toy-2l", seed=0))


@pytest.fixture(scope="module")
def ds():
    return get_task("addition").dataset(24, seed=0)


@pytest.fixture(scope="module")
def spec(model):
    return GraphSpec.from_model(model)


def sender_hook_names(model) -> list[str]:
    """TransformerLens hook names of the sender outputs, in sender order (no MLPs when attention-only)."""
    per_block = ("attn.hook_result",) if model.cfg.attn_only else ("attn.hook_result", "hook_mlp_out")
    return ["blocks.0.hook_resid_pre"] + [f"blocks.{l}.{h}" for l in range(model.cfg.n_layers) for h in per_block]


def replaced_run(model, tokens, value_of):
    """Logits with every sender output replaced by ``value_of(hook_name, act)``."""
    names = sender_hook_names(model)
    model.set_use_attn_result(True)
    try:
        with torch.no_grad():
            return model.run_with_hooks(tokens, fwd_hooks=[(n, lambda act, hook: value_of(hook.name, act))
                                                           for n in names])
    finally:
        model.set_use_attn_result(False)


# ---------------------------------------------------------------- interventions

def test_full_graph_reproduces_the_model(model, ds):
    with torch.no_grad():
        expected = model(ds.clean)
    for ablation in Ablation:
        got = run_with_graph(model, Graph.full(model), ds, ablation, batch_size=10)
        assert torch.allclose(got, expected, atol=1e-5)


def test_empty_graph_patching_is_the_corrupted_run(model, ds):
    with torch.no_grad():
        expected = model(ds.corrupt)
    got = run_with_graph(model, Graph.empty(model), ds, "patching", batch_size=10)
    assert torch.allclose(got, expected, atol=1e-5)


def test_empty_graph_zero_and_mean(model, ds):
    zero = replaced_run(model, ds.clean, lambda name, act: torch.zeros_like(act))
    assert torch.allclose(run_with_graph(model, Graph.empty(model), ds, Ablation.ZERO), zero, atol=1e-5)
    model.set_use_attn_result(True)
    try:
        _, cache = model.run_with_cache(ds.clean)
    finally:
        model.set_use_attn_result(False)
    mean = replaced_run(model, ds.clean, lambda name, act: cache[name].mean(0, keepdim=True).expand_as(act))
    got = run_with_graph(model, Graph.empty(model), ds, Ablation.MEAN, batch_size=7)  # mean over all batches
    assert torch.allclose(got, mean, atol=1e-5)


def test_parallel_attention_mlp_model():
    m = build_model(toy_config("toy-2l", seed=1, parallel_attn_mlp=True))
    spec = GraphSpec.from_model(m)
    assert spec.parallel_attn_mlp and spec.n_real_edges == GraphSpec(2, 4, True).n_real_edges
    d = get_task("addition").dataset(8, seed=1)
    with torch.no_grad():
        clean, corrupt = m(d.clean), m(d.corrupt)
    assert torch.allclose(run_with_graph(m, Graph.full(m), d), clean, atol=1e-5)
    assert torch.allclose(run_with_graph(m, Graph.empty(m), d), corrupt, atol=1e-5)



def hand_patched(model, tokens, hook_name: str, head: int | None, delta: torch.Tensor, mlp_in: bool) -> torch.Tensor:
    """Logits with ``delta`` [batch, pos, d_model] added to one receiver's input by a plain
    TransformerLens hook (at ``head`` of a split q/k/v input, or to the whole activation)."""
    def hook(act, hook):
        act = act.clone()
        if head is None:
            act += delta
        else:
            act[:, :, head] += delta
        return act

    model.set_use_split_qkv_input(True)
    if mlp_in:
        model.set_use_hook_mlp_in(True)
    try:
        with torch.no_grad():
            return model.run_with_hooks(tokens, fwd_hooks=[(hook_name, hook)])
    finally:
        model.set_use_split_qkv_input(False)
        if mlp_in:
            model.set_use_hook_mlp_in(False)

def test_single_edge_ablation_matches_hand_patch(model, ds, spec):
    """Ablating u -> v alone adds (a_u^corrupt - a_u^clean) to v's input, nothing else."""
    clean, corrupt = sender_cache(model, ds.clean), sender_cache(model, ds.corrupt)
    for name, hook_name, head in [("a0.h2->a1.h1<k>", "blocks.1.hook_k_input", 1), ("input->m0", "blocks.0.hook_mlp_in", None),
                                  ("a1.h3->logits", "blocks.1.hook_resid_post", None)]:
        s, d = spec.parse_edge(name)
        delta = corrupt[:, :, s] - clean[:, :, s]

        expected = hand_patched(model, ds.clean, hook_name, head, delta, mlp_in=True)
        g = Graph.full(model)
        member = g.in_graph.clone()
        member[s, d] = False
        with patched(model, g.with_in_graph(member), corrupt):
            with torch.no_grad():
                got = model(ds.clean)
        assert torch.allclose(got, expected, atol=1e-5), name


def test_model_is_restored_and_permanent_hooks_survive(model, ds):
    calls = []
    hp = model.hook_dict["blocks.1.attn.hook_pattern"]
    hp.add_hook(lambda act, hook: calls.append(1), dir="fwd", is_permanent=True)
    try:
        model.set_use_split_qkv_input(False)
        flags = {f: getattr(model.cfg, f) for f in FLAGS}
        counts = {n: (len(h.fwd_hooks), len(h.bwd_hooks)) for n, h in model.hook_dict.items()}
        params = {k: v.clone() for k, v in model.state_dict().items()}
        values = sender_cache(model, ds.corrupt)
        with pytest.raises(RuntimeError, match="boom"):
            with patched(model, Graph.empty(model), values):
                assert model.cfg.use_split_qkv_input
                raise RuntimeError("boom")
        run_with_graph(model, top_n(Graph.from_model(model, scores=torch.rand(11, 27)), 20), ds)
        attribute(model, ds[:4], "eap")
        attribute(model, ds[:4], "eap-ig", steps=2)
        attribute_nodes(model, ds[:4], "patching")
        assert {f: getattr(model.cfg, f) for f in FLAGS} == flags
        assert {n: (len(h.fwd_hooks), len(h.bwd_hooks)) for n, h in model.hook_dict.items()} == counts
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in params.items())
        assert all(p.grad is None for p in model.parameters())
        calls.clear()
        with torch.no_grad():
            model(ds.clean[:2])
        assert calls == [1]  # the permanent hook still fires
    finally:
        hp.remove_hooks("fwd", including_permanent=True)


# ---------------------------------------------------------------- attribution

def test_eap_matches_plain_autograd(model, ds, spec):
    batch = ds[:12]
    g = attribute(model, batch, "eap", batch_size=12)
    clean, corrupt = sender_cache(model, batch.clean), sender_cache(model, batch.corrupt)
    kept = {}

    def keep(act, hook):
        act.retain_grad()
        kept[hook.name] = act

    names = ["blocks.1.hook_q_input", "blocks.1.hook_v_input", "blocks.0.hook_mlp_in", "blocks.1.hook_resid_post"]
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    try:
        logits = model.run_with_hooks(batch.clean, fwd_hooks=[(n, keep) for n in names])
        batch.metric_values(logits).mean().backward()
    finally:
        model.set_use_split_qkv_input(False)
        model.set_use_hook_mlp_in(False)
        model.zero_grad(set_to_none=True)
    checks = [("a0.h1->a1.h2<q>", "blocks.1.hook_q_input", 2), ("input->a1.h0<v>", "blocks.1.hook_v_input", 0),
              ("m0->a1.h3<v>", "blocks.1.hook_v_input", 3), ("input->m0", "blocks.0.hook_mlp_in", None),
              ("a0.h0->m0", "blocks.0.hook_mlp_in", None), ("m1->logits", "blocks.1.hook_resid_post", None)]
    for name, hook_name, head in checks:
        s, _ = spec.parse_edge(name)
        grad = kept[hook_name].grad
        grad = grad if head is None else grad[:, :, head]
        expected = ((corrupt[:, :, s] - clean[:, :, s]) * grad).sum()  # grad of the batch mean
        assert g.edge(name).score == pytest.approx(float(expected), rel=1e-4, abs=1e-6), name


def receiver_grads(model, batch, fwd_hooks) -> torch.Tensor:  # [batch, pos, n_dst, d_model]
    """∂(batch-mean metric)/∂(every receiver's input) of one run with ``fwd_hooks``, read at
    TransformerLens's split q/k/v inputs, ``hook_mlp_in`` and the last ``hook_resid_post``
    (zero where a receiver has no path from what requires grad)."""
    n_layers = model.cfg.n_layers
    inputs = ("q_input", "k_input", "v_input") + (() if model.cfg.attn_only else ("mlp_in",))
    names = [f"blocks.{l}.hook_{x}" for l in range(n_layers) for x in inputs]
    names.append(f"blocks.{n_layers - 1}.hook_resid_post")
    kept = {}

    def keep(act, hook):
        if act.requires_grad:
            act.retain_grad()
        kept[hook.name] = act

    for flag in FLAGS:
        setattr(model.cfg, flag, True)
    try:
        logits = model.run_with_hooks(batch.clean, fwd_hooks=list(fwd_hooks) + [(n, keep) for n in names])
        batch.metric_values(logits).mean().backward()
    finally:
        for flag in FLAGS:
            setattr(model.cfg, flag, False)
        model.zero_grad(set_to_none=True)
    grads = [torch.zeros_like(kept[n]) if kept[n].grad is None else kept[n].grad for n in names]
    return torch.cat([g if g.ndim == 4 else g[:, :, None] for g in grads], 2)


def reference_eap(model, batch, steps: int | None = None):
    """All EAP scores [n_src, n_dst] with TransformerLens's split q/k/v inputs and plain autograd;
    with ``steps``, EAP-IG: receiver gradients averaged over inputs interpolated k/steps of the
    way from the corrupted to the clean embeddings, k = 1..steps."""
    spec = GraphSpec.from_model(model)
    clean, corrupt = sender_cache(model, batch.clean), sender_cache(model, batch.corrupt)
    receivers = 0
    for alpha in ([1.0] if steps is None else [k / steps for k in range(1, steps + 1)]):
        def embed(act, hook, alpha=alpha):
            return (corrupt[:, :, 0] + alpha * (clean[:, :, 0] - corrupt[:, :, 0])).requires_grad_(True)

        grads = receiver_grads(model, batch, [("blocks.0.hook_resid_pre", embed)])
        receivers = receivers + grads / (1 if steps is None else steps)  # [b, pos, n_dst, d_model]
    return torch.einsum("bpsd,bprd->sr", corrupt - clean, receivers) * spec.real


@pytest.mark.parametrize("norm", ["LN", "LNPre", "RMS", "RMSPre", None])
def test_eap_all_edges_and_norms_with_a_gate(norm):
    """Every edge, every normalisation; with a permanent gate hook on the attention pattern,
    as a sparse model carries."""
    m = build_model(toy_config("toy-2l", seed=2, normalization_type=norm))
    gate = (torch.rand(4, 12, 12, generator=torch.Generator().manual_seed(0)) > 0.3).float()
    m.blocks[1].attn.hook_pattern.add_hook(lambda act, hook: act * gate, is_permanent=True)
    batch = get_task("addition").dataset(8, seed=5)
    got = attribute(m, batch, "eap").scores
    expected = reference_eap(m, batch)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    with torch.no_grad():
        assert torch.allclose(run_with_graph(m, Graph.full(m), batch), m(batch.clean), atol=1e-5)
        assert torch.allclose(run_with_graph(m, Graph.empty(m), batch), m(batch.corrupt), atol=1e-5)


def test_pretrained_gpt2_through_the_offline_cache(offline_gpt2):
    """The pretrained path (GPT-2 architecture, real tokenizer, a natural-language task)."""
    from circuitkit.tasks import task_for_model

    gpt2 = offline_gpt2
    batch = task_for_model("ioi", gpt2).dataset(6, seed=0)
    with torch.no_grad():
        assert torch.allclose(run_with_graph(gpt2, Graph.full(gpt2), batch), gpt2(batch.clean), atol=1e-4)
        assert torch.allclose(run_with_graph(gpt2, Graph.empty(gpt2), batch), gpt2(batch.corrupt), atol=1e-4)
    expected = reference_eap(gpt2, batch)
    got = attribute(gpt2, batch, "eap").scores
    assert torch.allclose(got, expected, rtol=1e-3, atol=1e-5 * float(expected.abs().max()))


def test_eap_averages_over_batches(model, ds):
    whole = attribute(model, ds, "eap", batch_size=len(ds)).scores
    assert torch.allclose(attribute(model, ds, "eap", batch_size=7).scores, whole, atol=1e-6)


@pytest.mark.parametrize("norm", ["LN", "RMSPre"])
def test_eap_ig_matches_plain_autograd(norm, monkeypatch):
    import circuitkit.circuits.attribution as attribution

    m = build_model(toy_config("toy-2l", seed=4, normalization_type=norm))
    batch = get_task("addition").dataset(6, seed=2)
    expected = reference_eap(m, batch, steps=4)
    got = attribute(m, batch, "eap-ig", steps=4).scores  # all steps in one pass
    tol = dict(rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    assert torch.allclose(got, expected, **tol)
    monkeypatch.setattr(attribution, "IG_COPY_BUDGET", 3 * batch.seq_len * m.cfg.d_model * len(batch) * m.cfg.n_layers)
    assert torch.allclose(attribute(m, batch, "eap-ig", steps=4).scores, expected, **tol)  # 3 steps, then 1


def test_eap_ig_with_one_step_is_eap(model, ds):
    eap = attribute(model, ds, "eap").scores
    assert torch.allclose(attribute(model, ds, "eap-ig", steps=1).scores, eap, atol=1e-6)
    assert not torch.allclose(attribute(model, ds, "eap-ig", steps=3).scores, eap, atol=1e-6)


def reference_sender_ig(model, batch, steps: int):
    """Per-sender IG scores [n_src, n_dst] with TransformerLens's own hooks and plain autograd: for
    each sender and ``alpha = (k + 1/2) / steps`` the sender's output alone (``attn.hook_result``
    slice, ``hook_mlp_out`` or ``hook_resid_pre``) is set to ``clean + alpha (corrupt - clean)``;
    receiver gradients of the batch-mean metric, averaged over k, are dotted with that sender's
    ``corrupt - clean``."""
    spec = GraphSpec.from_model(model)
    clean, corrupt = sender_cache(model, batch.clean), sender_cache(model, batch.corrupt)
    sites = [("blocks.0.hook_resid_pre", None)] + [
        (f"blocks.{l}.attn.hook_result", h) if h < spec.n_heads else (f"blocks.{l}.hook_mlp_out", None)
        for l in range(spec.n_layers) for h in range(spec.src_per_layer)]
    out = torch.zeros(spec.n_src, spec.n_dst)
    for s, (site, head) in enumerate(sites):
        receivers = 0
        for k in range(steps):
            value = (clean[:, :, s] + (k + 0.5) / steps * (corrupt[:, :, s] - clean[:, :, s])).requires_grad_(True)

            def move(act, hook, value=value, head=head):
                if head is None:
                    return value.clone()
                act = act.clone()
                act[:, :, head] = value
                return act

            receivers = receivers + receiver_grads(model, batch, [(site, move)]) / steps  # [b, pos, n_dst, d_model]
        out[s] = torch.einsum("bpd,bprd->r", corrupt[:, :, s] - clean[:, :, s], receivers)
    return out * spec.real


@pytest.mark.parametrize("norm", ["LN", "RMSPre"])
def test_eap_ig_senders_matches_plain_autograd(norm, monkeypatch):
    import circuitkit.circuits.attribution as attribution

    m = build_model(toy_config("toy-2l", seed=4, normalization_type=norm))
    batch = get_task("addition").dataset(6, seed=2)
    expected = reference_sender_ig(m, batch, steps=2)
    tol = dict(rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    got = attribute(m, batch, "eap-ig-senders", steps=2).scores
    assert torch.allclose(got, expected, **tol)
    # 3 copies a pass: chunks split inside a block's senders and stop at block boundaries
    width = 3 * m.cfg.n_heads + 2
    monkeypatch.setattr(attribution, "PATCH_COPY_BUDGET", 3 * len(batch) * batch.seq_len * m.cfg.d_model * width)
    assert torch.allclose(attribute(m, batch, "eap-ig-senders", steps=2, batch_size=4).scores, expected, **tol)


def test_eap_ig_senders_node_scores_tend_to_node_patching(model, ds, spec):
    """Along one sender's own path IG is exact in the limit (the path is one-dimensional): node
    scores approach node patching as steps grow, and they are the sums of the outgoing edge
    scores (a sender's output reaches the metric only through the receivers reading it)."""
    edges = attribute(model, ds, "eap-ig-senders", steps=3)
    nodes3 = attribute_nodes(model, ds, "eap-ig-senders", steps=3)
    assert torch.allclose(nodes3, edges.node_scores, rtol=1e-4, atol=1e-5)
    exact = attribute_nodes(model, ds, "patching")
    nodes = attribute_nodes(model, ds, "eap-ig-senders", steps=16)
    scale = float(exact.abs().max())
    assert (nodes - exact).abs().max() <= 2e-3 * scale
    assert (nodes3 - exact).abs().max() > (nodes - exact).abs().max()  # finer steps, closer
    eap_gap = (attribute_nodes(model, ds, "eap") - exact).abs().max()
    assert eap_gap > 10 * (nodes - exact).abs().max()  # eap's linearisation is far coarser
    # the last MLP feeds only the logits: its one edge is exact too
    assert edges.edge("m1->logits").score == pytest.approx(float(exact[spec.mlp_src(1)]), rel=2e-2)


def test_acdc_pruning_bookkeeping(model, spec):
    """ACDC tries edges in sequence: the first one tried (last sender into the logits) sees the
    full graph, so its score is its single-edge patching score; with tau = 0 nothing is pruned;
    with tau > 0 the kept edges are exactly |score| >= tau, and the final circuit's metric,
    measured afresh, is m(full) plus the scores of the pruned edges (they telescope)."""
    ds = get_task("addition").dataset(8, seed=1)
    first = f"m{spec.n_layers - 1}->logits"
    patch = attribute(model, ds, "patching").edge(first).score
    keep_all = attribute(model, ds, "acdc", tau=0.0)
    assert keep_all.edge(first).score == pytest.approx(patch, abs=1e-5)
    assert top_n(keep_all, spec.n_real_edges, prune=False).n_edges == spec.n_real_edges
    tau = float(keep_all.scores.abs()[spec.real].median())  # prunes a good share of the edges
    scored = attribute(model, ds, "acdc", tau=tau)
    circuit = threshold(scored, tau, prune=False)
    pruned = spec.real & ~circuit.in_graph
    assert 0 < int(pruned.sum()) < spec.n_real_edges
    assert bool((scored.scores[pruned].abs() < tau).all())
    m = metric_with_graphs(model, [Graph.full(model), circuit], ds).mean(1)
    assert float(m[1]) == pytest.approx(float(m[0]) + float(scored.scores[pruned].sum()), abs=1e-4)
    from circuitkit.circuits.discover import discover  # no selection given: the edges ACDC kept

    found, _ = discover(model, ds, method="acdc", tau=tau, batch_size=8)
    assert torch.equal(found.in_graph, threshold(scored, tau).in_graph)
    with pytest.raises(CircuitkitError, match="tau >= 0"):
        attribute(model, ds, "acdc", tau=-1)
    with pytest.raises(CircuitkitError, match="edges only"):
        attribute_nodes(model, ds, "acdc")


def test_patching_scores_are_single_edge_ablations(model, ds, spec):
    g = attribute(model, ds, "patching", batch_size=10)
    names = ["a0.h1->a1.h2<q>", "input->m1", "m0->logits", "a1.h0->m1"]
    graphs = [Graph.full(model)]
    for name in names:
        s, d = spec.parse_edge(name)
        member = spec.real.clone()
        member[s, d] = False
        graphs.append(Graph.full(model).with_in_graph(member))
    m = metric_with_graphs(model, graphs, ds).mean(1)
    for i, name in enumerate(names):
        assert g.edge(name).score == pytest.approx(float(m[i + 1] - m[0]), abs=1e-5)
    # and agrees with the intervention context run batch by batch
    values = sender_cache(model, ds.corrupt)
    with patched(model, graphs[1], values), torch.no_grad():
        one = ds.metric_values(model(ds.clean)).mean()
    with torch.no_grad():
        full = ds.metric_values(model(ds.clean)).mean()
    assert g.edge(names[0]).score == pytest.approx(float(one - full), abs=1e-5)


def test_node_scores(model, ds, spec):
    eap_edges = attribute(model, ds, "eap")
    assert torch.allclose(attribute_nodes(model, ds, "eap"), eap_edges.node_scores, atol=1e-6)
    ig = attribute(model, ds, "eap-ig", steps=2)
    assert torch.allclose(attribute_nodes(model, ds, "eap-ig", steps=2), ig.node_scores, atol=1e-6)
    nodes = attribute_nodes(model, ds, "patching")  # exact: whole output of the node ablated
    u = spec.head_src(0, 3)
    member = spec.real.clone()
    member[u] = False
    m = metric_with_graphs(model, [Graph.full(model), Graph.full(model).with_in_graph(member)], ds).mean(1)
    assert float(nodes[u]) == pytest.approx(float(m[1] - m[0]), abs=1e-5)


def test_methods_roughly_agree_on_a_random_model(model, ds):
    a = agreement(model, ds, "patching", "eap-ig", k=20)
    assert a.pearson > 0.5 and a.method_a == "patching" and a.method_b == "eap-ig"
    g = attribute(model, ds, "eap")
    same = compare_scores(g, g, k=20)
    assert same.top_k_overlap == 1.0 and same.pearson == pytest.approx(1.0)
    # Spearman compares ranks: an order-preserving transform keeps it at 1 while Pearson drops;
    # reversed ranks give -1 (catches ranks scattered back to the wrong edges)
    cubed = compare_scores(g, g.with_scores(g.scores ** 3 * 100), k=20)
    assert cubed.spearman == pytest.approx(1.0) and cubed.pearson < 0.999
    flipped = compare_scores(g, g.with_scores(-g.scores), k=20)
    assert flipped.spearman == pytest.approx(-1.0)
    ties = g.with_scores(torch.where(g.spec.real, torch.sign(g.scores), 0.0))  # three values, many ties
    a = compare_scores(g, ties, k=20)
    s = g.scores[g.spec.real].double()
    ranks = torch.tensor(pd.Series(s.numpy()).rank().to_numpy())  # pandas' average ranks as the reference
    tie_ranks = torch.tensor(pd.Series(torch.sign(s).numpy()).rank().to_numpy())
    assert a.spearman == pytest.approx(float(torch.corrcoef(torch.stack([ranks, tie_ranks]))[0, 1]), abs=1e-9)


def test_determinism(model):
    d1, d2 = get_task("addition").dataset(16, seed=3), get_task("addition").dataset(16, seed=3)
    for method in ("eap", "eap-ig"):
        g1, g2 = attribute(model, d1, method), attribute(model, d2, method)
        assert torch.equal(g1.scores, g2.scores)
        assert top_n(g1, 30).to_dict() == top_n(g2, 30).to_dict()


def test_greedy_and_faithfulness(model, ds):
    g = attribute(model, ds, "eap")
    c = greedy(model, g, ds, target=0.8)
    f = faithfulness(model, c, ds)
    assert c.metadata["reached"] and c.metadata["selection"] == "greedy"
    assert f.explained == pytest.approx(c.metadata["explained_effect"], abs=1e-5)
    assert f.explained >= 0.8 and c.n_edges <= g.spec.n_real_edges
    full = faithfulness(model, Graph.full(model), ds)
    assert full.explained == pytest.approx(1.0, abs=1e-5) and full.m_circuit == pytest.approx(full.m_full, abs=1e-5)


# ---------------------------------------------------------------- attention-only and LayerNorm-free models

@pytest.fixture(scope="module", params=["LN", None], ids=["attn-only", "attn-only-no-norm"])
def attn_model(request):
    """A random 2-layer attention-only toy (TransformerLens ``attn_only=True``), with LayerNorm or none."""
    return build_model(toy_config("toy-2l", seed=7, attn_only=True, normalization_type=request.param))


@pytest.fixture(scope="module")
def attn_ds():
    return get_task("addition").dataset(10, seed=4)


def single_edge_graphs(spec: GraphSpec) -> list[Graph]:
    """The full graph, then one graph per real edge (sender-major) with only that edge ablated."""
    graphs = [Graph.full(spec)]
    for s, d in spec.real.nonzero().tolist():
        member = spec.real.clone()
        member[s, d] = False
        graphs.append(Graph.full(spec).with_in_graph(member))
    return graphs


def test_attn_only_graph_describes_the_model(attn_model):
    spec = GraphSpec.from_model(attn_model)
    L, H = attn_model.cfg.n_layers, attn_model.cfg.n_heads
    assert spec.attn_only and spec.n_src == 1 + L * H and spec.n_dst == L * 3 * H + 1
    assert spec.mlp_rows.numel() == 0 and not any(n.startswith("m") for n in spec.node_names)
    assert spec != GraphSpec(L, H)  # a graph of the MLP model of the same size is refused
    with pytest.raises(CircuitkitError, match="attn_only=False"):
        Graph.full(GraphSpec(L, H)).check_model(attn_model)


def test_attn_only_interventions(attn_model, attn_ds):
    """The full graph is the model, the fully ablated graph the corrupted / zero / mean run, and a
    single edge ablation adds (a_u^corrupt - a_u^clean) to that receiver's input only."""
    m, ds = attn_model, attn_ds
    with torch.no_grad():
        clean, corrupt = m(ds.clean), m(ds.corrupt)
    for ablation in Ablation:
        assert torch.allclose(run_with_graph(m, Graph.full(m), ds, ablation, batch_size=4), clean, atol=1e-5)
    assert torch.allclose(run_with_graph(m, Graph.empty(m), ds, "patching", batch_size=4), corrupt, atol=1e-5)
    zero = replaced_run(m, ds.clean, lambda name, act: torch.zeros_like(act))
    assert torch.allclose(run_with_graph(m, Graph.empty(m), ds, "zero"), zero, atol=1e-5)
    m.set_use_attn_result(True)
    try:
        _, tl_cache = m.run_with_cache(ds.clean)
    finally:
        m.set_use_attn_result(False)
    mean = replaced_run(m, ds.clean, lambda name, act: tl_cache[name].mean(0, keepdim=True).expand_as(act))
    assert torch.allclose(run_with_graph(m, Graph.empty(m), ds, "mean", batch_size=3), mean, atol=1e-5)
    spec = GraphSpec.from_model(m)
    cache = sender_cache(m, ds.clean)  # [b, pos, n_src, d_model]
    corrupt_senders = sender_cache(m, ds.corrupt)
    for name, hook_name, head in [("a0.h2->a1.h1<k>", "blocks.1.hook_k_input", 1),
                                  ("input->a1.h3<v>", "blocks.1.hook_v_input", 3),
                                  ("a0.h0->logits", "blocks.1.hook_resid_post", None)]:
        s, d = spec.parse_edge(name)
        delta = corrupt_senders[:, :, s] - cache[:, :, s]

        expected = hand_patched(m, ds.clean, hook_name, head, delta, mlp_in=False)
        member = spec.real.clone()
        member[s, d] = False
        with patched(m, Graph.full(m).with_in_graph(member), corrupt_senders), torch.no_grad():
            assert torch.allclose(m(ds.clean), expected, atol=1e-5), name


@pytest.mark.parametrize("ablation", list(Ablation))
def test_attn_only_exact_patching_every_edge_and_node(attn_model, attn_ds, ablation):
    """Single-edge patching (which starts each pass at the receiver's block) equals the general
    intervention with that one edge ablated, for every real edge and every ablation; node patching
    equals ablating every outgoing edge of the node."""
    m, ds = attn_model, attn_ds
    spec = GraphSpec.from_model(m)
    graphs = single_edge_graphs(spec)
    metric = metric_with_graphs(m, graphs, ds, ablation).mean(1)  # [1 + n_real]
    got = attribute(m, ds, "patching", ablation=ablation, batch_size=4).scores[spec.real]  # sender-major
    assert torch.allclose(got, metric[1:] - metric[0], atol=1e-5)
    nodes = [Graph.full(spec)]
    for u in range(spec.n_src):
        member = spec.real.clone()
        member[u] = False
        nodes.append(Graph.full(spec).with_in_graph(member))
    metric = metric_with_graphs(m, nodes, ds, ablation).mean(1)
    assert torch.allclose(attribute_nodes(m, ds, "patching", ablation=ablation), metric[1:] - metric[0], atol=1e-5)


def test_attn_only_gradient_methods_match_plain_autograd(attn_model, attn_ds):
    m, ds = attn_model, attn_ds[:6]
    for method, steps in (("eap", None), ("eap-ig", 3)):
        expected = reference_eap(m, ds, steps=steps)
        got = attribute(m, ds, method, **({} if steps is None else {"steps": steps})).scores
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max())), method
        nodes = attribute_nodes(m, ds, method, **({} if steps is None else {"steps": steps}))
        assert torch.allclose(nodes, got.sum(1), rtol=1e-4, atol=1e-6 * float(expected.abs().max())), method
    expected = reference_sender_ig(m, ds, steps=2)
    got = attribute(m, ds, "eap-ig-senders", steps=2).scores
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_attn_only_methods_against_patching(attn_model, attn_ds):
    """eap and eap-ig estimate patching; eap-ig-senders' node scores tend to node patching."""
    m, ds = attn_model, attn_ds
    exact = attribute(m, ds, "patching")
    for method, options in (("eap", {}), ("eap-ig", {"steps": 5})):
        a = compare_scores(exact, attribute(m, ds, method, **options), k=10)
        assert a.pearson > 0.9, (method, a)
    nodes = attribute_nodes(m, ds, "eap-ig-senders", steps=16)
    exact_nodes = attribute_nodes(m, ds, "patching")
    assert (nodes - exact_nodes).abs().max() <= 2e-3 * float(exact_nodes.abs().max())


def test_layernorm_free_linear_receivers_are_exact():
    """Without normalisation the logits are linear in the final residual and the last block's value
    inputs enter the logits linearly (the attention pattern does not depend on them), and the addition
    metric (one distractor) is linear in the logits: there eap equals exact patching for every
    ablation. Elsewhere (queries, keys, earlier blocks) it is only an estimate."""
    m = build_model(toy_config("toy-2l", seed=3, attn_only=True, normalization_type=None))
    with torch.no_grad():  # sharper attention than at initialisation, so that queries and keys act nonlinearly
        for block in m.blocks:
            block.attn.W_Q.mul_(4)
            block.attn.W_K.mul_(4)
    ds = get_task("addition").dataset(8, seed=6)
    spec = GraphSpec.from_model(m)
    last = spec.n_layers - 1
    linear = torch.zeros(spec.n_dst, dtype=torch.bool)
    linear[spec.logits_dst] = True
    linear[[spec.head_dst(last, h, "v") for h in range(spec.n_heads)]] = True
    for ablation in Ablation:
        exact = attribute(m, ds, "patching", ablation=ablation).scores
        eap = attribute(m, ds, "eap", ablation=ablation).scores
        scale = float(exact.abs().max())
        assert torch.allclose(eap[:, linear], exact[:, linear], atol=1e-5 * scale), ablation
        assert (eap[:, ~linear] - exact[:, ~linear]).abs().max() > 1e-2 * float(exact[:, ~linear].abs().max())


def test_attn_only_acdc_discover_and_faithfulness(attn_model, attn_ds):
    """ACDC's bookkeeping identity; m(N) and m(∅) are the clean and the corrupted run; a discovered
    circuit's f is recomputed from its own forward."""
    m, ds = attn_model, attn_ds
    spec = GraphSpec.from_model(m)
    keep_all = attribute(m, ds, "acdc", tau=0.0)
    tau = float(keep_all.scores.abs()[spec.real].median())
    scored = attribute(m, ds, "acdc", tau=tau)
    circuit = threshold(scored, tau, prune=False)
    pruned = spec.real & ~circuit.in_graph
    assert 0 < int(pruned.sum()) < spec.n_real_edges
    metric = metric_with_graphs(m, [Graph.full(m), circuit], ds).mean(1)
    assert float(metric[1]) == pytest.approx(float(metric[0]) + float(scored.scores[pruned].sum()), abs=1e-4)
    with torch.no_grad():
        m_clean, m_corrupt = float(ds.metric_values(m(ds.clean)).mean()), float(ds.metric_values(m(ds.corrupt)).mean())
    full, empty = faithfulness(m, Graph.full(m), ds), faithfulness(m, Graph.empty(m), ds)
    assert full.m_full == pytest.approx(m_clean, abs=1e-5) and full.m_empty == pytest.approx(m_corrupt, abs=1e-5)
    assert full.explained == pytest.approx(1.0, abs=1e-5) and empty.explained == pytest.approx(0.0, abs=1e-5)
    from circuitkit.circuits.discover import discover

    found, _ = discover(m, ds, method="eap-ig", steps=2, edges=12, batch_size=5)
    assert 0 < found.n_edges <= 12 and found.n_mlps == 0
    f = faithfulness(m, found, ds)
    m_found = float(metric_with_graphs(m, [found], ds).mean())
    assert f.explained == pytest.approx((m_found - m_corrupt) / (m_clean - m_corrupt), rel=1e-4)


# ---------------------------------------------------------------- CLI

def test_discover_cli(tmp_path, model):
    from circuitkit.cli import main

    save_model(model, tmp_path / "toy")
    out = tmp_path / "out"
    rc = main(["discover", "--model", str(tmp_path / "toy"), "--task", "addition", "--method", "eap-ig",
               "--edges", "25", "--n", "20", "--batch-size", "10", "--steps", "2", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    circuit = Graph.load(out / "circuit.json")
    summary = json.loads((out / "summary.json").read_text())
    assert circuit.n_edges == summary["edges"] <= 25 and summary["heads"] == circuit.n_heads
    assert {"m_full", "m_empty", "m_circuit", "explained_effect"} <= set(summary)
    assert "explained effect" in (out / "summary.md").read_text()
    assert circuit.metadata["steps"] == 2
    # every method that takes steps gets --ig-steps; one that takes none is refused it, not silently
    for method, steps in (("eap-ig-senders", 2), ("eap", None), ("acdc", None)):
        flags = ["--ig-steps", "2"] if steps else []
        assert main(["discover", "--model", str(tmp_path / "toy"), "--task", "addition", "--method", method,
                     "--edges", "25", "--n", "8", *flags, "--out", str(out / method), "--no-progress"]) == 0
        assert Graph.load(out / method / "circuit.json").metadata.get("steps") == steps
        if not steps:
            assert main(["discover", "--model", str(tmp_path / "toy"), "--task", "addition", "--method", method,
                         "--ig-steps", "2", "--out", str(out / "no"), "--no-progress"]) == 2
    assert main(["discover", "--model", str(tmp_path / "toy"), "--task", "no-such-task", "--out", str(out)]) == 2


# ---------------------------------------------------------------- errors

def test_unknown_method_and_ablation(model, ds):
    with pytest.raises(CircuitkitError, match="known methods: patching, eap, eap-ig"):
        get_method("acdc++")
    with pytest.raises(CircuitkitError, match="unknown ablation"):
        run_with_graph(model, Graph.full(model), ds, "resample")
    with pytest.raises(CircuitkitError, match="takes no option"):
        attribute(model, ds, "eap", steps=3)
    with pytest.raises(CircuitkitError, match="steps >= 1"):
        attribute(model, ds, "eap-ig", steps=0)
    with pytest.raises(CircuitkitError, match=r"steps \(--ig-steps\) must be int, got 2.5"):
        attribute(model, ds, "eap-ig-senders", steps=2.5)


def test_dataset_errors_surface(model, ds):
    with pytest.raises(CircuitkitError, match="same token length"):
        dataclasses.replace(ds, corrupt=ds.corrupt[:, :-1])
    with pytest.raises(CircuitkitError, match="no answers"):
        dataclasses.replace(ds, answer_pos=ds.answer_pos[:, :0], correct=ds.correct[:, :0],
                            distractors=ds.distractors[:, :0])
    big = dataclasses.replace(ds, clean=ds.clean + model.cfg.d_vocab)
    with pytest.raises(CircuitkitError, match="vocabulary"):
        attribute(model, big, "eap")
    with pytest.raises(CircuitkitError, match="TaskDataset"):
        run_with_graph(model, Graph.full(model), ds.clean)


def test_graph_model_mismatch(model, ds):
    with pytest.raises(CircuitkitError, match="3-layer"):
        run_with_graph(model, Graph.full(GraphSpec(3, 4)), ds)


@pytest.mark.parametrize("change,match", [
    (dict(attn_only=True, parallel_attn_mlp=True), "no MLP to run in parallel"),
    (dict(original_architecture="BertForMaskedLM"), "post-LayerNorm"),
    (dict(n_key_value_heads=2), "grouped-query"),
])
def test_unsupported_architectures(change, match):
    cfg = toy_config("toy-2l", seed=0, **change)
    m = HookedTransformer(cfg, move_to_device=False)  # bypass build_model's own check
    with pytest.raises(CircuitkitError, match=match):
        GraphSpec.from_model(m)
    with pytest.raises(CircuitkitError, match=match):
        attribute(m, get_task("addition").dataset(4), "eap")


@pytest.mark.parametrize("variant", ["mlp", "parallel"])
def test_exact_patching_scores_only_the_scored_positions(variant):
    """Exact patching runs the last block's MLP, the final LayerNorm and the unembedding only from
    the batch's first answer position on (attention still reads every position). Every edge's score
    must still equal the general intervention with that one edge ablated, with answer positions that
    differ between examples and a KL metric that reads the clean logits (a cut that dropped a scored
    position, shifted the answers wrongly, or fed the last MLP-input receiver a misaligned δ would
    fail), and the cut must actually happen (the last MLP sees fewer positions than the prompt)."""
    m = build_model(toy_config("toy-2l", seed=3, parallel_attn_mlp=variant == "parallel"))
    base = get_task("addition").dataset(12, seed=5)
    answer_pos = base.answer_pos.clone()
    answer_pos[::3] -= 2  # some examples are scored two positions earlier
    first = int(answer_pos.min())
    assert 0 < first < base.seq_len - 1
    for metric in (base.metric, Metric.NEG_KL):
        ds = dataclasses.replace(base, answer_pos=answer_pos, metric=metric)
        spec = GraphSpec.from_model(m)
        expected = metric_with_graphs(m, single_edge_graphs(spec), ds).mean(1)  # [1 + n_real]
        widths = {"unembed": [], "mlp": []}  # positions each pass computes there
        handles = [m.unembed.register_forward_hook(lambda mod, i, out: widths["unembed"].append(out.shape[1])),
                   m.blocks[-1].mlp.register_forward_hook(lambda mod, i, out: widths["mlp"].append(out.shape[1]))]
        try:
            got = attribute(m, ds, "patching", batch_size=6).scores[spec.real]  # sender-major
        finally:
            for h in handles:
                h.remove()
        assert torch.allclose(got, expected[1:] - expected[0], atol=1e-5), metric
        nodes = [Graph.full(spec)]  # node patching: every outgoing edge of the node (the last MLP's
        for u in range(spec.n_src):  # output is added after the cut)
            member = spec.real.clone()
            member[u] = False
            nodes.append(Graph.full(spec).with_in_graph(member))
        node_metric = metric_with_graphs(m, nodes, ds).mean(1)
        assert torch.allclose(attribute_nodes(m, ds, "patching", batch_size=6), node_metric[1:] - node_metric[0],
                              atol=1e-5), metric
        # both batches of 6 hold a shifted example: every copy pass computes positions first.. only
        # (the clean run and the ablation values: the whole prompt)
        for where in ("unembed",) + (("mlp",) if variant == "mlp" else ()):
            assert set(widths[where]) == {ds.seq_len, ds.seq_len - first}, (where, widths[where])
            assert widths[where].count(ds.seq_len - first) > widths[where].count(ds.seq_len), (where, widths[where])
        if variant == "parallel":  # the MLP reads the block's input, beside attention: all positions
            assert set(widths["mlp"]) == {ds.seq_len}
