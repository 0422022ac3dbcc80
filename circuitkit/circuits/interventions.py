"""Running a model with the edges outside a circuit ablated.

Why: every verification number (m(C), m(∅), faithfulness, exact patching scores) is a
forward pass in which some edges carry an ablated value. This module owns that forward
pass: which TransformerLens flags and hooks it needs, how ablated values are produced
(:class:`Ablation`), and how to put the model back exactly as it was afterwards.

Ablating the edge u -> v means receiver v reads
``its clean input + (a_u^ablate - a_u^current)``, where ``a_u^current`` is u's output in the
current (already patched) forward pass, computed as the pass goes layer by layer. With
every edge ablated and PATCHING, every receiver reads exactly its corrupted input, so the
model computes the corrupted run.

Senders: ``blocks.0.hook_resid_pre`` (embeddings), per-head outputs ``z_h @ W_O[h]`` read at
``blocks.l.attn.hook_z`` (the values of ``attn.hook_result``, without TransformerLens's
memory-hungry ``use_attn_result`` path), ``blocks.l.hook_mlp_out``. Receivers:
``blocks.l.hook_{q,k,v}_input`` (per head), ``blocks.l.hook_mlp_in`` and
``blocks.{L-1}.hook_resid_post`` (logits). Attention-only models have no MLP senders or
receivers; everything else is the same. The ablations are defined in ``docs/method.md`` §3.

Hooks are added to the hook points directly and only those handles are removed again,
so permanent hooks (sparsity gates) and hooks added by others are never touched. Patched
forward passes are for evaluation: they run without gradients.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from circuitkit import CircuitkitError, parse_enum
from circuitkit.circuits.graph import Graph, GraphSpec
from circuitkit.tasks.base import Metric, TaskDataset

DEFAULT_BATCH_SIZE = 32
# Patched copies of a batch are stacked until the sender buffer [copies, batch, pos, n_src, d_model]
# holds about this many numbers.
COPY_BUDGET = 2**23

_FLAGS = ("use_split_qkv_input", "use_attn_in", "use_hook_mlp_in")

HookFn = Callable[..., torch.Tensor | None]


# ---------------------------------------------------------------- model state

@contextmanager
def graph_hooks_enabled(model, split_qkv: bool = True) -> Iterator:
    """Turn on ``hook_mlp_in`` and (with ``split_qkv``) per-head q/k/v inputs; restore the flags after.

    ``split_qkv=False`` switches per-head inputs off instead, for passes that read q/k/v
    receiver gradients at ``attn.hook_q/k/v`` (see :mod:`~circuitkit.circuits.attribution`).
    """
    cfg = model.cfg
    before = {f: getattr(cfg, f) for f in _FLAGS}
    try:
        cfg.use_split_qkv_input = split_qkv
        cfg.use_attn_in = False
        if not cfg.attn_only:  # attention-only blocks have no MLP input to hook
            model.set_use_hook_mlp_in(True)
        yield model
    finally:
        for f, v in before.items():
            setattr(cfg, f, v)


@contextmanager
def temporary_hooks(model, fwd_hooks: Sequence[tuple[str, HookFn]]) -> Iterator:
    """Add forward hooks ``(hook name, fn(act, hook))``; on exit remove exactly these, nothing else."""
    added = []
    try:
        for name, fn in fwd_hooks:
            hp = model.hook_dict.get(name)
            if hp is None:
                raise CircuitkitError(f"the model has no hook point {name!r}; circuitkit needs a TransformerLens "
                                      "HookedTransformer with the standard block hooks")
            hp.add_hook(fn, dir="fwd")
            handle = hp.fwd_hooks[-1]
            assert handle.user_hook is fn
            added.append((hp, handle))
        yield model
    finally:
        for hp, handle in reversed(added):
            handle.hook.remove()
            hp.fwd_hooks = [h for h in hp.fwd_hooks if h is not handle]


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def check_dataset(model, ds: TaskDataset) -> None:
    """Raise a clear error when ``ds`` cannot be run through ``model``."""
    if not isinstance(ds, TaskDataset):
        raise CircuitkitError(f"expected a TaskDataset (from get_task(name).dataset(n)), got {type(ds).__name__}")
    if ds.clean.shape != ds.corrupt.shape:
        raise CircuitkitError(f"clean prompts {tuple(ds.clean.shape)} and corrupted prompts {tuple(ds.corrupt.shape)} "
                              "differ in shape; corrupted prompts must have the same token length as the clean ones")
    vocab = model.cfg.d_vocab
    hi = int(torch.maximum(ds.clean.max(), ds.corrupt.max()))
    if hi >= vocab or int(torch.minimum(ds.clean.min(), ds.corrupt.min())) < 0:
        raise CircuitkitError(f"task {ds.task!r} uses token id {hi} but the model's vocabulary has {vocab} tokens; "
                              "use a task built for this model (toy tasks need a toy-vocabulary model)")
    if model.cfg.positional_embedding_type == "standard" and ds.seq_len > model.cfg.n_ctx:
        raise CircuitkitError(f"task {ds.task!r} prompts have {ds.seq_len} tokens but the model's context is "
                              f"{model.cfg.n_ctx}")


# ---------------------------------------------------------------- sender outputs

def head_outputs(z: torch.Tensor,  # [batch, pos, n_heads, d_head]
                 w_o: torch.Tensor) -> torch.Tensor:  # [n_heads, d_head, d_model] -> [n_heads, batch, pos, d_model]
    """Per-head attention outputs ``z_h @ W_O[h]`` (``attn.hook_result``'s values), sender-major."""
    b, p, h, e = z.shape
    with torch.no_grad():
        return torch.bmm(z.detach().reshape(b * p, h, e).transpose(0, 1), w_o).view(h, b, p, -1)


def sender_hooks(model, spec: GraphSpec, sink: Callable[[slice, torch.Tensor], None],
                 heads_as_z: bool = False) -> list[tuple[str, HookFn]]:
    """Hooks that hand every sender output to ``sink(rows, act)``, sender-major:
    ``act`` [n_rows, batch, pos, d_model] (contiguous for heads; a view for the others).
    With ``heads_as_z`` heads are handed over as ``z`` [batch, pos, n_heads, d_head] instead."""
    hooks = []
    for g in spec.sender_groups:
        if g.per_head:
            def fn(act, hook, rows=g.rows, w_o=model.blocks[g.layer].attn.W_O):  # act: z [batch, pos, n_heads, d_head]
                sink(rows, act.detach() if heads_as_z else head_outputs(act, w_o))
        else:
            def fn(act, hook, rows=g.rows):  # act: [batch, pos, d_model]
                sink(rows, act.detach().unsqueeze(0))
        hooks.append((g.hook, fn))
    return hooks


def capture_senders(model, tokens: torch.Tensor,  # [batch, pos]
                    spec: GraphSpec | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [batch, pos, d_vocab] and sender outputs [batch, pos, n_src, d_model] of one run.

    The outputs are a view of a fresh sender-major [n_src, batch, pos, d_model] buffer
    (``.permute(2, 0, 1, 3)`` gives it back without a copy).
    """
    spec = spec or GraphSpec.from_model(model)
    b, p = tokens.shape
    buf = torch.empty(spec.n_src, b, p, model.cfg.d_model, device=model_device(model), dtype=model_dtype(model))

    def sink(rows: slice, act: torch.Tensor) -> None:
        buf[rows] = act

    with torch.no_grad(), temporary_hooks(model, sender_hooks(model, spec, sink)):  # senders need no flags
        logits = model(tokens.to(buf.device))
    return logits, buf.permute(1, 2, 0, 3)


# ---------------------------------------------------------------- ablation types

class Ablation(Enum):
    """What an ablated edge carries instead of its sender's clean output."""

    PATCHING = "patching"  # the sender's output on the corrupted prompt
    MEAN = "mean"  # the sender's clean output averaged over the dataset, per position
    ZERO = "zero"  # zero

    @classmethod
    def parse(cls, value: "Ablation | str") -> "Ablation":
        return parse_enum(cls, value, "ablation")

    def prepare(self, model, ds: TaskDataset, batch_size: int = DEFAULT_BATCH_SIZE,
                spec: GraphSpec | None = None) -> "AblationValues":
        """What this ablation needs from the whole dataset (the mean for MEAN), ready per batch."""
        spec = spec or GraphSpec.from_model(model)
        mean = None
        if self is Ablation.MEAN:
            total = None
            for batch in ds.batches(batch_size):
                _, senders = capture_senders(model, batch.clean, spec)  # [b, pos, n_src, d_model]
                s = senders.sum(0, keepdim=True)
                total = s if total is None else total + s
            mean = total / len(ds)  # [1, pos, n_src, d_model]
        return AblationValues(self, spec, mean)


@dataclass(frozen=True)
class AblationValues:
    """Ablated sender values for the batches of one dataset."""

    ablation: Ablation
    spec: GraphSpec
    mean: torch.Tensor | None = None  # [1, pos, n_src, d_model], MEAN only

    def for_batch(self, model, batch: TaskDataset) -> torch.Tensor:  # [batch or 1, pos, n_src, d_model]
        """The values ablated edges carry on ``batch``. PATCHING returns a fresh tensor (the
        caller may modify it); MEAN returns the shared dataset mean (do not modify)."""
        if self.ablation is Ablation.PATCHING:
            return capture_senders(model, batch.corrupt, self.spec)[1]
        if self.ablation is Ablation.MEAN:
            return self.mean
        return torch.zeros(1, batch.seq_len, self.spec.n_src, model.cfg.d_model,
                           device=model_device(model), dtype=model_dtype(model))

    def input_for_batch(self, model, batch: TaskDataset) -> torch.Tensor:  # [batch or 1, pos, d_model]
        """The value the input node (sender 0, ``blocks.0.hook_resid_pre``) carries when ablated:
        ``for_batch(...)[:, :, 0]`` without running the blocks (PATCHING embeds the corrupted prompt)."""
        if self.ablation is Ablation.PATCHING:
            with torch.no_grad():
                return model(batch.corrupt, stop_at_layer=0)
        if self.ablation is Ablation.MEAN:
            return self.mean[:, :, 0]
        return torch.zeros(1, batch.seq_len, model.cfg.d_model, device=model_device(model), dtype=model_dtype(model))


# ---------------------------------------------------------------- the patched forward pass

class _Patcher:
    """Hook state for one patched forward of ``k`` stacked copies of a batch.

    Copy ``c`` ablates the edges ``ablated[c]``; the model's batch is copy-major
    (example ``i`` of copy ``c`` at ``c * batch + i``). Masks with a position axis,
    ``[k, pos, n_src, n_dst]``, ablate each edge at the positions marked only: receiver ``v``
    at position ``p`` reads ``a_u^ablate - a_u^current`` at ``p`` (position-resolved graphs,
    :mod:`~circuitkit.circuits.positions`).
    """

    def __init__(self, model, spec: GraphSpec, ablated: torch.Tensor,  # [k, (pos,) n_src, n_dst] bool
                 values: torch.Tensor):  # [batch or 1, pos, n_src, d_model]
        self.spec, self.k = spec, ablated.shape[0]
        self.values = values.permute(2, 0, 1, 3)  # [n_src, batch or 1, pos, d_model] (a view)
        # a^ablate - a^current, sender-major so that a receiver's senders [0, prefix) are one
        # contiguous block and its mixture is a plain batched matmul, with no copy of the block
        self.diff: torch.Tensor | None = None  # [k, n_src, batch, pos, d_model]
        rows_used = ablated.any(-1).reshape(-1, spec.n_src).any(0)  # [n_src]
        self.hooks: list[tuple[str, HookFn]] = [
            hook for g, hook in zip(spec.sender_groups, sender_hooks(model, spec, self._write))
            if bool(rows_used[g.rows].any())]
        for g in spec.receiver_groups:
            w = ablated[..., : g.prefix, g.cols]  # [k, (pos,) prefix, n_cols]
            active = w.flatten(1).any(1).nonzero().squeeze(1)  # [k_active]
            if len(active):
                w = w[active].to(device=values.device, dtype=values.dtype).transpose(-1, -2)  # [k_active, (pos,) n_cols, prefix]
                self.hooks.append((g.hook, self._receiver(g.prefix, g.per_head, active.to(values.device), w)))

    def _write(self, rows: slice, a: torch.Tensor) -> None:  # a: current outputs [n_rows, k*b, pos, d_model]
        b = a.shape[1] // self.k
        if self.diff is None:
            self.diff = torch.zeros(self.k, self.spec.n_src, b, a.shape[2], a.shape[-1], device=a.device,
                                    dtype=a.dtype)
        current = a.reshape(a.shape[0], self.k, b, *a.shape[2:]).transpose(0, 1)  # [k, n_rows, b, pos, d_model]
        self.diff[:, rows] = self.values[rows].unsqueeze(0) - current

    def _receiver(self, prefix: int, per_head: bool, active: torch.Tensor,  # [k_active]
                  w: torch.Tensor) -> HookFn:  # [k_active, (pos,) n_cols, prefix]
        everyone = len(active) == self.k

        def hook(act, hook):
            # act: [k*b, pos, n_heads, d_model] (per head) or [k*b, pos, d_model]
            diff = self.diff[:, :prefix]  # [k, prefix, b, pos, d_model]
            if not everyone:
                diff = diff[active]
            k, _, b, pos, d = diff.shape
            if w.ndim == 4:  # per position: [k_active, pos, n_cols, prefix]
                delta = torch.einsum("kpcs,ksbpd->kbpcd", w, diff)  # [k_active, b, pos, n_cols, d_model]
            else:
                delta = torch.bmm(w, diff.reshape(k, prefix, -1))  # [k_active, n_cols, b*pos*d_model]
                delta = delta.view(k, -1, b, pos, d).permute(0, 2, 3, 1, 4)  # [k_active, b, pos, n_cols, d_model]
            if not per_head:
                delta = delta.squeeze(3)
            x = act.reshape(self.k, -1, *act.shape[1:])
            x = x + delta if everyone else x.index_add(0, active, delta)
            return x.reshape(act.shape)
        return hook


@contextmanager
def patched(model, graph: Graph | Sequence[Graph], values: torch.Tensor  # [batch or 1, pos, n_src, d_model]
            ) -> Iterator:
    """Inside, ``model(tokens)`` runs with the real edges not in ``graph`` ablated to ``values``.

    ``values`` are the ablated sender outputs (``Ablation.X.prepare(...).for_batch(...)``). With
    a sequence of ``k`` graphs, feed the batch repeated ``k`` times (``tokens.repeat(k, 1)``):
    copy ``c`` runs graph ``c``. Flags and hooks are restored on exit.
    """
    graphs = [graph] if hasattr(graph, "ablated") else list(graph)  # a Graph or a PositionGraph, or several
    if not graphs:
        raise CircuitkitError("patched() needs at least one graph")
    for g in graphs:
        g.check_model(model)
    ablated = torch.stack([g.ablated for g in graphs])  # [k, (pos,) n_src, n_dst]
    with patched_masks(model, graphs[0].spec, ablated, values):
        yield model


@contextmanager
def patched_masks(model, spec: GraphSpec, ablated: torch.Tensor,  # [k, (pos,) n_src, n_dst] bool
                  values: torch.Tensor) -> Iterator:  # [batch or 1, pos, n_src, d_model]
    """:func:`patched` for raw masks of the edges to ablate, one per stacked copy (with a
    position axis for position-resolved graphs: an edge is ablated at the positions marked)."""
    if ablated.ndim not in (3, 4) or tuple(ablated.shape[-2:]) != (spec.n_src, spec.n_dst) \
            or ablated.dtype != torch.bool:
        raise CircuitkitError(f"ablated edges must be a bool tensor [copies, {spec.n_src}, {spec.n_dst}] "
                              f"(or [copies, pos, {spec.n_src}, {spec.n_dst}]), got {ablated.dtype} {tuple(ablated.shape)}")
    if values.ndim != 4 or values.shape[2] != spec.n_src:
        raise CircuitkitError(f"ablation values must be [batch, pos, n_src={spec.n_src}, d_model], "
                              f"got {tuple(values.shape)}")
    if ablated.ndim == 4 and ablated.shape[1] != values.shape[1]:
        raise CircuitkitError(f"the position-resolved graph has {ablated.shape[1]} positions but the prompts have "
                              f"{values.shape[1]} tokens; score and evaluate a graph on prompts of one length")
    patcher = _Patcher(model, spec, ablated & spec.real, values)
    with graph_hooks_enabled(model), temporary_hooks(model, patcher.hooks):
        yield model


# ---------------------------------------------------------------- running graphs over a dataset

def _reference(model, batch: TaskDataset) -> torch.Tensor | None:  # [batch, pos, d_vocab] or None
    """The full model's clean logits when the metric needs them (KL), else None."""
    if batch.metric is not Metric.NEG_KL:
        return None
    with torch.no_grad():
        return model(batch.clean.to(model_device(model)))


def copies_metric(batch: TaskDataset, logits: torch.Tensor,  # [k*batch, pos, d_vocab], copy-major
                  reference: torch.Tensor | None, k: int) -> torch.Tensor:  # [k, batch]
    """The task metric of ``k`` stacked copies of ``batch`` in one call."""
    b = len(batch)
    if k == 1:
        return batch.metric_values(logits, reference).reshape(1, b)
    ref = None if reference is None else reference.repeat(k, 1, 1)
    return batch[torch.arange(b).repeat(k)].metric_values(logits, ref).reshape(k, b)


def _copies_per_pass(spec: GraphSpec, model, batch: TaskDataset) -> int:
    per_copy = len(batch) * batch.seq_len * spec.n_src * model.cfg.d_model
    return max(1, COPY_BUDGET // max(per_copy, 1))


def ablation_metrics(model, spec: GraphSpec, ds: TaskDataset, ablated: Callable[[int, int], torch.Tensor],
                     n_copies: int, ablation: Ablation | str = Ablation.PATCHING,
                     batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False,
                     desc: str = "patching") -> torch.Tensor:  # [n_copies, n_examples]
    """The per-example metric under ``n_copies`` different ablations.

    ``ablated(start, stop)`` returns the bool masks [stop - start, n_src, n_dst] of copies
    ``start..stop-1``; they are evaluated in stacks that share one ablation-values pass per batch.
    """
    check_dataset(model, ds)
    values_src = Ablation.parse(ablation).prepare(model, ds, batch_size, spec)
    device = model_device(model)
    out = torch.empty(n_copies, len(ds))
    n_batches = -(-len(ds) // batch_size)
    with torch.no_grad(), tqdm(total=n_batches * n_copies, desc=desc, disable=not progress, leave=False) as bar:
        for bi, batch in enumerate(ds.batches(batch_size)):
            batch = batch.to(device)
            values = values_src.for_batch(model, batch)
            reference = _reference(model, batch)
            b = len(batch)
            per_pass = _copies_per_pass(spec, model, batch)
            for start in range(0, n_copies, per_pass):
                stop = min(start + per_pass, n_copies)
                masks = ablated(start, stop)  # [k, n_src, n_dst]
                k = stop - start
                with patched_masks(model, spec, masks, values):
                    logits = model(batch.clean.repeat(k, 1))  # [k*b, pos, d_vocab]
                out[start:stop, bi * batch_size: bi * batch_size + b] = copies_metric(batch, logits, reference,
                                                                                     k).float().cpu()
                bar.update(k)
    return out


def metric_with_graphs(model, graphs: Sequence[Graph], ds: TaskDataset,
                       ablation: Ablation | str = Ablation.PATCHING, batch_size: int = DEFAULT_BATCH_SIZE,
                       progress: bool = False) -> torch.Tensor:  # [n_graphs, n_examples]
    """The task metric per example for each graph, several graphs per forward pass.

    Cheaper than one :func:`metric_with_graph` call per graph: the ablated values (e.g. the
    corrupted run) are computed once per batch. Used for faithfulness curves.
    """
    graphs = list(graphs)
    if not graphs:
        raise CircuitkitError("metric_with_graphs needs at least one graph")
    for g in graphs:
        g.check_model(model)
    resolved = any(g.ablated.ndim == 3 for g in graphs)  # position-resolved graphs among them

    def masks(a: int, b: int) -> torch.Tensor:  # [b - a, (pos,) n_src, n_dst]; component masks hold at every position
        ms = [g.ablated for g in graphs[a:b]]
        return torch.stack([m.expand(ds.seq_len, *m.shape) if resolved and m.ndim == 2 else m for m in ms])

    return ablation_metrics(model, graphs[0].spec, ds, masks, len(graphs), ablation, batch_size, progress,
                            desc="graphs")


def metric_with_graph(model, graph: Graph, ds: TaskDataset, ablation: Ablation | str = Ablation.PATCHING,
                      batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False) -> torch.Tensor:  # [n_examples]
    """The task metric of every example when only ``graph``'s edges are kept (``ds.metric_values``)."""
    return metric_with_graphs(model, [graph], ds, ablation, batch_size, progress)[0]


def run_with_graph(model, graph: Graph, ds: TaskDataset, ablation: Ablation | str = Ablation.PATCHING,
                   batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False) -> torch.Tensor:
    """Logits [n_examples, pos, d_vocab] on the clean prompts with the edges not in ``graph`` ablated."""
    graph.check_model(model)
    check_dataset(model, ds)
    values_src = Ablation.parse(ablation).prepare(model, ds, batch_size, graph.spec)
    device = model_device(model)
    outs = []
    with torch.no_grad():
        for batch in tqdm(list(ds.batches(batch_size)), desc="graph", disable=not progress, leave=False):
            batch = batch.to(device)
            with patched(model, graph, values_src.for_batch(model, batch)):
                outs.append(model(batch.clean))
    return torch.cat(outs)


def explained_effect(m_circuit: torch.Tensor, m_full: float, m_empty: float) -> torch.Tensor:  # same shape
    """``(m(C) - m(∅)) / (m(N) - m(∅))`` elementwise; nan when the full and empty metrics agree."""
    denom = m_full - m_empty
    if denom == 0:
        return torch.full_like(m_circuit, float("nan"))
    return (m_circuit - m_empty) / denom


@dataclass(frozen=True)
class Faithfulness:
    """Metric means of the full model, the fully ablated model and a circuit, and the explained
    effect ``f = (m(C) - m(∅)) / (m(N) - m(∅))``."""

    m_full: float
    m_empty: float
    m_circuit: float
    n_edges: int
    n_heads: int

    @property
    def explained(self) -> float:
        return float(explained_effect(torch.tensor(self.m_circuit), self.m_full, self.m_empty))

    def to_dict(self) -> dict[str, float]:
        return {"m_full": self.m_full, "m_empty": self.m_empty, "m_circuit": self.m_circuit,
                "explained_effect": self.explained, "n_edges": self.n_edges, "n_heads": self.n_heads}


def faithfulness(model, graph: Graph, ds: TaskDataset, ablation: Ablation | str = Ablation.PATCHING,
                 batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False) -> Faithfulness:
    """m(N), m(∅) and m(C) for ``graph`` in one sweep over ``ds``."""
    full, empty = graph.with_in_graph(graph.real_mask), graph.with_in_graph(torch.zeros_like(graph.in_graph))
    m = metric_with_graphs(model, [full, empty, graph], ds, ablation, batch_size, progress).mean(1)
    return Faithfulness(float(m[0]), float(m[1]), float(m[2]), graph.n_edges, graph.n_heads)
