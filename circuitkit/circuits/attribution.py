"""Edge and node attribution methods, chosen by name from a registry.

Why: discovery, benchmarks and evaluation all ask "how much does each edge (or head)
matter for this task?" and must get comparable answers from interchangeable methods.
Every score here follows one sign convention: the estimated change of the task metric
(mean over examples) when that edge or node alone is ablated. So ``patching`` (exact)
and ``eap`` / ``eap-ig`` (gradient estimates) can be compared directly.

- ``patching``: exact; the metric change when ablating each edge alone. Ablating ``u -> v``
  alone changes nothing before ``v`` reads the residual stream, so each forward pass starts
  at ``v``'s block from the cached clean residual and adds ``a_u^ablate - a_u^clean`` to
  ``v``'s input; many edges share a pass (copies stacked along the batch). The tests check
  it against the general intervention of :mod:`~circuitkit.circuits.interventions`.
- ``eap``: ``(a_u^ablate - a_u^clean) · ∂m/∂(input_v)``, summed over positions and d_model,
  on the clean run: one ablation pass + one clean forward + one backward per batch; the
  products are one einsum per receiver block, done in the backward hooks.
- ``eap-ig``: as eap, with the receiver gradients averaged over ``steps`` runs whose input
  embeddings are interpolated from the ablated to the clean input (k/steps, k = 1..steps;
  ``steps=1`` is eap).

Node scores use the same ideas at the senders' outputs: for eap and eap-ig they equal the
sum of the node's outgoing edge scores; node patching ablates all of a node's outputs.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping

import torch
from tqdm.auto import tqdm

from circuitkit import CircuitkitError
from circuitkit.circuits.graph import Graph, GraphSpec
from circuitkit.circuits.interventions import (
    COPY_BUDGET, DEFAULT_BATCH_SIZE, Ablation, capture_senders, check_dataset, graph_hooks_enabled, model_device,
    model_dtype, sender_hooks, temporary_hooks,
)
from circuitkit.tasks.base import Metric, TaskDataset

DEFAULT_IG_STEPS = 5


# ---------------------------------------------------------------- gradient methods

class _GradientPass:
    """One forward with gradients on the clean prompts, and its backward.

    Hooks: the input embedding is replaced by ``input_fn(embedding)`` (detached, requiring
    grad); sender outputs are optionally captured into ``clean`` [batch, pos, n_src, d_model];
    gradients at the receivers (edge level) or senders (node level) are contracted with
    ``diff_t`` (``a^ablate - a^clean``, see :func:`_sender_major`) as they arrive and added to ``out``:
    one matrix product per receiver block, [prefix, batch*pos*d_model] @ [batch*pos*d_model, n_cols].

    q/k/v receivers without per-head inputs: every head's q input is the block's residual
    stream ``x`` and ``q_h = ln1(x) @ W_Q[h] + b_Q[h]``, so ``∂m/∂(q input of h)`` is the
    LayerNorm's vector-Jacobian product at ``x`` applied to ``(∂m/∂q_h) @ W_Q[h]^T``. The
    gradient is read at ``attn.hook_q`` and the LayerNorm's statistics at ``ln1.hook_scale`` /
    ``ln1.hook_normalized``; this avoids 3 * n_heads LayerNorms per block forward and back.
    """

    def __init__(self, model, spec: GraphSpec, level: str, out: torch.Tensor,  # [n_src, n_dst] or [n_src]
                 input_fn: Callable[[torch.Tensor], torch.Tensor], clean: torch.Tensor | None = None):
        self.model, self.spec, self.level, self.out, self.input_fn, self.clean = model, spec, level, out, input_fn, clean
        self.diff_t: torch.Tensor | None = None  # [n_src, batch*pos*d_model], set before backward
        self.x: torch.Tensor | None = None
        self.weight = 1.0
        self.ln_stats: dict[tuple[int, str], torch.Tensor] = {}  # (layer, "scale"|"normalized") -> [batch, pos, 1|d]

    def hooks(self) -> list[tuple[str, Callable]]:
        spec = self.spec
        hooks: list[tuple[str, Callable]] = [("blocks.0.hook_resid_pre", self._input)]
        if self.clean is not None:
            hooks += sender_hooks(self.model, spec, self._capture)
        if self.level == "edge":
            norm = self.model.cfg.normalization_type
            for g in spec.receiver_groups:
                if not g.per_head:
                    hooks.append((g.hook, self._watch(self._receiver_grad(g.prefix, g.cols))))
                    continue
                layer, qkv = int(g.hook.split(".")[1]), g.hook.split("_")[-2][-1]  # blocks.{l}.hook_{q}_input
                if qkv == "q" and norm is not None:
                    for stat in ("scale", "normalized"):
                        hooks.append((f"blocks.{layer}.ln1.hook_{stat}", self._keep_stat(layer, stat)))
                hooks.append((f"blocks.{layer}.attn.hook_{qkv}",
                              self._watch(self._head_input_grad(layer, qkv, g.prefix, g.cols))))
        else:  # the input's gradient is watched on the leaf itself, in _input
            for g in spec.sender_groups[1:]:
                hooks.append((g.grad_hook, self._watch(self._node_grad(g.rows))))
        return hooks

    def _keep_stat(self, layer: int, stat: str) -> Callable:
        def hook(act, hook):  # [batch, pos, 1] or [batch, pos, d_model]; the same for q, k and v
            self.ln_stats[layer, stat] = act.detach()
        return hook

    def _head_input_grad(self, layer: int, qkv: str, prefix: int, cols: slice) -> Callable:
        attn = self.model.blocks[layer].attn
        w_in = {"q": attn.W_Q, "k": attn.W_K, "v": attn.W_V}[qkv]  # [n_heads, d_model, d_head]

        def on_grad(grad):  # ∂m/∂q: [batch, pos, n_heads, d_head]
            with torch.no_grad():
                u = torch.einsum("bphe,hde->hbpd", grad, w_in)  # ∂m/∂ln1(x) along head h's path
                g = self._norm_vjp(layer, u)  # [n_heads, batch, pos, d_model]
                self.out[:prefix, cols] += self.weight * (self.diff_t[:prefix] @ g.reshape(g.shape[0], -1).T).float().cpu()
        return on_grad

    def _norm_vjp(self, layer: int, u: torch.Tensor) -> torch.Tensor:  # [n_heads, b, pos, d] -> same
        """``u`` pulled back through block ``layer``'s ln1 (LN, LNPre, RMS, RMSPre or none)."""
        norm = self.model.cfg.normalization_type
        if norm is None:
            return u
        ln = self.model.blocks[layer].ln1
        scale, x_hat = self.ln_stats[layer, "scale"].float(), self.ln_stats[layer, "normalized"].float()
        v = u.float() * ln.w if norm in ("LN", "RMS") else u.float()
        g = v - x_hat * (v * x_hat).mean(-1, keepdim=True)
        if norm in ("LN", "LNPre"):
            g = g - v.mean(-1, keepdim=True)
        return (g / scale).to(u.dtype)

    def _receiver_grad(self, prefix: int, cols: slice) -> Callable:
        def on_grad(grad):  # [batch, pos, d_model]
            self.out[:prefix, cols] += self.weight * (self.diff_t[:prefix] @ grad.reshape(-1, 1)).float().cpu()
        return on_grad

    def _capture(self, rows: slice, act: torch.Tensor) -> None:  # act [batch, pos, n, d_model]
        self.clean[:, :, rows] = act.detach()

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

    def _node_grad(self, rows: slice) -> Callable:
        # every sender in `rows` adds its output to the activation whose gradient arrives here
        def on_grad(grad):  # [batch, pos, d_model]
            self.out[rows] += self.weight * (self.diff_t[rows] @ grad.reshape(-1)).float().cpu()  # [n_rows]
        return on_grad

    def run(self, model, tokens: torch.Tensor) -> torch.Tensor:  # [batch, pos] -> [batch, pos, d_vocab]
        """Forward with these hooks; the logits stay attached to the autograd graph."""
        with torch.enable_grad(), temporary_hooks(model, self.hooks()):
            return model(tokens)

    def backward(self, logits: torch.Tensor, batch: TaskDataset, reference: torch.Tensor | None,
                 weight: float) -> None:
        self.weight = weight
        metric = batch.metric_values(logits, reference).mean()
        metric.backward(inputs=[self.x])


