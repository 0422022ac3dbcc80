"""Gates (evaluation rule, straight-through estimator, sparsity terms), GECO, storage, measurement."""

import math

import pytest
import torch

from circuitkit import CircuitkitError
from circuitkit.models import build_model, save_model, toy_config
from circuitkit.sparsity import load_model
from circuitkit.sparsity import (GateConfig, GateMode, attach, attach_from_file, detach, gate_mode, get_gates,
                                 measure_sparsity, save_sparse_model)
from circuitkit.sparsity.gates import gate, uniform_noise
from circuitkit.sparsity.objective import Geco, GecoState, sparsity_objective
from circuitkit.tasks import get_task


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokens():
    return get_task("addition").dataset(6, seed=1).clean  # [6, 12]


def small_model(seed=0):
    m = build_model(toy_config("toy-2l", seed=seed))
    m.eval()
    return m


def manual_scores(cache, layer):
    q, k = cache[f"blocks.{layer}.attn.hook_q"], cache[f"blocks.{layer}.attn.hook_k"]  # [b, pos, head, d]
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    t = s.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    return s.masked_fill(~causal, float("-inf"))


@pytest.mark.parametrize("bias", [0.0, 0.5])
def test_eval_gating_matches_hand_computation(tokens, bias):
    model = small_model()
    attach(model, GateConfig(bias_gate=bias))
    assert get_gates(model).mode is GateMode.EVAL  # the default after attaching
    _, cache = model.run_with_cache(tokens)
    n_off = 0
    for l in range(model.cfg.n_layers):
        s = manual_scores(cache, l)
        keep = (s + bias > 0).float()
        n_off += int((keep == 0).sum()) - int(torch.isinf(s).sum())
        expected = s.softmax(-1) * keep  # no renormalisation
        assert torch.allclose(cache[f"blocks.{l}.attn.hook_pattern"], expected, atol=1e-6)
        v = cache[f"blocks.{l}.attn.hook_v"]  # [b, pos, head, d]
        z = torch.einsum("bhqk,bkhd->bqhd", expected, v)
        assert torch.allclose(cache[f"blocks.{l}.attn.hook_z"], z, atol=1e-5)
    assert n_off > 0  # the test actually gates something
    sums = cache["blocks.0.attn.hook_pattern"].sum(-1)
    assert (sums < 1 - 1e-4).any()  # kept weights are not renormalised


def test_mlp_eval_gating(tokens):
    model = small_model()
    attach(model, GateConfig(attn=False, mlp=True, bias_gate_mlp=0.1))
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: "mlp" in n)
    pre = cache["blocks.0.mlp.hook_pre"]
    expected = torch.nn.functional.gelu(pre, approximate="none") * (pre + 0.1 > 0).float()
    assert torch.allclose(cache["blocks.0.mlp.hook_post"], expected, atol=1e-5)


def test_straight_through_forward_binary_and_gradient_is_sigmoid_path():
    g0 = torch.Generator().manual_seed(0)
    z = (torch.randn(4, 3, 5, 5, generator=g0) * 2).requires_grad_(True)
    u = uniform_noise((4, 3, 5, 5), torch.Generator().manual_seed(1))
    assert 0 < float(u.min()) and float(u.max()) < 1
    w = torch.randn(4, 3, 5, 5, generator=g0)
    m, soft = gate(z, GateMode.TRAIN, u=u)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    g = torch.sigmoid(z + torch.log(u) - torch.log1p(-u))
    assert torch.equal(m, (g > 0.5).float())
    (grad_m,) = torch.autograd.grad((m * w).sum(), z, retain_graph=True)
    (grad_g,) = torch.autograd.grad((g * w).sum(), z)
    assert torch.allclose(grad_m, grad_g, atol=1e-6, rtol=1e-4)
    # the soft density (here the mean of sigmoid(z)) and its gradient
    sig = torch.sigmoid(z)
    assert soft.item() == pytest.approx(sig.mean().item(), rel=1e-6)
    (grad_s,) = torch.autograd.grad(soft, z, retain_graph=True)
    assert torch.allclose(grad_s, sig * (1 - sig) / z.numel(), atol=1e-9)
    # both paths at once, per head (attention layout [batch, head, q, k])
    m2, soft_h = gate(z, GateMode.TRAIN, u=u, kind="attn", scale=0.1)
    assert torch.allclose(soft_h, sig.sum((0, 2, 3)) * 0.1, rtol=1e-5)
    hw = torch.randn(3, generator=g0)
    (both,) = torch.autograd.grad((m2 * w).sum() + (soft_h * hw).sum(), z)
    expected = grad_g + sig * (1 - sig) * 0.1 * hw.view(1, 3, 1, 1)
    assert torch.allclose(both, expected, atol=1e-6, rtol=1e-4)
    # deterministic straight-through: forward 1[z>0], gradient sigmoid'(z)
    mh, _ = gate(z, GateMode.HARD_ST)
    assert torch.equal(mh, (z > 0).float())
    (gh,) = torch.autograd.grad((mh * w).sum(), z)
    assert torch.allclose(gh, w * torch.sigmoid(z) * (1 - torch.sigmoid(z)), atol=1e-6)
    # evaluation: constant
    me, _ = gate(z, GateMode.EVAL)
    assert torch.equal(me, (z > 0).float()) and not me.requires_grad


