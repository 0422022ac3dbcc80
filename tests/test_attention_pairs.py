"""Attention-pair attribution, pair-level faithfulness, attribution mass and ``circuitkit pairs``.

References are computed independently: single-pair removals with TransformerLens's own
``run_with_hooks`` (a hook that zeroes one entry of a cloned pattern), gradients against
finite differences, mass curves against hand-made values.
"""

from __future__ import annotations

import json

import pytest
import torch

from circuitkit import CircuitkitError
from circuitkit.circuits.attention_pairs import (PairScores, PairSpec, attribute_pairs, metric_with_pairs,
                                                 pairs_removed)
from circuitkit.cli import main
from circuitkit.evaluation.pairs import (head_mass, mass_curve, mass_ratio, minimal_pair_circuit, pair_curve,
                                        pair_effects, pair_mass)
from circuitkit.models import build_model, toy_config
from circuitkit.sparsity import load_model
from circuitkit.tasks import get_task
from circuitkit.tasks.base import Metric

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ds():
    return get_task("addition").dataset(8, seed=0)


@pytest.fixture(scope="module")
def base():
    return load_model("toy-addition")  # read-only


@pytest.fixture(scope="module")
def base_scores(base, ds):
    return attribute_pairs(base, ds, "exact", batch_size=5)  # 8 examples: two batches, the second partial


def _metric_with(model, ds, edits):
    """Mean metric with ``edits`` = [(layer, head, query, key, scale)] applied to cloned patterns."""
    by_layer = {}
    for l, h, q, k, s in edits:
        by_layer.setdefault(l, []).append((h, q, k, s))

    def hook_for(items):
        def hook(p, hook):
            p = p.clone()
            for h, q, k, s in items:
                p[:, h, q, k] *= s
            return p
        return hook

    hooks = [(f"blocks.{l}.attn.hook_pattern", hook_for(items)) for l, items in by_layer.items()]
    with torch.no_grad():
        logits = model.run_with_hooks(ds.clean, fwd_hooks=hooks)
    return float(ds.metric_values(logits).double().mean())


def test_exact_score_is_a_hand_computed_single_pair_removal(base, ds, base_scores):
    m0 = _metric_with(base, ds, [])
    assert base_scores.m_full == pytest.approx(m0, abs=1e-5)
    picks = [tuple(p) for p in base_scores.order()[:3].tolist()] + [(3, 1, 10, 4), (2, 3, 9, 0), (1, 0, 7, 7)]
    for l, h, q, k in picks:
        hand = _metric_with(base, ds, [(l, h, q, k, 0.0)]) - m0
        assert float(base_scores.scores[l, h, q, k]) == pytest.approx(hand, abs=2e-5), (l, h, q, k)
    # query and key are not interchangeable: the transposed entry is non-causal and scores 0
    l, h, q, k = picks[0]
    assert q != k and float(base_scores.scores[l, h, k, q]) == 0.0


def test_gradient_score_is_the_first_order_term(base, ds):
    g = attribute_pairs(base, ds, "gradient", batch_size=3)
    m0 = _metric_with(base, ds, [])
    eps = 1e-3
    for l, h, q, k in [(0, 2, 9, 9), (1, 2, 8, 5), (3, 0, 10, 6), (2, 1, 6, 2)]:
        fd = (_metric_with(base, ds, [(l, h, q, k, 1 - eps)]) - m0) / eps  # d/dt m(pattern·(1 − t)) at 0
        assert float(g.scores[l, h, q, k]) == pytest.approx(fd, rel=0.05, abs=2e-3), (l, h, q, k)


def test_exact_and_gradient_agree_on_a_tiny_random_model():
    model = build_model(toy_config("toy-2l", seed=3))  # random weights: near-uniform patterns, small effects
    ds = get_task("addition").dataset(6, seed=1)
    e, g = attribute_pairs(model, ds, "exact"), attribute_pairs(model, ds, "gradient")
    c = e.spec.causal
    r = torch.corrcoef(torch.stack([e.scores[c], g.scores[c]]))[0, 1]
    assert r > 0.95
    for s in (e, g):  # non-causal entries are exactly 0
        assert bool((s.scores[~c] == 0).all())


