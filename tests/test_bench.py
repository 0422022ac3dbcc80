"""circuitkit bench: output structure and the edge-name mapping to auto-circuit (no timings asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from circuitkit import CircuitkitError
from circuitkit import bench
from circuitkit.bench.scaling import GATED_NOW
from circuitkit.circuits.graph import GraphSpec
from circuitkit.cli import build_parser


def _peer_names(n_layers: int, n_heads: int) -> tuple[list[str], list[str]]:
    """auto-circuit's factorized, separate-qkv node names, written out by hand."""
    srcs = ["Resid Start"]
    dests = []
    for layer in range(n_layers):
        srcs += [f"A{layer}.{h}" for h in range(n_heads)] + [f"MLP {layer}"]
        dests += [f"A{layer}.{h}.{c}" for h in range(n_heads) for c in "QKV"] + [f"MLP {layer}"]
    return srcs, dests + ["Resid End"]


def test_peer_edge_name_examples():
    assert bench.peer_edge_name("Resid Start", "A0.1.Q") == "input->a0.h1<q>"
    assert bench.peer_edge_name("A0.3", "A2.0.V") == "a0.h3->a2.h0<v>"
    assert bench.peer_edge_name("MLP 1", "MLP 2") == "m1->m2"
    assert bench.peer_edge_name("A3.2", "Resid End") == "a3.h2->logits"
    assert bench.peer_edge_name("A1.0", "MLP 1") == "a1.h0->m1"
    for src, dest in (("Resid End", "MLP 0"), ("A0.1", "A1.2"), ("A0.1.Q", "MLP 1"), ("Resid Start", "Resid Start")):
        with pytest.raises(CircuitkitError):
            bench.peer_edge_name(src, dest)


def test_peer_names_map_onto_our_real_edges():
    spec = GraphSpec(n_layers=4, n_heads=4)
    srcs, dests = _peer_names(4, 4)
    ours = set()
    for s in srcs:
        for d in dests:
            name = bench.peer_edge_name(s, d)
            src, dst = spec.node_index[name.split("->")[0]], spec.dst_index[name.split("->")[1]]
            if bool(spec.real[src, dst]):
                ours.add(name)
    assert len(ours) == spec.n_real_edges == 479
    assert ours == {spec.edge_name(s, d) for s, d in spec.real.nonzero().tolist()}


def test_peer_graph_matches_ours_when_installed():
    try:
        bench.import_peer()
    except bench.PeerUnavailable as e:
        pytest.skip(str(e))
    from circuitkit.models import build_model, toy_config
    from circuitkit.tasks import get_task

    model = build_model(toy_config("toy-4l", seed=0))
    runner = bench.PeerRunner(model, get_task("ioi").dataset(2, 0))
    spec = GraphSpec.from_model(model)
    names = {bench.peer_edge_name(e.src.name, e.dest.name) for e in runner.model.edges}
    assert runner.n_edges == len(names) == spec.n_real_edges == 479
    assert names == {spec.edge_name(s, d) for s, d in spec.real.nonzero().tolist()}


def test_agreement_and_tiling():
    ours = {f"e{i}": float(i) for i in range(60)}
    same = bench.agreement(ours, {k: 2 * v for k, v in ours.items()})
    assert same["pearson"] == pytest.approx(1.0) and same["top_overlap"] == 50 and same["n_shared"] == 60
    assert same["max_abs_diff_normalised"] == pytest.approx(0.0)
    flipped = bench.agreement(ours, {k: -v for k, v in ours.items()})
    assert flipped["pearson"] == pytest.approx(-1.0)

    from circuitkit.tasks import get_task

    ds = get_task("ioi").dataset(3, 0)
    t = bench.tiled(ds, 3)
    assert t.seq_len == 3 * ds.seq_len and bool((t.answer_pos == t.seq_len - 1).all())
    assert torch.equal(t.clean[:, : ds.seq_len], ds.clean)


