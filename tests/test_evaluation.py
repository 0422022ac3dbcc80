"""Verification and comparison: explained effect, curves, CPR/CMD, minimal circuits, tables, `run`."""

import json
import math

import pytest
import torch

from circuitkit import CircuitkitError
from circuitkit.circuits.attribution import attribute
from circuitkit.circuits.graph import Graph, GraphSpec
from circuitkit.circuits.selection import top_n
from circuitkit.evaluation import faithfulness as F
from circuitkit.evaluation.compare import OVERLAP_COLUMNS, PAIR_COLUMNS, overlap_table, pair_row, pair_table
from circuitkit.evaluation.study import StudyConfig, TaskResult, analyse, jaccard
from circuitkit.models import build_model, save_model, toy_config
from circuitkit.tasks import get_task


@pytest.fixture(scope="module")
def model():
    return build_model(toy_config("toy-2l", seed=1))


@pytest.fixture(scope="module")
def ds():
    return get_task("addition").dataset(24, seed=0)


@pytest.fixture(scope="module")
def scored(model, ds):
    return attribute(model, ds, "eap")


def f_of(model, graphs, ds):
    return F._evaluate(model, graphs, ds, "patching", 64)[2]


def test_full_graph_explains_everything_empty_nothing(model, ds):
    full, empty = Graph.full(model), Graph.empty(model)
    f_full, f_empty = f_of(model, [full, empty], ds)
    assert f_full == pytest.approx(1.0, abs=1e-4)
    assert f_empty == pytest.approx(0.0, abs=1e-4)


def test_cpr_cmd_hand_computed():
    c = F.CprCmd(fractions=(0.0, 0.5, 1.0), f=(0.0, 1.0, 1.0))
    assert c.cpr == pytest.approx(0.25 + 0.5)
    assert c.cmd == pytest.approx(0.25)
    c = F.CprCmd(fractions=(0.1, 0.2, 1.0), f=(1.5, 0.5, 1.0))  # overshoot counts in CMD via |1 - f|
    assert c.cpr == pytest.approx(0.1 * (1.5 + 0.5) / 2 + 0.8 * (0.5 + 1.0) / 2)
    assert c.cmd == pytest.approx(0.1 * (0.5 + 0.5) / 2 + 0.8 * (0.5 + 0.0) / 2)


def test_smallest_reaching():
    assert F.smallest_reaching([1, 2, 4, 8], [0.1, 0.95, 0.85, 0.99], 0.9) == 2
    assert F.smallest_reaching([1, 2, 4], [0.1, 0.2, 0.3], 0.9) is None
    with pytest.raises(CircuitkitError):
        F.smallest_reaching([1, 2], [0.5], 0.9)


def test_minimal_circuit_is_the_smallest_crossing(model, ds, scored):
    m = F.minimal_circuit(model, scored, ds, threshold=0.8, batch_size=64)
    assert m.reached and m.f >= 0.8
    assert f_of(model, [top_n(scored, m.requested)], ds)[0] == pytest.approx(m.f, abs=1e-5)
    if m.requested > 1:  # one edge fewer does not reach the threshold
        assert f_of(model, [top_n(scored, m.requested - 1)], ds)[0] < 0.8


def test_curve_sizes_and_kept(model, ds, scored):
    c = F.edge_curve(model, scored, ds, sizes=[1, 5, 10000 % scored.spec.n_real_edges or 1, scored.spec.n_real_edges])
    assert c.f[-1] == pytest.approx(1.0, abs=1e-4)
    assert all(k <= s for k, s in zip(c.kept, c.sizes))
    h = F.head_curve(model, scored, ds)
    assert h.sizes[0] == 0 and h.sizes[-1] == model.cfg.n_layers * model.cfg.n_heads
    assert h.f[-1] == pytest.approx(1.0, abs=1e-4)


def test_completeness_extremes(model, ds):
    assert F.completeness(model, Graph.full(model), ds) == pytest.approx(1.0, abs=1e-4)
    assert F.completeness(model, Graph.empty(model), ds) == pytest.approx(0.0, abs=1e-4)