@pytest.mark.parametrize("zoo, task", [("toy-addition-sparse", "addition"), ("toy-multitask-sparse", "ioi")])
def test_pairs_a_sparse_models_gates_close_score_exactly_zero(zoo, task):
    model = load_model(zoo)  # read-only; gates attached in evaluation mode
    ds = get_task(task).dataset(6, seed=0)
    seen = {}

    def grab(p, hook):
        seen[hook.layer()] = p.detach()

    with torch.no_grad():
        model.run_with_hooks(ds.clean, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), grab)])
    gated = torch.stack([seen[l] for l in range(model.cfg.n_layers)], 1)  # [batch, layer, head, q, k]
    causal = PairSpec.from_model(model, ds.seq_len).causal
    closed = (gated == 0).all(0) & causal  # closed on every example
    assert closed.float().mean() > 0.5  # the test means something: most pairs are closed
    for method in ("exact", "gradient"):
        s = attribute_pairs(model, ds, method)
        assert bool((s.scores[closed] == 0).all()), method
        assert int((s.scores != 0).sum()) > 0, method
    # and removing every closed pair changes nothing at all
    keep = (~closed)[None]
    assert torch.equal(metric_with_pairs(model, ds, keep), metric_with_pairs(model, ds, torch.ones_like(keep)))


def test_metric_with_pairs_copies_match_hand_runs(base, ds, base_scores):
    spec = base_scores.spec
    top = base_scores.top_k_mask(5)
    keep = torch.stack([torch.ones(spec.shape, dtype=torch.bool), torch.zeros(spec.shape, dtype=torch.bool), top])
    m = metric_with_pairs(base, ds, keep, batch_size=3).double().mean(1)
    assert float(m[0]) == pytest.approx(_metric_with(base, ds, []), abs=1e-5)
    every = [(l, h, q, k, 0.0) for l, h, q, k in spec.causal.nonzero().tolist()]
    assert float(m[1]) == pytest.approx(_metric_with(base, ds, every), abs=1e-5)
    kept = {tuple(p) for p in top.nonzero().tolist()}
    rest = [(l, h, q, k, 0.0) for l, h, q, k in spec.causal.nonzero().tolist() if (l, h, q, k) not in kept]
    assert float(m[2]) == pytest.approx(_metric_with(base, ds, rest), abs=1e-5)
    with pytest.raises(CircuitkitError, match="keep-masks"):
        metric_with_pairs(base, ds, torch.ones(1, 4, 4, 5, 5, dtype=torch.bool))
    with pytest.raises(CircuitkitError, match="bool tensor"):
        with pairs_removed(base, torch.ones(1, 4, 4, 12, 12)):
            pass


def test_minimal_pair_circuit_is_the_smallest_top_k(base, ds, base_scores):
    curve = pair_curve(base, base_scores, ds, batch_size=8)
    assert curve.sizes[-1] == base_scores.spec.n_pairs and curve.f[-1] == pytest.approx(1.0, abs=1e-5)
    mc = minimal_pair_circuit(base, base_scores, ds, 0.9, curve, batch_size=8)
    assert mc.reached and int(mc.keep.sum()) == mc.k
    known = (curve.m_full, curve.m_empty)
    f_k, f_before = pair_effects(base, base_scores, ds, [mc.k, mc.k - 1], known, 8)[2]
    assert f_k == pytest.approx(mc.f, abs=1e-6) and f_k >= 0.9 and f_before < 0.9