def test_cli_parts_and_errors():
    args = build_parser().parse_args(["bench", "--parts", "attribution,scaling", "--quick"])
    cfg = bench.config_from_args(args)
    assert cfg["parts"] == ["attribution", "scaling"] and cfg["repeats"] == 1 and not cfg["memory"]
    with pytest.raises(CircuitkitError, match="unknown part"):
        bench.config_from_args(build_parser().parse_args(["bench", "--parts", "nope"]))
    with pytest.raises(CircuitkitError, match="--layers must be positive integers"):
        bench.config_from_args(build_parser().parse_args(["bench", "--layers", "0,2"]))
    # the settings go through the check every config shares: types and ranges, field by field
    with pytest.raises(CircuitkitError, match="warmup must be >= 0, got -1"):
        bench.config_from_args(build_parser().parse_args(["bench", "--warmup", "-1"]))
    with pytest.raises(CircuitkitError, match="repeats must be positive, got 0"):
        bench.config_from_args(build_parser().parse_args(["bench", "--repeats", "0"]))
    args = build_parser().parse_args(["bench"])
    args.memory = "no"  # a value no flag gives, as a caller of the API might
    with pytest.raises(CircuitkitError, match="memory must be"):
        bench.config_from_args(args)


def test_run_bench_output_structure(tmp_path):
    cfg = dict(parts=list(bench.PARTS), model="random:toy-2l", task="ioi", batch=2, ig_steps=2, repeats=1,
               warmup=0, patching_repeats=1, threads=1, memory=False, seq_mults=[1, 2], layers=[1, 2],
               scaling_arch="toy-2l", sparsity_batch=2, sparsity_steps=1, quick=True,
               scaling_with=[str(BENCHMARKS / "gate-blocks.json")])
    res = bench.run_bench(cfg, figure=tmp_path / "fig" / "scaling")
    parts = res["parts"]
    assert set(parts) == set(bench.PARTS)
    a = parts["attribution"]
    assert {"forward_nograd", "fwd_bwd_inputs", "fwd_bwd_params", "eap", "eap-ig"} <= set(a["times"])
    assert set(a["ratios"]) == {"eap_vs_floor", "eap_vs_floor_params", "eap_ig_per_step_vs_floor", "eap_ig_vs_floor"}
    assert all(v > 0 for v in a["ratios"].values())
    assert a["flops"]["eap_vs_floor"] == pytest.approx(a["flops"]["eap"] / a["flops"]["floor"], abs=1e-3)
    assert a["flops"]["eap_ig_vs_floor"] > 0

    p = parts["peer"]
    n_edges = GraphSpec(n_layers=2, n_heads=4).n_real_edges
    assert p["n_edges_ours"] == n_edges
    # the independent reference computes the same quantity
    assert p["reference"]["n_shared"] == n_edges and p["reference"]["pearson"] > 0.999
    if p["available"]:
        assert p["n_edges_peer"] == n_edges and p["agreement"]["n_shared"] == n_edges
        assert p["agreement"]["pearson"] > 0.999 and p["time_ratio"] > 0
    else:
        assert p["reason"]

    pa = parts["patching"]
    assert pa["n_edges"] == n_edges and pa["per_edge_ms"] > 0
    s = parts["sparsity"]
    assert set(s["results"]) == {"plain", "attn", "attn+mlp"}

    sc = parts["scaling"]
    assert [(r["n_layers"], r["seq_mult"]) for r in sc["rows"]] == [(2, 1), (2, 2), (1, 1)]
    assert {"floor_ms", "eap_ms", "eap_ig_ms", "plain_step_ms", "gated_step_ms"} <= set(sc["rows"][0])
    assert set(sc["slopes"]) == {"seq_len", "n_layers"}
    assert [(p["series"], p["seq_len"]) for p in sc["shape_points"]] == [("gated_vs_plain", 1024),
                                                                         ("gated_vs_plain", 256)]
    assert all((tmp_path / "fig" / f"scaling.{ext}").stat().st_size > 0 for ext in ("png", "svg"))

    jpath, mpath = bench.write_results(res, tmp_path / "out", "b", command="circuitkit bench --quick")
    loaded = json.loads(jpath.read_text())
    assert loaded["format"] == "circuitkit.bench" and loaded["command"] == "circuitkit bench --quick"
    md = mpath.read_text()
    for heading in ("Attribution cost vs floor", "Work (floating-point operations", "auto-circuit", "Exact patching", "Sparse post-training step",
                    "Scaling", "Drawn into the figure's ratio panels"):
        assert heading in md


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_committed_results_at_other_shapes_land_on_the_scaling_figures_ratio_panels():
    from circuitkit.bench.scaling import ratio_panels, shape_points

    toy = json.loads((BENCHMARKS / "bench.json").read_text())["parts"]["scaling"]
    gpt2 = json.loads((BENCHMARKS / "gpt2-small-shape.json").read_text())
    gate = json.loads((BENCHMARKS / "gate-blocks.json").read_text())
    pts = shape_points(BENCHMARKS / "gpt2-small-shape.json") + shape_points(BENCHMARKS / "gate-blocks.json")
    panels = ratio_panels(toy, pts)
    shapes = {axis: [s for s in series if s["kind"] == "shape"] for axis, series in panels.items()}
    # the attribution run has the depth sweep's length (15 tokens): it goes on the depth panel at its
    # layer count, with the ratios the bench stored when it measured them (to their 3 decimals)
    eap, ig = shapes["n_layers"]
    assert (eap["series"], ig["series"]) == ("eap_vs_floor", "eap_ig_vs_floor")
    assert eap["x"] == ig["x"] == [gpt2["model"]["n_layers"]] == [12]
    assert eap["y"][0] == pytest.approx(gpt2["parts"]["attribution"]["ratios"]["eap_vs_floor"], abs=6e-4)
    assert ig["y"][0] == pytest.approx(gpt2["parts"]["attribution"]["ratios"]["eap_ig_vs_floor"], abs=6e-4)
    # the gated-step rows (256 and 1,024 tokens) go on the sequence panel, in order of length, the gate as
    # shipped (not the "before" variant) over the plain step
    (steps,) = shapes["seq_len"]
    by_len = {r["seq_len"]: r["results"][GATED_NOW]["ratio_vs_plain"] for r in gate["rows"]}
    assert steps["series"] == "gated_vs_plain" and steps["x"] == sorted(by_len) == [256, 1024]
    assert steps["y"] == pytest.approx([by_len[n] for n in steps["x"]], abs=6e-4)
    assert "2 layers, batch 1" in steps["label"] and "d_model 768" in steps["label"]
    # the sweep's own lines are unchanged
    sweep = {s["series"]: s for s in panels["seq_len"] if s["kind"] == "sweep"}
    assert sweep["gated_vs_plain"]["y"] == [r["gated_vs_plain"] for r in toy["rows"] if r["n_layers"] == 4]


