"""The hot paths of attribution and the bench's model shapes (issue 15).

- eap / eap-ig keep their running scores on the model's device: no host transfer (``.cpu()``,
  ``.item()``, ``.tolist()``) per receiver, which on a GPU is one synchronisation each.
- ``circuitkit bench`` resolves the GPT-2-small shape and HookedTransformerConfig fields.
"""

from __future__ import annotations

import sys
from collections import Counter

import pytest
import torch

import circuitkit.circuits.attribution as attribution
from circuitkit import CircuitkitError
from circuitkit.bench.config import MODEL_SHAPES, _load, shape_fields
from circuitkit.circuits import attribute, attribute_nodes
from circuitkit.models import build_model, toy_config
from circuitkit.tasks import get_task


def _host_transfers_from_attribution(monkeypatch) -> Counter:
    """Count Tensor.cpu / .item / .tolist calls made from circuitkit/circuits/attribution.py."""
    calls: Counter = Counter()
    for name in ("cpu", "item", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, _original=original, **k):
            if sys._getframe(1).f_code.co_filename == attribution.__file__:
                calls[_name] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


@pytest.mark.parametrize("method,options", [("eap", {}), ("eap-ig", {"steps": 2})])
@pytest.mark.parametrize("level", ["edge", "node"])
def test_no_host_transfer_per_receiver(monkeypatch, method, options, level):
    """A model with twice the layers (twice the receivers) makes the same number of host transfers
    per batch: the scores are accumulated where the model is, and moved once at the end."""
    ds = get_task("addition").dataset(6, seed=1)
    counts = []
    for n_layers in (1, 3):
        m = build_model(toy_config("toy-2l", seed=0, n_layers=n_layers))
        calls = _host_transfers_from_attribution(monkeypatch)
        fn = attribute if level == "edge" else attribute_nodes
        fn(m, ds, method, batch_size=3, **options)  # two batches
        monkeypatch.undo()
        counts.append(sum(calls.values()))
    assert counts[0] == counts[1], f"host transfers grow with the receivers: {counts}"
    assert counts[1] <= 8, f"more host transfers than one per pass and call: {counts[1]}"


def test_eap_scores_unchanged_by_batching_the_copies(monkeypatch):
    """eap-ig with every step in one pass (the in-place LayerNorm corrections loop over copies)
    equals eap-ig one step per pass (a single copy each), for LN, RMS and LNPre."""
    ds = get_task("addition").dataset(5, seed=3)
    for norm in ("LN", "RMS", "LNPre"):
        m = build_model(toy_config("toy-2l", seed=1, normalization_type=norm))
        together = attribute(m, ds, "eap-ig", steps=3).scores
        with monkeypatch.context() as mp:
            mp.setattr(attribution, "IG_COPY_BUDGET", 1)  # one copy per pass
            apart = attribute(m, ds, "eap-ig", steps=3).scores
        assert torch.allclose(together, apart, rtol=1e-4, atol=1e-6 * float(apart.abs().max())), norm


def test_gpt2_small_shape_and_config_fields():
    fields = shape_fields("gpt2-small-shape")
    assert (fields["n_layers"], fields["n_heads"], fields["d_model"], fields["d_mlp"]) == (12, 12, 768, 3072)
    assert fields["d_head"] * fields["n_heads"] == fields["d_model"]
    small = shape_fields('{"n_layers": 1, "d_model": 32, "n_heads": 2, "d_head": 16, "d_mlp": 64, "n_ctx": 40}')
    model, desc = _load("random:" + '{"n_layers": 1, "d_model": 32, "n_heads": 2, "d_head": 16, "d_mlp": 64, '
                        '"n_ctx": 40}')
    assert (model.cfg.n_layers, model.cfg.d_model, model.cfg.n_ctx) == (1, 32, 40) and small["n_ctx"] == 40
    assert "random weights" in desc
    assert set(MODEL_SHAPES) >= {"gpt2-small-shape"}


@pytest.mark.parametrize("spec,words", [("nope-shape", "unknown model shape"),
                                         ('{"n_layers": 1, "d_model": 30, "n_heads": 4}', "invalid model"),
                                         ('{"n_layers": 1,', "JSON")])
def test_bad_shapes_are_clear_errors(spec, words):
    with pytest.raises(CircuitkitError, match=words):
        shape_fields(spec)


