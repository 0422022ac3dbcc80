"""Edge and node attribution methods, chosen by name from a registry.

Why: discovery, benchmarks and evaluation all ask "how much does each edge (or head)
matter for this task?" and must get comparable answers from interchangeable methods.
Every score here follows one sign convention: the estimated change of the task metric
(mean over examples) when that edge or node alone is ablated. So ``patching`` (exact)
and ``eap`` / ``eap-ig`` (gradient estimates) can be compared directly.

- ``patching``: exact; the metric change when ablating each edge alone. Ablating ``u -> v``
  alone changes nothing before ``v`` reads the residual stream, so each forward pass starts
  at ``v``'s block from the cached clean residual and gives ``v`` the input
  ``clean + a_u^ablate - a_u^clean`` (see :class:`_Site`); many edges share a pass (copies
  stacked along the batch), and after the last block's attention only the positions the metric
  scores are computed (:func:`_last_block_tail`). The tests check it against the general
  intervention of :mod:`~circuitkit.circuits.interventions`.
- ``eap``: ``(a_u^ablate - a_u^clean) · ∂m/∂(input_v)``, summed over positions and d_model,
  on the clean run: one ablation pass + one clean forward + one backward per batch, and one
  matrix product per receiver block. On pre-norm models the q/k/v receivers are scored inside
  the backward, which pulls their gradients back through each head's weights once (where
  TransformerLens's backward would make the sum and the scoring the per-head products again);
  the other receivers after it (:meth:`_GradientPass.flush`).
- ``eap-ig``: as eap, with the receiver gradients averaged over ``steps`` runs whose input
  embeddings are interpolated from the ablated to the clean input (k/steps, k = 1..steps;
  ``steps=1`` is eap). Steps share a pass as :data:`IG_COPY_BUDGET` allows; the gradients of
  every pass are summed and contracted once, with sender differences made after the passes.
- ``eap-ig-senders``: integrated gradients along each sender's *own* path: sender u's output
  moves from clean toward ablated (midpoint rule, ``steps`` points) while every other node is
  computed as usual; ``δ_u · mean ∂m/∂(input_v)``. Closer to single-edge patching than eap-ig
  when an ablation moves the residual stream far (LayerNorm saturation, e.g. a head's large
  corrupted output into the logits); node scores tend to exact node patching. Costs
  ``n_src * steps`` partial passes per batch: slower than patching on a toy graph of 479
  edges, far cheaper on GPT-2's 32k.

Node scores use the same ideas at the senders' outputs: for eap and eap-ig they equal the
sum of the node's outgoing edge scores; node patching ablates all of a node's outputs.

One registry serves both graph levels (:data:`LEVELS`): a :class:`Method` with a
``position_fn`` also scores every edge at every token position (``patching``, ``eap`` and
``eap-ig`` do: the same passes with the position axis kept), which
:func:`~circuitkit.circuits.positions.attribute_positions` and ``discover --level position`` use.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from collections.abc import Iterator, Mapping
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from circuitkit import CircuitkitError
from circuitkit.circuits.graph import Graph, GraphSpec
from circuitkit.circuits.interventions import (
    DEFAULT_BATCH_SIZE, Ablation, AblationValues, capture_senders, check_dataset, copies_metric, graph_hooks_enabled,
    metric_with_graph, model_device, model_dtype, sender_hooks, temporary_hooks,
)
from circuitkit.tasks.base import Metric, TaskDataset

# the graphs a method scores: components summed over positions, and every edge at every token position
COMPONENT, POSITION = "component", "position"
LEVELS = (COMPONENT, POSITION)
DEFAULT_IG_STEPS = 5
DEFAULT_ACDC_TAU = 0.01
# eap-ig runs several interpolation steps in one pass, up to this many residual-stream numbers summed over the
# blocks, steps * batch * pos * d_model * n_layers (a proxy of the pass's saved activations, which grow with the
# copies): the toy bench's passes (4 layers, d64, batch 64 x 15: 0.25M numbers a copy) keep all 5 steps in one,
# while at GPT-2-small width one batch of 8 x 15 tokens (1.1M numbers) runs one step a pass, so eap-ig's peak
# memory stays near one forward + backward's. Per-step passes cost little time: every receiver's gradients are
# summed over the passes and contracted with the sender differences once (_GradientPass.flush).
IG_COPY_BUDGET = 2**21
# exact patching stacks single-edge copies of a batch up to this many residual numbers a pass
# [copies*batch, pos, d_model] (eap-ig-senders: times its width); on an accelerator large passes pay, while
# exact patching's forward-only passes on a CPU are faster when their activations stay in cache (same scores:
# each copy is its own rows), so a CPU gets its own, smaller budget for them (eap-ig-senders was slower with it)
PATCH_COPY_BUDGET = 2**21
CPU_PATCH_COPY_BUDGET = 2**19
# gradient passes on pre-norm models take q/k/v's backward over from TransformerLens (_HeadInputsOf), and eap
# scores their receivers inside it, where the per-head pull-backs are made once (_GradientPass); False: every pass
# reads the gradients at hook_q/k/v and pulls back after the backward (the tests compare the two)
OWN_QKV_BACKWARD = True


def ig_steps_per_pass(steps: int, numbers_per_copy: int) -> int:
    """How many of eap-ig's ``steps`` interpolation copies share a forward + backward pass, when one
    copy of the batch has ``numbers_per_copy`` residual-stream numbers over the blocks
    (batch * pos * d_model * n_layers): as many as :data:`IG_COPY_BUDGET` holds (read at call
    time), at least one, at most ``steps``."""
    return max(1, min(steps, IG_COPY_BUDGET // max(numbers_per_copy, 1)))


def patch_copy_budget(device: torch.device) -> int:
    """Residual numbers one exact-patching pass may hold on ``device`` (read at call time, so either
    constant may be set by a caller)."""
    return CPU_PATCH_COPY_BUDGET if torch.device(device).type == "cpu" else PATCH_COPY_BUDGET


# ---------------------------------------------------------------- gradient methods

@dataclass(frozen=True)
class _QKVWeights:
    """One block's small q/k/v weight terms as the receiver scoring uses them, made once per
    attribution call (they do not change while it runs) instead of once per block and pass. The
    weights themselves are read from the model: a folded copy ``(w_ln ⊙ W)^T`` of every block was
    81 MiB at GPT-2-small width, held for the whole call (a third of a forward + backward's peak)."""

    ln_w: torch.Tensor | None  # [d_model]: ln1's weight w_ln (None: the norm has none)
    col_sum: torch.Tensor  # [3 * n_heads, d_head]: Σ_d (w_ln ⊙ W)
    offset: torch.Tensor  # [3 * n_heads, d_head]: q = x̂ @ (w_ln ⊙ W_Q) + offset (b_Q, plus b_ln @ W_Q for LN)

    @classmethod
    def of(cls, model, layer: int) -> "_QKVWeights":
        attn, ln, norm = model.blocks[layer].attn, model.blocks[layer].ln1, model.cfg.normalization_type
        ws = (attn.W_Q, attn.W_K, attn.W_V)  # [n_heads, d_model, d_head] each
        with torch.no_grad():
            offset = torch.cat([attn.b_Q, attn.b_K, attn.b_V])  # [3 * n_heads, d_head]
            if norm == "LN":
                offset = offset + torch.cat([cls._vec_times(ln.b, w) for w in ws])
            ln_w = ln.w.detach() if norm in ("LN", "RMS") else None
            col_sum = torch.cat([w.sum(1) if ln_w is None else cls._vec_times(ln_w, w) for w in ws])
            return cls(ln_w, col_sum, offset)

    @staticmethod
    def _vec_times(v: torch.Tensor,  # [d_model]
                   w: torch.Tensor) -> torch.Tensor:  # [n_heads, d_model, d_head] -> [n_heads, d_head]
        """``v @ w[h]`` for every head, one batched product reading ``w`` where it lies (an einsum
        copied each weight to a new layout first: 0.26 ms against 0.06 ms at GPT-2 width)."""
        return torch.bmm(v.view(1, 1, -1).expand(w.shape[0], 1, -1), w).squeeze(1)

    @staticmethod
    def pull_back(model, layer: int, g: torch.Tensor,  # [rows, 3 * n_heads, d_head]: ∂m/∂q, ∂m/∂k, ∂m/∂v
                  ln_w: torch.Tensor | None) -> torch.Tensor:  # [3 * n_heads, rows, d_model]
        """``(g_h @ W_h^T) ⊙ w_ln`` for every q, k and v head, into one buffer."""
        attn = model.blocks[layer].attn
        n = attn.W_Q.shape[0]
        u = g.new_empty(g.shape[1], g.shape[0], model.cfg.d_model)
        for i, w in enumerate((attn.W_Q, attn.W_K, attn.W_V)):
            _QKVWeights.pull_back_into(w, g[:, i * n: (i + 1) * n], u[i * n: (i + 1) * n])
        return u if ln_w is None else u.mul_(ln_w)

    @staticmethod
    def summed_pull_back(w: torch.Tensor,  # [n_heads, d_model, d_head]: W_Q, W_K or W_V
                         g: torch.Tensor) -> torch.Tensor:  # [rows, n_heads, d_head] -> [rows, d_model]
        """``Σ_h g[:, h] @ w[h]^T``, accumulated head by head in one buffer: a single product would need
        ``w`` copied to the [(n_heads d_head), d_model] layout first (0.5 ms a weight at GPT-2 width)."""
        w = w.detach()
        out = torch.mm(g[:, 0], w[0].T)
        for h in range(1, w.shape[0]):
            out.addmm_(g[:, h], w[h].T)
        return out

    @staticmethod
    def pull_back_into(w: torch.Tensor,  # [n_heads, d_model, d_head]: W_Q, W_K or W_V
                       g: torch.Tensor,  # [rows, n_heads, d_head]
                       out: torch.Tensor) -> None:  # [n_heads, rows, d_model]
        """``out[h] = g[:, h] @ w[h]^T``: one matrix product per head, reading ``g`` and ``w`` where they
        lie (at GPT-2 width 6.3 ms a block against 8.0 ms for batched products on the transposed layouts)."""
        w = w.detach()
        for h in range(w.shape[0]):
            torch.mm(g[:, h], w[h].T, out=out[h])


class _HeadInputsOf(torch.autograd.Function):
    """A block's q (k, v) made a function of ln1's normalized input ``x̂``, with the backward given.

    The values are TransformerLens's own (computed, then detached: its linear map and whatever it
    saved for its backward leave the autograd graph); ``backward`` returns ``on_grad(∂m/∂q)``, which
    must be ``∂m/∂x̂`` — ``Σ_h (∂m/∂q_h @ W_Q[h]^T) ⊙ w_ln`` — and may keep what it made on the way
    (:meth:`_GradientPass._own_input_hook`).
    """

    @staticmethod
    def forward(ctx, x_hat: torch.Tensor,  # [batch, pos, d_model], in the autograd graph
                act: torch.Tensor,  # [batch, pos, n_heads, d_head], detached
                on_grad: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:  # [batch, pos, n_heads, d_head]
        ctx.on_grad = on_grad
        return act.view_as(act)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # [batch, pos, n_heads, d_head] -> ∂m/∂x̂ [batch, pos, d_model]
        return ctx.on_grad(grad), None, None


# normalisations whose q/k/v gradient passes read as functions of ln1's hook_normalized (_GradientPass)
_OWN_BACKWARD_NORMS = ("LN", "LNPre", "RMS", "RMSPre")


class _GradientPass:
    """One forward with gradients on the clean prompts, and its backward.

    Hooks: the input embedding is replaced by ``input_fn(embedding)`` (detached, requiring
    grad); with ``subtract_clean`` the clean sender outputs are subtracted from ``diff``
    as they are computed (so ``diff`` may hold the ablated values before the pass and
    ``a^ablate - a^clean`` after it; heads given as ablated ``z`` in ``z_ablate`` are
    projected once, ``(z^ablate - z^clean) @ W_O``). Gradients at the receivers (edge level) or senders
    (node level) are contracted with ``diff`` and added to ``out``: one matrix product per receiver
    block, [prefix, batch*pos*d_model] @ [batch*pos*d_model, n_cols].

    q/k/v receivers without per-head inputs: every head's q input is the block's residual
    stream ``x`` and ``q_h = ln1(x) @ W_Q[h] + b_Q[h]``, so ``∂m/∂(q input of h)`` is the
    LayerNorm's vector-Jacobian product at ``x`` applied to ``(∂m/∂q_h) @ W_Q[h]^T``. The
    gradients are read at ``attn.hook_q/k/v`` and the LayerNorm's statistics at
    ``ln1.hook_scale`` / ``ln1.hook_normalized`` (see :meth:`_collect_head_inputs`). This avoids
    3 * n_heads LayerNorms per block forward and back.

    Scores are linear in the receiver gradients, so these are summed (weighted) as they arrive
    and contracted with ``diff`` in :meth:`flush`, after the backward: eap-ig's interpolation steps
    may each have their own pass (:meth:`run` takes the step's ``input_fn`` and copy count) and
    still pay the contraction once, ``diff`` itself is needed only then (eap-ig makes it after its
    passes), and no [3 * n_heads, batch*pos, d_model] product is held while the backward's
    activations are.

    Pre-norm models (``own_qkv``): each block's q, k and v are made functions of the first of ln1's
    three copies of ``x̂`` (:class:`_HeadInputsOf`, equal values), so TransformerLens's q/k/v linear
    maps and the other two copies of ln1 leave the autograd graph: their saved activations are freed
    at once (at GPT-2-small width eap's peak memory growth fell from 1.18-1.30x the bare forward +
    backward's to 0.75-0.90x) and the backward runs ln1 once per block. The backward returns
    ``∂m/∂x̂`` itself. With ``score_in_backward`` (eap: one pass, ``diff`` complete before the
    backward) it pulls ``∂m/∂q`` back through each head's weights and returns the sum of those
    products, scoring them at once (:meth:`_score_in_backward`): the pull-back is made once, where
    TransformerLens's backward made the sum and the scoring the per-head products again. Otherwise
    it makes only their sum (head by head into one buffer), and the gradients go to the sums scored
    after the passes.

    ``level="position"`` scores the same edges per token position (``out`` is
    ``[pos, n_src, n_dst]``): every contraction goes through
    :meth:`_with_diff`, which then sums over batch and d_model but keeps the position axis
    (:mod:`~circuitkit.circuits.positions`).
    """

    def __init__(self, model, spec: GraphSpec, level: str,
                 out: torch.Tensor,  # [n_src, n_dst] (edge), [pos, n_src, n_dst] (position) or [n_src] (node)
                 diff: torch.Tensor | None,  # [n_src, batch, pos, d_model], sender-major (None: given to flush)
                 subtract_clean: bool = False,
                 z_ablate: dict[int, torch.Tensor] | None = None,  # layer -> ablated z [batch, pos, n_heads, d_head]
                 weights: dict[int, "_QKVWeights"] | None = None,  # per-layer weight products, shared by passes
                 score_in_backward: bool = False):
        self.model, self.spec, self.level, self.out = model, spec, level, out
        self.own_qkv = (OWN_QKV_BACKWARD and level in ("edge", "position")
                        and model.cfg.normalization_type in _OWN_BACKWARD_NORMS)
        self.score_in_backward = self.own_qkv and score_in_backward and diff is not None
        self.weights = {} if weights is None else weights
        self.diff, self.subtract_clean, self.z_ablate = diff, subtract_clean, z_ablate
        self.input_fn: Callable[[torch.Tensor], torch.Tensor] = lambda x: x  # per pass, see run()
        self.repeats = 1  # per pass: the model's batch is `repeats` copies of the examples (eap-ig steps)
        self.n_pos = 0  # per pass: the prompts' positions (the last block's MLP may see fewer: run(first=...))
        self.x: torch.Tensor | None = None
        self.weight = 1.0
        self.prefix_of = spec.src_prefix.tolist()  # receiver -> number of senders before it (Python ints: no sync)
        self.ln_stats: dict[tuple[int, str], torch.Tensor] = {}  # (layer, "scale"|"normalized") -> [batch, pos, 1|d]
        self.pending: dict[int, dict[str, torch.Tensor]] = {}  # layer -> {"q": ∂m/∂q, ...} until all three arrive
        self.qkv_acts: dict[tuple[int, str], torch.Tensor] = {}  # (layer, "q") -> q [batch, pos, n_heads, d_head]
        self.cache: dict[str, torch.Tensor] = {}  # diff laid out position-major (position level), made once
        # weighted gradient sums until flush(): receiver (prefix, first col, end col) -> [batch*pos*d_model]
        self.resid_acc: dict[tuple[int, int, int], torch.Tensor] = {}
        self.node_acc: dict[tuple[int, int], torch.Tensor] = {}  # node level: sender rows -> [batch*pos*d_model]
        self.head_acc: dict[int, _HeadInputSums] = {}  # layer -> its q/k/v receivers' sums
        self.pulled: dict[int, torch.Tensor] = {}  # score_in_backward: layer -> pull-backs [3 * n_heads, b*pos, d]

    @property
    def diff_t(self) -> torch.Tensor:  # [n_src, batch*pos*d_model]
        return self.diff.view(self.diff.shape[0], -1)

    def hooks(self) -> list[tuple[str, Callable]]:
        spec = self.spec
        hooks: list[tuple[str, Callable]] = [("blocks.0.hook_resid_pre", self._input)]
        if self.subtract_clean:
            hooks += sender_hooks(self.model, spec, self._subtract, heads_as_z=self.z_ablate is not None)
        if self.level in ("edge", "position"):
            for g in spec.receiver_groups:
                if not g.per_head:
                    hooks.append((g.hook, self._watch(self._receiver_grad(g.prefix, g.cols))))
                    continue
                layer, qkv = int(g.hook.split(".")[1]), g.hook.split("_")[-2][-1]  # blocks.{l}.hook_{q}_input
                if qkv == "q" and self.model.cfg.normalization_type is not None:
                    for stat in ("scale", "normalized"):
                        hooks.append((f"blocks.{layer}.ln1.hook_{stat}", self._keep_stat(layer, stat)))
                make = self._own_input_hook if self.own_qkv else self._head_input_hook
                hooks.append((f"blocks.{layer}.attn.hook_{qkv}", make(layer, qkv, g.prefix)))
        else:  # the input's gradient is watched on the leaf itself, in _input
            for g in spec.sender_groups[1:]:
                hooks.append((g.grad_hook, self._watch(self._node_grad(g.rows))))
        return hooks

    def _subtract(self, rows: slice, act: torch.Tensor) -> None:
        # act: [n_rows, batch, pos, d_model], or for heads with z_ablate: z [batch, pos, n_heads, d_head]
        layer = self.spec.head_group_layer.get(rows.start)
        if layer is not None and self.z_ablate is not None:
            z = (self.z_ablate.pop(layer) - act.detach()).flatten(0, 1).transpose(0, 1)  # [n_heads, b*pos, d_head]
            out = self.diff[rows].view(z.shape[0], z.shape[1], -1)  # written in place: [n_heads, b*pos, d_model]
            torch.bmm(z, self.model.blocks[layer].attn.W_O.detach(), out=out)
        else:
            _write_tail(self.diff[rows], act, subtract=True)

    def _input(self, act, hook):  # act [batch, pos, d_model]
        x = self.input_fn(act.detach()).detach().requires_grad_(True)
        self.x = x
        if self.level == "node":
            x.register_hook(self._node_grad(slice(0, 1)))
        return x

    @staticmethod
    def _watch(on_grad: Callable[[torch.Tensor], None]) -> Callable:
        def hook(act, hook):
            act.register_hook(on_grad)
        return hook

    def _keep_stat(self, layer: int, stat: str) -> Callable:
        def hook(act, hook):  # [batch, pos, 1] or [batch, pos, d_model]; the same for q, k and v
            if self.own_qkv:  # q's copy, kept in the graph: k and v read it too (_own_input_hook)
                self.ln_stats.setdefault((layer, stat), act)
            else:
                self.ln_stats[layer, stat] = act.detach()
        return hook

    def _own_input_hook(self, layer: int, qkv: str, prefix: int) -> Callable:
        i, n, d_model = "qkv".index(qkv), self.spec.n_heads, self.model.cfg.d_model
        weight = getattr(self.model.blocks[layer].attn, f"W_{qkv.upper()}")  # [n_heads, d_model, d_head]

        def on_grad(grad):  # ∂m/∂q (or k, v) [batch, pos, n_heads, d_head] -> ∂m/∂x̂ [batch, pos, d_model]
            ln_w = self._weights(layer).ln_w
            with torch.no_grad():
                if self.score_in_backward:  # every head's pull-back, kept for the scores; their sum
                    scale = self.ln_stats[layer, "scale"].detach()  # [batch, pos, 1]
                    g = grad / scale.unsqueeze(-1)
                    u = self.pulled.get(layer)
                    if u is None:
                        u = self.pulled[layer] = g.new_empty(3 * n, g.shape[0] * g.shape[1], d_model)
                    part = u[i * n: (i + 1) * n]  # [n_heads, b*pos, d_model]
                    _QKVWeights.pull_back_into(weight, g.reshape(-1, n, g.shape[-1]), part)
                    if ln_w is not None:
                        part.mul_(ln_w)
                    grad_x = part.sum(0).view(*g.shape[:2], d_model).mul_(scale)
                else:  # only their sum, as TransformerLens's backward makes it
                    g = grad
                    grad_x = _QKVWeights.summed_pull_back(weight, g.reshape(-1, n, g.shape[-1])).view(*g.shape[:2], -1)
                    if ln_w is not None:
                        grad_x.mul_(ln_w)
            got = self.pending.setdefault(layer, {})
            got[qkv] = g
            if len(got) == 3:
                self._block_done(layer, prefix, self.pending.pop(layer))
            return grad_x

        def hook(act, hook):  # q (or k, v): [batch, pos, n_heads, d_head]
            self.qkv_acts[layer, qkv] = act.detach()
            return _HeadInputsOf.apply(self.ln_stats[layer, "normalized"], act.detach(), on_grad)
        return hook

    def _block_done(self, layer: int, prefix: int, grads: dict[str, torch.Tensor]) -> None:
        """A block's q/k/v gradients of this pass are in: scored now (``score_in_backward``) or summed."""
        if self.score_in_backward:
            self._score_in_backward(layer, prefix, grads)
        else:
            self._collect_head_inputs(layer, prefix, grads)

    @staticmethod
    def _stacked(grads: dict[str, torch.Tensor]) -> torch.Tensor:  # -> [r*b, pos, 3 * n_heads, d_head]
        """One block's ∂m/∂q, ∂m/∂k, ∂m/∂v side by side, zeros for one with no path to the metric."""
        some = next(iter(grads.values()))
        return torch.cat([grads.get(c, torch.zeros_like(some)) for c in "qkv"], 2)

    def _score_in_backward(self, layer: int, prefix: int, grads: dict[str, torch.Tensor]) -> None:
        """Scores one block's q/k/v receivers from the pull-backs its backward made (``grads``:
        ∂m/∂q / σ and so on; a missing one had no path to the metric)."""
        u, n = self.pulled.pop(layer), self.spec.n_heads
        with torch.no_grad():
            for i, c in enumerate("qkv"):
                if c not in grads:
                    u[i * n: (i + 1) * n].zero_()
            g = self._stacked(grads)  # [b, pos, 3 * n_heads, d_head]
            acc = _HeadInputSums(prefix, g, self._corrections(layer, g, 1.0))
            self._score_head_inputs(layer, acc, u, self.weight)

    def _corrections(self, layer: int, g: torch.Tensor,  # [r*b, pos, 3 * n_heads, d_head]: ∂m/∂q,k,v / σ
                     weight: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """ln1's ``x̂`` terms, one per copy: (weight * Σ_d u x̂ [b*pos, 3 * n_heads], x̂ [b*pos, d_model])."""
        w, r, n = self._weights(layer), self.repeats, g.shape[2]
        x_hat = self.ln_stats[layer, "normalized"].detach()  # [r*b, pos, d_model]
        # x̂ @ (w ⊙ W): [r*b, pos, 3 * n_heads, d_head]
        xw = torch.cat([self.qkv_acts.pop((layer, c)) for c in "qkv"], 2) - w.offset
        e = (g * xw).sum(-1).reshape(r, -1, n) * weight  # Σ_d u x̂ per copy: [r, b*pos, 3 * n_heads]
        x_hat_r = x_hat.reshape(r, -1, x_hat.shape[-1])  # [r, b*pos, d_model]
        return [(e[c], x_hat_r[c]) for c in range(r)]

    def _head_input_hook(self, layer: int, qkv: str, prefix: int) -> Callable:
        def on_grad(grad):  # ∂m/∂q (or k, v): [batch, pos, n_heads, d_head]
            got = self.pending.setdefault(layer, {})
            got[qkv] = grad
            if len(got) == 3:
                self._block_done(layer, prefix, self.pending.pop(layer))

        def hook(act, hook):  # q (or k, v): [batch, pos, n_heads, d_head]
            self.qkv_acts[layer, qkv] = act.detach()
            act.register_hook(on_grad)
        return hook

    def _collect_head_inputs(self, layer: int, prefix: int, grads: dict[str, torch.Tensor]) -> None:
        """Adds one pass's ∂m/∂q, ∂m/∂k, ∂m/∂v of one block ([repeats*batch, pos, n_heads, d_head] each;
        a missing one had no path to the metric) to the block's sums, scored in :meth:`_score_head_inputs`.

        With ``v = w ⊙ u`` and ``u = (∂m/∂q_h) @ W_Q[h]^T``, ln1's pull-back is
        ``(v - mean(v) - x̂ mean(v ⊙ x̂)) / σ`` (no ``mean(v)`` term for RMS norms). ``w`` is folded
        into the pull-back (:meth:`_QKVWeights.pull_back`) and ``1/σ`` into ∂m/∂q, so all but the
        ``x̂`` term are linear in ``∂m/∂q / σ``, summed over copies and passes; the ``x̂`` term keeps
        each copy's ``x̂`` and its coefficients ``Σ_d u x̂`` ([batch*pos, 3 * n_heads]).
        """
        norm = self.model.cfg.normalization_type
        with torch.no_grad():
            g = self._stacked(grads)  # [r*b, pos, 3 * n_heads, d_head]
            if norm is not None:
                g = g / self.ln_stats[layer, "scale"].unsqueeze(-1)  # σ: [r*b, pos, 1]
            r = self.repeats
            g_sum = (g.reshape(r, -1, *g.shape[1:]).sum(0) if r > 1 else g) * self.weight  # [b, pos, 3nh, d_head]
            acc = self.head_acc.get(layer)
            if acc is None:
                acc = self.head_acc[layer] = _HeadInputSums(prefix, g_sum, [])
            else:
                acc.g_sum.add_(g_sum)
            if norm is not None:  # x̂ differs between copies: one correction per copy
                acc.corrections.extend(self._corrections(layer, g, self.weight))

    def _score_head_inputs(self, layer: int, acc: "_HeadInputSums",
                           u: torch.Tensor | None = None,  # [3 * n_heads, b*pos, d_model]: the pull-backs, if made
                           weight: float = 1.0) -> None:
        """Scores of the edges into one block's q, k and v inputs from their sums: the pull-back
        ``u`` [3 * n_heads, batch*pos, d_model] is made once (or given: made in the backward), the
        correction terms applied in place, and scored in a single matrix product with ``diff``
        (times ``weight``): ``diff`` is read once per block and no [senders, batch, pos, d_model]
        temporary is made (that was half the block's scoring time at GPT-2-small width)."""
        norm, d_model = self.model.cfg.normalization_type, self.model.cfg.d_model
        first = self.spec.head_dst(layer, 0, "q")  # a block's q, k, v receivers are contiguous
        w = self._weights(layer)
        with torch.no_grad():
            g_sum = acc.g_sum  # [b, pos, 3 * n_heads, d_head]
            n = g_sum.shape[2]
            if u is None:
                u = w.pull_back(self.model, layer, g_sum.reshape(-1, n, g_sum.shape[-1]), w.ln_w)  # [3nh, b*pos, d]
            for e, x_hat in acc.corrections:  # [b*pos, 3 * n_heads], [b*pos, d_model]
                u.addcmul_(e.T.unsqueeze(-1), x_hat.unsqueeze(0), value=-1.0 / d_model)
            if norm in ("LN", "LNPre"):
                mean_u = (g_sum * w.col_sum).sum(-1).reshape(-1, n)  # Σ_d u: [b*pos, 3 * n_heads]
                u.sub_(mean_u.T.unsqueeze(-1), alpha=1.0 / d_model)
            score = self._with_diff(acc.prefix, u.reshape(n, -1))  # [(pos,) prefix, 3 * n_heads]
            if weight != 1.0:
                score.mul_(weight)
            self.out[..., :acc.prefix, first: first + n] += score.to(self.out.dtype)

    def flush(self, diff: torch.Tensor | None = None) -> None:  # [n_src, batch, pos, d_model]
        """Contract the gradient sums of every pass since the last flush with ``diff`` (given here
        or at construction) into ``out``."""
        if diff is not None:
            self.diff = diff
            self.cache.clear()
        with torch.no_grad():
            for (start, stop), g in self.node_acc.items():  # g: [batch*pos*d_model]
                self.out[start:stop] += (self.diff_t[start:stop] @ g).to(self.out.dtype)  # [n_rows]
            self.node_acc.clear()
            for (prefix, start, stop), g in self.resid_acc.items():  # g: [batch*pos*d_model]
                self.out[..., :prefix, start:stop] += self._with_diff(prefix, g[None, :]).to(self.out.dtype)
            self.resid_acc.clear()
            while self.head_acc:
                layer, acc = self.head_acc.popitem()
                self._score_head_inputs(layer, acc)

    def _weights(self, layer: int) -> "_QKVWeights":
        if layer not in self.weights:
            self.weights[layer] = _QKVWeights.of(self.model, layer)
        return self.weights[layer]

    def _with_diff(self, prefix: int, b: torch.Tensor,  # [n, batch*pos*d_model]
                   ) -> torch.Tensor:  # [prefix, n], or [pos, prefix, n] at position level
        """``Σ diff[:prefix] ⊙ b`` over batch, position and d_model; at position level the position
        axis is kept, with one position-major copy of ``diff`` per pass."""
        if self.level != "position":
            return self.diff_t[:prefix] @ b.T
        if "by_position" not in self.cache:
            self.cache["by_position"] = self._by_position(self.diff_t, self.diff.shape[-1])
        b = self._by_position(b, self.diff.shape[-1])  # [pos, n, batch*d_model]
        return torch.bmm(self.cache["by_position"][:, :prefix], b.transpose(1, 2))

    def _by_position(self, t: torch.Tensor, width: int) -> torch.Tensor:  # [m, rows*pos*width] -> [pos, m, rows*width]
        p = self.diff.shape[2]
        return t.reshape(t.shape[0], -1, p, width).permute(2, 0, 1, 3).reshape(p, t.shape[0], -1)

    def _summed(self, grad: torch.Tensor) -> torch.Tensor:  # [repeats*batch, pos', d_model] -> [batch*pos*d_model]
        """Scores are linear in these gradients, so the copies' gradients are summed first. A gradient
        after the last block's cut (``pos' < pos``, :func:`_last_block_tail`) is 0 at the positions cut."""
        if grad.shape[1] < self.n_pos:
            grad = torch.nn.functional.pad(grad, (0, 0, self.n_pos - grad.shape[1], 0))
        return grad.reshape(self.repeats, -1).sum(0) if self.repeats > 1 else grad.reshape(-1)

    def _receiver_grad(self, prefix: int, cols: slice) -> Callable:
        key = (prefix, cols.start, cols.stop)

        def on_grad(grad):  # [repeats*batch, pos, d_model]
            g = self._summed(grad) * self.weight  # [batch*pos*d_model]
            if key in self.resid_acc:
                self.resid_acc[key].add_(g)
            else:
                self.resid_acc[key] = g
        return on_grad

    def _node_grad(self, rows: slice) -> Callable:
        # every sender in `rows` adds its output to the activation whose gradient arrives here
        key = (rows.start, rows.stop)

        def on_grad(grad):  # [repeats*batch, pos, d_model]
            g = self._summed(grad) * self.weight  # [batch*pos*d_model]
            if key in self.node_acc:
                self.node_acc[key].add_(g)
            else:
                self.node_acc[key] = g
        return on_grad

    def run(self, model, tokens: torch.Tensor,  # [repeats*batch, pos] -> [repeats*batch, pos - first, d_vocab]
            input_fn: Callable[[torch.Tensor], torch.Tensor] | None = None, repeats: int = 1,
            first: int = 0) -> torch.Tensor:
        """Forward with these hooks, the input embedding replaced by ``input_fn(embedding)``
        (identity when None); the logits stay attached to the autograd graph. After the last block's
        attention only positions ``first..`` are computed (the metric reads none before them)."""
        self.input_fn, self.repeats, self.n_pos = input_fn or (lambda x: x), repeats, tokens.shape[1]
        with torch.enable_grad(), temporary_hooks(model, self.hooks() + _last_block_tail(model, first)):
            return model(tokens)

    def backward(self, logits: torch.Tensor,  # [repeats*batch, pos - first, d_vocab]
                 batch: TaskDataset,
                 reference: torch.Tensor | None,  # [batch, pos or pos - first, d_vocab]: NEG_KL's clean logits
                 weight: float) -> None:
        self.weight = weight
        kept = logits.shape[1]  # positions the run computed after the last block's attention
        if reference is not None:
            reference = reference[:, reference.shape[1] - kept:]
        metric = copies_metric(batch.scored_from(self.n_pos - kept), logits, reference, self.repeats).mean()
        metric.backward(inputs=[self.x])
        for layer, grads in list(self.pending.items()):  # blocks where q, k or v got no gradient
            self._block_done(layer, self.prefix_of[self.spec.head_dst(layer, 0, "q")], self.pending.pop(layer))
        self.qkv_acts.clear()
        self.ln_stats.clear()
        self.x = None


@dataclass
class _HeadInputSums:
    """One block's q/k/v receiver gradients summed over copies and passes, until they are scored."""

    prefix: int  # senders before the block
    g_sum: torch.Tensor  # [batch, pos, 3 * n_heads, d_head]: Σ weight * (∂m/∂q,k,v) / σ
    corrections: list[tuple[torch.Tensor, torch.Tensor]]  # per copy: (weight * Σ_d u x̂ [b*pos, 3nh], x̂ [b*pos, d])


def first_scored(batch: TaskDataset) -> int:
    """The batch's first position the metric reads: nothing before it needs the last block's MLP,
    the final norm or the unembedding (:func:`_last_block_tail`)."""
    return int(batch.answer_pos.min())


def _write_tail(dst: torch.Tensor,  # [n_rows, batch, pos, d_model], written in place
                act: torch.Tensor,  # [n_rows, batch, pos', d_model], pos' <= pos
                subtract: bool = False) -> None:
    """``dst = act`` (or ``dst -= act``) for a sender output that a run cut after the last block's
    attention computed at the last ``pos'`` positions only; ``dst`` is 0 before them (nothing reads
    those positions: every receiver of such a sender is read after the cut, with gradient 0 there)."""
    cut = dst.shape[-2] - act.shape[-2]
    if cut:
        dst[..., :cut, :] = 0
        dst = dst[..., cut:, :]
    if subtract:
        dst -= act
    else:
        dst.copy_(act)


def _sender_major(values: torch.Tensor, batch: int, owned: bool) -> torch.Tensor:
    """[batch or 1, pos, n_src, d_model] -> contiguous [n_src, batch, pos, d_model] that may be
    modified: ``values`` itself when the caller owns it and it is laid out so, else a copy."""
    v = values.permute(2, 0, 1, 3)
    if owned and v.shape[1] == batch and v.is_contiguous():
        return v
    return v.expand(v.shape[0], batch, *v.shape[2:]).contiguous()


def _ablated_sender_major(model, spec: GraphSpec, values_src: AblationValues, batch: TaskDataset, first: int = 0
                          ) -> tuple[torch.Tensor, dict[int, torch.Tensor] | None]:
    """Ablated values as a fresh sender-major [n_src, batch, pos, d_model] buffer. For PATCHING
    the heads' rows are left unset and their corrupted ``z`` returned per layer instead, to be
    projected once after the clean ``z`` is subtracted; the corrupted forward is cut after the last
    block's attention at ``first`` (:func:`_last_block_tail`)."""
    if values_src.ablation is not Ablation.PATCHING:
        with torch.no_grad():
            return _sender_major(values_src.for_batch(model, batch), len(batch), owned=False), None
    b, p = batch.clean.shape
    buf = torch.empty(spec.n_src, b, p, model.cfg.d_model, device=model_device(model), dtype=model_dtype(model))
    zs: dict[int, torch.Tensor] = {}

    def sink(rows: slice, act: torch.Tensor) -> None:
        if rows.start in spec.head_group_layer:
            zs[spec.head_group_layer[rows.start]] = act  # z [batch, pos, n_heads, d_head]
        else:
            _write_tail(buf[rows], act)

    hooks = sender_hooks(model, spec, sink, heads_as_z=True) + _last_block_tail(model, first)
    with torch.no_grad(), temporary_hooks(model, hooks):
        model(batch.corrupt)
    return buf, zs


def _sender_differences(model, spec: GraphSpec, values_src: AblationValues, batch: TaskDataset,
                        clean: torch.Tensor | None = None,  # [b, pos, n_src, d_model]: clean outputs, if captured
                        first: int = 0) -> torch.Tensor:  # [n_src, batch, pos, d_model]
    """``a^ablate - a^clean`` sender-major, in one buffer: the ablated values, from which the clean
    outputs are subtracted as a clean forward computes them (or ``clean`` when given); that forward
    cut after the last block's attention at ``first`` (:func:`_last_block_tail`)."""
    b = len(batch)
    with torch.no_grad():
        diff = _sender_major(values_src.for_batch(model, batch), b, owned=values_src.ablation is Ablation.PATCHING)
        if clean is not None:
            return diff.sub_(clean.permute(2, 0, 1, 3))

        def sink(rows: slice, act: torch.Tensor) -> None:  # [n_rows, batch, pos (after the cut: pos - first), d_model]
            _write_tail(diff[rows], act, subtract=True)

        with temporary_hooks(model, sender_hooks(model, spec, sink) + _last_block_tail(model, first)):
            model(batch.clean)
    return diff


def _gradient_scores(model, ds: TaskDataset, *, level: str, steps: int | None, ablation: Ablation | str,
                     batch_size: int, progress: bool) -> torch.Tensor:  # [n_src, n_dst] or [n_src]
    spec = GraphSpec.from_model(model)
    check_dataset(model, ds)
    values_src = Ablation.parse(ablation).prepare(model, ds, batch_size, spec)
    device = model_device(model)
    shape = {"edge": (spec.n_src, spec.n_dst), "position": (ds.seq_len, spec.n_src, spec.n_dst)}.get(level, (spec.n_src,))
    total = torch.zeros(shape, dtype=torch.float32, device=device)  # on the model's device: no sync per receiver
    n = len(ds)
    weights: dict[int, _QKVWeights] = {}  # shared by every pass of this call
    with graph_hooks_enabled(model, split_qkv=False):
        for batch in tqdm(list(ds.batches(batch_size)), desc="attribution", disable=not progress, leave=False):
            batch = batch.to(device)
            b, scored_from = len(batch), first_scored(batch)  # the metric reads no logits before it
            if steps is None:  # eap: the clean forward with gradients also subtracts the clean outputs
                diff, z_ablate = _ablated_sender_major(model, spec, values_src, batch, scored_from)
                gp = _GradientPass(model, spec, level, total, diff, True, z_ablate, weights=weights,
                                   score_in_backward=True)
                logits = gp.run(model, batch.clean, first=scored_from)
                reference = logits.detach() if batch.metric is Metric.NEG_KL else None
                gp.backward(logits, batch, reference, b / n)
                del logits, reference  # the autograd graph's buffers go before the contraction's
                gp.flush()
                continue
            # eap-ig: `steps` interpolated forward + backward passes, then the sender differences: the passes
            # need only the input embeddings (and the clean logits for KL), and diff is read by flush() alone
            with torch.no_grad():
                base_in = values_src.input_for_batch(model, batch)  # [b or 1, pos, d_model]
                clean_logits, clean = (capture_senders(model, batch.clean, spec) if batch.metric is Metric.NEG_KL
                                       else (None, None))  # [b, pos, d_vocab], [b, pos, n_src, d_model]
            gp = _GradientPass(model, spec, level, total, None, weights=weights)
            per_pass = ig_steps_per_pass(steps, b * batch.seq_len * model.cfg.d_model * spec.n_layers)
            for first in range(1, steps + 1, per_pass):  # steps k/steps, k = 1..steps, `per_pass` copies at a time
                alphas = torch.arange(first, min(first + per_pass, steps + 1), device=device, dtype=base_in.dtype) / steps
                r = len(alphas)

                def interpolate(x, alphas=alphas, r=r):  # the clean embedding of r copies -> [r*b, pos, d_model]
                    clean_in = x.reshape(r, -1, *x.shape[1:])[0]  # [b, pos, d_model]
                    return (base_in + alphas[:, None, None, None] * (clean_in - base_in)).reshape(-1, *x.shape[1:])

                logits = gp.run(model, batch.clean.repeat(r, 1), interpolate, r, scored_from)
                gp.backward(logits, batch, clean_logits, r * b / (n * steps))
                del logits
            # every step's gradients, contracted once
            gp.flush(_sender_differences(model, spec, values_src, batch, clean, scored_from))
    return total.cpu()  # one transfer per call, after every batch


def _check_steps(steps: Any) -> int:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise CircuitkitError(f"IG methods need steps >= 1 (an integer), got {steps!r}")
    return steps


def _level_fn(scores: Callable[..., torch.Tensor], level: str, stepped: bool) -> Callable[..., torch.Tensor]:
    """A registry entry's edge or node function from a ``scores(model, ds, *, level, steps, ...)``;
    ``stepped`` ones take a ``steps`` option (default :data:`DEFAULT_IG_STEPS`), the others none."""
    if not stepped:
        def fn(model, ds, *, ablation, batch_size, progress) -> torch.Tensor:
            return scores(model, ds, level=level, steps=None, ablation=ablation, batch_size=batch_size,
                          progress=progress)
        return fn

    def stepped_fn(model, ds, *, ablation, batch_size, progress, steps: int = DEFAULT_IG_STEPS) -> torch.Tensor:
        return scores(model, ds, level=level, steps=_check_steps(steps), ablation=ablation, batch_size=batch_size,
                      progress=progress)
    return stepped_fn


# ---------------------------------------------------------------- integrated gradients per sender

def _sender_path_scores(model, ds: TaskDataset, *, level: str, steps: int, ablation: Ablation | str,
                        batch_size: int, progress: bool) -> torch.Tensor:  # [n_src, n_dst] or [n_src]
    """Integrated gradients along each sender's own ablation path.

    For sender ``u`` and ``α_k = (k + ½) / steps`` (midpoint rule) the model runs with u's
    output ``a_u^clean + α_k δ_u`` (``δ_u = a_u^ablate - a_u^clean``), everything else computed
    from there as usual; the score of ``u -> v`` is ``δ_u · mean_k ∂m/∂(input_v)`` and the node
    score of u is ``δ_u · mean_k ∂m/∂a_u`` (which tends to u's exact node patching effect as
    ``steps`` grows: the path is one-dimensional). Each (sender, step) pair is one copy of the
    batch; copies whose senders sit in the same block share a pass that starts at that block
    from the cached clean residual stream. Costs ``n_src * steps`` partial forward + backward
    passes per batch, against ``steps`` for eap-ig.
    """
    spec = GraphSpec.from_model(model)
    check_dataset(model, ds)
    values_src = Ablation.parse(ablation).prepare(model, ds, batch_size, spec)
    device, d_model = model_device(model), model.cfg.d_model
    out = torch.zeros((spec.n_src, spec.n_dst) if level == "edge" else (spec.n_src,), dtype=torch.float64)
    by_block: dict[int, list[int]] = {}  # block a pass starts at -> senders perturbed there
    kind: dict[int, str] = {}  # sender -> "input" | "head" | "mlp"
    for g in spec.sender_groups:
        by_block.setdefault(0 if g.layer is None else g.layer, []).extend(range(g.rows.start, g.rows.stop))
        kind.update({s: "input" if g.layer is None else "head" if g.per_head else "mlp"
                     for s in range(g.rows.start, g.rows.stop)})
    split = level == "edge"
    width = 3 * spec.n_heads + 2 if split else 2  # residual-sized tensors a copy keeps per block
    n_batches = -(-len(ds) // batch_size)
    with graph_hooks_enabled(model, split_qkv=split), \
            tqdm(total=n_batches * spec.n_src, desc="eap-ig-senders", disable=not progress, leave=False) as bar:
        for batch in ds.batches(batch_size):
            batch = batch.to(device)
            b, p = batch.clean.shape
            with torch.no_grad():
                values = values_src.for_batch(model, batch)  # [b or 1, pos, n_src, d_model]
                logits, clean, resid = _clean_run(model, spec, batch.clean)
                delta = values.permute(2, 0, 1, 3) - clean  # [n_src, b, pos, d_model]
            reference = logits if batch.metric is Metric.NEG_KL else None
            per_pass = max(1, PATCH_COPY_BUDGET // (b * p * d_model * width))
            for layer, senders in by_block.items():
                items = [(s, k) for s in senders for k in range(steps)]
                for start in range(0, len(items), per_pass):
                    chunk = items[start: start + per_pass]
                    srcs = torch.tensor([s for s, _ in chunk], device=device)
                    alphas = torch.tensor([(k + 0.5) / steps for _, k in chunk], device=device, dtype=delta.dtype)
                    kinds = [kind[s] for s, _ in chunk]
                    _SenderPathPass(model, spec, level, out, delta, srcs, kinds, alphas, layer).run(
                        resid[layer], batch, reference, 1.0 / (len(ds) * steps))
                    bar.update(len(chunk) / steps)
    if level == "edge":
        out *= spec.real
    return out.float()


class _SenderPathPass:
    """One stack of per-sender IG copies: copy ``c`` moves sender ``srcs[c]`` by ``alphas[c] * δ``.

    The input's perturbation is added to the starting residual; a head's to ``hook_attn_out``
    and an MLP's to ``hook_mlp_out`` of block ``layer`` (a head's output enters the residual
    stream only through the block's attention output). Node level: a zero tensor requiring
    grad rides on each perturbation. Edge level: the starting residual requires grad and the
    receivers' inputs (per-head q/k/v inputs) are watched. Gradients are contracted with the
    copy's own ``δ``.
    """

    def __init__(self, model, spec: GraphSpec, level: str, out: torch.Tensor,  # [n_src, n_dst] or [n_src]
                 delta: torch.Tensor,  # [n_src, batch, pos, d_model]
                 srcs: torch.Tensor, kinds: list[str], alphas: torch.Tensor, layer: int):  # [r], r, [r]
        self.model, self.spec, self.level, self.out, self.layer = model, spec, level, out, layer
        self.srcs, self.r = srcs, len(srcs)
        self.own = delta[srcs]  # [r, b, pos, d_model]: each copy's δ
        move = alphas[:, None, None, None] * self.own
        self.of_kind = {k: torch.tensor([x == k for x in kinds], device=srcs.device) for k in set(kinds)}  # [r] bool
        self.moves = {k: move * m[:, None, None, None] for k, m in self.of_kind.items()}  # [r, b, pos, d_model]
        self.leaves: dict[str, torch.Tensor] = {}

    def _flat(self, t: torch.Tensor) -> torch.Tensor:  # [r, b, ...] -> [r*b, ...]
        return t.reshape(-1, *t.shape[2:])

    def _add(self, kind: str) -> Callable:
        def hook(act, hook):  # [r*b, pos, d_model]
            act = act + self._flat(self.moves[kind])
            if self.level == "node":
                leaf = torch.zeros_like(act, requires_grad=True)
                self.leaves[kind] = leaf
                act = act + leaf
            return act
        return hook

    def _receiver(self, cols: slice, per_head: bool) -> Callable:
        def on_grad(grad):  # [r*b, pos, (n_heads,) d_model]
            g = grad.reshape(self.r, -1, *grad.shape[1:])
            eq = "rbpd,rbphd->rh" if per_head else "rbpd,rbpd->r"
            score = torch.einsum(eq, self.own, g).reshape(self.r, -1).double().cpu()  # [r, n_cols]
            rows = self.srcs.cpu()[:, None].expand(-1, score.shape[1])
            idx = torch.arange(cols.start, cols.stop)[None, :].expand(self.r, -1)
            self.out.index_put_((rows, idx), score * self.weight, accumulate=True)

        def hook(act, hook):
            act.register_hook(on_grad)
        return hook

    def run(self, resid: torch.Tensor,  # [b, pos, d_model]: clean residual entering block `layer`
            batch: TaskDataset, reference: torch.Tensor | None, weight: float) -> None:
        self.weight = weight
        hooks = []
        if "head" in self.moves:
            hooks.append((f"blocks.{self.layer}.hook_attn_out", self._add("head")))
        if "mlp" in self.moves:
            hooks.append((f"blocks.{self.layer}.hook_mlp_out", self._add("mlp")))
        if self.level == "edge":
            hooks += [(g.hook, self._receiver(g.cols, g.per_head)) for g in self.spec.receiver_groups
                      if g.cols.start >= self.layer * self.spec.dst_per_layer]
        x = resid.unsqueeze(0).expand(self.r, *resid.shape)  # [r, b, pos, d_model]
        if "input" in self.moves:
            x = x + self.moves["input"]
        x = self._flat(x).detach()
        if self.level == "edge":
            x.requires_grad_(True)  # so that every receiver downstream carries a gradient
        elif "input" in self.moves:
            self.leaves["input"] = leaf = torch.zeros_like(x, requires_grad=True)
            x = x + leaf
        with temporary_hooks(self.model, hooks):
            logits = self.model(x, start_at_layer=self.layer)  # [r*b, pos, d_vocab]
            copies_metric(batch, logits, reference, self.r).sum().backward()
        if self.level == "node":
            for kind, leaf in self.leaves.items():
                g = leaf.grad.reshape(self.r, *self.own.shape[1:])  # [r, b, pos, d_model]
                score = (self.own * g).flatten(1).sum(1).double().cpu() * self.of_kind[kind].cpu()
                self.out.index_add_(0, self.srcs.cpu(), score * weight)


# ---------------------------------------------------------------- exact patching

@dataclass(frozen=True)
class _Site:
    """Where a single-sender ablation applies ``δ = a_u^ablate - a_u^clean``.

    Ablating one edge ``u -> v`` (or all outputs of one node ``u``) leaves everything computed
    before that point as in the clean run, so the forward pass starts at block ``layer`` from
    the cached clean residual stream ``x`` (``layer == n_layers``: only the final LayerNorm and
    unembedding run) and

    - ``hook is None``: adds δ to that starting residual;
    - ``hook`` is ``attn.hook_q/k/v``: replaces head ``head``'s query/key/value by
      ``ln1(x + δ) @ W[head] + b[head]`` (what a per-head input ``x + δ`` gives, without
      per-head LayerNorms for every head);
    - otherwise adds δ to the activation at ``hook`` (``hook_mlp_in``, ``hook_attn_out``, ``hook_mlp_out``).
    """

    layer: int
    hook: str | None
    head: int | None


def _edge_sites(spec: GraphSpec) -> tuple[torch.Tensor, list[_Site]]:  # ([n_real, 2] (src, dst), sites)
    edges = spec.real.nonzero()
    where = {}
    for g in spec.receiver_groups:
        for col in range(g.cols.start, g.cols.stop):
            layer = spec.dst_layer(col)
            if layer is None:
                where[col] = _Site(spec.n_layers, None, None)
            elif g.per_head:  # blocks.{l}.hook_{q}_input -> blocks.{l}.attn.hook_{q}
                where[col] = _Site(layer, f"blocks.{layer}.attn.hook_{g.hook.split('_')[-2][-1]}", col - g.cols.start)
            else:
                where[col] = _Site(layer, g.hook, None)
    return edges, [where[d] for d in edges[:, 1].tolist()]


def _node_sites(spec: GraphSpec) -> list[_Site]:
    sites = []
    for g in spec.sender_groups:
        site = _Site(0, None, None) if g.layer is None else _Site(g.layer, g.grad_hook, None)
        sites += [site] * (g.rows.stop - g.rows.start)
    return sites


def _site_hook(model, site: _Site, delta: torch.Tensor,  # [k, batch, pos, d_model]
               heads: torch.Tensor,  # [k] head per copy (head-input sites)
               x: torch.Tensor) -> Callable:  # [batch, pos, d_model]: clean residual entering the block
    k = delta.shape[0]
    if site.hook.endswith(("hook_q", "hook_k", "hook_v")):
        block = model.blocks[site.layer]
        c = site.hook[-1]
        w = getattr(block.attn, f"W_{c.upper()}")[heads]  # [k, d_model, d_head]
        bias = getattr(block.attn, f"b_{c.upper()}")[heads]  # [k, d_head]
        new = torch.einsum("kbpd,kde->kbpe", block.ln1(x.unsqueeze(0) + delta), w) + bias[:, None, None]

        def hook(act, hook):  # [k*b, pos, n_heads, d_head]
            out = act.reshape(k, -1, *act.shape[1:]).clone()
            out[torch.arange(k, device=heads.device), :, :, heads] = new
            return out.reshape(act.shape)
        return hook

    def hook(act, hook):  # [k*b, pos, d_model]; after the last block's cut [k*b, pos - first, d_model]
        tail = delta[:, :, delta.shape[2] - act.shape[1]:]  # the cut keeps the last positions
        return (act.reshape(k, -1, *act.shape[1:]) + tail).reshape(act.shape)
    return hook


def _last_block_tail(model, first: int) -> list[tuple[str, Callable]]:
    """Hooks that keep only token positions ``first..`` once the last block's attention has read
    every position.

    The last block's MLP, the final LayerNorm and the unembedding are per-position, and the metric
    reads no logits before ``first``, so the logits there are the full pass's (exact patching spends
    about half its time in the last block, at positions that are never scored). The cut is the
    last block's ``hook_resid_mid`` (``hook_resid_post`` where attention and MLP read the same
    residual, or there is no MLP); a site hook after it sees the last ``pos - first`` positions."""
    if first == 0:
        return []
    cfg = model.cfg

    def cut(act, hook):  # [n, pos, d_model] -> [n, pos - first, d_model]
        return act[:, first:]
    where = "hook_resid_post" if cfg.attn_only or cfg.parallel_attn_mlp else "hook_resid_mid"
    return [(f"blocks.{cfg.n_layers - 1}.{where}", cut)]


def _single_sender_patching(model, ds: TaskDataset, srcs: torch.Tensor,  # [n_items] sender of each ablation
                            sites: list[_Site], *, ablation, batch_size, progress,
                            positions: torch.Tensor | None = None) -> torch.Tensor:  # [n_items]
    """Mean metric change when item ``i`` applies ``a^ablate - a^clean`` of sender ``srcs[i]`` at ``sites[i]``
    (only at token position ``positions[i]`` when given: position-level patching)."""
    spec = GraphSpec.from_model(model)
    check_dataset(model, ds)
    values_src = Ablation.parse(ablation).prepare(model, ds, batch_size, spec)
    device, d_model = model_device(model), model.cfg.d_model
    groups: dict[tuple[int, str | None], list[int]] = {}
    for i, site in enumerate(sites):
        groups.setdefault((site.layer, site.hook), []).append(i)
    heads = torch.tensor([-1 if s.head is None else s.head for s in sites], device=device)
    srcs = srcs.to(device)
    positions = None if positions is None else positions.to(device)
    total = torch.zeros(len(sites), dtype=torch.float64)
    n_batches = -(-len(ds) // batch_size)
    with torch.no_grad(), graph_hooks_enabled(model, split_qkv=False), \
            tqdm(total=n_batches * len(sites), desc="patching", disable=not progress, leave=False) as bar:
        for batch in ds.batches(batch_size):
            batch = batch.to(device)
            b, p = batch.clean.shape
            values = values_src.for_batch(model, batch)  # [b or 1, pos, n_src, d_model]
            logits, clean, resid = _clean_run(model, spec, batch.clean)
            reference = logits if batch.metric is Metric.NEG_KL else None
            m_full = batch.metric_values(logits, reference).double()  # [b]
            diff = values.permute(2, 0, 1, 3) - clean  # [n_src, b, pos, d_model]
            per_pass = max(1, patch_copy_budget(device) // (b * p * d_model))
            first = first_scored(batch)
            scored = batch.scored_from(first)
            tail_ref = None if reference is None else reference[:, first:]  # [b, pos - first, d_vocab]
            for (layer, hook), items in groups.items():
                for start in range(0, len(items), per_pass):
                    chunk = torch.tensor(items[start: start + per_pass], device=device)
                    k = len(chunk)
                    delta = diff[srcs[chunk]]  # [k, b, pos, d_model]
                    if positions is not None:  # δ at the item's own position only
                        at = positions[chunk][:, None] == torch.arange(p, device=device)  # [k, pos]
                        delta = delta * at[:, None, :, None].to(delta.dtype)
                    x = resid[layer].unsqueeze(0).expand(k, b, p, d_model)  # [k, b, pos, d_model]
                    hooks = _last_block_tail(model, first) if layer < spec.n_layers else []
                    if hook is None:
                        x = x + delta
                        if layer == spec.n_layers:  # the logits' input: LayerNorm and unembed work per position
                            x = x[:, :, first:]
                    else:
                        hooks.append((hook, _site_hook(model, sites[items[start]], delta, heads[chunk],
                                                       resid[layer])))
                    with temporary_hooks(model, hooks):
                        out = model(x.reshape(k * b, x.shape[2], d_model), start_at_layer=layer)
                    # out: [k*b, pos - first, d_vocab]
                    m = copies_metric(scored, out, tail_ref, k).double()  # [k, b]
                    total[chunk.cpu()] += (m - m_full).sum(1).cpu()
                    bar.update(k)
    return (total / len(ds)).float()


def _clean_run(model, spec: GraphSpec, tokens: torch.Tensor  # [batch, pos]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits [batch, pos, d_vocab], sender outputs [n_src, batch, pos, d_model] (sender-major) and
    the residual stream entering each block and the final LayerNorm, [n_layers + 1, batch, pos, d_model]."""
    b, p = tokens.shape
    senders = torch.empty(spec.n_src, b, p, model.cfg.d_model, device=tokens.device, dtype=model_dtype(model))
    resid = torch.empty(spec.n_layers + 1, b, p, model.cfg.d_model, device=tokens.device, dtype=model_dtype(model))

    def sink(rows: slice, act: torch.Tensor) -> None:
        senders[rows] = act

    def keep(i: int) -> Callable:
        def hook(act, hook):
            resid[i] = act
        return hook

    hooks = sender_hooks(model, spec, sink) + [(f"blocks.{i}.hook_resid_pre", keep(i)) for i in range(spec.n_layers)]
    hooks.append((f"blocks.{spec.n_layers - 1}.hook_resid_post", keep(spec.n_layers)))
    with temporary_hooks(model, hooks):
        logits = model(tokens)
    return logits, senders, resid


def _patching_edges(model, ds, *, ablation, batch_size, progress) -> torch.Tensor:
    spec = GraphSpec.from_model(model)
    edges, sites = _edge_sites(spec)
    delta = _single_sender_patching(model, ds, edges[:, 0], sites, ablation=ablation, batch_size=batch_size,
                                    progress=progress)
    scores = torch.zeros(spec.n_src, spec.n_dst)
    scores[edges[:, 0], edges[:, 1]] = delta
    return scores


def exact_position_patching(model, ds: TaskDataset, positions: list[int] | None = None, *,
                            ablation: Ablation | str = Ablation.PATCHING, batch_size: int = DEFAULT_BATCH_SIZE,
                            progress: bool = False) -> torch.Tensor:  # [pos, n_src, n_dst]
    """Exact position-level patching: the mean metric change when one edge at one token position
    alone is ablated. It costs ``n_pos`` times component-level patching; ``positions`` (indices)
    measures those only and leaves the others' scores 0 (not measured)."""
    spec = GraphSpec.from_model(model)
    check_dataset(model, ds)
    chosen = list(range(ds.seq_len)) if positions is None else sorted(set(positions))
    if any(not isinstance(p, int) or not 0 <= p < ds.seq_len for p in chosen):
        raise CircuitkitError(f"positions {positions!r} must be integers in [0, {ds.seq_len})")
    edges, sites = _edge_sites(spec)  # [n_real, 2], n_real sites
    n_real = len(edges)
    at = torch.tensor(chosen, dtype=torch.long).repeat_interleave(n_real)  # position-major items
    srcs, dsts = edges[:, 0].repeat(len(chosen)), edges[:, 1].repeat(len(chosen))
    delta = _single_sender_patching(model, ds, srcs, sites * len(chosen), ablation=ablation,
                                    batch_size=batch_size, progress=progress, positions=at)
    scores = torch.zeros(ds.seq_len, spec.n_src, spec.n_dst)
    scores[at, srcs, dsts] = delta
    return scores


def _patching_positions(model, ds, *, ablation, batch_size, progress) -> torch.Tensor:  # [pos, n_src, n_dst]
    return exact_position_patching(model, ds, ablation=ablation, batch_size=batch_size, progress=progress)


def _patching_nodes(model, ds, *, ablation, batch_size, progress) -> torch.Tensor:
    spec = GraphSpec.from_model(model)
    return _single_sender_patching(model, ds, torch.arange(spec.n_src), _node_sites(spec), ablation=ablation,
                                   batch_size=batch_size, progress=progress)


# ---------------------------------------------------------------- ACDC-style pruning

def _acdc_edges(model, ds: TaskDataset, *, ablation, batch_size, progress,
                tau: float = DEFAULT_ACDC_TAU) -> torch.Tensor:  # [n_src, n_dst]
    """ACDC-style greedy pruning (Conmy et al. 2023), absolute-value variant.

    Starting from the full graph, receivers are visited from the logits back to the first
    block (reverse topological order) and, for each, its incoming edges from the latest sender
    to the input. Each edge is tried: ``score = m(current without it) - m(current)`` (mean over
    ``ds``), and it stays removed when ``|score| < tau``. So the kept edges are exactly those
    with ``|score| >= tau`` (``threshold(graph, tau)``), and the final circuit's metric is
    ``m(full)`` plus the scores of the removed edges. One patched pass over ``ds`` per real
    edge, in sequence (each decision depends on the ones before).
    """
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau >= 0:
        raise CircuitkitError(f"acdc needs tau >= 0 (the largest metric change an edge may make and still be "
                              f"pruned), got {tau!r}")
    spec = GraphSpec.from_model(model)
    check_dataset(model, ds)
    current = Graph.full(spec)
    m_cur = float(metric_with_graph(model, current, ds, ablation, batch_size).mean())
    scores = torch.zeros(spec.n_src, spec.n_dst)
    prefix = spec.src_prefix.tolist()
    order = [(s, d) for d in reversed(range(spec.n_dst)) for s in reversed(range(prefix[d]))]
    for s, d in tqdm(order, desc="acdc", disable=not progress, leave=False):
        member = current.in_graph.clone()
        member[s, d] = False
        trial = current.with_in_graph(member)
        m_new = float(metric_with_graph(model, trial, ds, ablation, batch_size).mean())
        scores[s, d] = m_new - m_cur
        if abs(m_new - m_cur) < tau:
            current, m_cur = trial, m_new
    return scores


def _acdc_nodes(model, ds, **_) -> torch.Tensor:
    raise CircuitkitError("acdc scores edges only; for node scores use patching, eap or eap-ig "
                          "(node_method in a study config)")


# ---------------------------------------------------------------- registry

@dataclass(frozen=True)
class Option:
    """A keyword option of an attribution method; the command line offers it as ``flag``.

    Methods that share an option (eap-ig and eap-ig-senders take ``steps``) declare it
    alike, so one flag serves them all.
    """

    name: str  # the keyword the method's functions take
    type: type  # int, float, str or bool
    default: Any
    help: str
    flag: str | None = None  # command-line flag; default ``--<name>`` with dashes

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def check(self, method: str, value: Any) -> Any:
        """``value`` if it has this option's type (an int passes for a float); else a clear error."""
        ok = isinstance(value, self.type) and not (isinstance(value, bool) and self.type is not bool)
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            ok, value = True, float(value)
        if not ok:
            raise CircuitkitError(f"method {method!r}: option {self.name} ({self.cli_flag}) must be "
                                  f"{self.type.__name__}, got {value!r}")
        return value


IG_STEPS = Option("steps", int, DEFAULT_IG_STEPS, "integration steps (eap-ig, eap-ig-senders)", flag="--ig-steps")
ACDC_TAU = Option("tau", float, DEFAULT_ACDC_TAU,
                  "acdc: prune an edge when removing it moves the metric by less than this; the circuit is then "
                  "the edges it kept (unless an explicit selection is asked for)")


@dataclass(frozen=True)
class Method:
    """An attribution method: edge scores [n_src, n_dst], node scores [n_src] and, where it has a
    position-level variant, position edge scores [pos, n_src, n_dst].

    ``edge_fn(model, ds, *, ablation, batch_size, progress, **options)`` returns the edge
    scores [n_src, n_dst] (``GraphSpec.from_model(model)`` numbering), ``node_fn`` the node
    scores [n_src], ``position_fn`` (None: component level only) the scores of every edge at
    every token position [pos, n_src, n_dst] (:mod:`~circuitkit.circuits.positions`);
    ``options`` declares the keyword options they take. :attr:`levels` says which graphs it scores.
    """

    name: str
    summary: str
    edge_fn: Callable[..., torch.Tensor]
    node_fn: Callable[..., torch.Tensor]
    options: tuple[Option, ...] = ()
    position_fn: Callable[..., torch.Tensor] | None = None

    @property
    def levels(self) -> tuple[str, ...]:
        """The graph levels this method scores (:data:`LEVELS`)."""
        return LEVELS if self.position_fn is not None else LEVELS[:1]

    def check_level(self, level: str) -> "Method":
        """This method, or a clear error when it has no variant at ``level``."""
        if level not in LEVELS:
            raise CircuitkitError(f"unknown graph level {level!r}; levels: {', '.join(LEVELS)}")
        if level not in self.levels:
            raise CircuitkitError(f"method {self.name!r} has no {level}-level variant; {level}-level methods: "
                                  f"{', '.join(method_names(level))}")
        return self

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.options)

    def defaults(self) -> dict[str, Any]:
        return {o.name: o.default for o in self.options}

    def pick(self, **candidates: Any) -> dict[str, Any]:
        """Of ``candidates`` (e.g. every option a command line offers), the ones this method takes."""
        return {k: v for k, v in candidates.items() if k in self.option_names}

    def _check(self, options: Mapping[str, Any]) -> dict[str, Any]:
        bad = sorted(set(options) - set(self.option_names))
        if bad:
            raise CircuitkitError(f"method {self.name!r} takes no option(s) {', '.join(bad)}; it accepts "
                                  f"{', '.join(self.option_names) or 'none'}")
        by_name = {o.name: o for o in self.options}
        return {k: by_name[k].check(self.name, v) for k, v in options.items()}

    def edge_scores(self, model, ds: TaskDataset, *, ablation: Ablation | str = Ablation.PATCHING,
                    batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False,
                    **options) -> torch.Tensor:  # [n_src, n_dst]
        options = self._check(options)
        return self.edge_fn(model, ds, ablation=ablation, batch_size=batch_size, progress=progress, **options)

    def node_scores(self, model, ds: TaskDataset, *, ablation: Ablation | str = Ablation.PATCHING,
                    batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False,
                    **options) -> torch.Tensor:  # [n_src]
        options = self._check(options)
        return self.node_fn(model, ds, ablation=ablation, batch_size=batch_size, progress=progress, **options)

    def position_scores(self, model, ds: TaskDataset, *, ablation: Ablation | str = Ablation.PATCHING,
                        batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False,
                        **options) -> torch.Tensor:  # [pos, n_src, n_dst]
        self.check_level(POSITION)
        options = self._check(options)
        return self.position_fn(model, ds, ablation=ablation, batch_size=batch_size, progress=progress, **options)


_REGISTRY: dict[str, Method] = {}
METHODS: Mapping[str, Method] = MappingProxyType(_REGISTRY)  # read-only view; add with register_method


class _MethodsAt(Mapping):
    """A live read-only view of the registered methods that score graphs at one level."""

    def __init__(self, level: str) -> None:
        self.level = level

    def __getitem__(self, name: str) -> Method:
        m = _REGISTRY[name]
        if self.level not in m.levels:
            raise KeyError(name)
        return m

    def __iter__(self) -> Iterator[str]:
        return iter([n for n, m in _REGISTRY.items() if self.level in m.levels])

    def __len__(self) -> int:
        return sum(1 for _ in self)


POSITION_METHODS: Mapping[str, Method] = _MethodsAt(POSITION)  # the methods with a position-level variant


def register_method(name: str, summary: str, edge_fn: Callable[..., torch.Tensor],
                    node_fn: Callable[..., torch.Tensor] | None = None, options: tuple[Option, ...] = (),
                    *, position_fn: Callable[..., torch.Tensor] | None = None, replace: bool = False) -> Method:
    """Add an attribution method to the registry, so that :func:`attribute`, the study and the
    command line (``--method NAME`` and a flag per option) reach it by name; with ``position_fn``
    also :func:`~circuitkit.circuits.positions.attribute_positions` and ``discover --level position``.

    ``node_fn`` may be None for a method that scores edges only. An option that another
    method already declares must be declared alike (same type, default and flag).
    """
    if not isinstance(name, str) or not name or name != name.strip():
        raise CircuitkitError(f"a method name must be a non-empty string without surrounding spaces, got {name!r}")
    if name in _REGISTRY and not replace:
        raise CircuitkitError(f"an attribution method named {name!r} is already registered; pick another name "
                              "or pass replace=True")
    if not callable(edge_fn) or any(f is not None and not callable(f) for f in (node_fn, position_fn)):
        raise CircuitkitError(f"method {name!r}: edge_fn, node_fn and position_fn must be callables")
    options = tuple(options)
    for o in options:
        if not isinstance(o, Option):
            raise CircuitkitError(f"method {name!r}: options must be Option(name, type, default, help), got {o!r}")
        if o.name in ("ablation", "batch_size", "progress"):
            raise CircuitkitError(f"method {name!r}: option name {o.name!r} is taken by attribute() itself")
        other = next((p for m in _REGISTRY.values() if m.name != name for p in m.options
                      if p.name == o.name or p.cli_flag == o.cli_flag), None)
        if other is not None and other != o:
            raise CircuitkitError(f"method {name!r}: option {o.name!r} ({o.cli_flag}) clashes with {other}; "
                                  "declare a shared option identically or give it another name and flag")
    if node_fn is None:
        def node_fn(model, ds, **_):
            raise CircuitkitError(f"method {name!r} scores edges only; for node scores use patching, eap or eap-ig")
    method = Method(name, summary, edge_fn, node_fn, options, position_fn)
    _REGISTRY[name] = method
    return method


def all_options() -> list[Option]:
    """Every option some registered method takes, once each (the command line's method flags)."""
    seen: dict[str, Option] = {}
    for m in _REGISTRY.values():
        for o in m.options:
            seen.setdefault(o.name, o)
    return list(seen.values())


register_method("patching", "exact: metric change when ablating each edge (at one position: position level) alone",
                _patching_edges, _patching_nodes, position_fn=_patching_positions)
register_method("eap", "edge attribution patching: (a_ablate - a_clean) . dm/d(receiver input)",
                _level_fn(_gradient_scores, "edge", False), _level_fn(_gradient_scores, "node", False),
                position_fn=_level_fn(_gradient_scores, "position", False))
register_method("eap-ig", "EAP with integrated gradients over interpolated input embeddings",
                _level_fn(_gradient_scores, "edge", True), _level_fn(_gradient_scores, "node", True), (IG_STEPS,),
                position_fn=_level_fn(_gradient_scores, "position", True))
register_method("eap-ig-senders", "integrated gradients along each sender's own clean -> ablated path "
                "(n_src x steps passes)", _level_fn(_sender_path_scores, "edge", True),
                _level_fn(_sender_path_scores, "node", True), (IG_STEPS,))
register_method("acdc", "ACDC-style greedy pruning: an edge stays out when removing it moves the metric by < tau",
                _acdc_edges, _acdc_nodes, (ACDC_TAU,))


def method_names(level: str | None = None) -> list[str]:
    """Registered method names (those with a variant at ``level`` when given)."""
    return list(_REGISTRY) if level is None else [n for n, m in _REGISTRY.items() if level in m.levels]


def get_method(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise CircuitkitError(f"unknown attribution method {name!r}; known methods: "
                              f"{', '.join(_REGISTRY)}") from None


def attribute(model, ds: TaskDataset, method: str = "eap", *, ablation: Ablation | str = Ablation.PATCHING,
              batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False, **options) -> Graph:
    """Edge scores of ``method`` as a :class:`Graph` holding every real edge (select from it next)."""
    m = get_method(method)
    ablation = Ablation.parse(ablation)
    scores = m.edge_scores(model, ds, ablation=ablation, batch_size=batch_size, progress=progress, **options)
    _check_finite(scores, f"{m.name} edge scores")
    meta = {"method": m.name, "ablation": ablation.value, "task": ds.task, "n_examples": len(ds),
            "metric": ds.metric.value, **options}
    return Graph.from_model(model, scores=scores, metadata=meta)


def attribute_nodes(model, ds: TaskDataset, method: str = "eap", *, ablation: Ablation | str = Ablation.PATCHING,
                    batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False,
                    **options) -> torch.Tensor:  # [n_src]: node i = sender i (graph.spec.node_names)
    """Node scores: the estimated metric change when each node's whole output is ablated."""
    scores = get_method(method).node_scores(model, ds, ablation=Ablation.parse(ablation), batch_size=batch_size,
                                            progress=progress, **options)
    _check_finite(scores, f"{method} node scores")
    return scores


def _check_finite(scores: torch.Tensor, what: str) -> None:
    """A NaN or Inf score would select nothing (or anything) silently: refuse it."""
    if not bool(torch.isfinite(scores).all()):
        bad = int((~torch.isfinite(scores)).sum())
        raise CircuitkitError(f"{bad} of the {what} are not finite (NaN or Inf): the model's forward pass or the "
                              "metric overflowed; check the weights (circuitkit.models.load_model checks files) "
                              "and that the metric is defined on this task")
