"""The training-mode gate computed block by block, and the attention gate fused with the pattern
multiply (circuitkit/sparsity/gates.py, issue 15), give the same bits as the whole-tensor, composed
computation they replaced: the gated pattern, both gradients, the hard-density statistic, and so whole
gated training steps."""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

import circuitkit.sparsity.gates as gates_mod
from circuitkit import CircuitkitError
from circuitkit.bench import steps
from circuitkit.bench.gate_reference import WholeTensorConcreteST, unfused_gate, whole_tensor_gate, whole_tensor_noise
from circuitkit.models import build_model, toy_config
from circuitkit.sparsity import GateConfig, GateMode, attach
from circuitkit.sparsity.gates import _sign_sum_per_head, uniform_noise


def _grads(fn, z, u, w, hw, kind, with_m=True, with_soft=True):
    z = z.clone().requires_grad_(True)
    m, soft = fn(z, u, kind, 0.01)
    loss = (m * w).sum() * with_m + ((soft * hw).sum() if kind == "attn" else soft * hw) * with_soft
    (g,) = torch.autograd.grad(loss, z)
    return m, soft, g


@pytest.mark.parametrize("block", [None, 128])  # None: the shipped block size (several blocks here)
@pytest.mark.parametrize("shape,kind", [((2, 4, 300, 300), "attn"), ((3, 5, 13, 13), "attn"), ((3, 7, 37), "mlp")])
def test_blocked_gate_equals_the_whole_tensor_gate_bit_for_bit(monkeypatch, block, shape, kind):
    if block is not None:
        monkeypatch.setattr(gates_mod, "BLOCK", block)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(shape, generator=g) * 3
    if kind == "attn":
        z = z.masked_fill(~torch.ones(shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    u = uniform_noise(shape, torch.Generator().manual_seed(1))
    w = torch.randn(shape, generator=g)
    hw = torch.randn(shape[1], generator=g) if kind == "attn" else torch.randn((), generator=g)
    for with_m, with_soft in ((True, True), (True, False), (False, True)):
        m0, s0, g0 = _grads(WholeTensorConcreteST.apply, z, u, w, hw, kind, with_m, with_soft)
        m1, s1, g1 = _grads(gates_mod._ConcreteST.apply, z, u, w, hw, kind, with_m, with_soft)
        assert torch.equal(m0, m1) and torch.equal(s0, s1)
        assert torch.equal(g0, g1), (with_m, with_soft, float((g0 - g1).abs().max()))
        assert float(g1.abs().sum()) > 0


@pytest.mark.parametrize("block", [None, 128])
def test_blocked_sign_sum_equals_the_whole_tensor_sum(monkeypatch, block):
    if block is not None:
        monkeypatch.setattr(gates_mod, "BLOCK", block)
    g = torch.Generator().manual_seed(2)
    for shape in ((2, 3, 11, 11), (1, 12, 64, 64), (4, 2, 1, 9)):
        z = torch.randn(shape, generator=g).round()  # exact zeros count 0, as sign does
        z = z.masked_fill(~torch.ones(shape[-2:], dtype=torch.bool).tril(diagonal=shape[-1] - shape[-2]),
                          float("-inf"))
        assert torch.equal(_sign_sum_per_head(z), torch.sign(z).sum((0, 2, 3)))


BIAS = 0.7


def _composed(concrete):
    def gated_pattern(pattern, scores, u, scale):  # as before the fusion: z, then m, then pattern * m
        m, soft = concrete.apply(scores + BIAS, u, "attn", scale)
        return pattern * m, soft
    return gated_pattern


def _fused(pattern, scores, u, scale):
    s, _ = gates_mod._GateSigmoid.apply(scores, BIAS, False)
    return gates_mod._GatedPattern.apply(pattern, s, u, scale)


def _pattern_grads(fn, pattern, scores, u, w, hw, with_out, with_soft):
    pattern, scores = pattern.clone().requires_grad_(True), scores.clone().requires_grad_(True)
    out, soft = fn(pattern, scores, u, 0.01)
    loss = ((out * w).sum() if with_out else 0) + ((soft * hw).sum() if with_soft else 0)
    gp, gs = torch.autograd.grad(loss, (pattern, scores), allow_unused=True)
    return out, soft, gp, gs


# 1088: a multiple of every vector width (as BLOCK must be) that divides no plane here
@pytest.mark.parametrize("block", [None, 128, 1088])
@pytest.mark.parametrize("shape", [(2, 4, 300, 300), (3, 5, 13, 13), (1, 12, 64, 64), (2, 3, 17, 40)])
def test_fused_gated_pattern_equals_pattern_times_the_gate_bit_for_bit(monkeypatch, block, shape):
    """The fused gate (_gate_sigmoid at the scores hook, _GatedPattern at the pattern hook) against
    ``z = scores + bias`` and ``pattern * m`` with m from the blocked _ConcreteST and from the
    whole-tensor reference: the gated pattern, the soft density, the gradients of pattern and scores,
    with the loss on both outputs, on the pattern only, and on the soft density only (then the pattern
    gets none), the noise as floats and as the int16 levels the shipped gate keeps; and the sigmoid and
    the hard-density signs against ``sigmoid(z)`` and ``sign(z).sum((0, 2, 3))``."""
    if block is not None:
        monkeypatch.setattr(gates_mod, "BLOCK", block)
    g = torch.Generator().manual_seed(0)
    tq, tk = shape[-2:]
    causal = torch.ones((tq, tk), dtype=torch.bool).tril(tk - tq)  # the queries are the last tq positions
    scores = (torch.randn(shape, generator=g) * 3).masked_fill(~causal, float("-inf"))
    scores[0, 0, -1, :3] = -BIAS  # z exactly 0: sign 0
    pattern = scores.softmax(-1)
    u = uniform_noise(shape, torch.Generator().manual_seed(1))
    levels = gates_mod.noise_levels(shape, torch.Generator().manual_seed(1))  # the same noise, as kept on CPU
    w, hw = torch.randn(shape, generator=g), torch.randn(shape[1], generator=g)
    s, signs = gates_mod._gate_sigmoid(scores, BIAS, signs=True)
    z = scores + BIAS
    assert torch.equal(s, torch.sigmoid(z)) and torch.equal(signs, torch.sign(z).sum((0, 2, 3)))
    for (with_out, with_soft), noise in itertools.product(((True, True), (True, False), (False, True)), (u, levels)):
        got = _pattern_grads(_fused, pattern, scores, noise, w, hw, with_out, with_soft)
        for concrete in (WholeTensorConcreteST, gates_mod._ConcreteST):
            want = _pattern_grads(_composed(concrete), pattern, scores, u, w, hw, with_out, with_soft)
            for name, a, b in zip(("pattern'", "soft", "grad pattern", "grad scores"), want, got):
                if a is None:
                    assert b is None, name
                else:
                    assert torch.equal(a, b), (name, with_out, with_soft, noise.dtype, float((a - b).abs().max()))
        out, _, gp, gs = got
        assert float(gs.abs().sum()) > 0 and (gp is None or float(gp.abs().sum()) > 0)
        assert 0 < float((out > 0).sum()) < float((pattern > 0).sum())  # some gates open, some closed


def test_gated_training_steps_are_unchanged(monkeypatch):
    """Three gated steps (attention and MLP gates, training mode) from the same start, with the
    shipped gate (blocked, the attention gate fused with the pattern), the blocked gate without the
    fusion, and the whole-tensor composed one: the same weights and statistics, bit for bit."""
    arch = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=80)
    monkeypatch.setattr(gates_mod, "BLOCK", 256)  # several blocks per gate at this size

    calls = {"whole": 0, "fused": 0}  # the reference's gate and the fused one: which ran

    class Counted(WholeTensorConcreteST):
        @staticmethod
        def forward(ctx, *args):
            calls["whole"] += 1
            return WholeTensorConcreteST.forward(ctx, *args)

    fused = gates_mod._GatedPattern

    class CountedFused(fused):
        @staticmethod
        def forward(ctx, *args):
            calls["fused"] += 1
            return fused.forward(ctx, *args)

    def run(variant):
        with variant(), monkeypatch.context() as mp:
            if variant is whole_tensor_gate:
                mp.setattr(gates_mod, "_ConcreteST", Counted)
            mp.setattr(gates_mod, "_GatedPattern", CountedFused)
            m = build_model(toy_config(arch, seed=0))
            m.train()
            gates = attach(m, GateConfig(attn=True, mlp=True), GateMode.TRAIN)
            gates.collect = True
            tokens, mask = steps.make_batch(m, 3, 80)
            run_step = steps.step_runner(m, tokens, mask, gated=True)
            for i in range(3):
                run_step(i)
            stats = {k: dict(gates.stats[k]) for k in ("attn_hard", "attn_soft", "mlp_hard", "mlp_soft")}
            return [p.detach().clone() for p in m.parameters()], stats

    before, st0 = run(whole_tensor_gate)
    assert calls == {"whole": 3 * 2 * 2, "fused": 0}  # steps x layers x (attention, MLP): the reference ran
    unfused, st1 = run(unfused_gate)
    assert calls["fused"] == 0
    after, st2 = run(contextlib.nullcontext)
    assert calls["fused"] == 3 * 2  # the shipped attention gate is the fused one
    for other, st in ((unfused, st1), (after, st2)):
        assert all(torch.equal(a, b) for a, b in zip(before, other))
        for k in st0:
            assert st0[k] and st0[k].keys() == st[k].keys()
            assert all(torch.equal(st0[k][l], st[k][l]) for l in st0[k]), k
    assert all(v.requires_grad for v in st2["attn_soft"].values())


def test_fused_gate_composes_with_temporary_pattern_hooks():
    """A temporary hook on hook_pattern (as circuit discovery adds) sees the gated pattern in
    training mode, and what it returns is what the layer uses: a run with a hook that records the
    pattern and doubles it, fused and unfused, the same output and gradients."""
    arch = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=40)

    def run(variant):
        with variant():
            m = build_model(toy_config(arch, seed=0))
            gates = attach(m, GateConfig(attn=True), GateMode.TRAIN)
            gates.noise_generator = torch.Generator().manual_seed(3)
            seen = []

            def hook(p, hook):
                seen.append(p.detach().clone())
                return p * 2

            tokens = torch.randint(m.cfg.d_vocab, (2, 40), generator=torch.Generator().manual_seed(4))
            out = m.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_pattern", hook)])
            out.square().mean().backward()
            return out.detach(), seen, [p.grad.clone() for p in m.parameters()]

    out0, seen0, g0 = run(unfused_gate)
    out1, seen1, g1 = run(contextlib.nullcontext)
    assert len(seen1) == 1 and torch.equal(seen0[0], seen1[0])
    causal = torch.ones(40, 40, dtype=torch.bool).tril()
    assert bool((seen1[0][..., ~causal] == 0).all()) and bool((seen1[0][..., causal] == 0).any())  # gated
    assert torch.equal(out0, out1) and all(torch.equal(a, b) for a, b in zip(g0, g1))