def test_minimality_counts_needed_edges(model, ds, scored):
    circuit = top_n(scored, 30)
    assert circuit.n_edges > 0
    frac = F.minimality(model, circuit, ds, eps=0.01)
    f0 = f_of(model, [circuit], ds)[0]
    manual = 0
    for s, d in circuit.in_graph.nonzero().tolist():
        g = circuit.in_graph.clone()
        g[s, d] = False
        manual += (f0 - f_of(model, [circuit.with_in_graph(g)], ds)[0]) > 0.01
    assert frac == pytest.approx(manual / circuit.n_edges)
    assert F.minimality(model, circuit, ds, eps=0.01, max_edges=circuit.n_edges) == frac  # no sampling needed


def test_minimality_estimated_on_a_sample_of_large_circuits(model, ds, scored):
    circuit = top_n(scored, 30)
    f0 = f_of(model, [circuit], ds)[0]
    edges = circuit.in_graph.nonzero().tolist()
    needed = []
    for s, d in edges:
        g = circuit.in_graph.clone()
        g[s, d] = False
        needed.append((f0 - f_of(model, [circuit.with_in_graph(g)], ds)[0]) > 0.01)
    assert 0 < sum(needed) < len(needed)  # a mixed circuit, so a wrong sample shows
    for seed in (0, 1):
        # the documented sample: 10 of the circuit's edges (in index order), torch.randperm(seed)
        pick = torch.randperm(len(edges), generator=torch.Generator().manual_seed(seed))[:10].tolist()
        expected = sum(needed[i] for i in pick) / 10
        assert F.minimality(model, circuit, ds, eps=0.01, max_edges=10, seed=seed) == pytest.approx(expected)
    with pytest.raises(CircuitkitError, match="max_edges must be >= 1"):
        F.minimality(model, circuit, ds, max_edges=0)


def test_jaccard():
    a = torch.tensor([True, True, False, False])
    b = torch.tensor([True, False, True, False])
    assert jaccard(a, b) == pytest.approx(1 / 3)
    assert jaccard(torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)) == 1.0


# ---------------------------------------------------------------- the headline table, on hand-built results

HAND_SPEC = GraphSpec(2, 2)  # nodes: input, a0.h0, a0.h1, m0, a1.h0, a1.h1, m1, logits


def hand_result(model: str, task: str, edges: list[str], *, f: float = 0.9, completeness: float = 0.95,
                cpr: float = 0.8, cmd: float = 0.2, minimality: float = 0.5) -> TaskResult:
    """A TaskResult whose minimal circuit holds exactly ``edges``; the other numbers are given."""
    member = torch.zeros(HAND_SPEC.n_src, HAND_SPEC.n_dst, dtype=torch.bool)
    for name in edges:
        member[HAND_SPEC.parse_edge(name)] = True
    circuit = Graph.full(HAND_SPEC).with_in_graph(member)
    curve = F.Curve("edges", (len(edges),), (len(edges),), (f,), 2.0, -1.0)
    return TaskResult(model=model, task=task, scored=Graph.full(HAND_SPEC), minimal=circuit, f_minimal=f,
                      reached=True, edge_curve=curve, head_curve=F.Curve("heads", (1,), (1,), (f,), 2.0, -1.0),
                      heads_minimal=1, cpr=cpr, cmd=cmd, completeness=completeness, minimality=minimality,
                      m_full=2.0, m_empty=-1.0)


# base ioi: 6 edges, heads {a0.h0, a1.h1}, 3 of the edges at a head
BASE_IOI = ["input->a0.h0<q>", "a0.h0->a1.h1<k>", "a1.h1->logits", "input->m0", "m0->m1", "m1->logits"]
# sparse ioi: 2 edges, heads {a0.h0}, both at a head; shares input->a0.h0<q> with the base
SPARSE_IOI = ["input->a0.h0<q>", "a0.h0->logits"]
# docstring: both circuits use head a0.h1 only; 4 edges against 3, sharing 2
BASE_DOC = ["input->a0.h1<v>", "a0.h1->logits", "input->logits", "m1->logits"]
SPARSE_DOC = ["input->a0.h1<k>", "a0.h1->logits", "input->logits"]


