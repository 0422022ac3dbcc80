"""The larger zoo architecture and the study across graph sizes (ratio against size, per-pair n).

Long training stays out of tests: the 6-layer, 8-head architecture is exercised on a few steps
of training and sparse post-training; the study on two tiny pairs of different depths.
"""

import json

import pandas as pd
import pytest
import torch

from circuitkit import CircuitkitError
from circuitkit.circuits.graph import GraphSpec
from circuitkit.models import TOY_CONFIGS, build_model, load_model, save_model, toy_config
from circuitkit.sparsity.finetune import SparsifyConfig, finetune
from circuitkit.tasks import EXTRA_TOY_TASKS, TOY_TASKS, get_task
from circuitkit.training import TrainConfig, train


def edges_by_counting(n_layers: int, n_heads: int) -> int:
    """Real edges counted receiver by receiver: a head's q, k and v read the input and every
    earlier block; an MLP reads those and its own layer's heads; the logits read everything."""
    total = 0
    for layer in range(n_layers):
        before = 1 + layer * (n_heads + 1)  # input + (heads + MLP) of each earlier layer
        total += 3 * n_heads * before + (before + n_heads)
    return total + 1 + n_layers * (n_heads + 1)


def test_6l8h_architecture_and_graph_size():
    fields = TOY_CONFIGS["toy-6l8h"]
    assert (fields["n_layers"], fields["n_heads"], fields["d_model"]) == (6, 8, 128)
    assert fields["n_heads"] * fields["d_head"] == fields["d_model"]
    spec = GraphSpec.from_config(toy_config("toy-6l8h"))
    assert spec.n_real_edges == edges_by_counting(6, 8) == 3628
    assert GraphSpec.from_config(toy_config("toy-4l")).n_real_edges == edges_by_counting(4, 4) == 479
    # every toy prompt fits the context
    for name in TOY_TASKS + EXTRA_TOY_TASKS:
        assert get_task(name).dataset(4, seed=0).clean.shape[1] <= fields["n_ctx"]


def test_6l8h_trains_and_sparsifies_a_few_steps(tmp_path):
    """On the eight toy tasks, as toy-multitask-6l-more: one CE constraint per task, prompts of lengths 5 to 20."""
    tasks = TOY_TASKS + EXTRA_TOY_TASKS
    cfg = TrainConfig.from_dict(dict(name="t6", out=str(tmp_path / "base"), run_dir=str(tmp_path / "run"),
                                     tasks={t: 1.0 for t in tasks}, arch="toy-6l8h", steps=3, batch_size=20,
                                     checkpoint_every=3, eval_every=3, eval_n=20, warmup=1))
    card = train(cfg, progress=False)
    model = load_model(tmp_path / "base")
    assert model.cfg.n_layers == 6 and model.cfg.n_heads == 8 and card["arch"] == "toy-6l8h"
    fresh = build_model(toy_config("toy-6l8h", seed=0))
    assert not torch.equal(model.W_Q, fresh.W_Q)  # the steps changed the weights
    scfg = SparsifyConfig.from_dict(dict(name="t6s", model=str(tmp_path / "base"), out=str(tmp_path / "sparse"),
                                         run_dir=str(tmp_path / "srun"), tasks={t: 1.0 for t in tasks},
                                         per_task_constraints=True, steps=2, batch_size=20, eval_n=10,
                                         target_n=10, measure_n=10, bias_gate=1.0))
    scard = finetune(scfg, progress=False)
    assert len(scard["kept_edges_layer"]) == 6 and len(scard["kept_edges_head"][0]) == 8
    assert set(scard["target_ce"]) == set(tasks) and set(card["tasks"]) == set(tasks)


def _pair(tmp_path, arch, tag):
    for role, seed in (("base", 1), ("sparse", 2)):
        save_model(build_model(toy_config(arch, seed=seed)), tmp_path / f"{tag}-{role}", {"name": f"{tag}-{role}"})
    return str(tmp_path / f"{tag}-base"), str(tmp_path / f"{tag}-sparse")


def test_run_reports_ratio_against_graph_size(tmp_path):
    from circuitkit.pipeline import RATIO_VS_SIZE_COLUMNS, RunConfig, run

    small = _pair(tmp_path, "toy-2l", "small")
    deeper = _pair(tmp_path, dict(n_layers=3, d_model=32, n_heads=2, d_head=16, d_mlp=64, n_ctx=32), "deep")
    cfg = RunConfig.from_dict({
        "out": str(tmp_path / "results"),
        "study": {"method": "eap", "n": 12, "batch_size": 64},
        "pairs": [{"base": small[0], "sparse": small[1], "tasks": ["addition"]},
                  {"base": deeper[0], "sparse": deeper[1], "tasks": ["addition", "ioi"], "n": 8}],
    })
    out = run(cfg, progress=False)
    table = pd.read_csv(out / "ratio_vs_size.csv")
    assert list(table.columns) == RATIO_VS_SIZE_COLUMNS
    assert list(table["graph_edges"]) == [edges_by_counting(2, 4)] + [edges_by_counting(3, 2)] * 2
    assert list(table["graph_heads"]) == [8, 6, 6]
    assert list(table["n_prompts"]) == [12, 8, 8]  # the pair's own n overrides the study's
    assert (table["edge_ratio"] - table["base_edges"] / table["sparse_edges"]).abs().max() < 1e-9
    assert (table["head_ratio"] - table["base_heads"] / table["sparse_heads"]).abs().max() < 1e-9
    full = pd.read_csv(out / "base_vs_sparse.csv")
    assert list(full["graph_edges"]) == list(table["graph_edges"])
    # the pair's n reached the analysis: m(N) in the summary is the full model's metric on 8 prompts
    summary = json.loads((out / "summaries" / "deep-base__ioi.json").read_text())
    assert summary["edges"] == int(table.loc[2, "base_edges"])
    ds8, ds12 = (get_task("ioi").dataset(n, seed=0) for n in (8, 12))
    m = load_model(deeper[0])
    with torch.no_grad():
        m8, m12 = (d.metric_values(m(d.clean)).mean().item() for d in (ds8, ds12))
    assert summary["m_full"] == pytest.approx(m8, rel=1e-5) and m8 != pytest.approx(m12, rel=1e-5)
    for ext in ("png", "svg"):
        assert (out / "figures" / f"ratio_vs_size.{ext}").stat().st_size > 0


@pytest.mark.parametrize("n", [0, -3, "200", 2.5, True])
def test_pair_n_must_be_a_positive_integer(n):
    from circuitkit.pipeline import RunConfig

    with pytest.raises(CircuitkitError, match=r"\[\[pairs\]\] #1: n must be (positive|an integer)"):
        RunConfig.from_dict({"pairs": [{"base": "a", "sparse": "b", "tasks": ["addition"], "n": n}]})
    with pytest.raises(CircuitkitError, match="unknown keys.*prompts"):
        RunConfig.from_dict({"pairs": [{"base": "a", "sparse": "b", "tasks": ["addition"], "prompts": 3}]})