def test_train_mode_samples_follow_sigmoid_probability():
    z = torch.tensor([-2.0, 0.0, 1.0]).expand(20000, 3)
    m, _ = gate(z, GateMode.TRAIN, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(m.mean(0), torch.sigmoid(torch.tensor([-2.0, 0.0, 1.0])), atol=0.015)


def test_sparsity_term_hand_example():
    model = small_model()
    gates = attach(model, GateConfig(attn=True, mlp=True, bias_gate=1.0, bias_gate_mlp=0.5))
    gates.collect = True
    inf = float("-inf")
    # one batch row, one head, T = 2: edges (0,0), (1,0), (1,1)
    scores = torch.tensor([[[[0.0, inf], [-1.0, 2.0]]]])
    gates._attn_scores_hook(scores, None, layer=0)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = (sig(1.0) + sig(0.0) + sig(3.0)) / 3
    assert gates.stats["attn_soft"][0].item() == pytest.approx(expected, rel=1e-6)
    assert gates.stats["attn_hard"][0].item() == pytest.approx(2 / 3)
    pre = torch.tensor([[[-1.0, 0.0, 2.0, -0.25]]])
    gates._mlp_pre_hook(pre, None, layer=0)
    assert gates.stats["mlp_soft"][0].item() == pytest.approx(
        (sig(-0.5) + sig(0.5) + sig(2.5) + sig(0.25)) / 4, rel=1e-6)
    assert gates.stats["mlp_hard"][0].item() == pytest.approx(3 / 4)
    gates.clear_stats()


def test_sparsity_term_on_a_model_equals_expected_fraction(tokens):
    model = small_model()
    b = 0.7
    gates = attach(model, GateConfig(attn=True, mlp=True, bias_gate=b, bias_gate_mlp=b), GateMode.TRAIN)
    gates.collect = True
    _, cache = model.run_with_cache(tokens)
    t = tokens.shape[1]
    per_layer = []
    for l in range(model.cfg.n_layers):
        s = cache[f"blocks.{l}.attn.hook_attn_scores"]  # masked: -inf above the diagonal
        per_layer.append((torch.sigmoid(s + b).sum((-2, -1)) / (t * (t + 1) / 2)).mean())
    sp = gates.sparsity()
    assert sp["attn"].item() == pytest.approx(torch.stack(per_layer).mean().item(), rel=1e-5)
    mlp = torch.stack([torch.sigmoid(cache[f"blocks.{l}.mlp.hook_pre"] + b).mean() for l in range(2)]).mean()
    assert sp["mlp"].item() == pytest.approx(mlp.item(), rel=1e-5)
    total = sparsity_objective(sp["attn"], sp["mlp"], w_attn=2.0, w_mlp=0.5)
    assert total.item() == pytest.approx(2 * sp["attn"].item() + 0.5 * sp["mlp"].item(), rel=1e-6)
    assert sp["attn"].requires_grad


def test_layer_weights_weigh_each_layers_density_and_its_gradient(tokens):
    """S_attn with attn_layer_weights = mean over (layer, head) of weight × density, computed here
    from the masked scores; a layer weighted 0 gets no gradient from the term (catches weights that
    are dropped, applied to the wrong layer, or applied after the mean)."""
    model = small_model()
    b = 0.7
    gates = attach(model, GateConfig(attn=True, bias_gate=b), GateMode.TRAIN)
    gates.collect = True
    _, cache = model.run_with_cache(tokens)
    t = tokens.shape[1]
    dens = torch.stack([torch.sigmoid(cache[f"blocks.{l}.attn.hook_attn_scores"] + b).sum((-2, -1)).mean(0)
                        / (t * (t + 1) / 2) for l in range(2)])  # [layers, heads]
    sp = gates.sparsity((3.0, 0.5))["attn"]
    assert sp.item() == pytest.approx((dens * torch.tensor([[3.0], [0.5]])).mean().item(), rel=1e-5)
    with pytest.raises(CircuitkitError, match="3 values but the model has 2 layers"):
        gates.sparsity((1.0, 1.0, 1.0))
    # the concave term: each head's density to the power p before the weights and the mean
    sp = gates.sparsity((3.0, 0.5), head_power=0.5)["attn"]
    assert sp.item() == pytest.approx((dens.sqrt() * torch.tensor([[3.0], [0.5]])).mean().item(), rel=1e-5)
    assert gates.sparsity(head_power=1.0)["attn"].item() == pytest.approx(dens.mean().item(), rel=1e-6)
    for w, layer1_moves in (((1.0, 0.0), False), ((0.0, 1.0), True)):
        model.zero_grad()
        gates.clear_stats()
        model(tokens)
        gates.sparsity(w)["attn"].backward()
        g1 = model.blocks[1].attn.W_Q.grad
        assert (g1 is not None and g1.abs().sum() > 0) == layer1_moves
        if not layer1_moves:  # layer 0's own weights still feel the penalty
            assert model.blocks[0].attn.W_Q.grad.abs().sum() > 0


def test_concave_head_term_favours_closing_the_sparser_head():
    """With p < 1 the term's gradient per unit of density is larger for a sparser head (p·d^(p−1)),
    so the optimiser closes heads that are nearly closed first; p = 1 prices every head alike, and a
    closed head (d = 0) still gives a finite gradient."""
    model = small_model()
    gates = attach(model, GateConfig(attn=True, bias_gate=0.0), GateMode.TRAIN)
    d = torch.tensor([[0.01, 0.5], [0.0, 0.2]], requires_grad=True)  # [layers, heads]
    gates.stats["attn_soft"] = {0: d[0], 1: d[1]}
    for p in (0.5, 1.0):
        d.grad = None
        gates.sparsity(head_power=p)["attn"].backward()
        g = d.grad
        assert torch.isfinite(g).all()
        if p == 1.0:
            assert torch.allclose(g, torch.full_like(g, 0.25))
        else:
            assert g[0, 0] > g[1, 1] > g[0, 1]  # sparser heads are pushed harder
            assert g[0, 0].item() == pytest.approx(0.25 * 0.5 * 0.01 ** -0.5, rel=1e-5)
    with pytest.raises(CircuitkitError, match=r"head_power must be in \(0, 1\]"):
        gates.sparsity(head_power=1.5)


def test_geco_lambda_rises_when_violated_and_falls_when_satisfied():
    geco = Geco(target=1.0, eta=0.1, ema_decay=0.0)
    s = GecoState()
    up = geco.update(s, 1.5)
    assert up.lam > s.lam and up.rho == pytest.approx(0.05)
    down = geco.update(s, 0.5)
    assert down.lam < s.lam
    clamped = Geco(target=1.0, eta=100.0, rho_max=2.0).update(s, 10.0)
    assert clamped.rho == 2.0
    ema = Geco(target=1.0, ema_decay=0.5).update(GecoState(ema=2.0), 1.0)
    assert ema.ema == pytest.approx(1.5)
    lag = geco.lagrangian(torch.tensor(0.2), torch.tensor(1.3), GecoState(rho=math.log(2.0)))
    assert lag.item() == pytest.approx(0.2 + 2.0 * 0.3)
    with pytest.raises(CircuitkitError):
        Geco(target=0.0)


def test_hooks_are_permanent_and_detach_cleanly(tokens):
    model = small_model()
    dense = model(tokens)
    attach(model, GateConfig(bias_gate=0.0, mlp=True))
    gated = model(tokens)
    assert not torch.allclose(dense, gated)
    model.reset_hooks()
    model.set_use_split_qkv_input(True)  # what circuit discovery switches on
    seen = []
    out = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_q_input", lambda x, hook: seen.append(1))])
    assert torch.allclose(out, gated, atol=1e-5) and seen
    model.set_use_split_qkv_input(False)
    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", lambda x, hook: None)]):
        assert torch.equal(model(tokens), gated)
    assert torch.equal(model(tokens), gated)
    with pytest.raises(CircuitkitError):
        attach(model, GateConfig())
    assert detach(model) == GateConfig(bias_gate=0.0, mlp=True)
    assert torch.equal(model(tokens), dense) and get_gates(model) is None


def test_gradients_flow_through_eval_gates(tokens):
    model = small_model()
    attach(model, GateConfig(bias_gate=0.0))
    x = (model.embed(tokens) + model.pos_embed(tokens)).detach().requires_grad_(True)
    logits = model(x, start_at_layer=0)
    logits[:, -1].logsumexp(-1).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_gate_mode_context(tokens):
    model = small_model()
    attach(model, GateConfig())
    with gate_mode(model, "train"):
        assert get_gates(model).mode is GateMode.TRAIN
    assert get_gates(model).mode is GateMode.EVAL
    with pytest.raises(CircuitkitError, match="unknown gate mode"):
        GateMode.parse("sometimes")
    with pytest.raises(CircuitkitError, match="at least one gate family"):
        GateConfig(attn=False, mlp=False)


def test_save_and_load_sparse_model(tmp_path, tokens):
    model = small_model(seed=3)
    attach(model, GateConfig(attn=True, mlp=True, bias_gate=0.2, bias_gate_mlp=0.1))
    with gate_mode(model, GateMode.TRAIN):
        pass
    expected = model(tokens)
    save_sparse_model(model, tmp_path / "sparse", {"note": "test"})
    assert (tmp_path / "sparse" / "sparsity.json").exists()
    loaded = load_model(tmp_path / "sparse")
    g = get_gates(loaded)
    assert g is not None and g.mode is GateMode.EVAL and g.config == get_gates(model).config
    assert torch.equal(loaded(tokens), expected)
    assert loaded.circuitkit_card["sparse"] is True and loaded.circuitkit_card["note"] == "test"
    bare = load_model(tmp_path / "sparse", gates=False)
    assert get_gates(bare) is None and not torch.allclose(bare(tokens), expected)
    # attach_from_file on a fresh copy of the weights gives the same model
    other = load_model(tmp_path / "sparse", gates=False)
    attach_from_file(other, tmp_path / "sparse" / "sparsity.json")
    assert torch.equal(other(tokens), expected)
    # the dense loader of circuitkit.models never hands back a sparse model without its gates
    from circuitkit import models

    with pytest.raises(CircuitkitError, match="sparse model.*circuitkit.sparsity.load_model"):
        models.load_model(tmp_path / "sparse")
    assert torch.equal(models.load_model(tmp_path / "sparse", gates=False)(tokens), bare(tokens))


def test_sparsity_file_errors(tmp_path):
    model = small_model()
    bad = tmp_path / "s.json"
    bad.write_text('{"gates": {"attn": true, "bias": 3}}')
    with pytest.raises(CircuitkitError, match="unknown gate settings"):
        attach_from_file(model, bad)
    with pytest.raises(CircuitkitError, match="no sparsity file"):
        attach_from_file(model, tmp_path / "missing.json")
    with pytest.raises(CircuitkitError, match="no gates attached"):
        save_sparse_model(model, tmp_path / "x")
    save_model(model, tmp_path / "dense")
    assert get_gates(load_model(tmp_path / "dense")) is None


def test_measure_counts_kept_edges(tokens):
    model = small_model()
    attach(model, GateConfig(bias_gate=0.0, mlp=True, bias_gate_mlp=0.0))
    rep = measure_sparsity(model, tokens, batch_size=4)  # two batches
    _, cache = model.run_with_cache(tokens)
    t = tokens.shape[1]
    kept = torch.stack([(manual_scores(cache, l) > 0).float().sum((-2, -1)).mean(0) for l in range(2)])
    kept = kept / (t * (t + 1) / 2)  # [layer, head]
    assert torch.allclose(torch.tensor(rep.kept_edges_head, dtype=torch.float64), kept.double(), atol=1e-6)
    assert rep.kept_edges == pytest.approx(kept.mean().item(), abs=1e-6)
    pre = torch.stack([cache[f"blocks.{l}.mlp.hook_pre"] for l in range(2)])
    assert rep.mlp_active == pytest.approx((pre > 0).float().mean().item(), abs=1e-6)
    assert 0 < rep.kept_edges < 1 and rep.n_sequences == 6
    assert get_gates(model).mode is GateMode.EVAL and not get_gates(model).collect
    dense = measure_sparsity(small_model(), get_task("addition").dataset(4, seed=0))
    assert dense.dense and dense.kept_edges == 1.0