def test_scaling_figure_inputs_that_are_wrong_are_clear_errors(tmp_path):
    from circuitkit.bench.scaling import shape_points

    bad = tmp_path / "sparsity-only.json"
    bad.write_text(json.dumps({"format": "circuitkit.bench", "parts": {"sparsity": {}}, "model": {}}))
    with pytest.raises(CircuitkitError, match="no parts/attribution in it"):
        shape_points(bad)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(CircuitkitError, match="expected a JSON object"):
        shape_points(tmp_path / "list.json")
    with pytest.raises(CircuitkitError, match="no scaling part"):
        bench.replot_scaling(BENCHMARKS / "gpt2-small-shape.json", tmp_path / "fig")


def test_cli_replot_draws_the_figure_without_measuring(tmp_path, monkeypatch):
    from circuitkit.cli import main
    from circuitkit.commands import bench as bench_command

    monkeypatch.setattr(bench_command, "run_bench", lambda *a, **k: pytest.fail("--replot measured"))
    stem = tmp_path / "fig" / "scaling"
    assert main(["bench", "--replot", str(BENCHMARKS / "bench.json"), "--figure", str(stem),
                 "--scaling-with", f"{BENCHMARKS / 'gpt2-small-shape.json'},{BENCHMARKS / 'gate-blocks.json'}"]) == 0
    assert all(stem.with_suffix(f".{ext}").stat().st_size > 0 for ext in ("png", "svg"))


def test_the_gated_step_benchmark_runs_the_training_loops_step(monkeypatch):
    from circuitkit.bench import steps
    from circuitkit.models import build_model, toy_config
    from circuitkit.sparsity import GateConfig, GateMode, attach
    from circuitkit.sparsity import finetune as ft

    assert steps.sparse_step is ft.sparse_step  # not a copy of the Lagrangian
    calls = []

    def counted(*args, **kw):
        calls.append(kw["step"])
        return ft.sparse_step(*args, **kw)

    monkeypatch.setattr(steps, "sparse_step", counted)
    model = build_model(toy_config("toy-2l", seed=0))
    model.train()
    attach(model, GateConfig(attn=True, mlp=True), GateMode.TRAIN).collect = True
    before = [p.detach().clone() for p in model.parameters()]
    tokens, mask = steps.make_batch(model, 4, 0)
    times = steps.time_steps(model, tokens, mask, n=2, gated=True, warmup=1)
    assert len(times) == 2 and calls == [0, 1, 2]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    plain = build_model(toy_config("toy-2l", seed=0))
    plain.train()
    steps.time_steps(plain, tokens, mask, n=1, gated=False, warmup=0)
    assert calls == [0, 1, 2]  # the plain step does not go through the gated one


