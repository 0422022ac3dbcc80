"""The training-mode gate as it was before it was computed block by block, and before the attention
gate was fused with the pattern multiply (issue 15).

Why: two readers need the old computations — ``scripts/bench_gate_blocks.py`` times them against
the shipped gate side by side, and ``tests/test_sparsity_gate_blocks.py`` checks that the shipped
gate gives the same bits. :func:`whole_tensor_gate` is the gate as it first was: every intermediate a
full-size [batch, head, q, k] tensor (the noise's integers, the gate ``m``, the straight-through
backward, the hard-density sign) and the attention pattern multiplied by ``m`` as a separate autograd
multiply. :func:`unfused_gate` is the blocked gate without the fusion: ``z = scores + bias``, then
``pattern * m`` with ``m`` from :class:`circuitkit.sparsity.gates._ConcreteST` (:class:`ComposedAttnTrain`).
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


class ComposedAttnTrain:
    """The training-mode attention gate composed of separate steps: ``z = scores + bias`` and its
    hard-density signs (``gates._sign_sum_per_head``) at the scores hook, ``m`` from
    ``gates._ConcreteST`` and an autograd ``pattern * m`` at the pattern hook (both looked up when
    called, so :func:`whole_tensor_gate` makes them the whole-tensor ones), the noise a float tensor."""

    noise_levels = False

    @staticmethod
    def at_scores(scores, bias, u, scale, collect):
        z = scores + bias  # [batch, head, q, k]
        signs = None
        if collect:
            with torch.no_grad():
                signs = gates_mod._sign_sum_per_head(z)
        return gates_mod._TrainGate(z, u, scale), signs

    @staticmethod
    def at_pattern(pattern, g):
        m, soft = gates_mod._ConcreteST.apply(g.x, g.u, "attn", g.scale)
        return pattern * m.to(pattern.dtype), soft


@contextlib.contextmanager
def _swapped(**values):
    saved = {k: getattr(gates_mod, k) for k in values}
    for k, v in values.items():
        setattr(gates_mod, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(gates_mod, k, v)


def whole_tensor_gate():
    """Context: the gates computed as before blocking and fusion (see the module docstring)."""
    return _swapped(_ConcreteST=WholeTensorConcreteST, _sign_sum_per_head=lambda z: torch.sign(z).sum((0, 2, 3)),
                    uniform_noise=whole_tensor_noise, _ATTN_TRAIN=ComposedAttnTrain)


def unfused_gate():
    """Context: the blocked gate, composed: ``z = scores + bias``, ``m`` from the blocked ``_ConcreteST``,
    the attention pattern multiplied by ``m`` as a separate autograd multiply."""
    return _swapped(_ATTN_TRAIN=ComposedAttnTrain)