def test_pair_table_values_on_hand_built_results():
    base = [hand_result("base", "ioi", BASE_IOI, f=0.91, completeness=0.97, cpr=0.7, cmd=0.3, minimality=0.5),
            hand_result("base", "docstring", BASE_DOC, completeness=0.6),
            hand_result("base", "only-in-base", BASE_DOC)]
    sparse = [hand_result("sparse", "docstring", SPARSE_DOC, completeness=0.99),
              hand_result("sparse", "ioi", SPARSE_IOI, f=0.93, completeness=0.88, cpr=0.9, cmd=0.1, minimality=1.0)]
    t = pair_table(base, sparse)
    assert list(t.columns) == PAIR_COLUMNS and list(t["task"]) == ["ioi", "docstring"]  # base order, shared tasks
    ioi = t.iloc[0].to_dict()
    assert (ioi["base_edges"], ioi["sparse_edges"], ioi["edge_ratio"]) == (6, 2, 3.0)  # base / sparse
    assert (ioi["base_heads"], ioi["sparse_heads"], ioi["head_ratio"]) == (2, 1, 2.0)
    assert (ioi["base_attn_edges"], ioi["sparse_attn_edges"], ioi["attn_edge_ratio"]) == (3, 2, 1.5)
    assert ioi["edge_jaccard"] == pytest.approx(1 / 7)  # 1 shared of 6 + 2 - 1
    assert ioi["head_jaccard"] == pytest.approx(1 / 2)  # {a0.h0} of {a0.h0, a1.h1}
    assert (ioi["base_f"], ioi["sparse_f"]) == (0.91, 0.93)
    assert (ioi["base_completeness"], ioi["sparse_completeness"]) == (0.97, 0.88)
    assert (ioi["base_cpr"], ioi["sparse_cpr"], ioi["base_cmd"], ioi["sparse_cmd"]) == (0.7, 0.9, 0.3, 0.1)
    assert (ioi["base_minimality"], ioi["sparse_minimality"]) == (0.5, 1.0)
    doc = t.iloc[1].to_dict()
    assert doc["edge_ratio"] == pytest.approx(4 / 3) and doc["head_ratio"] == 1.0
    assert doc["edge_jaccard"] == pytest.approx(2 / 5) and doc["head_jaccard"] == 1.0
    assert (doc["base_completeness"], doc["sparse_completeness"]) == (0.6, 0.99)


def test_pair_table_ratio_edge_cases():
    t = pair_table([hand_result("b", "ioi", BASE_IOI)], [hand_result("s", "ioi", [])])
    assert t.loc[0, "edge_ratio"] == math.inf and t.loc[0, "head_ratio"] == math.inf
    assert t.loc[0, "edge_jaccard"] == 0.0 and t.loc[0, "head_jaccard"] == 0.0
    with pytest.raises(CircuitkitError, match="cannot compare task"):
        pair_row(hand_result("b", "ioi", BASE_IOI), hand_result("s", "docstring", SPARSE_DOC))


def test_overlap_table_values_on_hand_built_results():
    results = [hand_result("base", "ioi", BASE_IOI), hand_result("base", "docstring", BASE_DOC),
               hand_result("base", "induction", ["input->a0.h0<q>", "a0.h0->a1.h1<k>", "a1.h1->logits", "m1->logits"])]
    o = overlap_table(results)
    assert list(o.columns) == OVERLAP_COLUMNS
    assert [(r.task_a, r.task_b) for r in o.itertuples()] == [("ioi", "docstring"), ("ioi", "induction"),
                                                               ("docstring", "induction")]
    ioi_doc, ioi_ind, doc_ind = (o.iloc[i].to_dict() for i in range(3))
    assert (ioi_doc["edges_a"], ioi_doc["edges_b"], ioi_doc["shared_edges"]) == (6, 4, 1)  # m1->logits
    assert ioi_doc["edge_jaccard"] == pytest.approx(1 / 9)
    assert (ioi_doc["heads_a"], ioi_doc["heads_b"], ioi_doc["shared_heads"], ioi_doc["head_jaccard"]) == (2, 1, 0, 0.0)
    assert (ioi_ind["shared_edges"], ioi_ind["edge_jaccard"]) == (4, pytest.approx(4 / 6))
    assert (ioi_ind["shared_heads"], ioi_ind["head_jaccard"]) == (2, 1.0)
    assert (doc_ind["shared_edges"], doc_ind["edge_jaccard"]) == (1, pytest.approx(1 / 7))
    assert doc_ind["model"] == "base"