def _sender_major(diff: torch.Tensor) -> torch.Tensor:  # [batch, pos, n_src, d_model] -> [n_src, batch*pos*d_model]
    return diff.permute(2, 0, 1, 3).reshape(diff.shape[2], -1)


def _gradient_scores(model, ds: TaskDataset, *, level: str, steps: int | None, ablation: Ablation | str,
                     batch_size: int, progress: bool) -> torch.Tensor:  # [n_src, n_dst] or [n_src]
    spec = GraphSpec.from_model(model)
    check_dataset(model, ds)
    values_src = Ablation.parse(ablation).prepare(model, ds, batch_size, spec)
    device, dtype = model_device(model), model_dtype(model)
    shape = (spec.n_src, spec.n_dst) if level == "edge" else (spec.n_src,)
    total = torch.zeros(shape, dtype=torch.float32)
    n = len(ds)
    with graph_hooks_enabled(model, split_qkv=False):
        for batch in tqdm(list(ds.batches(batch_size)), desc="attribution", disable=not progress, leave=False):
            batch = batch.to(device)
            b = len(batch)
            with torch.no_grad():
                ablate = values_src.for_batch(model, batch)  # [b or 1, pos, n_src, d_model]
            if steps is None:  # eap: the clean forward with gradients also captures the clean outputs
                clean = torch.zeros(b, batch.seq_len, spec.n_src, model.cfg.d_model, device=device, dtype=dtype)
                gp = _GradientPass(model, spec, level, total, lambda x: x, clean)
                logits = gp.run(model, batch.clean)
                reference = logits.detach() if batch.metric is Metric.NEG_KL else None
                gp.diff_t = _sender_major(clean.neg_().add_(ablate))  # a^ablate - a^clean
                gp.backward(logits, batch, reference, b / n)
                continue
            # eap-ig: one clean capture pass, then `steps` interpolated forward + backward passes
            clean_logits, clean = capture_senders(model, batch.clean, spec)  # [b, pos, n_src, d_model]
            reference = clean_logits if batch.metric is Metric.NEG_KL else None
            clean_in, base_in = clean[:, :, 0].clone(), ablate[:, :, 0]  # [b, pos, d_model], [b or 1, pos, d_model]
            diff_t = _sender_major(clean.neg_().add_(ablate))  # a^ablate - a^clean
            for k in range(1, steps + 1):
                alpha = k / steps
                gp = _GradientPass(model, spec, level, total, lambda x, a=alpha: base_in + a * (clean_in - base_in))
                gp.diff_t = diff_t
                logits = gp.run(model, batch.clean)
                gp.backward(logits, batch, reference, b / (n * steps))
    return total