def test_flop_counts_match_the_architecture_and_eaps_work_written_out():
    """The bench's work counts: the no-grad forward's matrix products written out by hand from the
    shape, the backward to the inputs as one product per linear map and two per attention product;
    and eap's exactly: its two forwards and its backward with the last block's MLP and the unembedding
    at the scored positions only, the per-head pull-backs made once (in place of TransformerLens's
    q/k/v input products, not beside them), one W_O projection of the heads' differences, one
    contraction per receiver column over the senders before it (2 × tokens × d_model a real edge),
    and the small q/k/v weight terms. Catches a pull-back made twice, a pass not cut, or a
    contraction over more senders than the graph's."""
    from circuitkit.bench.config import _dataset, build_shape
    from circuitkit.bench.timing import count_flops, floor_fns, method_fns

    model = build_shape("toy-2l").eval()
    c = model.cfg
    ds = _dataset(model, "ioi", 3)
    b, p = ds.clean.shape
    t = b * p  # tokens
    linear = c.n_layers * 2 * t * (c.d_model * 3 * c.n_heads * c.d_head + c.n_heads * c.d_head * c.d_model
                                   + 2 * c.d_model * c.d_mlp) + 2 * t * c.d_model * c.d_vocab
    attention = c.n_layers * 2 * (2 * b * c.n_heads * p * p * c.d_head)  # q·k and pattern·v
    fns = {**floor_fns(model, ds), **method_fns(model, ds, 2)}
    fl = count_flops({k: fns[k] for k in ("forward_nograd", "fwd_bwd_inputs", "eap")})
    assert fl["forward_nograd"] == linear + attention
    assert fl["fwd_bwd_inputs"] == (linear + attention) + linear + 2 * attention

    first = int(ds.answer_pos.min())
    assert first > 0
    unscored = b * first * (2 * 2 * c.d_model * c.d_mlp + 2 * c.d_model * c.d_vocab)  # last MLP + unembed, cut
    cut = linear - unscored
    w_o = c.n_layers * 2 * t * c.n_heads * c.d_head * c.d_model
    contraction = 2 * t * c.d_model * GraphSpec.from_model(model).n_real_edges
    weight_terms = c.n_layers * 6 * 2 * c.n_heads * c.d_model * c.d_head  # LN: b_ln @ W and w_ln @ W, q/k/v
    assert c.normalization_type == "LN"
    assert fl["eap"] == 2 * (cut + attention) + (cut + 2 * attention) + w_o + contraction + weight_terms


def test_named_shapes_are_judged_by_their_own_targets():
    """GPT-2-small shape is judged by issue 15's targets (eap ≤ 1.3×, eap-ig ≤ 1.2× their floors),
    toy models by the project's (1.5×); the report prints the targets its run was judged by. Catches
    a report that prints the toy target beside a run judged by another."""
    from circuitkit.bench.config import TARGETS, targets_for
    from circuitkit.bench.report import to_markdown

    shape = targets_for("random:gpt2-small-shape")
    assert (shape["eap_vs_floor"], shape["eap_ig_vs_floor"], shape["memory_vs_floor"]) == (1.3, 1.2, 1.5)
    assert targets_for("toy-multitask") == TARGETS and targets_for("random:toy-2l") == TARGETS
    res = json.loads((BENCHMARKS / "gpt2-small-shape.json").read_text())
    a = res["parts"]["attribution"]
    assert a["targets"]["eap_vs_floor"] == 1.3
    assert a["meets_target"]["eap_vs_floor"] == (a["ratios"]["eap_vs_floor"] <= 1.3)
    rows = {line.split(" | ")[0]: line for line in to_markdown(res).splitlines() if line.startswith("| eap")}
    assert "| ≤ 1.3×" in rows["| eap"] and "| ≤ 1.2×" in rows["| eap-ig, 5 steps"]
    assert not any("≤ 1.5×" in row for row in rows.values())