def test_completeness_is_one_minus_f_of_the_knocked_out_model(model, ds):
    """C = every output of m0 and a1.h0. Knocking C out of the full model is patching those two nodes'
    outputs to their corrupted values, done here with TransformerLens's own hooks; completeness is
    1 − f(N ∖ C), which differs from f(C) on this model."""
    spec = GraphSpec.from_model(model)
    member = torch.zeros(spec.n_src, spec.n_dst, dtype=torch.bool)
    member[spec.mlp_src(0)] = spec.real[spec.mlp_src(0)]
    member[spec.head_src(1, 0)] = spec.real[spec.head_src(1, 0)]
    circuit = Graph.full(spec).with_in_graph(member)
    model.set_use_attn_result(True)
    try:
        with torch.no_grad():
            _, corrupt = model.run_with_cache(ds.corrupt)

            def mlp0(act, hook):
                return corrupt["blocks.0.hook_mlp_out"]

            def head0(act, hook):
                act = act.clone()
                act[:, :, 0] = corrupt["blocks.1.attn.hook_result"][:, :, 0]
                return act

            knocked = model.run_with_hooks(ds.clean, fwd_hooks=[("blocks.0.hook_mlp_out", mlp0),
                                                                ("blocks.1.attn.hook_result", head0)])
            m_clean, m_corrupt = (float(ds.metric_values(model(t)).mean()) for t in (ds.clean, ds.corrupt))
    finally:
        model.set_use_attn_result(False)
    m_knocked = float(ds.metric_values(knocked).mean())
    expected = 1 - (m_knocked - m_corrupt) / (m_clean - m_corrupt)
    got = F.completeness(model, circuit, ds, batch_size=64)
    assert got == pytest.approx(expected, abs=1e-4)
    assert abs(got - f_of(model, [circuit], ds)[0]) > 0.05  # not f(C)


@pytest.fixture(scope="module")
def analysed(model, ds):
    return analyse(model, "m", ds, StudyConfig(method="eap", n=16, batch_size=64, threshold=0.8))


def test_analyse_heads_minimal_is_the_fewest_heads_reaching_the_threshold(model, ds, analysed):
    """Checked against fresh forwards, not against the result's own curve: the top heads_minimal heads
    reach the threshold and one head fewer does not."""
    from circuitkit.circuits.attribution import attribute_nodes
    from circuitkit.circuits.selection import top_heads

    r = analysed
    n = r.heads_minimal
    assert n is not None and 0 < n < model.cfg.n_layers * model.cfg.n_heads
    nodes = attribute_nodes(model, ds, "eap", batch_size=64)
    f_n, f_fewer = f_of(model, [top_heads(r.scored, n, nodes), top_heads(r.scored, n - 1, nodes)], ds)
    assert f_n >= 0.8 > f_fewer
    assert r.completeness == pytest.approx(F.completeness(model, r.minimal, ds, batch_size=64), abs=1e-6)


def test_tables_from_analysed_results(model, ds, analysed):
    """Two different results of one model: a self-comparison would say nothing."""
    other = analyse(model, "m", get_task("ioi").dataset(16, seed=0), StudyConfig(method="eap", n=16, batch_size=64))
    o = overlap_table([analysed, other])
    assert list(o.columns) == OVERLAP_COLUMNS and (o.loc[0, "task_a"], o.loc[0, "task_b"]) == ("addition", "ioi")
    shared = int((analysed.minimal.in_graph & other.minimal.in_graph).sum())
    assert o.loc[0, "shared_edges"] == shared < min(analysed.n_edges, other.n_edges)