def test_mass_curves_by_hand():
    c = mass_curve(torch.tensor([1.0, 0.0, 3.0, 0.0]), "pairs")
    assert c.fraction == pytest.approx((0.75, 1.0, 1.0, 1.0))
    assert (c.k_at(0.7), c.k_at(0.8), c.k_at(1.0)) == (1, 2, 2)
    spread = mass_curve(torch.ones(10), "pairs")
    assert spread.k_at(0.8) == 8 and mass_ratio(spread, c, 0.8) == 4.0
    assert mass_curve(torch.zeros(3), "heads").k_at(0.8) is None
    with pytest.raises(CircuitkitError, match="non-negative"):
        mass_curve(torch.tensor([-1.0, 2.0]), "pairs")
    spec = PairSpec(1, 2, 2)
    scores = torch.zeros(spec.shape)
    scores[0, 0, 1, 0], scores[0, 1, 0, 0], scores[0, 1, 1, 1] = -2.0, 1.0, 0.5  # head sums |.|: 2, 1.5
    ps = PairScores(spec, scores, "exact", "t", 1, 0.0)
    assert ps.head_scores.tolist() == [[2.0, 1.5]]
    assert pair_mass(ps).k_at(0.5) == 1 and head_mass(ps).k_at(0.6) == 2
    assert [p["pair"] for p in ps.top_pairs(2)] == ["a0.h0@1<-0", "a0.h1@0<-0"]
    bad = scores.clone()
    bad[0, 0, 0, 1] = 1.0
    with pytest.raises(CircuitkitError, match="causal"):
        PairScores(spec, bad, "exact", "t", 1, 0.0)


def test_scores_file_round_trip_and_damage(tmp_path, base_scores):
    path = base_scores.with_metadata(model="toy-addition").save(tmp_path / "p.safetensors")
    back = PairScores.load(path)
    assert torch.equal(back.scores, base_scores.scores) and back.spec == base_scores.spec
    assert (back.method, back.task, back.n_examples, back.m_full) == ("exact", "addition", 8, base_scores.m_full)
    assert back.metadata["model"] == "toy-addition"
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file at all")
    with pytest.raises(CircuitkitError, match="safetensors"):
        PairScores.load(tmp_path / "junk.safetensors")
    with pytest.raises(CircuitkitError, match="no pair-score file"):
        PairScores.load(tmp_path / "missing.safetensors")


def test_bad_requests_are_clear_errors(base, ds):
    with pytest.raises(CircuitkitError, match="unknown pair attribution method"):
        attribute_pairs(base, ds, "ig")
    kl = get_task("addition").dataset(2, seed=0)
    kl = type(kl)(**{**kl.__dict__, "metric": Metric.NEG_KL})
    with pytest.raises(CircuitkitError, match="gradient of −KL"):
        attribute_pairs(base, kl, "gradient")
    with pytest.raises(CircuitkitError, match="batch_size"):
        attribute_pairs(base, ds, "gradient", batch_size=0)


def test_pairs_command_writes_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["pairs", "--model", "toy-addition-sparse", "--task", "addition", "--method", "gradient", "--n", "4",
            "--top", "3", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    scores = PairScores.load(out / "pairs.safetensors")
    assert summary["nonzero_pairs"] == int((scores.scores != 0).sum()) and len(summary["top_pairs"]) == 3
    assert summary["pair_mass"]["k_at_80"] == pair_mass(scores).k_at(0.8)
    before = (out / "pairs.safetensors").read_bytes()
    assert main(argv) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "pairs.safetensors").read_bytes() == before
    assert main(argv + ["--force", "--seed", "1"]) == 0
    assert main(["pairs", "--model", "toy-addition", "--task", "addition", "--n", "0", "--out", str(out)]) == 2