def _eap_edges(model, ds, *, ablation, batch_size, progress) -> torch.Tensor:
    return _gradient_scores(model, ds, level="edge", steps=None, ablation=ablation, batch_size=batch_size,
                            progress=progress)


def _eap_nodes(model, ds, *, ablation, batch_size, progress) -> torch.Tensor:
    return _gradient_scores(model, ds, level="node", steps=None, ablation=ablation, batch_size=batch_size,
                            progress=progress)


def _check_steps(steps: Any) -> int:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise CircuitkitError(f"eap-ig needs steps >= 1 (an integer), got {steps!r}")
    return steps


def _ig_edges(model, ds, *, ablation, batch_size, progress, steps: int = DEFAULT_IG_STEPS) -> torch.Tensor:
    return _gradient_scores(model, ds, level="edge", steps=_check_steps(steps), ablation=ablation,
                            batch_size=batch_size, progress=progress)


def _ig_nodes(model, ds, *, ablation, batch_size, progress, steps: int = DEFAULT_IG_STEPS) -> torch.Tensor:
    return _gradient_scores(model, ds, level="node", steps=_check_steps(steps), ablation=ablation,
                            batch_size=batch_size, progress=progress)


# ---------------------------------------------------------------- exact patching

@dataclass(frozen=True)
class _Site:
    """Where a single-sender ablation adds ``a_u^ablate - a_u^clean``.

    Ablating one edge ``u -> v`` (or all outputs of one node ``u``) leaves everything computed
    before that point as in the clean run, so the forward pass starts at block ``layer`` from
    the cached clean residual stream and adds the difference at ``hook`` (``None``: to that
    starting residual; ``layer == n_layers``: only the final LayerNorm and unembedding run).
    """

    layer: int
    hook: str | None
    head: int | None  # column of a per-head activation [batch, pos, n_heads, d_model]


def _edge_sites(spec: GraphSpec) -> tuple[torch.Tensor, list[_Site]]:  # ([n_real, 2] (src, dst), sites)
    edges = spec.real.nonzero()
    where = {}
    for g in spec.receiver_groups:
        for col in range(g.cols.start, g.cols.stop):
            if col == spec.logits_dst:
                where[col] = _Site(spec.n_layers, None, None)
            else:
                where[col] = _Site(col // (3 * spec.n_heads + 1), g.hook,
                                   col - g.cols.start if g.per_head else None)
    return edges, [where[d] for d in edges[:, 1].tolist()]


