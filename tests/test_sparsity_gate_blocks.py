"""The training-mode gate computed block by block (circuitkit/sparsity/gates.py, issue 15) gives the
same bits as the whole-tensor computation it replaced: the gradient, the hard-density statistic, and
so whole gated training steps."""

from __future__ import annotations

import pytest
import torch

import circuitkit.sparsity.gates as gates_mod
from circuitkit.bench import steps
from circuitkit.bench.gate_reference import WholeTensorConcreteST, whole_tensor_noise
from circuitkit.models import build_model, toy_config
from circuitkit.sparsity import GateConfig, GateMode, attach
from circuitkit.sparsity.gates import _sign_sum_per_head, gate, uniform_noise


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


def test_gated_training_steps_are_unchanged(monkeypatch):
    """Three gated steps (attention and MLP gates, training mode) from the same start, with the
    blocked gate and with the whole-tensor one: the same weights, bit for bit."""
    arch = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=80)
    monkeypatch.setattr(gates_mod, "BLOCK", 256)  # several blocks per gate at this size

    calls = []

    class Counted(WholeTensorConcreteST):
        @staticmethod
        def forward(ctx, *args):
            calls.append(1)
            return WholeTensorConcreteST.forward(ctx, *args)

    def run(concrete):
        with monkeypatch.context() as mp:
            mp.setattr(gates_mod, "_ConcreteST", concrete)
            if concrete is Counted:
                mp.setattr(gates_mod, "_sign_sum_per_head", lambda z: torch.sign(z).sum((0, 2, 3)))
            m = build_model(toy_config(arch, seed=0))
            m.train()
            attach(m, GateConfig(attn=True, mlp=True), GateMode.TRAIN).collect = True
            tokens, mask = steps.make_batch(m, 3, 80)
            run_step = steps.step_runner(m, tokens, mask, gated=True)
            for i in range(3):
                run_step(i)
            return [p.detach().clone() for p in m.parameters()], dict(m.circuitkit_gates.stats["attn_hard"])

    before, hard0 = run(Counted)
    assert len(calls) == 3 * 2 * 2  # steps x layers x (attention, MLP): the reference really ran
    after, hard1 = run(gates_mod._ConcreteST)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(torch.equal(hard0[k], hard1[k]) for k in hard0) and hard0


@pytest.mark.parametrize("block", [None, 128])
@pytest.mark.parametrize("shape", [(1,), (3, 5, 7, 7), (2, 3, 301, 301)])
def test_blocked_noise_is_the_same_draw(monkeypatch, block, shape):
    if block is not None:
        monkeypatch.setattr(gates_mod, "BLOCK", block)
    a = uniform_noise(shape, torch.Generator().manual_seed(7))
    b = whole_tensor_noise(shape, torch.Generator().manual_seed(7))
    assert a.shape == b.shape and torch.equal(a, b)
