"""Verification of circuits: explained effect, faithfulness curves, minimal circuits, CPR/CMD,
completeness and minimality (docs/method.md §6).

Why a module of its own: attribution says which edges *might* matter; this module measures
what a circuit actually does under ablation, with the intervention machinery of
:mod:`circuitkit.circuits.interventions`. Everything is expressed through the explained
effect ``f(C) = (m(C) − m(∅)) / (m(N) − m(∅))`` of the task metric ``m``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from circuitkit import CircuitkitError
from circuitkit.circuits.graph import Graph
from circuitkit.circuits.interventions import DEFAULT_BATCH_SIZE, Ablation, explained_effect, metric_with_graphs
from circuitkit.circuits.selection import bisect_top_n, log_sizes, top_heads, top_n
from circuitkit.tasks.base import TaskDataset

# MIB's edge fractions for CPR / CMD, as fractions of the real edges.
MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass(frozen=True)
class Curve:
    """Explained effect against circuit size. ``sizes`` are what was asked (top-n edges or
    heads), ``kept`` what the circuit holds after dangling edges were removed."""

    unit: str  # "edges" | "heads"
    sizes: tuple[int, ...]
    kept: tuple[int, ...]
    f: tuple[float, ...]
    m_full: float
    m_empty: float

    def to_dict(self) -> dict:
        return {"unit": self.unit, "sizes": list(self.sizes), "kept": list(self.kept), "f": list(self.f),
                "m_full": self.m_full, "m_empty": self.m_empty}

    @classmethod
    def from_dict(cls, d: dict) -> "Curve":
        """The curve :meth:`to_dict` wrote (a study's saved summary)."""
        return cls(str(d["unit"]), tuple(int(x) for x in d["sizes"]), tuple(int(x) for x in d["kept"]),
                   tuple(float(x) for x in d["f"]), float(d["m_full"]), float(d["m_empty"]))


def _evaluate(model, graphs: Sequence[Graph], ds: TaskDataset, ablation, batch_size,
              known: tuple[float, float] | None = None) -> tuple[float, float, list[float]]:
    """m(N), m(∅) and f of each graph; ``known`` = (m(N), m(∅)) already measured on ``ds``."""
    first = graphs[0]
    if known is not None:
        m_full, m_empty = known
        m = metric_with_graphs(model, list(graphs), ds, ablation, batch_size).mean(1)  # [n_graphs]
        return m_full, m_empty, explained_effect(m, m_full, m_empty).tolist()
    full, empty = first.with_in_graph(first.real_mask), first.with_in_graph(torch.zeros_like(first.in_graph))
    m = metric_with_graphs(model, [full, empty, *graphs], ds, ablation,
                           batch_size).mean(1)  # [2 + n_graphs]
    m_full, m_empty = float(m[0]), float(m[1])
    if abs(m_full - m_empty) < 1e-9:
        raise CircuitkitError(
            f"task {ds.task!r}: the full model and the fully ablated model score the same ({m_full:.4g}), "
            "so no effect can be explained; check that the corrupted prompts change the answer")
    return m_full, m_empty, explained_effect(m[2:], m_full, m_empty).tolist()


def edge_curve(model, scored: Graph, ds: TaskDataset, sizes: Sequence[int] | None = None,
               ablation: Ablation | str = Ablation.PATCHING, batch_size: int = DEFAULT_BATCH_SIZE) -> Curve:
    """f of the top-n edges of ``scored`` for each n in ``sizes`` (default: log-spaced)."""
    sizes = list(sizes) if sizes is not None else log_sizes(scored.n_real_edges)
    graphs = [top_n(scored, int(n)) for n in sizes]
    m_full, m_empty, f = _evaluate(model, graphs, ds, ablation, batch_size)
    return Curve("edges", tuple(int(n) for n in sizes), tuple(g.n_edges for g in graphs), tuple(f), m_full, m_empty)


def head_curve(model, scored: Graph, ds: TaskDataset, node_scores: torch.Tensor | None = None,  # [n_src]
               ablation: Ablation | str = Ablation.PATCHING, batch_size: int = DEFAULT_BATCH_SIZE) -> Curve:
    """f of the circuit of the top-n heads (all MLPs kept) for n = 0..L·H."""
    n_heads = scored.spec.n_layers * scored.spec.n_heads
    sizes = list(range(0, n_heads + 1))
    graphs = [top_heads(scored, n, node_scores) for n in sizes]
    m_full, m_empty, f = _evaluate(model, graphs, ds, ablation, batch_size)
    return Curve("heads", tuple(sizes), tuple(g.n_heads for g in graphs), tuple(f), m_full, m_empty)


def smallest_reaching(sizes: Sequence[int], f: Sequence[float], threshold: float = 0.9) -> int | None:
    """The smallest size on a curve whose explained effect is at least ``threshold`` (None if none)."""
    if len(sizes) != len(f):
        raise CircuitkitError(f"sizes ({len(sizes)}) and f ({len(f)}) must have the same length")
    ok = [s for s, v in zip(sizes, f) if v >= threshold]
    return min(ok) if ok else None


@dataclass(frozen=True)
class Minimal:
    """The minimal circuit: the fewest top-scoring edges with f ≥ threshold."""

    graph: Graph
    requested: int
    f: float
    reached: bool
    threshold: float

    @property
    def n_edges(self) -> int:
        return self.graph.n_edges

    @property
    def n_heads(self) -> int:
        return self.graph.n_heads


def minimal_circuit(model, scored: Graph, ds: TaskDataset, threshold: float = 0.9, curve: Curve | None = None,
                    ablation: Ablation | str = Ablation.PATCHING, batch_size: int = DEFAULT_BATCH_SIZE) -> Minimal:
    """Smallest top-n circuit with f ≥ ``threshold``: :func:`~circuitkit.circuits.selection.bisect_top_n`
    on the edge curve (the first grid point that reaches it, refined by bisection); every real
    edge when none does."""
    if not 0.0 < threshold <= 1.0:
        raise CircuitkitError(f"threshold must be in (0, 1], got {threshold}")
    curve = curve or edge_curve(model, scored, ds, ablation=ablation, batch_size=batch_size)

    def effect(n: int) -> float:
        return _evaluate(model, [top_n(scored, n)], ds, ablation, batch_size, known=(curve.m_full, curve.m_empty))[2][0]

    n, f, reached = bisect_top_n(curve.sizes, curve.f, threshold, effect)
    if not reached:
        n = scored.n_real_edges
    return Minimal(top_n(scored, n), n, f, reached, threshold)


def area(x: Sequence[float], y: Sequence[float]) -> float:
    """Trapezoidal area under y(x)."""
    return float(torch.trapezoid(torch.tensor(y, dtype=torch.float64), torch.tensor(x, dtype=torch.float64)))


@dataclass(frozen=True)
class CprCmd:
    fractions: tuple[float, ...]
    f: tuple[float, ...]

    @property
    def cpr(self) -> float:
        """Area under f over the edge fractions (x in [0, 1]); higher is better."""
        return area(self.fractions, self.f)

    @property
    def cmd(self) -> float:
        """Area under |1 − f| over the edge fractions; lower is better."""
        return area(self.fractions, [abs(1 - v) for v in self.f])


def cpr_cmd(model, scored: Graph, ds: TaskDataset, fractions: Sequence[float] = MIB_FRACTIONS,
            ablation: Ablation | str = Ablation.PATCHING, batch_size: int = DEFAULT_BATCH_SIZE) -> CprCmd:
    """f at the MIB edge fractions (top ``round(fraction · n_real)`` edges)."""
    n_real = scored.n_real_edges
    graphs = [top_n(scored, int(round(p * n_real))) for p in fractions]
    _, _, f = _evaluate(model, graphs, ds, ablation, batch_size)
    return CprCmd(tuple(fractions), tuple(f))


def completeness(model, circuit: Graph, ds: TaskDataset, ablation: Ablation | str = Ablation.PATCHING,
                 batch_size: int = DEFAULT_BATCH_SIZE) -> float:
    """The fraction of the effect removed when the circuit is knocked out of the full model:
    ``1 − f(N ∖ C)``, where ``N ∖ C`` keeps every real edge except the circuit's."""
    knocked = circuit.with_in_graph(circuit.real_mask & ~circuit.in_graph)
    return 1.0 - _evaluate(model, [knocked], ds, ablation, batch_size)[2][0]


def minimality(model, circuit: Graph, ds: TaskDataset, eps: float = 0.01,
               ablation: Ablation | str = Ablation.PATCHING, batch_size: int = DEFAULT_BATCH_SIZE,
               max_edges: int | None = None, seed: int = 0) -> float:
    """The fraction of circuit edges whose single removal lowers f by more than ``eps``.

    Each edge tested costs one ablated evaluation of ``ds``. With ``max_edges``, a circuit
    larger than that is estimated from a uniform sample of ``max_edges`` of its edges drawn
    without replacement (``seed``): the standard error of the fraction is at most
    ``0.5 / sqrt(max_edges)``. Circuits no larger than ``max_edges`` are measured exactly.
    """
    edges = circuit.in_graph.nonzero()  # [n_edges, 2] ([n_edges, 3] for a position-resolved graph)
    if len(edges) == 0:
        return float("nan")
    if max_edges is not None:
        if max_edges < 1:
            raise CircuitkitError(f"minimality: max_edges must be >= 1 (or None for every edge), got {max_edges}")
        if len(edges) > max_edges:
            pick = torch.randperm(len(edges), generator=torch.Generator().manual_seed(seed))[:max_edges]
            edges = edges[pick.sort().values]
    graphs = [circuit]
    for e in edges.tolist():
        member = circuit.in_graph.clone()
        member[tuple(e)] = False
        graphs.append(circuit.with_in_graph(member))
    _, _, f = _evaluate(model, graphs, ds, ablation, batch_size)
    base = f[0]
    return sum(1 for v in f[1:] if base - v > eps) / len(edges)
