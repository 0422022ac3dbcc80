"""Attention-edge and MLP-neuron gates, as TransformerLens permanent hooks (docs/method.md §1).

Attention edges. At ``blocks.{l}.attn.hook_attn_scores`` the hook reads the causally
masked, pre-softmax scores ``s`` [batch, head, query, key] and forms the gate logit
``z = s + bias_gate``; at ``blocks.{l}.attn.hook_pattern`` it returns
``pattern' = softmax(s) ⊙ m``, with **no renormalisation**, where

- ``GateMode.TRAIN`` (stochastic, straight-through binary concrete):
  ``u ~ U(0,1)``, ``g = sigmoid(z + log u − log(1−u))``, ``m = 1[g > 0.5] + g − g.detach()``;
- ``GateMode.EVAL`` (deterministic, the default): ``m = 1[z > 0]``, a constant, so
  gradients through a gated model are those of the evaluated function (what circuit
  discovery needs);
- ``GateMode.HARD_ST`` (deterministic straight-through, for a final finetuning phase):
  forward ``1[z > 0]`` exactly as in evaluation, gradient through ``sigmoid(z)``.

MLP neurons. Gate logit = ``hook_pre`` (the pre-activation) + ``bias_gate_mlp``; the same
estimator, applied multiplicatively at ``hook_post``.

Masked (non-causal) scores are ``-inf``, so their gates are 0 and they never count.

Sparsity terms, collected during a forward when ``Gates.collect`` is on: per layer the
soft density ``Σ_{j≤i} sigmoid(z_ij) / (T(T+1)/2)`` per head (mean over the batch, with
gradient), and the hard density ``Σ 1[z_ij > 0] / (T(T+1)/2)`` (no gradient); for MLPs the
mean ``sigmoid(pre + b)`` and mean ``1[pre + b > 0]`` over batch, positions and neurons.
:meth:`Gates.sparsity` returns ``S_attn`` (mean over layers and heads) and ``S_mlp``.

The hooks are added with ``is_permanent=True``: ``model.reset_hooks()``, ``model.hooks(...)``
and ``run_with_hooks`` (which circuit discovery uses for its own temporary hooks) leave them
in place; :func:`detach` removes them. Because permanent hooks are registered first, a
temporary hook on ``hook_pattern`` sees the gated pattern; a temporary hook that *edits*
``hook_attn_scores`` changes the softmax but not the gate, which was computed from the
scores as they reached the hook point (interventions upstream — q, k, hook_q_input — do
change the gate, as they should).
"""

from __future__ import annotations

import enum
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from functools import partial
from typing import Any, Iterator, Sequence

import torch
from transformer_lens import HookedTransformer

from circuitkit import CircuitkitError, parse_enum

ATTR = "circuitkit_gates"


class GateMode(enum.Enum):
    """How gates are formed: stochastic straight-through (training) or deterministic."""

    TRAIN = "train"  # stochastic binary concrete, straight-through gradient
    EVAL = "eval"  # deterministic 1[z > 0], no gradient through the gate
    HARD_ST = "hard_st"  # deterministic forward, straight-through sigmoid(z) gradient

    @classmethod
    def parse(cls, value: "GateMode | str") -> "GateMode":
        return parse_enum(cls, value, "gate mode")


@dataclass(frozen=True)
class GateConfig:
    """Which gate families are on and their bias (gate logit = activation + bias)."""

    attn: bool = True
    mlp: bool = False
    bias_gate: float = 3.0
    bias_gate_mlp: float = 3.0

    def __post_init__(self) -> None:
        if not (self.attn or self.mlp):
            raise CircuitkitError("GateConfig needs at least one gate family: attn=True and/or mlp=True")
        for k in ("bias_gate", "bias_gate_mlp"):
            v = getattr(self, k)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not torch.isfinite(torch.tensor(float(v))):
                raise CircuitkitError(f"GateConfig.{k} must be a finite number, got {v!r}")

    @property
    def families(self) -> list[str]:
        return [f for f in ("attn", "mlp") if getattr(self, f)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "gate config") -> "GateConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise CircuitkitError(f"{source}: unknown gate settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


def _edge_count(tq: int, tk: int) -> int:
    """Causal (query, key) pairs with key ≤ query when the queries are the last tq of tk positions."""
    off = tk - tq
    return tq * off + tq * (tq + 1) // 2


# Elements per block of the gate's elementwise passes: 1 MiB of float32 (a multiple of every CPU vector
# width, so each block runs the same vector code as one pass over the whole tensor would).
BLOCK = 1 << 18


def _blocks(n: int) -> Iterator[tuple[int, int]]:
    """Flat ``[lo, hi)`` ranges of at most :data:`BLOCK` elements covering ``range(n)``."""
    for lo in range(0, n, BLOCK):
        yield lo, min(lo + BLOCK, n)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1)