def test_run_on_tiny_config_writes_report(tmp_path):
    from circuitkit.pipeline import RunConfig, run

    for name, seed in (("base", 1), ("sparse", 2)):
        save_model(build_model(toy_config("toy-2l", seed=seed)), tmp_path / name, {"name": name})
    cfg = RunConfig.from_dict({
        "out": str(tmp_path / "results"),
        "study": {"method": "eap-ig", "ig_steps": 2, "n": 12, "batch_size": 64},
        "pairs": [{"base": str(tmp_path / "base"), "sparse": str(tmp_path / "sparse"), "tasks": ["addition", "ioi"]}],
    })
    out = run(cfg, progress=False)
    report = (out / "report.md").read_text()
    assert "edge_ratio" in report and "ioi" in report
    for f in ["base_vs_sparse.csv", "base_vs_sparse.md", "task_overlap__base.csv", "figures/faithfulness.png",
              "figures/faithfulness.svg", "figures/circuit__base__addition.png", "circuits/sparse__ioi.json",
              "summaries/base__addition.json"]:
        assert (out / f).exists(), f
    circuit = Graph.load(out / "circuits" / "sparse__ioi.json")
    summary = json.loads((out / "summaries" / "sparse__ioi.json").read_text())
    assert circuit.n_edges == summary["edges"]


def test_run_config_errors(tmp_path):
    from circuitkit.pipeline import RunConfig

    with pytest.raises(CircuitkitError, match="unknown keys"):
        RunConfig.from_dict({"outt": "x"})
    with pytest.raises(CircuitkitError, match=r"\[study\]: unknown keys"):
        RunConfig.from_dict({"study": {"metod": "eap"}})
    with pytest.raises(CircuitkitError, match="does not exist"):
        RunConfig.from_toml(tmp_path / "nope.toml")


def test_fingerprints_tell_prompts_and_models_apart():
    """The keys --resume trusts: the same prompts hash alike; one changed token, another seed, another task differ;
    a model's fingerprint follows its weights and its gates."""
    from circuitkit.sparsity import GateConfig, attach, detach, model_fingerprint

    a, b = get_task("ioi").dataset(8, seed=0), get_task("ioi").dataset(8, seed=0)
    assert a.fingerprint() == b.fingerprint()
    assert get_task("ioi").dataset(8, seed=1).fingerprint() != a.fingerprint()
    d = a.distractors.clone()
    d[3, 0, 0] += 1
    from dataclasses import replace
    assert replace(a, distractors=d).fingerprint() != a.fingerprint()
    assert replace(a, task="other").fingerprint() != a.fingerprint()
    m = build_model(toy_config("toy-2l", seed=1))
    plain = model_fingerprint(m)
    assert model_fingerprint(build_model(toy_config("toy-2l", seed=1))) == plain
    attach(m, GateConfig(bias_gate=3.0))
    gated = model_fingerprint(m)
    detach(m)
    attach(m, GateConfig(bias_gate=2.0))
    assert len({plain, gated, model_fingerprint(m)}) == 3
    detach(m)
    with torch.no_grad():
        m.W_U[0, 0] += 1e-3
    assert model_fingerprint(m) != plain