def _node_sites(spec: GraphSpec) -> list[_Site]:
    sites = []
    for g in spec.sender_groups:
        site = _Site(0, None, None) if g.layer is None else _Site(g.layer, g.grad_hook, None)
        sites += [site] * (g.rows.stop - g.rows.start)
    return sites


def _add_at(delta: torch.Tensor,  # [k, batch, pos, d_model]
            heads: torch.Tensor | None) -> Callable:  # [k] head column per copy
    def hook(act, hook):  # [k*batch, pos, n_heads, d_model] or [k*batch, pos, d_model]
        x = act.reshape(delta.shape[0], -1, *act.shape[1:]).clone()
        if heads is None:
            x += delta
        else:
            x[torch.arange(len(heads), device=heads.device), :, :, heads] += delta
        return x.reshape(act.shape)
    return hook


def _single_sender_patching(model, ds: TaskDataset, srcs: torch.Tensor,  # [n_items] sender of each ablation
                            sites: list[_Site], *, ablation, batch_size, progress) -> torch.Tensor:  # [n_items]
    """Mean metric change when item ``i`` adds ``a^ablate - a^clean`` of sender ``srcs[i]`` at ``sites[i]``."""
    spec = GraphSpec.from_model(model)
    check_dataset(model, ds)
    values_src = Ablation.parse(ablation).prepare(model, ds, batch_size, spec)
    device, d_model = model_device(model), model.cfg.d_model
    groups: dict[tuple[int, str | None], list[int]] = {}
    for i, site in enumerate(sites):
        groups.setdefault((site.layer, site.hook), []).append(i)
    heads = torch.tensor([-1 if s.head is None else s.head for s in sites], device=device)
    total = torch.zeros(len(sites), dtype=torch.float64)
    n_batches = -(-len(ds) // batch_size)
    with torch.no_grad(), tqdm(total=n_batches * len(sites), desc="patching", disable=not progress,
                               leave=False) as bar:
        for batch in ds.batches(batch_size):
            batch = batch.to(device)
            b, p = batch.clean.shape
            values = values_src.for_batch(model, batch)  # [b or 1, pos, n_src, d_model]
            logits, clean, resid = _clean_run(model, spec, batch.clean)
            reference = logits if batch.metric is Metric.NEG_KL else None
            m_full = batch.metric_values(logits, reference).double()  # [b]
            diff = values - clean  # [b, pos, n_src, d_model]
            per_pass = max(1, COPY_BUDGET // (b * p * d_model * 4 * spec.n_heads))
            for (layer, hook), items in groups.items():
                for start in range(0, len(items), per_pass):
                    chunk = torch.tensor(items[start: start + per_pass], device=device)
                    k = len(chunk)
                    delta = diff[:, :, srcs.to(device)[chunk]].permute(2, 0, 1, 3)  # [k, b, pos, d_model]
                    x = resid[layer].unsqueeze(0).expand(k, b, p, d_model)  # [k, b, pos, d_model]
                    hooks = []
                    if hook is None:
                        x = x + delta
                    else:
                        hooks = [(hook, _add_at(delta, None if sites[items[start]].head is None else heads[chunk]))]
                    with _receiver_hooks_at(model, layer, hook), temporary_hooks(model, hooks):
                        out = model(x.reshape(k * b, p, d_model), start_at_layer=layer)  # [k*b, pos, d_vocab]
                    out = out.reshape(k, b, *out.shape[1:])
                    for c in range(k):
                        total[chunk[c]] += (batch.metric_values(out[c], reference).double() - m_full).sum().cpu()
                    bar.update(k)
    return (total / len(ds)).float()


@contextmanager
def _receiver_hooks_at(model, layer: int, hook: str | None) -> Iterator:
    """Split q/k/v inputs (or ``hook_mlp_in``) for block ``layer`` only, when ``hook`` needs them.

    Per-head q/k/v inputs cost 3 * n_heads LayerNorms per block; a hook on the next block's
    ``hook_resid_pre`` (which runs before the block reads the flag) switches them off again.
    """
    cfg = model.cfg
    before = (cfg.use_split_qkv_input, cfg.use_hook_mlp_in)
    hooks = []
    if hook is not None and hook.endswith(("q_input", "k_input", "v_input")):
        cfg.use_split_qkv_input = True
        if layer + 1 < cfg.n_layers:
            def off(act, hook):
                cfg.use_split_qkv_input = False
            hooks.append((f"blocks.{layer + 1}.hook_resid_pre", off))
    elif hook is not None and hook.endswith("mlp_in"):
        cfg.use_hook_mlp_in = True
    try:
        with temporary_hooks(model, hooks):
            yield
    finally:
        cfg.use_split_qkv_input, cfg.use_hook_mlp_in = before


def _clean_run(model, spec: GraphSpec, tokens: torch.Tensor  # [batch, pos]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits [batch, pos, d_vocab], sender outputs [batch, pos, n_src, d_model] and the residual
    stream entering each block and the final LayerNorm, [n_layers + 1, batch, pos, d_model]."""
    b, p = tokens.shape
    senders = torch.zeros(b, p, spec.n_src, model.cfg.d_model, device=tokens.device, dtype=model_dtype(model))
    resid = torch.zeros(spec.n_layers + 1, b, p, model.cfg.d_model, device=tokens.device, dtype=model_dtype(model))

    def sink(rows: slice, act: torch.Tensor) -> None:
        senders[:, :, rows] = act

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


def _patching_nodes(model, ds, *, ablation, batch_size, progress) -> torch.Tensor:
    spec = GraphSpec.from_model(model)
    return _single_sender_patching(model, ds, torch.arange(spec.n_src), _node_sites(spec), ablation=ablation,
                                   batch_size=batch_size, progress=progress)


# ---------------------------------------------------------------- registry

@dataclass(frozen=True)
class Method:
    """An attribution method: edge scores [n_src, n_dst] and node scores [n_src]."""

    name: str
    summary: str
    edge_fn: Callable[..., torch.Tensor]
    node_fn: Callable[..., torch.Tensor]
    options: tuple[str, ...] = ()  # extra keyword options it accepts

    def _check(self, options: Mapping[str, Any]) -> None:
        bad = sorted(set(options) - set(self.options))
        if bad:
            raise CircuitkitError(f"method {self.name!r} takes no option(s) {', '.join(bad)}; it accepts "
                                  f"{', '.join(self.options) or 'none'}")

    def edge_scores(self, model, ds: TaskDataset, *, ablation: Ablation | str = Ablation.PATCHING,
                    batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False,
                    **options) -> torch.Tensor:  # [n_src, n_dst]
        self._check(options)
        return self.edge_fn(model, ds, ablation=ablation, batch_size=batch_size, progress=progress, **options)

    def node_scores(self, model, ds: TaskDataset, *, ablation: Ablation | str = Ablation.PATCHING,
                    batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False,
                    **options) -> torch.Tensor:  # [n_src]
        self._check(options)
        return self.node_fn(model, ds, ablation=ablation, batch_size=batch_size, progress=progress, **options)


METHODS: Mapping[str, Method] = MappingProxyType({m.name: m for m in (
    Method("patching", "exact: metric change when ablating each edge alone", _patching_edges, _patching_nodes),
    Method("eap", "edge attribution patching: (a_ablate - a_clean) . dm/d(receiver input)", _eap_edges, _eap_nodes),
    Method("eap-ig", "EAP with integrated gradients over interpolated input embeddings", _ig_edges, _ig_nodes,
           ("steps",)),
)})


def method_names() -> list[str]:
    return list(METHODS)


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise CircuitkitError(f"unknown attribution method {name!r}; known methods: "
                              f"{', '.join(METHODS)}") from None


def attribute(model, ds: TaskDataset, method: str = "eap", *, ablation: Ablation | str = Ablation.PATCHING,
              batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False, **options) -> Graph:
    """Edge scores of ``method`` as a :class:`Graph` holding every real edge (select from it next)."""
    m = get_method(method)
    ablation = Ablation.parse(ablation)
    scores = m.edge_scores(model, ds, ablation=ablation, batch_size=batch_size, progress=progress, **options)
    meta = {"method": m.name, "ablation": ablation.value, "task": ds.task, "n_examples": len(ds),
            "metric": ds.metric.value, **options}
    return Graph.from_model(model, scores=scores, metadata=meta)


def attribute_nodes(model, ds: TaskDataset, method: str = "eap", *, ablation: Ablation | str = Ablation.PATCHING,
                    batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False,
                    **options) -> torch.Tensor:  # [n_src]: node i = sender i (graph.spec.node_names)
    """Node scores: the estimated metric change when each node's whole output is ablated."""
    return get_method(method).node_scores(model, ds, ablation=Ablation.parse(ablation), batch_size=batch_size,
                                          progress=progress, **options)