def test_ig_steps_per_pass_takes_fewer_steps_for_a_larger_pass(monkeypatch):
    """The budget counts residual numbers over the blocks: a pass twice as large gets at most half
    the steps, never fewer than one nor more than asked; the GPT-2-small-shape bench batch (8 x 15
    tokens, 12 blocks of d_model 768) runs one step a pass, the toy bench's (64 x 15, 4 blocks of 64)
    all five in one. Catches a budget counting input numbers only (GPT-2 width would stack 5 copies:
    3.8x the floor's peak memory) or a constant not read at call time."""
    per = attribution.ig_steps_per_pass
    budget = attribution.IG_COPY_BUDGET
    assert per(5, 8 * 15 * 768 * 12) == 1
    assert per(5, 64 * 15 * 64 * 4) == 5
    small, large = budget // 4, budget // 2
    assert per(10, small) == 4 and per(10, large) == 2 and per(3, small) == 3
    assert per(5, 4 * budget) == 1
    monkeypatch.setattr(attribution, "IG_COPY_BUDGET", 3 * small)
    assert per(10, small) == 3


@pytest.mark.parametrize("ablation", ["patching", "mean", "zero"])
def test_input_for_batch_is_the_input_nodes_ablated_value(ablation):
    """The ablated input embedding eap-ig interpolates from, made without running the blocks, equals
    the input node's (sender 0) row of the full ablated values."""
    from circuitkit.circuits.graph import GraphSpec
    from circuitkit.circuits.interventions import Ablation

    m = build_model(toy_config("toy-2l", seed=2))
    ds = get_task("addition").dataset(6, seed=4)
    values = Ablation.parse(ablation).prepare(m, ds, 6, GraphSpec.from_model(m))
    full = values.for_batch(m, ds)  # [b or 1, pos, n_src, d_model]
    got = values.input_for_batch(m, ds)  # [b or 1, pos, d_model]
    assert got.shape == full[:, :, 0].shape
    assert torch.equal(got, full[:, :, 0])
    if ablation == "patching":  # the corrupted prompt's embedding, not the clean one's
        with torch.no_grad():
            assert not torch.allclose(got, m(ds.clean, stop_at_layer=0))


@pytest.mark.parametrize("ablation", ["patching", "mean"])
def test_eap_ig_one_step_per_pass_equals_batched_at_every_level(monkeypatch, ablation):
    """Gradients summed over passes and contracted once (edge, node and position level; a KL metric,
    whose reference logits come from the clean capture) give the scores of all steps in one pass.
    Catches a pass's sums dropped or counted twice, or a weight applied per pass instead of per copy."""
    import dataclasses

    from circuitkit.circuits.positions import attribute_positions
    from circuitkit.tasks import Metric

    m = build_model(toy_config("toy-2l", seed=5))
    base = get_task("addition").dataset(6, seed=6)
    for ds in (base, dataclasses.replace(base, metric=Metric.NEG_KL)):
        runs = {
            "edge": lambda: attribute(m, ds, "eap-ig", ablation=ablation, steps=3).scores,
            "node": lambda: attribute_nodes(m, ds, "eap-ig", ablation=ablation, steps=3),
            "position": lambda: attribute_positions(m, ds, "eap-ig", ablation=ablation, steps=3).scores,
        }
        for level, run in runs.items():
            together = run()
            with monkeypatch.context() as mp:
                mp.setattr(attribution, "IG_COPY_BUDGET", 1)  # one copy per pass
                apart = run()
            assert together.abs().max() > 0, level
            assert torch.allclose(together, apart, rtol=1e-4, atol=1e-6 * float(apart.abs().max())), (level, ds.metric)


@pytest.mark.parametrize("norm", ["LN", "LNPre", "RMS", "RMSPre"])
@pytest.mark.parametrize("method,options", [("eap", {}), ("eap-ig", {"steps": 2})])
def test_own_qkv_backward_equals_transformer_lens_and_runs(monkeypatch, norm, method, options):
    """Gradient passes whose q/k/v backward is circuitkit's (eap: the per-head pull-backs made inside
    it and scored there; eap-ig: their sum in one product, scored after the passes) give the scores of
    passes that leave the backward to TransformerLens and pull back afterwards, at edge and position
    level; and the own backward did run (not a silent fall-back). Catches a returned gradient missing
    ln1's weight or σ (every earlier receiver's score would move), or a weight applied twice."""
    from circuitkit.circuits.positions import attribute_positions

    m = build_model(toy_config("toy-2l", seed=6, normalization_type=norm))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # fresh models' norms are w = 1, b = 0: give ln1 its own weights to pull back through
        for name, p in m.named_parameters():
            if ".ln1." in name:
                weight = name.endswith(".w")
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5 if weight else torch.randn(p.shape, generator=gen))
    ds = get_task("addition").dataset(7, seed=8)
    runs = {"edge": lambda: attribute(m, ds, method, batch_size=4, **options).scores,
            "position": lambda: attribute_positions(m, ds, method, batch_size=4, **options).scores}
    calls = Counter()
    original = attribution._HeadInputsOf.backward

    def counted(ctx, grad):
        calls["backward"] += 1
        return original(ctx, grad)

    for level, run in runs.items():
        with monkeypatch.context() as mp:
            mp.setattr(attribution._HeadInputsOf, "backward", staticmethod(counted))
            own = run()
        with monkeypatch.context() as mp:
            mp.setattr(attribution, "OWN_QKV_BACKWARD", False)
            plain = run()
        assert own.abs().max() > 0, level
        assert torch.allclose(own, plain, rtol=1e-4, atol=1e-6 * float(plain.abs().max())), (level, norm)
    assert calls["backward"] == 2 * 2 * 2 * 3, calls  # levels x batches x blocks x q, k, v (eap-ig: one pass)


