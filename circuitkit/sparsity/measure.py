"""How sparse a gated model is, measured with its gates in evaluation mode.

``kept_edges``: the fraction of causal attention edges (query i, key j ≤ i, per head)
whose gate is on, ``1[s_ij + b > 0]``, over held-out sequences — overall, per layer and
per head. ``mlp_active``: the fraction of (token, neuron) pairs whose MLP gate is on, per
layer and overall; ``mlp_ever_active``: the fraction of neurons on for at least one token.
A model without gates is dense: every fraction is 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from transformer_lens import HookedTransformer

from circuitkit import CircuitkitError
from circuitkit.sparsity.gates import GateMode, _edge_count, gate_mode, get_gates
from circuitkit.tasks.base import TaskDataset


@dataclass
class SparsityReport:
    kept_edges: float
    kept_edges_layer: list[float]
    kept_edges_head: list[list[float]]
    mlp_active: float | None = None
    mlp_active_layer: list[float] | None = None
    mlp_ever_active: float | None = None
    n_sequences: int = 0
    n_edges: int = 0  # causal edges counted (sequences × heads × layers × T(T+1)/2)
    dense: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _token_batches(data: Any, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(data, TaskDataset):
        for b in data.batches(batch_size):
            yield b.clean
    elif isinstance(data, torch.Tensor):
        if data.ndim != 2:
            raise CircuitkitError(f"token batches must be [batch, pos], got shape {tuple(data.shape)}")
        for i in range(0, data.shape[0], batch_size):
            yield data[i:i + batch_size]
    elif isinstance(data, (list, tuple)):
        for d in data:
            yield from _token_batches(d, batch_size)
    else:
        raise CircuitkitError(f"measure_sparsity takes a TaskDataset, a [batch, pos] token tensor or a list of "
                              f"them, got {type(data).__name__}")


@torch.no_grad()
def measure_sparsity(model: HookedTransformer, data: Any, batch_size: int = 500) -> SparsityReport:
    """Kept-edge and active-neuron fractions of ``model`` (evaluation-mode gates) on ``data``."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    gates = get_gates(model)
    batches = list(_token_batches(data, batch_size))
    n_seq = sum(b.shape[0] for b in batches)
    if n_seq == 0:
        raise CircuitkitError("measure_sparsity: no sequences to measure on")
    if gates is None:
        return SparsityReport(1.0, [1.0] * L, [[1.0] * H for _ in range(L)], 1.0, [1.0] * L, 1.0, n_seq,
                              dense=True)
    kept = torch.zeros(L, H, dtype=torch.float64)
    edges = torch.zeros(L, dtype=torch.float64)
    mlp_on = torch.zeros(L, dtype=torch.float64)
    mlp_tok = torch.zeros(L, dtype=torch.float64)
    ever = torch.zeros(L, model.cfg.d_mlp or 0, dtype=torch.bool) if gates.config.mlp else None
    was_training = model.training
    model.eval()
    try:
        with gate_mode(model, GateMode.EVAL, collect=True) as g:
            for toks in batches:
                g.clear_stats()
                model(toks.to(model.cfg.device))
                b, t = toks.shape
                n_e = _edge_count(t, t)
                for l, frac in g.stats["attn_hard"].items():
                    kept[l] += frac.double().cpu() * n_e * b
                    edges[l] += n_e * b
                for l, frac in g.stats["mlp_hard"].items():
                    mlp_on[l] += float(frac) * b * t
                    mlp_tok[l] += b * t
                    ever[l] |= g.stats["mlp_hard_neuron"][l].cpu() > 0
            g.clear_stats()
    finally:
        model.train(was_training)
    if gates.config.attn:
        per_head = kept / edges[:, None]
        per_layer = kept.sum(1) / (edges * H)
        overall = float(kept.sum() / (edges.sum() * H))
        n_edges = int(edges.sum() * H)
    else:  # attention ungated: every edge kept
        per_head, per_layer, overall, n_edges = torch.ones(L, H), torch.ones(L), 1.0, 0
    rep = SparsityReport(kept_edges=overall, kept_edges_layer=per_layer.tolist(),
                         kept_edges_head=per_head.tolist(), n_sequences=n_seq, n_edges=n_edges)
    if gates.config.mlp:
        rep.mlp_active_layer = (mlp_on / mlp_tok).tolist()
        rep.mlp_active = float(mlp_on.sum() / mlp_tok.sum())
        rep.mlp_ever_active = float(ever.float().mean())
    return rep