def test_pairs_command_ranks_by_scores_it_is_given(tmp_path, capsys):
    """--scores skips the attribution: the minimal circuit is the one the scores' own run finds, and scores of
    another dataset (prompt count, seed) or of another model are refused with what to pass."""
    first, second = tmp_path / "a", tmp_path / "b"
    common = ["pairs", "--model", "toy-addition-sparse", "--task", "addition", "--n", "6", "--seed", "3", "--minimal",
              "--no-progress"]
    assert main(common + ["--method", "gradient", "--out", str(first)]) == 0
    assert main(common + ["--scores", str(first / "pairs.safetensors"), "--out", str(second)]) == 0
    a, b = (json.loads((d / "summary.json").read_text()) for d in (first, second))
    assert b["attribution_seconds"] is None and b["method"] == "gradient"
    assert (b["minimal_pairs"], b["minimal_f"], b["top_pairs"]) == (a["minimal_pairs"], a["minimal_f"], a["top_pairs"])
    saved = [PairScores.load(d / "pairs.safetensors").scores for d in (first, second)]
    assert torch.equal(*saved)
    capsys.readouterr()
    for wrong in (["--n", "5"], ["--seed", "4"]):
        argv = [*common, "--scores", str(first / "pairs.safetensors"), "--out", str(tmp_path / "c"), *wrong]
        assert main(argv) == 2
        assert "--n 6 --seed 3" in capsys.readouterr().err
    # scores of one method are not reported as another's
    argv = [*common, "--scores", str(first / "pairs.safetensors"), "--method", "exact", "--out", str(tmp_path / "d")]
    assert main(argv) == 2
    assert "holds gradient scores; drop --method" in capsys.readouterr().err
    # scores of another model (same task, prompts and seed) rank only the model they were computed on
    argv = [*common, "--scores", str(first / "pairs.safetensors"), "--out", str(tmp_path / "e")]
    argv[argv.index("toy-addition-sparse")] = "toy-addition"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "holds pair scores of another model (toy-addition-sparse" in err and not (tmp_path / "e").exists()


def test_token_figures_are_written(tmp_path):
    from circuitkit.evaluation.pairs import MinimalPairs, PairCurve, PairResult
    from circuitkit.plotting import pair_mass_figure, token_circuit_figure

    spec = PairSpec(2, 3, 4)
    g = torch.Generator().manual_seed(0)
    results = []
    for name, scale in (("base", 1.0), ("sparse", 0.1)):
        s = torch.randn(spec.shape, generator=g) * spec.causal * scale
        ps = PairScores(spec, s, "exact", "t", 4, 1.0)
        mc = MinimalPairs(3, 0.95, True, 0.9, ps.top_k_mask(3))
        curve = PairCurve((1, 2, 3, spec.n_pairs), (0.1, 0.5, 0.95, 1.0), 1.0, 0.0)
        results.append(PairResult(name, ps, pair_mass(ps), head_mass(ps), curve, mc))
    from circuitkit.circuits import PositionGraph, top_n

    pg = PositionGraph.from_model(build_model(toy_config("toy-2l", seed=0)), 4)
    pg = top_n(pg.with_scores(torch.randn(pg.scores.shape, generator=g) * pg.spec.real), 9, prune=False)
    paths = pair_mass_figure([("t", *results)], tmp_path / "mass")
    paths += token_circuit_figure([("p", list("abcd"), [(r.model, r.scores, r.minimal.keep) for r in results]
                                    + [("positions", pg)])], tmp_path / "tok")
    assert sorted(p.name for p in paths) == ["mass.png", "mass.svg", "tok.png", "tok.svg"]
    assert all(p.stat().st_size > 1000 for p in paths)
    svg = (tmp_path / "tok.svg").read_text()
    assert "3 pairs" in svg  # the panel title counts the pairs drawn
    n_pos = len({p for p, _, _ in pg.in_graph.nonzero().tolist()})
    assert f"9 position edges, {pg.n_heads} heads, {n_pos} positions" in svg  # ... and the position edges