_BITS = 15
_SCALE = 2.0 ** -_BITS


def uniform_noise(shape: tuple[int, ...], generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """U(0, 1) samples on a grid of 2**15 levels, never exactly 0 or 1 (float32).

    On CPU two samples are cut from every random 31-bit integer, which is two to three
    times as fast as ``torch.rand``; the gate noise is the largest cost of a gated step.
    (The resolution only limits the logistic noise to |log u − log(1−u)| < 11.1, where a
    gate flips with probability below 1.5e-5.)
    """
    n = 1
    for d in shape:
        n *= int(d)
    if device is None:
        device = generator.device if generator is not None else "cpu"
    if torch.device(device).type != "cpu":  # GPU generators are fast: use them directly
        return torch.rand(shape, generator=generator, device=device).clamp_(_SCALE / 2, 1 - _SCALE / 2)
    u = torch.empty(n, dtype=torch.float32)
    for lo, hi, x in _level_blocks(n, generator):
        u[lo:hi].copy_(x).mul_(_SCALE).add_(_SCALE / 2)
    return u.view(shape)


def _level_blocks(n: int, generator: torch.Generator | None) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(lo, hi, x)`` covering ``range(n)``: ``x`` [hi - lo] int16 the 15-bit levels of those elements, two cut
    from every random 31-bit integer. Block by block (the integers of one block at a time, in one reused
    buffer): the same draws, in the same order, as one (n + 1) // 2 draw would be, without a full-size
    integer tensor. The one rule behind :func:`uniform_noise` and :func:`noise_levels`."""
    r = torch.empty(min(BLOCK, n + 1) // 2, dtype=torch.int32)
    for lo, hi in _blocks(n):
        ints = r[:(hi - lo + 1) // 2].random_(generator=generator)  # [0, 2**31)
        yield lo, hi, ints.view(torch.int16)[:hi - lo].bitwise_and_(0x7FFF)


def noise_levels(shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
    """The 15-bit levels ``x`` behind :func:`uniform_noise` on CPU (int16, same shape, the same draws):
    ``u = x·2**-15 + 2**-16`` exactly (:func:`_levels_to_uniform`), in half the memory of ``u``."""
    n = 1
    for d in shape:
        n *= int(d)
    x = torch.empty(n, dtype=torch.int16)
    for lo, hi, levels in _level_blocks(n, generator):
        x[lo:hi].copy_(levels)
    return x.view(shape)


def _levels_to_uniform(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = x·2**-15 + 2**-16`` for levels x [n] (int16) into out [n] (float32 or float64): each step
    exact, so the bits of :func:`uniform_noise`."""
    return torch.mul(x, _SCALE, out=out).add_(_SCALE / 2)


def _sign_sum_per_head(z: torch.Tensor) -> torch.Tensor:
    """``sign(z).sum((0, 2, 3))`` for z [batch, head, q, k] -> [head] (z's dtype), block by block in one
    small buffer instead of a full-size ``sign(z)``; the integer counts are summed exactly (float64), so
    the value equals the whole-tensor sum wherever that one is exact (every count below 2**24)."""
    b, h = z.shape[:2]
    zf = z.reshape(b, h, -1)  # [batch, head, q·k]
    n = zf.shape[-1]
    width = min(n, max(64, BLOCK // (b * h) // 64 * 64))
    buf = torch.empty((b, h, width), dtype=z.dtype, device=z.device)
    total = torch.zeros(h, dtype=torch.float64, device=z.device)
    for lo in range(0, n, width):
        hi = min(lo + width, n)
        total += torch.sign(zf[..., lo:hi], out=buf[..., :hi - lo]).sum((0, 2), dtype=torch.float64)
    return total.to(z.dtype)


def _soft_reduce(s: torch.Tensor, kind: str, scale: float) -> torch.Tensor:
    # attention: [batch, head, q, k] -> [head]; mlp: [..., d_mlp] -> scalar
    return (s.sum((0, 2, 3)) if kind == "attn" else s.sum()) * scale


class _ConcreteST(torch.autograd.Function):
    """Straight-through binary-concrete gate, fused with the soft density (MLP gates and :func:`gate`;
    training-mode attention gates go through :class:`_GatedPattern`, the same estimator).

    With ``s = sigmoid(z)`` and uniform ``u``: ``g = sigmoid(z + log u − log(1−u))
    = s·u / (s·u + (1−s)(1−u))``, and ``g > 0.5 ⇔ s + u > 1``, so the forward is
    ``m = floor(s + u)`` (s, u in (0, 1)); the backward uses ``dm/dz := dg/dz = g(1−g)
    = s·u·(1−s)(1−u) / (s·u + (1−s)(1−u))²``. The second output is the soft density
    ``scale · Σ s`` (per head for attention), with ``ds/dz = s(1−s)``.

    What a gated step costs on CPU is mostly memory: at T = 1,024 with 12 heads one
    [batch, head, q, k] float tensor is 48 MiB per batch row, and every fresh tensor of that size
    is new pages from the kernel (system time). So the backward makes its intermediates block by
    block (:data:`BLOCK`) in small reused buffers, with the same elementwise operations in the
    same order as whole-tensor ones (identical values): two full-size tensors are made (the
    gradient and ``s(1−s)``) instead of six.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, u: torch.Tensor, kind: str, scale: float):  # noqa: D401
        s = torch.sigmoid(z)
        m = torch.add(s, u).floor_()
        ctx.save_for_backward(s, u)  # s + u is recomputed in backward: one [batch, head, q, k] tensor less kept
        ctx.kind, ctx.scale = kind, scale
        return m, _soft_reduce(s, kind, scale)

    @staticmethod
    def backward(ctx, grad_m: torch.Tensor | None, grad_soft: torch.Tensor | None):
        s, u = ctx.saved_tensors
        n = s.numel()
        fs, fu = _flat(s), _flat(u)
        k = min(n, BLOCK)
        buf = torch.empty((4, k), dtype=s.dtype, device=s.device)  # block-sized scratch, reused
        out = None
        if grad_m is not None:
            out = torch.empty_like(s, memory_format=torch.contiguous_format)
            fo, fg = out.view(-1), _flat(grad_m)
            for lo, hi in _blocks(n):
                a, t, b, den = (x[:hi - lo] for x in buf)
                sb, ub = fs[lo:hi], fu[lo:hi]
                torch.mul(sb, ub, out=a)
                torch.add(sb, ub, out=t)
                torch.sub(a, t, out=b)
                b += 1  # (1 − s)(1 − u)
                torch.add(a, b, out=den)
                a *= b
                torch.div(a, den.square_(), out=fo[lo:hi]).mul_(fg[lo:hi])  # g(1 − g) · grad
        if grad_soft is not None:
            c = grad_soft * ctx.scale
            c = c.view(1, -1, 1, 1) if ctx.kind == "attn" else c
            ds = torch.empty_like(s, memory_format=torch.contiguous_format)
            fd = ds.view(-1)
            one = torch.ones((), dtype=s.dtype, device=s.device)
            for lo, hi in _blocks(n):
                one_minus = torch.sub(one, fs[lo:hi], out=buf[0, :hi - lo])
                torch.mul(fs[lo:hi], one_minus, out=fd[lo:hi])  # s(1 − s)
            out = ds.mul_(c) if out is None else out.addcmul_(ds, c.expand_as(ds) if c.dim() else c)
        return out, None, None, None


def _plane_blocks(planes: int, plane: int, block: int) -> Iterator[tuple[int, int, int, int]]:
    """Flat ``[lo, hi)`` ranges over ``planes`` contiguous planes of ``plane`` elements each, with the
    planes ``[p0, p1)`` they lie in: whole planes, at most ``block`` elements together, or, where one
    plane is larger than ``block``, pieces of one plane that start at multiples of ``block`` from the
    plane's start. So every range ends where a plane ends or ``block`` elements after it started: an
    elementwise kernel run over it does its vector code on the same elements (and its scalar tail on
    the same last ones) as one run over the plane-by-plane broadcast of the whole tensor."""
    if plane <= block:
        step = block // plane
        for p0 in range(0, planes, step):
            p1 = min(p0 + step, planes)
            yield p0 * plane, p1 * plane, p0, p1
    else:
        for p in range(planes):
            for lo in range(0, plane, block):
                yield p * plane + lo, p * plane + min(lo + block, plane), p, p + 1


def _gate_sigmoid(scores: torch.Tensor, bias: float,
                  signs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``s = sigmoid(scores + bias)`` [batch, head, q, k] block by block, without the full-size logits
    ``z = scores + bias``, and (``signs``) ``Σ sign(z)`` per head [head] (scores' dtype) from the same
    blocks — the values of ``torch.sigmoid(z)`` and :func:`_sign_sum_per_head` ``(z)`` (the blocks are
    :data:`BLOCK` long, a multiple of every vector width, so the vector and scalar code run on the same
    elements as in one pass; the sign counts are integers, summed exactly)."""
    b, h, tq, tk = scores.shape
    n, plane = scores.numel(), tq * tk
    fsc = _flat(scores)
    s = torch.empty(scores.shape, dtype=scores.dtype, device=scores.device)
    fs = s.view(-1)
    block = BLOCK if scores.device.type == "cpu" else max(n, 1)
    buf = torch.empty(min(n, block), dtype=scores.dtype, device=scores.device)  # z, one block at a time
    counts = torch.zeros(b * h, dtype=torch.float64, device=scores.device) if signs else None  # per plane
    # a block's counts are exact in float32 (at most 2**24 terms of ±1, 0): no float64 copy of the block
    acc = None if scores.dtype == torch.float32 and block <= 1 << 24 else torch.float64
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        z = torch.add(fsc[lo:hi], bias, out=buf[:hi - lo])
        torch.sigmoid(z, out=fs[lo:hi])
        if counts is not None:
            sg = torch.sign(z, out=z)
            if lo % plane == 0 and (hi - lo) % plane == 0:  # whole planes
                counts[lo // plane:hi // plane] += sg.view(-1, plane).sum(1, dtype=acc)
            else:  # the pieces of the planes the block crosses
                for p in range(lo // plane, (hi - 1) // plane + 1):
                    a, e = max(lo, p * plane), min(hi, (p + 1) * plane)
                    counts[p] += sg[a - lo:e - lo].sum(dtype=acc)
    per_head = counts.view(b, h).sum(0).to(scores.dtype) if counts is not None else None
    return s, per_head


class _GateSigmoid(torch.autograd.Function):
    """At the scores hook: ``s = sigmoid(scores + bias)`` and the hard-density signs
    (:func:`_gate_sigmoid`), tied into the graph at the scores as they reached the hook. Its one
    consumer is :class:`_GatedPattern`, which passes back as "the gradient of ``s``" the gradient of
    the logits ``z = scores + bias`` (made there in one pass with the pattern's gradient); this
    backward hands it on to the scores unchanged, as ``z = scores + bias`` would. (So an in-place edit
    of the scores by a later hook changes neither the gate nor the path its gradient takes.)"""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, bias: float, signs: bool):  # noqa: D401
        s, sg = _gate_sigmoid(scores, bias, signs)  # [batch, head, q, k], [head] or None
        if sg is not None:
            ctx.mark_non_differentiable(sg)
        return s, sg

    @staticmethod
    def backward(ctx, grad_z: torch.Tensor | None, grad_signs: Any):
        return grad_z, None, None


class _GatedPattern(torch.autograd.Function):
    """``pattern ⊙ m`` with the training-mode attention gate ``m = floor(s + u)``, ``s = sigmoid(z)``,
    ``z = scores + bias`` (the estimator of :class:`_ConcreteST`), and the soft density, in one function.

    The same values as ``pattern * _ConcreteST.apply(scores + bias, u, "attn", scale)[0]`` (the same
    elementwise operations in the same order, ``tests/test_sparsity_gate_blocks.py``), without the
    full-size tensors between them: ``z`` is never made (``s`` comes from :func:`_gate_sigmoid`, and
    the gradient returned for ``s`` is the one of ``z``, which :class:`_GateSigmoid` hands on to the
    scores); the gate ``m`` is made block by block and never kept; the noise may be kept as its int16
    levels (:func:`noise_levels`) and remade per block; and the backward is one blocked pass that writes
    the two gradients — ``grad_pattern = grad·m`` and ``grad_z = g(1−g)·(grad·pattern) + c·s(1−s)``
    (``c`` the soft density's gradient per head), the latter over the saved ``s`` — where the composed
    functions wrote four full-size tensors (``grad·m``, ``grad·pattern``, the straight-through gradient,
    ``s(1−s)``). On CPU every such tensor is a pass over memory and, above glibc's 32 MiB mmap
    threshold, fresh pages from the kernel (48 MiB per batch row at T = 1,024 and 12 heads); elsewhere
    (a GPU) each pass is one kernel over the whole tensor.
    """

    @staticmethod
    def forward(ctx, pattern: torch.Tensor, s: torch.Tensor, u: torch.Tensor, scale: float):  # noqa: D401
        # pattern, s = sigmoid(z) from _GateSigmoid: [batch, head, q, k], one dtype; u: the same shape, in that
        # dtype or as int16 levels (noise_levels). The gradient returned for s is the one of z (see _GateSigmoid).
        out = torch.empty_like(pattern, memory_format=torch.contiguous_format)
        fp, fs, fu, fo = _flat(pattern), _flat(s), _flat(u), out.view(-1)
        n = s.numel()
        block = BLOCK if s.device.type == "cpu" else max(n, 1)
        buf = torch.empty(min(n, block), dtype=s.dtype, device=s.device)  # the gate m, one block at a time
        levels = u.dtype == torch.int16
        for lo in range(0, n, block):
            hi = min(lo + block, n)
            ub = _levels_to_uniform(fu[lo:hi], buf[:hi - lo]) if levels else fu[lo:hi]
            m = torch.add(fs[lo:hi], ub, out=buf[:hi - lo]).floor_()
            torch.mul(fp[lo:hi], m, out=fo[lo:hi])
        ctx.save_for_backward(pattern, s, u)
        ctx.scale = scale
        ctx.set_materialize_grads(False)  # an unused output's gradient is None, and its terms are skipped
        ctx.done = False
        return out, _soft_reduce(s, "attn", scale)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor | None, grad_soft: torch.Tensor | None):
        if ctx.done:
            raise CircuitkitError("the training-mode attention gate's backward ran twice for one forward; its saved "
                                  "sigmoid becomes the gradient of the scores, so run the forward again instead of "
                                  "keeping the graph (retain_graph)")
        if grad_out is None and grad_soft is None:
            return None, None, None, None
        pattern, s, u = ctx.saved_tensors
        ctx.done = True
        bsz, heads, tq, tk = s.shape
        n, plane = s.numel(), tq * tk
        if n == 0:
            return torch.zeros_like(pattern), torch.zeros_like(s), None, None
        block = BLOCK if s.device.type == "cpu" else max(n, 1)
        fs, fu, fp = _flat(s), _flat(u), _flat(pattern)
        want_p = grad_out is not None and ctx.needs_input_grad[0]
        grad_p = torch.empty_like(s, memory_format=torch.contiguous_format) if want_p else None
        # the gradient of z is written over s, block by block once the block's s is used: s is this function's
        # own (made by _GateSigmoid for it alone), and one full-size tensor less is fresh memory
        grad_z = s if s.is_contiguous() else torch.empty_like(s, memory_format=torch.contiguous_format)
        fz = grad_z.view(-1)
        fg = _flat(grad_out) if grad_out is not None else None
        fgp = grad_p.view(-1) if want_p else None
        c = None
        if grad_soft is not None:  # per plane (batch row, head): the soft density's gradient
            c = (grad_soft * ctx.scale).repeat(bsz).view(-1, 1)  # [batch·head, 1]
        one = torch.ones((), dtype=s.dtype, device=s.device)
        levels = u.dtype == torch.int16
        buf = torch.empty((5 + levels, min(n, block)), dtype=s.dtype, device=s.device)  # block scratch, reused
        for lo, hi, p0, p1 in _plane_blocks(bsz * heads, plane, block):
            sb = fs[lo:hi]
            ub = _levels_to_uniform(fu[lo:hi], buf[5, :hi - lo]) if levels and fg is not None else fu[lo:hi]
            a, t, b, den, ds = (x[:hi - lo] for x in buf[:5])
            zb = fz[lo:hi]  # may be sb itself: every use of sb comes before zb is written
            if c is not None:
                torch.mul(sb, torch.sub(one, sb, out=ds), out=ds)  # s(1 − s)
            if fg is not None:
                gb = fg[lo:hi]
                torch.add(sb, ub, out=t)
                if want_p:
                    torch.floor(t, out=fgp[lo:hi]).mul_(gb)  # grad · m
                torch.mul(sb, ub, out=a)
                torch.sub(a, t, out=b)
                b += 1  # (1 − s)(1 − u)
                torch.add(a, b, out=den)
                a *= b
                gm = torch.mul(gb, fp[lo:hi], out=t)  # grad · pattern, into t (s + u is used by now)
                torch.div(a, den.square_(), out=zb).mul_(gm)  # g(1 − g) · grad · pattern
            if c is not None:
                rows, cb = p1 - p0, c[p0:p1]
                if fg is None:
                    torch.mul(ds.view(rows, -1), cb, out=zb.view(rows, -1))
                else:
                    zb.view(rows, -1).addcmul_(ds.view(rows, -1), cb)
        return grad_p, grad_z if ctx.needs_input_grad[1] else None, None, None


@dataclass(frozen=True)
class _TrainGate:
    """A training-mode attention gate between its two hooks."""

    x: torch.Tensor  # [batch, head, q, k]: s = sigmoid(z) from _GateSigmoid (fused), or z (composed)
    u: torch.Tensor  # [batch, head, q, k], U(0, 1), or its int16 levels (noise_levels; fused only)
    scale: float


class _FusedAttnTrain:
    """The training-mode attention gate as shipped: at ``hook_attn_scores`` ``s = sigmoid(scores + bias)``
    and the hard-density signs block by block (:func:`_gate_sigmoid`), at ``hook_pattern``
    :class:`_GatedPattern`, with the noise kept as its int16 levels on CPU (half the memory of ``u``, and
    below glibc's mmap threshold, so no fresh pages; ``u`` is remade block by block where used).
    (:mod:`circuitkit.bench.gate_reference` has the composed gate it replaced.)"""

    noise_levels = True

    @staticmethod
    def at_scores(scores: torch.Tensor, bias: float, u: torch.Tensor, scale: float,
                  collect: bool) -> tuple[_TrainGate, torch.Tensor | None]:
        # scores, u: [batch, head, q, k] -> the pending gate, Σ sign(scores + bias) per head [head] if collect
        s, signs = _GateSigmoid.apply(scores, bias, collect)
        return _TrainGate(s, u, scale), signs

    @staticmethod
    def at_pattern(pattern: torch.Tensor, g: _TrainGate) -> tuple[torch.Tensor, torch.Tensor]:
        # pattern [batch, head, q, k] -> gated pattern [batch, head, q, k], soft density [head]
        if pattern.shape != g.x.shape:
            raise CircuitkitError(f"the attention pattern {tuple(pattern.shape)} and the gate logits "
                                  f"{tuple(g.x.shape)} differ in shape; the gate hooks are out of step")
        if pattern.dtype == g.x.dtype:
            return _GatedPattern.apply(pattern, g.x, g.u, g.scale)
        out, soft = _GatedPattern.apply(pattern.to(g.x.dtype), g.x, g.u, g.scale)
        return out.to(pattern.dtype), soft


_ATTN_TRAIN: Any = _FusedAttnTrain  # the training-mode attention gate (the benchmark's reference swaps it)


class _HardST(torch.autograd.Function):
    """Deterministic straight-through gate: forward ``1[z > 0]``, gradient ``sigmoid'(z)``;
    second output the soft density as in :class:`_ConcreteST`."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, kind: str, scale: float):
        s = torch.sigmoid(z)
        ctx.save_for_backward(s)
        ctx.kind, ctx.scale = kind, scale
        return torch.relu(z).sign_(), _soft_reduce(s, kind, scale)

    @staticmethod
    def backward(ctx, grad_m, grad_soft):
        (s,) = ctx.saved_tensors
        d = s * (1 - s)
        g = torch.zeros_like(s) if grad_m is None else grad_m
        if grad_soft is not None:
            c = grad_soft * ctx.scale
            g = g + (c.view(1, -1, 1, 1) if ctx.kind == "attn" else c)
        return d.mul_(g), None, None


def gate(z: torch.Tensor, mode: GateMode, u: torch.Tensor | None = None,
         generator: torch.Generator | None = None, kind: str = "mlp",
         scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gate ``m`` for logits ``z`` under ``mode``, and the soft density.

    The soft density is ``scale · Σ sigmoid(z)`` — per head (summed over batch, query,
    key) for ``kind="attn"`` ([batch, head, q, k] input), over everything for
    ``kind="mlp"``; ``scale`` defaults to 1/numel (the mean). In EVAL mode it is ``None``
    (not computed). TRAIN draws ``u`` from ``generator`` (or the global RNG) unless given.
    """
    if mode is GateMode.EVAL:
        return torch.relu(z.detach()).sign(), None  # 1[z > 0]; -inf and 0 give 0
    if scale is None:
        scale = 1.0 / (z.numel() / z.shape[1] if kind == "attn" else z.numel())
    if mode is GateMode.HARD_ST:
        return _HardST.apply(z, kind, scale)
    if u is None:
        u = uniform_noise(tuple(z.shape), generator, z.device)
    return _ConcreteST.apply(z, u.to(z.dtype), kind, scale)


class Gates:
    """The gate hooks on one model, their mode, and what the last forward collected.

    Attach with :func:`attach`; the object lives at ``model.circuitkit_gates``.

    Training-mode noise comes from ``noise_generator`` (``None``: torch's global RNG). With
    ``noise_rows = (global_batch, start)`` the noise is drawn for the whole global batch and
    this process takes rows ``start:start+batch``, so data-parallel ranks see exactly the
    noise a single process would (see :mod:`circuitkit.sparsity.finetune`).
    """

    def __init__(self, model: HookedTransformer, config: GateConfig, mode: GateMode = GateMode.EVAL) -> None:
        self.model = model
        self.config = config
        self.mode = GateMode.parse(mode)
        self.collect = False
        self.noise_generator: torch.Generator | None = None
        self.noise_rows: tuple[int, int] | None = None
        self._pending: dict[tuple[str, int], torch.Tensor | _TrainGate] = {}
        self.stats: dict[str, dict[int, torch.Tensor]] = {}
        self.clear_stats()
        self._hooked: list[Any] = []

    # ------------------------------------------------------------ hooks

    def _uniform_for(self, z: torch.Tensor, levels: bool = False) -> torch.Tensor:
        """U(0,1) for z's gates in z's dtype; with ``noise_rows`` drawn for the global batch and sliced.
        ``levels``: as the int16 levels of :func:`noise_levels` (the same draws) where z is float32/64 on
        CPU, as is the generator."""
        gen = self.noise_generator
        dev = torch.device(gen.device if gen is not None else z.device)
        shape = tuple(z.shape) if self.noise_rows is None else (self.noise_rows[0], *z.shape[1:])
        if levels and dev.type == z.device.type == "cpu" and z.dtype in (torch.float32, torch.float64):
            u = noise_levels(shape, gen)
        else:
            u = uniform_noise(shape, gen, dev).to(z.dtype)
        if self.noise_rows is not None:
            u = u[self.noise_rows[1]:self.noise_rows[1] + z.shape[0]]
        return u.to(z.device)

    def _attn_scores_hook(self, scores: torch.Tensor, hook: Any, layer: int) -> None:
        bsz, _, tq, tk = scores.shape  # [batch, head, q, k]; -inf where masked
        n_edges = _edge_count(tq, tk)
        scale = 1.0 / (bsz * n_edges)  # soft density per head: mean over the batch of Σ_{j≤i} σ / n_edges
        if self.mode is GateMode.TRAIN:  # the gate is made with the pattern; its soft density there
            u = self._uniform_for(scores, levels=_ATTN_TRAIN.noise_levels)
            pending, signs = _ATTN_TRAIN.at_scores(scores, self.config.bias_gate, u, scale, self.collect)
            self._pending[("attn", layer)] = pending
            if self.collect:  # deterministic density 1[z > 0]: masked -inf count as −1
                self.stats["attn_hard"][layer] = (signs + bsz * tq * tk) * (0.5 * scale)
            return None
        z = scores + self.config.bias_gate
        m, soft = gate(z, self.mode, kind="attn", scale=scale)
        self._pending[("attn", layer)] = m
        if self.collect:
            with torch.no_grad():
                if soft is None:
                    soft = torch.sigmoid(z).sum((0, 2, 3)) * scale
                hard = m.sum((0, 2, 3)) * scale
            self.stats["attn_soft"][layer] = soft  # [head], with gradient in HARD_ST
            self.stats["attn_hard"][layer] = hard
        return None

    def _attn_pattern_hook(self, pattern: torch.Tensor, hook: Any, layer: int) -> torch.Tensor:
        m = self._pending.pop(("attn", layer), None)
        if m is None:
            raise CircuitkitError(f"{hook.name}: no gate from hook_attn_scores for this forward; the gate hooks "
                                  "are out of step (was hook_attn_scores skipped?)")
        if isinstance(m, _TrainGate):
            out, soft = _ATTN_TRAIN.at_pattern(pattern, m)
            if self.collect:
                self.stats["attn_soft"][layer] = soft  # [head], with gradient
            return out
        return pattern * m.to(pattern.dtype)

    def _mlp_pre_hook(self, pre: torch.Tensor, hook: Any, layer: int) -> None:
        z = pre + self.config.bias_gate_mlp  # [batch, pos, d_mlp]
        u = self._uniform_for(z) if self.mode is GateMode.TRAIN else None
        m, soft = gate(z, self.mode, u=u, kind="mlp")
        self._pending[("mlp", layer)] = m
        if self.collect:
            with torch.no_grad():
                if soft is None:
                    soft = torch.sigmoid(z).mean()
                if self.mode is GateMode.TRAIN:
                    hard = (torch.sign(z).mean() + 1) * 0.5
                else:
                    hard = m.mean()
                if self.mode is GateMode.EVAL:  # per-neuron activity, for measurement
                    self.stats["mlp_hard_neuron"][layer] = m.flatten(0, -2).amax(0)  # [d_mlp]
            self.stats["mlp_soft"][layer] = soft
            self.stats["mlp_hard"][layer] = hard
        return None

    def _mlp_post_hook(self, post: torch.Tensor, hook: Any, layer: int) -> torch.Tensor:
        m = self._pending.pop(("mlp", layer), None)
        if m is None:
            raise CircuitkitError(f"{hook.name}: no gate from hook_pre for this forward")
        return post * m.to(post.dtype)

    def hook_specs(self) -> list[tuple[str, Any]]:
        specs = []
        for l in range(self.model.cfg.n_layers):
            if self.config.attn:
                specs += [(f"blocks.{l}.attn.hook_attn_scores", partial(self._attn_scores_hook, layer=l)),
                          (f"blocks.{l}.attn.hook_pattern", partial(self._attn_pattern_hook, layer=l))]
            if self.config.mlp:
                specs += [(f"blocks.{l}.mlp.hook_pre", partial(self._mlp_pre_hook, layer=l)),
                          (f"blocks.{l}.mlp.hook_post", partial(self._mlp_post_hook, layer=l))]
        return specs

    # ------------------------------------------------------------ statistics

    def clear_stats(self) -> None:
        self.stats = {"attn_soft": {}, "attn_hard": {}, "mlp_soft": {}, "mlp_hard": {}, "mlp_hard_neuron": {}}
        self._pending.clear()

    def sparsity(self, attn_layer_weights: Sequence[float] | None = None,
                 head_power: float = 1.0) -> dict[str, torch.Tensor | None]:
        """``S_attn`` and ``S_mlp`` (scalars with gradient) from the last collecting forward.

        ``S_attn`` is the mean over (layer, head) of the soft edge density ``d`` raised to
        ``head_power`` (1: ``d`` itself), each layer's row multiplied by
        ``attn_layer_weights[layer]`` when given (one weight per layer)."""
        out: dict[str, torch.Tensor | None] = {"attn": None, "mlp": None}
        if self.stats["attn_soft"]:
            layers = sorted(self.stats["attn_soft"])
            dens = torch.stack([self.stats["attn_soft"][l] for l in layers])  # [layers, heads]
            if head_power != 1.0:
                if not 0.0 < head_power <= 1.0:
                    raise CircuitkitError(f"head_power must be in (0, 1], got {head_power}")
                # the floor keeps the derivative finite at a closed head (d = 0); it changes d ** p by < 1e-12 ** p
                dens = dens.clamp_min(1e-12).pow(head_power)
            if attn_layer_weights is not None:
                check_layer_weights(attn_layer_weights, self.model.cfg.n_layers)
                w = torch.tensor([float(attn_layer_weights[l]) for l in layers], dtype=dens.dtype, device=dens.device)
                dens = dens * w[:, None]
            out["attn"] = dens.mean()
        if self.stats["mlp_soft"]:
            out["mlp"] = torch.stack([self.stats["mlp_soft"][l] for l in sorted(self.stats["mlp_soft"])]).mean()
        return out

    def density_report(self, heads: bool = True) -> dict[str, Any]:
        """Soft/hard density per layer (and per head) from the last collecting forward, as floats."""
        rep: dict[str, Any] = {}
        for fam in ("attn", "mlp"):
            for kind in ("soft", "hard"):
                d = self.stats[f"{fam}_{kind}"]
                if not d:
                    continue
                x = torch.stack([d[l].detach().float().reshape(-1) for l in sorted(d)])  # [layers, heads or 1]
                rep[f"{fam}_{kind}"] = x.mean(1).tolist()
                if fam == "attn" and heads:
                    rep[f"{fam}_{kind}_head"] = x.tolist()
        return rep


def check_layer_weights(weights: Sequence[float], n_layers: int, model: str = "the model") -> None:
    """Refuse per-layer attention weights (``attn_layer_weights``) that are not one per layer."""
    if len(weights) != n_layers:
        raise CircuitkitError(f"attn_layer_weights has {len(weights)} values but {model} has {n_layers} layers; "
                              "give one weight per layer")


# ---------------------------------------------------------------- attach / detach

def get_gates(model: HookedTransformer) -> Gates | None:
    """The model's :class:`Gates`, or ``None`` when it has none attached."""
    return getattr(model, ATTR, None)


def attach(model: HookedTransformer, config: GateConfig | None = None,
           mode: GateMode | str = GateMode.EVAL) -> Gates:
    """Add the gate hooks (permanent TransformerLens hooks) to ``model``; default mode EVAL."""
    if not isinstance(model, HookedTransformer):
        raise CircuitkitError(f"gates attach to a HookedTransformer, got {type(model).__name__}")
    if get_gates(model) is not None:
        raise CircuitkitError("this model already has gates attached; call circuitkit.sparsity.detach(model) first")
    config = config or GateConfig()
    if config.mlp and model.cfg.attn_only:
        raise CircuitkitError("MLP gates need a model with MLPs (attn_only=False)")
    if config.attn and getattr(model.cfg, "use_attention_sinks", False):
        raise CircuitkitError("attention gates do not support models with attention sinks")
    gates = Gates(model, config, mode)
    hook_dict = model.hook_dict
    for name, fn in gates.hook_specs():
        if name not in hook_dict:
            raise CircuitkitError(f"the model has no hook point {name}; gates need a standard HookedTransformer block")
        hook_dict[name].add_hook(fn, is_permanent=True)
        gates._hooked.append((hook_dict[name], fn))
    setattr(model, ATTR, gates)
    return gates


def detach(model: HookedTransformer) -> GateConfig | None:
    """Remove the gate hooks (and only them); returns the config that was attached."""
    gates = get_gates(model)
    if gates is None:
        return None
    for hp, fn in gates._hooked:
        keep = []
        for handle in hp.fwd_hooks:
            if handle.user_hook is fn:
                handle.hook.remove()
            else:
                keep.append(handle)
        hp.fwd_hooks = keep
    gates._hooked.clear()
    gates.clear_stats()
    delattr(model, ATTR)
    return gates.config


def set_mode(model: HookedTransformer, mode: GateMode | str) -> None:
    gates = get_gates(model)
    if gates is None:
        raise CircuitkitError("the model has no gates attached (circuitkit.sparsity.attach)")
    gates.mode = GateMode.parse(mode)


@contextmanager
def gate_mode(model: HookedTransformer, mode: GateMode | str, collect: bool | None = None) -> Iterator[Gates]:
    """Temporarily switch the gates' mode (and optionally statistics collection)."""
    gates = get_gates(model)
    if gates is None:
        raise CircuitkitError("the model has no gates attached (circuitkit.sparsity.attach)")
    old_mode, old_collect = gates.mode, gates.collect
    gates.mode = GateMode.parse(mode)
    if collect is not None:
        gates.collect = collect
    try:
        yield gates
    finally:
        gates.mode, gates.collect = old_mode, old_collect
        gates._pending.clear()