@pytest.mark.parametrize("block", [None, 128])
@pytest.mark.parametrize("shape", [(1,), (3, 5, 7, 7), (2, 3, 301, 301)])
def test_blocked_noise_is_the_same_draw(monkeypatch, block, shape):
    if block is not None:
        monkeypatch.setattr(gates_mod, "BLOCK", block)
    a = uniform_noise(shape, torch.Generator().manual_seed(7))
    b = whole_tensor_noise(shape, torch.Generator().manual_seed(7))
    assert a.shape == b.shape and torch.equal(a, b)
    x = gates_mod.noise_levels(shape, torch.Generator().manual_seed(7))  # what the fused gate keeps
    assert x.dtype == torch.int16 and x.shape == a.shape
    assert torch.equal(gates_mod._levels_to_uniform(x.reshape(-1), torch.empty(a.numel())).view(a.shape), a)


def test_fused_gate_backward_twice_is_a_clear_error():
    """The fused backward writes the gradient over its saved sigmoid: a second backward through the same
    graph must refuse, not compute from overwritten values."""
    shape = (1, 2, 5, 5)
    scores = torch.randn(shape, requires_grad=True)
    pattern = scores.softmax(-1)
    out, soft = _fused(pattern, scores, uniform_noise(shape), 0.01)
    loss = out.sum() + soft.sum()
    loss.backward(retain_graph=True)
    with pytest.raises(CircuitkitError, match="backward ran twice"):
        loss.backward()


