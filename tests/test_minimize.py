"""Minimized circuits: backward elimination from a minimal prefix until every edge (pair) left is needed.

The engine (selection.eliminate) is checked against an independent one-at-a-time loop on synthetic
effects; the model-level searches (selection.minimize on component and position graphs,
pairs.minimize_pairs on attention pairs) are checked by re-measuring, with the plain evaluation
functions, that the result reaches the target and that dropping any one member of it does not.
"""

from __future__ import annotations

import random

import pytest
import torch

from circuitkit import CircuitkitError
from circuitkit.circuits import attribute, attribute_positions
from circuitkit.circuits.attention_pairs import attribute_pairs, metric_with_pairs
from circuitkit.circuits.interventions import explained_effect, metric_with_graphs
from circuitkit.circuits.selection import MinimalRule, eliminate, greedy, minimize, remove_dangling
from circuitkit.cli import main
from circuitkit.evaluation.compare import PAIR_COLUMNS, PREFIX_COLUMNS, pair_table
from circuitkit.evaluation.pairs import analyse_pairs, minimal_pair_circuit, minimize_pairs, pair_curve
from circuitkit.evaluation.study import StudyConfig, analyse
from circuitkit.sparsity import load_model
from circuitkit.tasks import get_task

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- the engine, on synthetic effects

def _reference(member: torch.Tensor, order: list[tuple], f, target: float, closure=None) -> torch.Tensor:
    """The definition, written plainly: passes of one-at-a-time removals until a pass removes nothing."""
    mask = member.clone()
    while True:
        dropped = False
        for e in order:
            if not mask[e]:
                continue
            cand = mask.clone()
            cand[e] = False
            if closure is not None:
                cand = closure(cand)
            if f(cand) >= target:
                mask, dropped = cand, True
        if not dropped:
            return mask


