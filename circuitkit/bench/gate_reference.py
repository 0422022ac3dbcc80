"""The training-mode gate as it was before it was computed block by block (issue 15).

Why: two readers need the old, whole-tensor computation — ``scripts/bench_gate_blocks.py``
times it against the shipped gate side by side, and ``tests/test_sparsity_gate_blocks.py`` checks
that the shipped, blocked gate gives the same bits. Every intermediate here is a full-size
[batch, head, q, k] tensor (the noise's integers, the straight-through backward, the hard-density
sign), exactly as :mod:`circuitkit.sparsity.gates` computed them before.
"""

from __future__ import annotations

import contextlib

import torch

import circuitkit.sparsity.gates as gates_mod


class WholeTensorConcreteST(torch.autograd.Function):
    """The training-mode gate before blocking: every intermediate a full-size tensor."""

    @staticmethod
    def forward(ctx, z, u, kind, scale):
        s = torch.sigmoid(z)
        m = torch.floor(s + u)
        ctx.save_for_backward(s, u)
        ctx.kind, ctx.scale = kind, scale
        return m, (s.sum((0, 2, 3)) if kind == "attn" else s.sum()) * scale

    @staticmethod
    def backward(ctx, grad_m, grad_soft):
        s, u = ctx.saved_tensors
        out = None
        if grad_m is not None:
            a = s * u
            b = a - (s + u)
            b += 1
            den = a + b
            a *= b
            out = a.div_(den.square_()).mul_(grad_m)
        if grad_soft is not None:
            c = grad_soft * ctx.scale
            c = c.view(1, -1, 1, 1) if ctx.kind == "attn" else c
            ds = s * (1 - s)
            out = ds.mul_(c) if out is None else out.addcmul_(ds, c.expand_as(ds) if c.dim() else c)
        return out, None, None, None


def whole_tensor_noise(shape, generator=None, device=None):
    """The gate noise before blocking: one full-size draw of 31-bit integers, then full-size passes."""
    n = 1
    for d in shape:
        n *= int(d)
    r = torch.empty((n + 1) // 2, dtype=torch.int32).random_(generator=generator)
    x = r.view(torch.int16)[:n].bitwise_and_(0x7FFF)
    return x.to(torch.float32).mul_(2.0 ** -15).add_(2.0 ** -16).view(shape)


@contextlib.contextmanager
def whole_tensor_gate():
    names = ("_ConcreteST", "_sign_sum_per_head", "uniform_noise")
    saved = [getattr(gates_mod, k) for k in names]
    gates_mod._ConcreteST = WholeTensorConcreteST
    gates_mod._sign_sum_per_head = lambda z: torch.sign(z).sum((0, 2, 3))
    gates_mod.uniform_noise = whole_tensor_noise
    try:
        yield
    finally:
        for k, v in zip(names, saved):
            setattr(gates_mod, k, v)
