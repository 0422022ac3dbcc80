"""Attention-pair attribution: a score for every causal (layer, head, query, key) pair.

Why a module of its own: sparse post-training acts on query–key pairs — a closed gate sets
one entry of a head's attention pattern to 0 (``pattern' = softmax(s) ⊙ m``, no
renormalisation; :mod:`circuitkit.sparsity.gates`) — while the edge graph of
:mod:`~circuitkit.circuits.graph` sums every head over positions. This module owns the pair
level (docs/method.md §10):

- the intervention: :func:`pairs_removed` runs a model with pattern entries set to 0, one
  keep-mask ``[layer, head, query, key]`` per copy of the batch (copy-major, as
  :func:`~circuitkit.circuits.interventions.patched` stacks graphs); it multiplies the pattern
  after any gate hooks, exactly as a closed gate does, so removing a pair a gate already
  closed changes nothing;
- the scores (:class:`PairMethod`, chosen by name), both the estimated change of the mean task
  metric when that pair alone is removed (the sign convention of
  :mod:`~circuitkit.circuits.attribution`):

  - ``exact``: ``m(clean, pair removed) − m(clean)``. Removing a pair of layer ``l`` changes
    nothing before block ``l``, so every forward starts at block ``l`` from the cached clean
    residual stream, with many pairs of that layer stacked as copies along the batch; a pair
    whose entry is already 0 on an example (a closed gate) contributes exactly 0 there without
    a forward;
  - ``gradient``: ``−pattern ⊙ ∂m/∂pattern``, the first-order estimate of the same change, for
    every pair from one forward and one backward per batch;

- :class:`PairScores`, the dense ``[layer, head, query, key]`` tensor (0 off the causal
  triangle) with its file format (safetensors, the summary as JSON metadata).

The corrupted prompts of a task are not used: a removed pair carries 0, as a closed gate.
Curves, minimal circuits and mass concentration are in :mod:`circuitkit.evaluation.pairs`.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from circuitkit import CircuitkitError, parse_enum
from circuitkit.circuits.interventions import (DEFAULT_BATCH_SIZE, check_dataset, copies_metric, model_device,
                                               temporary_hooks)
from circuitkit.io import atomic_path
from circuitkit.sparsity.gates import GateMode, gate_mode, get_gates
from circuitkit.tasks.base import Metric, TaskDataset

PAIRS_FORMAT = "circuitkit-attention-pairs"
PAIRS_VERSION = 1
# pair-removal copies of a batch are stacked up to this many residual numbers [copies*batch, pos, d_model]
PAIR_COPY_BUDGET = 2**22


# ---------------------------------------------------------------- the pair index

@dataclass(frozen=True)
class PairSpec:
    """The causal (layer, head, query, key) pairs of a model on prompts of ``seq_len`` tokens."""

    n_layers: int
    n_heads: int
    seq_len: int

    def __post_init__(self) -> None:
        for k in ("n_layers", "n_heads", "seq_len"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise CircuitkitError(f"PairSpec.{k} must be a positive integer, got {v!r}")

    @classmethod
    def from_model(cls, model, seq_len: int) -> "PairSpec":
        return cls(int(model.cfg.n_layers), int(model.cfg.n_heads), int(seq_len))

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.n_layers, self.n_heads, self.seq_len, self.seq_len)

    @property
    def causal(self) -> torch.Tensor:  # [layer, head, query, key] bool: key <= query
        tri = torch.ones(self.seq_len, self.seq_len, dtype=torch.bool).tril()
        return tri.expand(self.n_layers, self.n_heads, -1, -1)

    @property
    def n_pairs(self) -> int:
        return self.n_layers * self.n_heads * self.seq_len * (self.seq_len + 1) // 2

    @staticmethod
    def pair_name(layer: int, head: int, query: int, key: int) -> str:
        """``a2.h3@7<-3``: head 3 of layer 2, query position 7 reading key position 3."""
        return f"a{layer}.h{head}@{query}<-{key}"

    def summary(self) -> dict[str, int]:
        return {"n_layers": self.n_layers, "n_heads": self.n_heads, "seq_len": self.seq_len}


def check_pair_support(model) -> None:
    """Raise a clear error for models whose attention pattern is not one softmax per head."""
    cfg = model.cfg
    if getattr(cfg, "use_attention_sinks", False):
        raise CircuitkitError("attention-pair attribution does not support attention sinks (the pattern is not a "
                              "softmax over the keys alone)")
    for l in range(cfg.n_layers):
        if f"blocks.{l}.attn.hook_pattern" not in model.hook_dict:
            raise CircuitkitError(f"the model has no hook point blocks.{l}.attn.hook_pattern; attention pairs need a "
                                  "standard TransformerLens HookedTransformer block")


# ---------------------------------------------------------------- the intervention

def _mask_hook(mask: torch.Tensor) -> Callable:  # mask: [k, 1 or batch, head, query, key] float
    """Multiply the pattern of copy ``c`` by ``mask[c]`` (the batch is copy-major: row ``c*b + i``)."""
    k = mask.shape[0]

    def hook(pattern, hook):  # pattern: [k*batch, head, query, key]
        p = pattern.reshape(k, -1, *pattern.shape[1:])
        return (p * mask.to(p.dtype)).reshape(pattern.shape)
    return hook


@contextmanager
def pairs_removed(model, keep: torch.Tensor  # [copies, layer, head, query, key] bool
                  ) -> Iterator:
    """Inside, ``model(tokens.repeat(k, 1))`` runs copy ``c`` with the pattern entries where
    ``keep[c]`` is False set to 0 (after any gates: ``pattern ⊙ m ⊙ keep``). Hooks are removed on exit."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    if keep.ndim != 5 or tuple(keep.shape[1:3]) != (L, H) or keep.shape[3] != keep.shape[4] \
            or keep.dtype != torch.bool:
        raise CircuitkitError(f"pair keep-masks must be a bool tensor [copies, {L}, {H}, pos, pos], "
                              f"got {keep.dtype} {tuple(keep.shape)}")
    check_pair_support(model)
    device = model_device(model)
    hooks = [(f"blocks.{l}.attn.hook_pattern", _mask_hook(keep[:, l, None].to(device)))
             for l in range(L) if not bool(keep[:, l].all())]
    with temporary_hooks(model, hooks):
        yield model