def _synthetic(n: int, seed: int):
    """Effects with interactions: a weighted sum plus pairwise terms, so that removals help and hurt."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, generator=g)
    inter = (torch.rand(n, n, generator=g) - 0.5) * 0.6 / n

    def f(mask: torch.Tensor) -> float:
        m = mask.double()
        return float((w.double() @ m + m @ inter.double() @ m) / w.sum())
    return f


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("window", [1, 3, 16])
def test_eliminate_equals_the_one_at_a_time_search(seed, window):
    """The speculative windows must give exactly what trying one removal at a time gives."""
    n = 40
    f = _synthetic(n, seed)
    member = torch.ones(n, dtype=torch.bool)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(100 + seed))[:, None]  # [n, 1]
    calls: list[int] = []

    def effects(masks):
        calls.append(len(masks))
        return [f(m) for m in masks]
    target = 0.6
    mask, f_end, n_eval = eliminate(member, order, effects, target, f(member), window=window)
    expected = _reference(member, [tuple(e) for e in order.tolist()], f, target)
    assert torch.equal(mask, expected)
    assert f_end == pytest.approx(f(mask)) and f_end >= target
    assert n_eval == sum(calls) and max(calls) <= window
    for e in mask.nonzero().tolist():  # 1-minimal: every member left is needed
        cand = mask.clone()
        cand[tuple(e)] = False
        assert f(cand) < target


def test_a_removal_refused_early_is_tried_again_after_others():
    """Edge 0 is needed while edge 1 is in, and not once 1 is gone: a single pass would keep it."""
    def f(mask: torch.Tensor) -> float:
        a, b, c = (bool(x) for x in mask)
        return {(True, True, True): 1.0, (False, True, True): 0.5, (True, False, True): 0.95,
                (False, False, True): 0.92}.get((a, b, c), 0.0)
    member = torch.ones(3, dtype=torch.bool)
    order = torch.tensor([[0], [1], [2]])
    mask, f_end, _ = eliminate(member, order, lambda ms: [f(m) for m in ms], 0.9, 1.0)
    assert mask.tolist() == [False, False, True] and f_end == 0.92


def test_eliminate_applies_the_closure_and_checks_its_input():
    # removing 0 also removes 3 (as a dangling edge would go); f counts the members left
    member = torch.ones(5, dtype=torch.bool)

    def closure(m: torch.Tensor) -> torch.Tensor:
        m = m.clone()
        if not m[0]:
            m[3] = False
        return m

    def f(m: torch.Tensor) -> float:
        return float(m.sum()) / 5
    order = torch.tensor([[0], [1], [2], [3], [4]])
    mask, _, _ = eliminate(member, order, lambda ms: [f(m) for m in ms], 0.4, 1.0, closure)
    assert torch.equal(mask, _reference(member, [(i,) for i in range(5)], f, 0.4, closure))
    # 0 goes and takes 3 with it (0.6), 1 goes (0.4), then neither 2 nor 4 can
    assert mask.tolist() == [False, False, True, False, True]
    with pytest.raises(CircuitkitError, match="reaches it"):
        eliminate(member, order, lambda ms: [0.0] * len(ms), 0.9, 0.5)
    with pytest.raises(CircuitkitError, match="nan: the full and the fully ablated model score the same"):
        eliminate(member, order, lambda ms: [0.0] * len(ms), 0.9, float("nan"))  # nan < target is False
    with pytest.raises(CircuitkitError, match="member of the circuit"):
        eliminate(torch.tensor([True, False]), torch.tensor([[0], [1]]), lambda ms: [1.0] * len(ms), 0.9, 1.0)
    with pytest.raises(CircuitkitError, match="minimal-circuit rule 'shortest'.*prefix, minimized"):
        MinimalRule.parse("shortest")


# ---------------------------------------------------------------- on a trained model

@pytest.fixture(scope="module")
def toy():
    return load_model("toy-addition")  # read-only


@pytest.fixture(scope="module")
def ds():
    return get_task("addition").dataset(12, seed=2)


def _f(model, graphs, ds, m_full, m_empty) -> list[float]:
    return explained_effect(metric_with_graphs(model, graphs, ds).mean(1), m_full, m_empty).tolist()


def _check_minimized(model, start, out, ds, target, sample: int | None = None):
    full, empty = start.with_in_graph(start.real_mask), start.with_in_graph(torch.zeros_like(start.in_graph))
    m = metric_with_graphs(model, [full, empty], ds).mean(1)
    m_full, m_empty = float(m[0]), float(m[1])
    assert bool((out.in_graph <= start.in_graph).all())  # a subset of the circuit it started from
    assert out.metadata["selection"] == "minimized" and out.metadata["from_edges"] == start.n_edges
    f_out = _f(model, [out], ds, m_full, m_empty)[0]
    assert f_out >= target and f_out == pytest.approx(out.metadata["explained_effect"], abs=1e-5)
    assert torch.equal(remove_dangling(out).in_graph, out.in_graph)  # no dangling edges left
    edges = out.in_graph.nonzero().tolist()
    if sample is not None:
        edges = random.Random(0).sample(edges, min(sample, len(edges)))
    drops = []
    for e in edges:
        member = out.in_graph.clone()
        member[tuple(e)] = False
        drops.append(remove_dangling(out.with_in_graph(member)))
    assert max(_f(model, drops, ds, m_full, m_empty)) < target  # every edge left is needed


def test_minimize_a_greedy_component_circuit(toy, ds):
    scored = attribute(toy, ds, "eap")
    start = greedy(toy, scored, ds, 0.8)
    out = minimize(toy, start, ds, 0.8)
    assert out.n_edges < start.n_edges  # eap's ranking keeps edges the circuit does not need
    _check_minimized(toy, start, out, ds, 0.8)
    with pytest.raises(CircuitkitError, match="f = .* < the target 0.99"):
        minimize(toy, start, ds, 0.99)


def test_minimize_a_position_circuit(toy):
    ds = get_task("addition").dataset(6, seed=4)
    scored = attribute_positions(toy, ds, "eap")
    start = greedy(toy, scored, ds, 0.8)
    out = minimize(toy, start, ds, 0.8)
    assert out.n_edges <= start.n_edges and out.in_graph.ndim == 3
    _check_minimized(toy, start, out, ds, 0.8, sample=40)


def test_minimize_pairs(toy, ds):
    scores = attribute_pairs(toy, ds, "gradient")
    curve = pair_curve(toy, scores, ds)
    prefix = minimal_pair_circuit(toy, scores, ds, 0.9, curve)
    out = minimize_pairs(toy, scores, ds, prefix, (curve.m_full, curve.m_empty))
    assert out.prefix_k == prefix.k and out.k == int(out.keep.sum()) <= prefix.k
    assert bool((out.keep <= prefix.keep).all())
    f = lambda keep: explained_effect(metric_with_pairs(toy, ds, keep).mean(1), curve.m_full,  # noqa: E731
                                      curve.m_empty)
    assert float(f(out.keep)[0]) >= 0.9 and float(f(out.keep)[0]) == pytest.approx(out.f, abs=1e-5)
    kept = out.keep.nonzero()
    drops = out.keep[None].repeat(len(kept), 1, 1, 1, 1)
    drops[torch.arange(len(kept)), kept[:, 0], kept[:, 1], kept[:, 2], kept[:, 3]] = False
    assert float(f(drops).max()) < 0.9  # every pair left is needed
    listed = out.pairs(scores)
    assert len(listed) == out.k and all(out.keep[p["layer"], p["head"], p["query"], p["key"]] for p in listed)
    assert [abs(p["score"]) for p in listed] == sorted((abs(p["score"]) for p in listed), reverse=True)
    r = analyse_pairs(toy, "toy", ds, "gradient", 0.9, rank_by=scores, minimal_rule="minimized")
    assert torch.equal(r.minimal.keep, out.keep) and r.to_dict()["prefix_pairs"] == prefix.k


def test_the_study_rule_minimizes_and_reports_the_prefix(toy):
    ds = get_task("addition").dataset(12, seed=2)
    plain = analyse(toy, "m", ds, StudyConfig(method="eap", n=12, batch_size=64, threshold=0.8))
    small = analyse(toy, "m", ds, StudyConfig(method="eap", n=12, batch_size=64, threshold=0.8, minimal="minimized"))
    assert plain.prefix_edges is None and small.prefix_edges == plain.n_edges
    assert small.n_edges < plain.n_edges and small.f_minimal >= 0.8
    assert bool((small.minimal.in_graph <= plain.minimal.in_graph).all())
    assert small.summary()["prefix_edges"] == plain.n_edges
    assert list(pair_table([plain], [plain]).columns) == PAIR_COLUMNS
    t = pair_table([small], [plain])
    assert list(t.columns) == PAIR_COLUMNS + PREFIX_COLUMNS
    assert t["base_prefix_edges"].tolist() == [plain.n_edges] and t["sparse_prefix_edges"].isna().all()
    with pytest.raises(CircuitkitError, match="minimal: unknown minimal-circuit rule 'pruned'"):
        StudyConfig(minimal="pruned").check("study.toml")


def test_the_commands_refuse_minimize_without_what_it_needs(tmp_path, capsys):
    rc = main(["discover", "--model", "toy-addition", "--task", "addition", "--minimize", "--out", str(tmp_path / "d")])
    assert rc == 2 and "--minimize needs --target" in capsys.readouterr().err
    rc = main(["pairs", "--model", "toy-addition", "--task", "addition", "--minimize", "--out", str(tmp_path / "p")])
    assert rc == 2 and "add --minimal" in capsys.readouterr().err
    assert not (tmp_path / "d").exists() and not (tmp_path / "p").exists()
