"""How well two attribution methods agree on one model and task.

Why: the project's acceptance criterion for a fast method is agreement with exact
patching — of the k edges with the largest |patching| score, at least 80% among the fast
method's top k, and a Pearson correlation of at least 0.9 over all real edges. This module
computes both numbers for any pair of methods so every report uses the same definition.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch

from circuitkit import CircuitkitError
from circuitkit.circuits.attribution import attribute
from circuitkit.circuits.graph import Graph
from circuitkit.circuits.interventions import DEFAULT_BATCH_SIZE, Ablation
from circuitkit.circuits.selection import edge_order
from circuitkit.tasks.base import TaskDataset


@dataclass(frozen=True)
class Agreement:
    """``top_k_overlap``: fraction of A's top-k edges (by |score|) that are in B's top k.
    ``pearson``: correlation of the signed scores over all real edges; ``spearman``: the same of
    their ranks (ties share their mean rank)."""

    method_a: str
    method_b: str
    k: int
    top_k_overlap: float
    pearson: float
    n_edges: int
    spearman: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_scores(a: Graph, b: Graph, k: int = 50) -> Agreement:
    """Agreement of two scored graphs of the same model."""
    if a.spec != b.spec or a.scores.shape != b.scores.shape:
        raise CircuitkitError("the two graphs belong to differently shaped models (or one is position-resolved and "
                              "the other not, or their prompts differ in length); compare graphs of one model and level")
    n_real = a.n_real_edges
    if not isinstance(k, int) or not 0 < k <= n_real:
        raise CircuitkitError(f"k must be an integer in [1, {n_real}] (the model's real edges), got {k!r}")
    top_a = {tuple(e) for e in edge_order(a)[:k].tolist()}
    top_b = {tuple(e) for e in edge_order(b)[:k].tolist()}
    real = a.real_mask
    sa, sb = a.scores[real].double(), b.scores[real].double()
    return Agreement(str(a.metadata.get("method", "a")), str(b.metadata.get("method", "b")), k,
                     len(top_a & top_b) / k, _pearson(sa, sb), n_real, _pearson(_ranks(sa), _ranks(sb)))


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float:  # [n], [n] float64
    x, y = x - x.mean(), y - y.mean()
    denom = (x.norm() * y.norm()).item()
    return float("nan") if denom == 0 else float((x @ y).item() / denom)


def _ranks(x: torch.Tensor) -> torch.Tensor:  # [n] -> [n] float64: 1-based ranks, ties share their mean rank
    order = torch.argsort(x, stable=True)
    _, inverse, counts = torch.unique_consecutive(x[order], return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()
    ranks = torch.empty(len(x), dtype=torch.float64)
    ranks[order] = ((last - counts + 1 + last) / 2)[inverse]
    return ranks


def agreement(model, ds: TaskDataset, method_a: str = "patching", method_b: str = "eap-ig", *, k: int = 50,
              ablation: Ablation | str = Ablation.PATCHING, batch_size: int = DEFAULT_BATCH_SIZE,
              options_a: Mapping[str, Any] | None = None, options_b: Mapping[str, Any] | None = None,
              progress: bool = False) -> Agreement:
    """Attribute ``ds`` with both methods and compare (``method_a`` is the reference, e.g. patching)."""
    ga = attribute(model, ds, method_a, ablation=ablation, batch_size=batch_size, progress=progress,
                   **dict(options_a or {}))
    gb = attribute(model, ds, method_b, ablation=ablation, batch_size=batch_size, progress=progress,
                   **dict(options_b or {}))
    return compare_scores(ga, gb, k=min(k, ga.spec.n_real_edges))