@contextmanager
def _evaluation_gates(model) -> Iterator:
    """Deterministic gates (evaluation mode) while scoring, whatever mode the model was left in."""
    if get_gates(model) is None:
        yield model
        return
    with gate_mode(model, GateMode.EVAL):
        yield model


def _reference(model, batch: TaskDataset) -> torch.Tensor | None:  # [batch, pos, d_vocab] or None
    if batch.metric is not Metric.NEG_KL:
        return None
    with torch.no_grad():
        return model(batch.clean)


def _clean_run(model, batch: TaskDataset) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Clean logits [batch, pos, d_vocab], residual streams ``blocks.l.hook_resid_pre`` [batch, pos, d_model]
    and patterns (after gates) [batch, head, query, key], one per layer."""
    L = model.cfg.n_layers
    resid: list[Any] = [None] * L
    pattern: list[Any] = [None] * L

    def keep_resid(act, hook, l):
        resid[l] = act.detach()

    def keep_pattern(act, hook, l):
        pattern[l] = act.detach()

    hooks = [h for l in range(L) for h in (
        (f"blocks.{l}.hook_resid_pre", lambda a, hook, l=l: keep_resid(a, hook, l)),
        (f"blocks.{l}.attn.hook_pattern", lambda a, hook, l=l: keep_pattern(a, hook, l)))]
    with torch.no_grad(), temporary_hooks(model, hooks):
        logits = model(batch.clean)
    return logits, resid, pattern


# ---------------------------------------------------------------- scoring

def _exact_batch(model, batch: TaskDataset, out: torch.Tensor,  # [layer, head, query, key] float64, summed into
                 bar) -> float:
    """Σ over the batch of ``m(pair removed) − m(clean)`` into ``out``; returns Σ m(clean)."""
    L, H, T = model.cfg.n_layers, model.cfg.n_heads, batch.seq_len
    b, d_model = len(batch), model.cfg.d_model
    reference = _reference(model, batch)
    logits, resid, pattern = _clean_run(model, batch)
    m_clean = batch.metric_values(logits, reference).double()  # [batch]
    per_pass = max(1, PAIR_COPY_BUDGET // (b * T * d_model))
    causal = torch.ones(T, T, dtype=torch.bool, device=logits.device).tril()
    for l in range(L):
        open_ = pattern[l] != 0  # [batch, head, query, key]: entries a removal can change
        pairs = (open_.any(0) & causal).nonzero()  # [P, 3] (head, query, key)
        bar.update(H * T * (T + 1) // 2 - len(pairs))
        for start in range(0, len(pairs), per_pass):
            chunk = pairs[start:start + per_pass]
            k = len(chunk)
            mask = torch.ones(k, 1, H, T, T, device=logits.device)
            c = torch.arange(k, device=logits.device)
            mask[c, 0, chunk[:, 0], chunk[:, 1], chunk[:, 2]] = 0
            with torch.no_grad(), temporary_hooks(model, [(f"blocks.{l}.attn.hook_pattern", _mask_hook(mask))]):
                x = resid[l].repeat(k, 1, 1)  # [k*batch, pos, d_model], copy-major
                m = copies_metric(batch, model(x, start_at_layer=l), reference, k).double()  # [k, batch]
            # an example on which the entry is already 0 gives exactly 0 (the removal is the identity there)
            was_open = open_[:, chunk[:, 0], chunk[:, 1], chunk[:, 2]].T  # [k, batch]
            delta = torch.where(was_open, m - m_clean, torch.zeros_like(m)).sum(1)  # [k]
            out[l].index_put_((chunk[:, 0].cpu(), chunk[:, 1].cpu(), chunk[:, 2].cpu()), delta.cpu(), accumulate=True)
            bar.update(k)
    return float(m_clean.sum())


def _gradient_batch(model, batch: TaskDataset, out: torch.Tensor,  # [layer, head, query, key] float64
                    bar) -> float:
    """``−pattern ⊙ ∂(Σ_batch m)/∂pattern`` summed over the batch into ``out``, from one forward and one
    backward; returns Σ m(clean).

    A zero tensor that requires grad is added to each layer's (gated) pattern; its gradient is
    ∂m/∂pattern with every downstream path (later layers' queries and keys included)."""
    L = model.cfg.n_layers
    reference = _reference(model, batch)
    zeros: list[Any] = [None] * L
    pattern: list[Any] = [None] * L

    def keep(act, l):  # act: [batch, head, query, key]
        pattern[l] = act.detach()
        zeros[l] = torch.zeros_like(act, requires_grad=True)
        return act + zeros[l]

    hooks = [(f"blocks.{l}.attn.hook_pattern", lambda a, hook, l=l: keep(a, l)) for l in range(L)]
    with torch.enable_grad(), temporary_hooks(model, hooks):
        logits = model(batch.clean)
        total = batch.metric_values(logits, reference).sum()
    grads = torch.autograd.grad(total, zeros, allow_unused=True)
    for l, g in enumerate(grads):
        if g is not None:
            out[l] -= (pattern[l].double() * g.double()).sum(0).cpu()
    bar.update(1)
    return float(total.detach())


class PairMethod(Enum):
    """How a pair is scored; each member computes its scores (``method.score(model, ds)``)."""

    EXACT = "exact"  # the metric change when the pair alone is removed, by forward passes
    GRADIENT = "gradient"  # −pattern ⊙ ∂m/∂pattern, one forward + one backward per batch

    @classmethod
    def parse(cls, value: "PairMethod | str") -> "PairMethod":
        return parse_enum(cls, value, "pair attribution method")

    @property
    def summary(self) -> str:
        return {PairMethod.EXACT: "exact: the metric change when each pair alone is removed (pattern entry 0)",
                PairMethod.GRADIENT: "gradient: −pattern · ∂m/∂pattern, one backward pass"}[self]

    def _units(self, spec: PairSpec, n_batches: int) -> int:
        per_batch = spec.n_pairs if self is PairMethod.EXACT else 1
        return per_batch * n_batches

    def score(self, model, ds: TaskDataset, batch_size: int = DEFAULT_BATCH_SIZE,
              progress: bool = False) -> "PairScores":
        """Scores of every causal pair, the mean over the examples of ``ds`` (docs/method.md §10)."""
        check_dataset(model, ds)
        check_pair_support(model)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
            raise CircuitkitError(f"batch_size must be a positive integer, got {batch_size!r}")
        if ds.metric is Metric.NEG_KL and self is PairMethod.GRADIENT:
            raise CircuitkitError("the gradient of −KL is 0 at the full model, so gradient pair scores would all be 0; "
                                  "use method='exact' or a task with a logit- or probability-difference metric")
        spec = PairSpec.from_model(model, ds.seq_len)
        out = torch.zeros(spec.shape, dtype=torch.float64)  # [layer, head, query, key]
        device = model_device(model)
        step = _exact_batch if self is PairMethod.EXACT else _gradient_batch
        m_sum = 0.0
        n_batches = -(-len(ds) // batch_size)
        with _evaluation_gates(model), tqdm(total=self._units(spec, n_batches), desc=f"pairs ({self.value})",
                                            disable=not progress, leave=False) as bar:
            for batch in ds.batches(batch_size):
                batch = batch.to(device)
                m_sum += step(model, batch, out, bar)
        scores = (out / len(ds)).float() * spec.causal
        if not bool(torch.isfinite(scores).all()):
            raise CircuitkitError(f"pair scores for task {ds.task!r} are not finite; the metric overflowed "
                                  "(check the model and the dataset)")
        return PairScores(spec, scores, self.value, ds.task, len(ds), m_sum / len(ds))


def attribute_pairs(model, ds: TaskDataset, method: PairMethod | str = PairMethod.GRADIENT,
                    batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False) -> "PairScores":
    """Score every causal (layer, head, query, key) pair of ``ds`` with ``method`` (``exact`` | ``gradient``)."""
    return PairMethod.parse(method).score(model, ds, batch_size, progress)


def metric_with_pairs(model, ds: TaskDataset, keep: torch.Tensor,  # [copies, layer, head, query, key] bool
                      batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False
                      ) -> torch.Tensor:  # [copies, n_examples]
    """The per-example metric on the clean prompts when only the pairs in ``keep[c]`` are kept, for each copy."""
    check_dataset(model, ds)
    if keep.ndim == 4:
        keep = keep[None]
    if keep.ndim != 5 or keep.shape[-1] != ds.seq_len:
        raise CircuitkitError(f"keep-masks must be [copies, layer, head, {ds.seq_len}, {ds.seq_len}] for task "
                              f"{ds.task!r}, got {tuple(keep.shape)}")
    n = keep.shape[0]
    device = model_device(model)
    out = torch.empty(n, len(ds))
    with _evaluation_gates(model), torch.no_grad(), \
            tqdm(total=n * -(-len(ds) // batch_size), desc="pair masks", disable=not progress, leave=False) as bar:
        for bi, batch in enumerate(ds.batches(batch_size)):
            batch = batch.to(device)
            reference = _reference(model, batch)
            b = len(batch)
            per_pass = max(1, PAIR_COPY_BUDGET // (b * batch.seq_len * model.cfg.d_model))
            for start in range(0, n, per_pass):
                stop = min(n, start + per_pass)
                with pairs_removed(model, keep[start:stop]):
                    logits = model(batch.clean.repeat(stop - start, 1))
                out[start:stop, bi * batch_size: bi * batch_size + b] = \
                    copies_metric(batch, logits, reference, stop - start).float().cpu()
                bar.update(stop - start)
    return out


# ---------------------------------------------------------------- the scores

@dataclass(frozen=True)
class PairScores:
    """Scores of every causal pair of one task: ``scores[layer, head, query, key]``, the estimated
    change of the mean metric when that pair alone is removed (0 off the causal triangle)."""

    spec: PairSpec
    scores: torch.Tensor  # [layer, head, query, key] float32
    method: str
    task: str
    n_examples: int
    m_full: float  # mean metric of the full model on the clean prompts
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if tuple(self.scores.shape) != self.spec.shape:
            raise CircuitkitError(f"pair scores must have shape {self.spec.shape} [layer, head, query, key], "
                                  f"got {tuple(self.scores.shape)}")
        if bool((self.scores[~self.spec.causal] != 0).any()):
            raise CircuitkitError("pair scores are nonzero above the causal diagonal (key > query); "
                                  "the tensor is not a causal [layer, head, query, key] score tensor")

    def with_metadata(self, **metadata) -> "PairScores":
        return PairScores(self.spec, self.scores, self.method, self.task, self.n_examples, self.m_full,
                          {**self.metadata, **metadata})

    @property
    def head_scores(self) -> torch.Tensor:  # [layer, head]: Σ |pair score| of each head
        return self.scores.abs().sum((2, 3))

    def order(self) -> torch.Tensor:  # [n_pairs, 4] long (layer, head, query, key), best first
        """Causal pairs by |score|, descending; ties in (layer, head, query, key) order."""
        idx = self.spec.causal.nonzero()  # [n_pairs, 4]
        s = self.scores[idx[:, 0], idx[:, 1], idx[:, 2], idx[:, 3]].abs()
        return idx[torch.argsort(s, descending=True, stable=True)]

    def top_k_mask(self, k: int) -> torch.Tensor:  # [layer, head, query, key] bool
        """The ``k`` best pairs (by |score|) as a keep-mask."""
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise CircuitkitError(f"the number of pairs must be a non-negative integer, got {k!r}")
        best = self.order()[:k]
        mask = torch.zeros(self.spec.shape, dtype=torch.bool)
        mask[best[:, 0], best[:, 1], best[:, 2], best[:, 3]] = True
        return mask

    def top_pairs(self, n: int | None = 20,
                  within: torch.Tensor | None = None  # [layer, head, query, key] bool
                  ) -> list[dict[str, Any]]:
        """The ``n`` best pairs (every one with None), of those in ``within`` when given, as dicts."""
        order = self.order()  # [n_pairs, 4]
        if within is not None:
            order = order[within[tuple(order.T)]]
        return [{"pair": PairSpec.pair_name(*p), "layer": p[0], "head": p[1], "query": p[2], "key": p[3],
                 "score": float(self.scores[tuple(p)])} for p in order[:n].tolist()]

    # -- files
    def summary(self) -> dict[str, Any]:
        return {"format": PAIRS_FORMAT, "version": PAIRS_VERSION, "spec": self.spec.summary(), "method": self.method,
                "task": self.task, "n_examples": self.n_examples, "m_full": self.m_full,
                "n_pairs": self.spec.n_pairs, "nonzero_pairs": int((self.scores != 0).sum()),
                "metadata": dict(self.metadata)}

    def save(self, path: str | os.PathLike) -> Path:
        """One safetensors file: the tensor ``scores`` and the summary as JSON metadata; written atomically."""
        path = Path(path)
        meta = json.dumps(self.summary(), allow_nan=False)
        with atomic_path(path) as tmp:
            save_file({"scores": self.scores.contiguous()}, str(tmp), metadata={"circuitkit": meta})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PairScores":
        path = Path(path)
        if not path.is_file():
            raise CircuitkitError(f"no pair-score file at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = (f.metadata() or {}).get("circuitkit")
                if meta is None or "scores" not in f.keys():
                    raise CircuitkitError(f"{path} is not a circuitkit pair-score file (no 'circuitkit' metadata "
                                          "or no 'scores' tensor); write one with PairScores.save / circuitkit pairs")
                scores = f.get_tensor("scores")
        except SafetensorError as e:
            raise CircuitkitError(f"{path} is not a readable safetensors file ({e})") from None
        try:
            d = json.loads(meta)
        except json.JSONDecodeError as e:
            raise CircuitkitError(f"{path}: the summary metadata is not JSON ({e}); the file is damaged") from None
        if d.get("format") != PAIRS_FORMAT or d.get("version") != PAIRS_VERSION:
            raise CircuitkitError(f"{path}: format {d.get('format')!r} version {d.get('version')!r}; this circuitkit "
                                  f"reads {PAIRS_FORMAT!r} version {PAIRS_VERSION}")
        if scores.dtype != torch.float32 or not bool(torch.isfinite(scores).all()):
            raise CircuitkitError(f"{path}: the scores must be finite float32 values; the file is damaged")
        spec = PairSpec(**d["spec"])
        return cls(spec, scores, d["method"], d["task"], int(d["n_examples"]), float(d["m_full"]),
                   d.get("metadata", {}) or {})


__all__ = ["PAIR_COPY_BUDGET", "PairMethod", "PairScores", "PairSpec", "attribute_pairs", "check_pair_support",
           "metric_with_pairs", "pairs_removed"]