def test_run_refuses_a_used_folder_and_resumes_from_saved_results(tmp_path, monkeypatch, capsys):
    """A second run into a results folder is refused unless it says --resume or --force. --resume reads back every
    result saved under the same key (no analysis runs) and writes the same tables; a result whose file is gone, or
    that was made with another setting or other weights, is computed again, and gives the same numbers when
    nothing changed (same config and seed, same circuit)."""
    import circuitkit.evaluation.compare as compare_mod
    import circuitkit.evaluation.pairs as pairs_mod
    from circuitkit.cli import main as cli_main
    from circuitkit.pipeline import RunConfig, run

    for name, seed in (("base", 1), ("sparse", 2)):
        save_model(build_model(toy_config("toy-2l", seed=seed)), tmp_path / name, {"name": name})
    raw = {"out": str(tmp_path / "results"), "figures": False,
           "study": {"method": "eap", "n": 12, "batch_size": 64, "levels": ["component", "position", "pairs"],
                     "pair_method": "gradient", "pair_n": 4},
           "pairs": [{"base": str(tmp_path / "base"), "sparse": str(tmp_path / "sparse"), "tasks": ["ioi"]}]}
    cfg = RunConfig.from_dict(raw)
    out = run(cfg, progress=False)
    tables = ("base_vs_sparse.csv", "token_positions.csv", "token_pairs.csv", "token_levels.csv")
    first = {t: (out / t).read_text() for t in tables}

    with pytest.raises(CircuitkitError, match="already holds a finished study.*--resume.*--force"):
        run(cfg, progress=False)
    with pytest.raises(CircuitkitError, match="pass one"):
        run(cfg, progress=False, resume=True, force=True)

    calls, scored = [], []
    real, real_pairs = compare_mod.analyse, pairs_mod.attribute_pairs

    def counted(model, label, ds, study, **kw):
        calls.append((label, ds.task))
        return real(model, label, ds, study, **kw)

    def counted_pairs(model, ds, *a, **kw):
        scored.append(ds.task)
        return real_pairs(model, ds, *a, **kw)

    monkeypatch.setattr(compare_mod, "analyse", counted)
    monkeypatch.setattr(pairs_mod, "attribute_pairs", counted_pairs)
    run(cfg, progress=False, resume=True)
    assert calls == [] and scored == [] and {t: (out / t).read_text() for t in tables} == first

    (out / "circuits" / "sparse__ioi__position.json").unlink()  # a damaged result: computed again, the rest reused
    (out / "run.json").unlink()  # a stopped study: refused without --resume too
    with pytest.raises(CircuitkitError, match="already holds 2 saved results"):
        run(cfg, progress=False)
    run(cfg, progress=False, resume=True)
    assert calls == [("sparse", "ioi")] and {t: (out / t).read_text() for t in tables} == first

    calls.clear()
    save_model(build_model(toy_config("toy-2l", seed=3)), tmp_path / "sparse", {"name": "sparse"})  # new weights
    run(cfg, progress=False, resume=True)
    assert calls == [("sparse", "ioi")] and scored == ["ioi"]  # the sparse model's, not the base's

    calls.clear()
    scored.clear()
    # another threshold: no saved circuit applies; the saved pair scores do (they do not depend on it)
    (tmp_path / "c.toml").write_text(
        f'out = "{out.as_posix()}"\nfigures = false\n[study]\nmethod = "eap"\nn = 12\nbatch_size = 64\n'
        'levels = ["component", "position", "pairs"]\npair_method = "gradient"\npair_n = 4\nthreshold = 0.8\n'
        '[[pairs]]\n'
        f'base = "{(tmp_path / "base").as_posix()}"\nsparse = "{(tmp_path / "sparse").as_posix()}"\n'
        'tasks = ["ioi"]\n')
    assert cli_main(["run", "--config", str(tmp_path / "c.toml"), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err and calls == []
    assert cli_main(["run", "--config", str(tmp_path / "c.toml"), "--no-progress", "--resume"]) == 0
    assert calls == [("base", "ioi"), ("sparse", "ioi")]
    assert scored == []
    assert json.loads((out / "summaries" / "base__ioi.json").read_text())["key"]["settings"]["threshold"] == 0.8


def test_compare_command_resumes_too(tmp_path, monkeypatch, capsys):
    """circuitkit compare shares the results folder's rules: a second run is refused, --resume reads the saved
    results back (no analysis) into the same table, --force computes them again."""
    import circuitkit.evaluation.compare as compare_mod
    from circuitkit.cli import main as cli_main

    for name, seed in (("base", 1), ("sparse", 2)):
        save_model(build_model(toy_config("toy-2l", seed=seed)), tmp_path / name, {"name": name})
    argv = ["compare", "--base", str(tmp_path / "base"), "--sparse", str(tmp_path / "sparse"), "--tasks", "ioi",
            "--method", "eap", "--n", "12", "--out", str(tmp_path / "cmp"), "--no-progress"]
    assert cli_main(argv) == 0
    table = (tmp_path / "cmp" / "base_vs_sparse.csv").read_text()
    capsys.readouterr()
    assert cli_main(argv) == 2 and "already holds 2 saved results" in capsys.readouterr().err
    calls = []
    real = compare_mod.analyse
    monkeypatch.setattr(compare_mod, "analyse",
                        lambda m, label, ds, cfg, **kw: calls.append(label) or real(m, label, ds, cfg, **kw))
    assert cli_main(argv + ["--resume"]) == 0 and calls == []
    assert (tmp_path / "cmp" / "base_vs_sparse.csv").read_text() == table
    assert cli_main(argv + ["--force"]) == 0 and calls == ["base", "sparse"]
    assert (tmp_path / "cmp" / "base_vs_sparse.csv").read_text() == table  # same config and seed, same circuits