def test_fused_gate_ignores_a_later_in_place_edit_of_the_scores():
    """A temporary hook that halves hook_attn_scores in place changes the softmax but not the gate,
    nor the path of the gate's gradient (to the scores as they reached the gate's hook): the fused
    gate gives the composed one's output and gradients, and the edit did change the output."""
    arch = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=40)

    def run(variant, edit=True):
        with variant():
            m = build_model(toy_config(arch, seed=0))
            gates = attach(m, GateConfig(attn=True), GateMode.TRAIN)
            gates.noise_generator = torch.Generator().manual_seed(3)
            gates.collect = True
            tokens = torch.randint(m.cfg.d_vocab, (2, 40), generator=torch.Generator().manual_seed(4))
            def halve(scores, hook):
                scores.mul_(0.5)  # in place, returns nothing

            hooks = [("blocks.0.attn.hook_attn_scores", halve)] if edit else []
            out = m.run_with_hooks(tokens, fwd_hooks=hooks)
            (out.square().mean() + gates.sparsity()["attn"]).backward()
            return out.detach(), [p.grad.clone() for p in m.parameters()]

    out0, g0 = run(unfused_gate)
    out1, g1 = run(contextlib.nullcontext)
    assert torch.equal(out0, out1) and all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert not torch.equal(out1, run(contextlib.nullcontext, edit=False)[0])
