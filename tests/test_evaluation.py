"""Verification and comparison: explained effect, curves, CPR/CMD, minimal circuits, tables, `run`."""

import json
import math

import pytest
import torch

from circuitkit import CircuitkitError
from circuitkit.circuits.attribution import attribute
from circuitkit.circuits.graph import Graph
from circuitkit.circuits.selection import top_n
from circuitkit.evaluation import faithfulness as F
from circuitkit.evaluation.compare import OVERLAP_COLUMNS, PAIR_COLUMNS, overlap_table, pair_table
from circuitkit.evaluation.study import StudyConfig, analyse, jaccard
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


def test_tables_have_documented_columns(model, ds):
    cfg = StudyConfig(method="eap", n=16, batch_size=64)
    r1 = analyse(model, "m", ds, cfg)
    r2 = analyse(model, "m", get_task("ioi").dataset(16, seed=0), cfg)
    t = pair_table([r1], [r1])
    assert list(t.columns) == PAIR_COLUMNS and len(t) == 1
    assert t.loc[0, "edge_ratio"] == 1.0 and t.loc[0, "edge_jaccard"] == 1.0
    o = overlap_table([r1, r2])
    assert list(o.columns) == OVERLAP_COLUMNS and o.loc[0, "task_b"] == "ioi"


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