def test_study_with_the_token_levels_writes_their_tables(tmp_path):
    """levels = component, position, pairs: the position-level minimal circuit is saved, and
    re-verified here from its file (f and edges as the table says); the levels table puts the
    three ratios of one task on one row."""
    import pandas as pd

    from circuitkit.circuits import PositionGraph, faithfulness
    from circuitkit.evaluation.study import StudyConfig
    from circuitkit.models import save_model
    from circuitkit.pipeline import RunConfig, run

    models = {}
    for name, seed in (("base", 1), ("sparse", 2)):
        models[name] = build_model(toy_config("toy-2l", seed=seed))
        save_model(models[name], tmp_path / name, {"name": name})
    cfg = RunConfig.from_dict({
        "out": str(tmp_path / "results"),
        "study": {"method": "eap", "n": 6, "batch_size": 64, "levels": ["component", "position", "pairs"],
                  "pair_method": "gradient", "pair_n": 4, "minimality_max_edges": 5},
        "pairs": [{"base": str(tmp_path / "base"), "sparse": str(tmp_path / "sparse"), "tasks": ["addition"]}],
        "figures": False,
    })
    out = run(cfg, progress=False)
    row = pd.read_csv(out / "token_pairs.csv").iloc[0]
    assert (row["task"], row["method"], row["n_prompts"]) == ("addition", "gradient", 4)  # pair_n, not n
    assert row["minimal_pair_ratio"] == pytest.approx(row["base_minimal_pairs"] / row["sparse_minimal_pairs"])
    # each model's pair scores and curves are saved: the minimal pair circuit re-verified from the file
    pair_ds = get_task("addition").dataset(4, seed=0)
    for role in ("base", "sparse"):
        scores = PairScores.load(out / "pairs" / f"{role}__addition.safetensors")
        saved = json.loads((out / "pairs" / f"{role}__addition.json").read_text())
        assert (scores.method, scores.n_examples, saved["minimal_pairs"]) == ("gradient", 4,
                                                                           row[f"{role}_minimal_pairs"])
        m = metric_with_pairs(models[role], pair_ds, scores.top_k_mask(saved["minimal_pairs"])).mean()
        c = saved["curve"]
        assert float((m - c["m_empty"]) / (c["m_full"] - c["m_empty"])) == pytest.approx(row[f"{role}_minimal_f"],
                                                                                         abs=1e-4)
    pos = pd.read_csv(out / "token_positions.csv").iloc[0]
    ds = get_task("addition").dataset(6, seed=0)
    for role in ("base", "sparse"):
        circuit = PositionGraph.load(out / "circuits" / f"{role}__addition__position.json")
        assert circuit.n_edges == pos[f"{role}_position_edges"] and circuit.metadata["level"] == "position"
        f = faithfulness(models[role], circuit, ds).explained
        assert f == pytest.approx(pos[f"{role}_position_f"], abs=1e-4) and f >= 0.9
    assert pos["position_edge_ratio"] == pytest.approx(pos["base_position_edges"] / pos["sparse_position_edges"])
    levels = pd.read_csv(out / "token_levels.csv").iloc[0]
    main_row = pd.read_csv(out / "base_vs_sparse.csv").iloc[0]
    assert levels["edge_ratio"] == pytest.approx(main_row["edge_ratio"])
    assert levels["position_edge_ratio"] == pytest.approx(pos["position_edge_ratio"])
    assert levels["minimal_pair_ratio"] == pytest.approx(row["minimal_pair_ratio"])
    report = (out / "report.md").read_text()
    assert all(h in report for h in ("Token level: attention pairs", "Token level: position-resolved edges",
                                     "Token level beside component level"))
    with pytest.raises(CircuitkitError, match="levels"):
        StudyConfig(levels=("pairs",))
    with pytest.raises(CircuitkitError, match="'acdc' has no position-level variant"):
        StudyConfig(method="acdc", levels=("component", "position"))
    with pytest.raises(CircuitkitError, match="pair_method"):
        RunConfig.from_dict({"study": {"pair_method": "ig"}})
    assert StudyConfig().levels == ("component",)  # the default study is unchanged