@pytest.mark.parametrize("steps", [None, 2])
def test_own_qkv_backward_with_a_block_whose_queries_and_keys_get_no_gradient(steps):
    """A detached attention pattern in block 1 leaves its q and k without a path to the metric: their
    own backward never runs for them, so their scores must be exactly 0 (not an unset buffer's
    contents), and every other score must match plain autograd (eap, and eap-ig with 2 steps)."""
    from tests.test_circuits_core import reference_eap

    m = build_model(toy_config("toy-2l", seed=2))
    m.blocks[1].attn.hook_pattern.add_hook(lambda act, hook: act.detach(), is_permanent=True)
    try:
        batch = get_task("addition").dataset(8, seed=5)
        method, options = ("eap", {}) if steps is None else ("eap-ig", {"steps": steps})
        got = attribute(m, batch, method, **options).scores
        expected = reference_eap(m, batch, steps)
    finally:
        m.reset_hooks(including_permanent=True)
    from circuitkit.circuits.graph import GraphSpec

    qk = [i for i, name in enumerate(GraphSpec.from_model(m).dst_names) if name.startswith("a1.") and name[-2] in "qk"]
    assert len(qk) == 8 and torch.equal(got[:, qk], torch.zeros_like(got[:, qk]))
    assert got.abs().max() > 0
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))


@pytest.mark.parametrize("method,options", [("eap", {}), ("eap-ig", {"steps": 2})])
def test_gradient_passes_skip_the_unscored_tail_with_the_same_scores(monkeypatch, method, options):
    """eap and eap-ig run the last block's MLP, the final norm and the unembedding only from the first
    scored position on (every pass but eap-ig's ablated values and KL's clean logits), and score exactly
    as full passes do, at edge, node and position level, for the task's metric and a KL metric. Catches an unpadded
    gradient after the cut (a shape error, or scores shifted by the cut), or a metric read at the
    cut logits' wrong positions."""
    import dataclasses

    from circuitkit.circuits.positions import attribute_positions
    from circuitkit.tasks import Metric

    m = build_model(toy_config("toy-2l", seed=3))
    base = get_task("addition").dataset(6, seed=2)
    first, last = int(base.answer_pos.min()), m.cfg.n_layers - 1
    assert first > 0
    seen: list[int] = []
    m.blocks[last].hook_mlp_out.add_hook(lambda act, hook: seen.append(act.shape[1]), is_permanent=True)
    try:
        for ds in (base, dataclasses.replace(base, metric=Metric.NEG_KL)):
            runs = {"edge": lambda: attribute(m, ds, method, **options).scores,
                    "node": lambda: attribute_nodes(m, ds, method, **options),
                    "position": lambda: attribute_positions(m, ds, method, **options).scores}
            for level, run in runs.items():
                seen.clear()
                cut = run()
                # full length only where eap-ig asks the ablation for its values, and captures KL's clean logits
                full_runs = 0 if method == "eap" else 1 + (ds.metric is Metric.NEG_KL)
                assert sorted(seen) == [ds.seq_len - first] * (len(seen) - full_runs) + [ds.seq_len] * full_runs, \
                    (level, seen)
                assert len(seen) > full_runs
                with monkeypatch.context() as mp:
                    mp.setattr(attribution, "_last_block_tail", lambda model, first: [])
                    full = run()
                assert cut.abs().max() > 0, level
                assert torch.allclose(cut, full, rtol=1e-5, atol=1e-7 * float(full.abs().max())), (level, ds.metric)
    finally:
        m.reset_hooks(including_permanent=True)


def test_write_tail_zeroes_the_positions_a_cut_run_did_not_compute():
    dst = torch.full((2, 3, 5, 4), float("nan"))
    act = torch.randn(2, 3, 2, 4)
    attribution._write_tail(dst, act)
    assert torch.equal(dst[..., :3, :], torch.zeros(2, 3, 3, 4)) and torch.equal(dst[..., 3:, :], act)
    attribution._write_tail(dst, act, subtract=True)
    assert torch.equal(dst[..., 3:, :], torch.zeros_like(act)) and not dst.isnan().any()
    full = torch.randn(2, 3, 5, 4)
    before = full.clone()
    attribution._write_tail(full, before, subtract=True)
    assert torch.equal(full, torch.zeros_like(full))
