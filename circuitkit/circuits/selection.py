"""Choosing a circuit from scored edges, as operations on the dense graph tensors.

Why: attribution gives every edge a score; a circuit is a membership mask. This module
owns the rules that turn one into the other (top-n, threshold, greedy to a target
explained effect, node-level top heads), the search that makes a circuit minimal (:func:`minimize`:
drop edges while the circuit still reaches the target, until every edge left is needed) and the
clean-up every rule ends with: removing dangling edges, those not on any path from ``input`` to
``logits``. Every function returns a new :class:`Graph` and leaves its argument as it was.

Every rule takes a position-resolved graph
(:class:`~circuitkit.circuits.positions.PositionGraph`) as well: its edges are (position, edge) pairs.

Pruning never changes what a circuit computes under PATCHING: a node cut off from
``input`` sees only ablated inputs, so its outputs already equal their ablated values.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Callable, Sequence

import torch

from circuitkit import CircuitkitError, parse_enum
from circuitkit.circuits.graph import Graph, GraphSpec
from circuitkit.circuits.interventions import DEFAULT_BATCH_SIZE, Ablation, explained_effect, metric_with_graphs
from circuitkit.circuits.positions import PositionGraph, remove_dangling_positions
from circuitkit.tasks.base import TaskDataset


def remove_dangling(graph: Graph | PositionGraph) -> Graph | PositionGraph:
    """Keep only in-graph edges ``u -> v`` with a path ``input -> u`` and a path ``v -> logits``
    (for a position-resolved graph, paths that cross positions inside attention heads only:
    :func:`~circuitkit.circuits.positions.remove_dangling_positions`)."""
    if isinstance(graph, PositionGraph):
        return remove_dangling_positions(graph)
    spec, edges = graph.spec, graph.in_graph  # [n_src, n_dst]
    dst_node = spec.dst_node  # [n_dst]
    from_input = torch.zeros(spec.n_nodes, dtype=torch.bool)
    from_input[0] = True
    while True:  # forward reachability, one layer of depth per round
        hit = (edges & from_input[: spec.n_src, None]).any(0).to(torch.long)  # [n_dst]
        new = from_input | (torch.zeros(spec.n_nodes, dtype=torch.long).index_add_(0, dst_node, hit) > 0)
        if torch.equal(new, from_input):
            break
        from_input = new
    to_logits = torch.zeros(spec.n_nodes, dtype=torch.bool)
    to_logits[spec.logits_node] = True
    while True:  # backward reachability
        ok = (edges & to_logits[dst_node][None, :]).any(1)  # [n_src]
        new = to_logits.clone()
        new[: spec.n_src] |= ok
        if torch.equal(new, to_logits):
            break
        to_logits = new
    keep = edges & from_input[: spec.n_src, None] & to_logits[dst_node][None, :]
    return graph.with_in_graph(keep)


def edge_order(graph: Graph, absolute: bool = True) -> torch.Tensor:  # [n_real, 2] (src, dst), best first
    """Real edges sorted by score (by |score| when ``absolute``), ties in sender-major order.
    For a position-resolved graph the rows are (pos, src, dst), ties in position-major order."""
    edges = graph.real_mask.nonzero()  # [n_real, 2] or [n_real, 3]
    s = graph.scores[tuple(edges.T)]
    s = torch.nan_to_num(s.abs() if absolute else s, nan=-math.inf)
    return edges[torch.argsort(s, descending=True, stable=True)]


def top_n(graph: Graph, n: int, *, absolute: bool = True, prune: bool = True) -> Graph:
    """The ``n`` best-scoring real edges (then without dangling edges, so possibly fewer)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise CircuitkitError(f"the number of edges must be a non-negative integer, got {n!r}")
    chosen = edge_order(graph, absolute)[:n]
    member = torch.zeros_like(graph.in_graph)
    member[tuple(chosen.T)] = True
    out = graph.with_in_graph(member, selection="top_n", requested_edges=n)
    return remove_dangling(out) if prune else out


def threshold(graph: Graph, value: float, *, absolute: bool = True, prune: bool = True) -> Graph:
    """Real edges with ``|score| >= value`` (``score >= value`` when ``absolute=False``)."""
    if not isinstance(value, (int, float)) or math.isnan(value):
        raise CircuitkitError(f"the threshold must be a number, got {value!r}")
    s = graph.scores.abs() if absolute else graph.scores
    out = graph.with_in_graph(graph.real_mask & (s >= value), selection="threshold", threshold=float(value),
                              absolute=absolute)
    return remove_dangling(out) if prune else out


def log_sizes(n_max: int, n_points: int = 24) -> list[int]:
    """Integer sizes 1..n_max, log-spaced, always including 1..8 and n_max (ascending)."""
    if n_max < 1:
        raise CircuitkitError(f"need at least one edge to build a curve, got {n_max}")
    grid = {int(round(x)) for x in torch.logspace(0, math.log10(n_max), n_points).tolist()}
    return sorted(grid | set(range(1, min(8, n_max) + 1)) | {n_max})


def bisect_top_n(sizes: Sequence[int], f: Sequence[float], target: float,
                 effect: Callable[[int], float]) -> tuple[int, float, bool]:
    """The fewest top-n edges whose explained effect reaches ``target``: ``(n, f(n), reached)``.

    ``f`` holds the explained effect at each of the ascending grid ``sizes``; the first grid
    size that reaches ``target`` is refined by bisection against the grid size before it
    (or 0), calling ``effect(n)`` for each size tried. When no grid size reaches it, the
    answer is the last grid size, not reached. The one search behind :func:`greedy` and
    :func:`circuitkit.evaluation.faithfulness.minimal_circuit`.
    """
    if len(sizes) != len(f) or not sizes:
        raise CircuitkitError(f"need one explained effect per grid size, got {len(sizes)} sizes and {len(f)} values")
    if any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise CircuitkitError(f"grid sizes must be strictly ascending, got {list(sizes)}")
    first = next((i for i, v in enumerate(f) if v >= target), None)
    if first is None:
        return int(sizes[-1]), float(f[-1]), False
    lo, hi, f_hi = (int(sizes[first - 1]) if first else 0), int(sizes[first]), float(f[first])
    while hi - lo > 1:  # invariant: hi reaches the target, lo did not
        mid = (lo + hi) // 2
        f_mid = float(effect(mid))
        if f_mid >= target:
            hi, f_hi = mid, f_mid
        else:
            lo = mid
    return hi, f_hi, True


def greedy(model, graph: Graph, ds: TaskDataset, target: float = 0.9, *, absolute: bool = True,
           ablation: Ablation | str = Ablation.PATCHING, batch_size: int = DEFAULT_BATCH_SIZE,
           prune: bool = True, progress: bool = False) -> Graph:
    """The fewest top-scoring edges whose circuit recovers ``target`` of the full model's effect.

    Edges are added in score order. The sizes of :func:`log_sizes` are evaluated together,
    then :func:`bisect_top_n` refines the first that reaches ``target``. If no size reaches
    it, every real edge is kept.
    """
    if not 0.0 < target <= 1.0:
        raise CircuitkitError(f"target must be a fraction in (0, 1], got {target}")
    n_real = graph.n_real_edges
    sizes = log_sizes(n_real)

    def candidate(n: int) -> Graph:
        return top_n(graph, n, absolute=absolute, prune=prune)

    full, empty = graph.with_in_graph(graph.real_mask), graph.with_in_graph(torch.zeros_like(graph.in_graph))
    graphs = [full, empty] + [candidate(n) for n in sizes]
    m = metric_with_graphs(model, graphs, ds, ablation, batch_size, progress).mean(1)  # [2 + n_sizes]
    m_full, m_empty = float(m[0]), float(m[1])
    f_grid = explained_effect(m[2:], m_full, m_empty).tolist()

    def effect(n: int) -> float:
        m_n = metric_with_graphs(model, [candidate(n)], ds, ablation, batch_size, progress).mean(1)  # [1]
        return float(explained_effect(m_n, m_full, m_empty)[0])

    n, f, reached = bisect_top_n(sizes, f_grid, target, effect)
    meta = dict(selection="greedy", target=target, reached=reached, explained_effect=f)
    return candidate(n).with_metadata(**meta, **({"requested_edges": n} if reached else {}))


class MinimalRule(Enum):
    """How a study's minimal circuit is chosen once the scores rank the edges (``[study] minimal``).

    PREFIX: the fewest top-scoring edges with f ≥ threshold (:func:`bisect_top_n`): one search along
    the ranking, as the paper does. MINIMIZED: that prefix, then :func:`eliminate` drops every edge
    whose removal keeps f ≥ threshold, until each edge left is needed. The prefix keeps edges that a
    ranking puts early but the circuit does not need; the minimized circuit is the one to count when
    "minimal" is meant as a property of the circuit rather than of the ranking.
    """

    PREFIX = "prefix"
    MINIMIZED = "minimized"

    @classmethod
    def parse(cls, value: "MinimalRule | str") -> "MinimalRule":
        return parse_enum(cls, value, "minimal-circuit rule")


def eliminate(member: torch.Tensor,  # any shape, bool: the circuit
              order: torch.Tensor,  # [k, member.ndim] long: the members to try, in this order
              effects: Callable[[list[torch.Tensor]], Sequence[float]], target: float, f_start: float,
              closure: Callable[[torch.Tensor], torch.Tensor] | None = None,
              window: int = 16) -> tuple[torch.Tensor, float, int]:
    """Backward elimination: ``(mask, f, evaluations)``.

    Try each member of ``order`` in turn; drop it when the circuit without it (then ``closure``, e.g.
    dangling-edge removal) still has ``f ≥ target``. Repeat passes until one drops nothing, so the
    result is 1-minimal: dropping any single member of it gives ``f < target``. ``effects`` measures
    several candidate masks at once; candidates are the next removals from the current circuit, up to
    ``window`` of them (fewer while removals keep succeeding), and only the first that succeeds is
    taken, so the result is the one-at-a-time search's exactly, with fewer forward passes where most
    removals fail.
    """
    if math.isnan(f_start):
        raise CircuitkitError("the circuit's explained effect is nan: the full and the fully ablated model score the "
                              "same on these prompts, so there is no effect to keep; check the corrupted prompts")
    if f_start < target:
        raise CircuitkitError(f"the circuit explains f = {f_start:.4f} < the target {target}; elimination starts "
                              "from a circuit that reaches it (a greedy / minimal prefix)")
    if window < 1:
        raise CircuitkitError(f"window must be >= 1, got {window}")
    mask, f_now, n_eval = member.clone(), float(f_start), 0
    tried = [tuple(e) for e in order.tolist()]
    if any(not bool(member[e]) for e in tried):
        raise CircuitkitError("every entry of the order must be a member of the circuit")
    while True:
        dropped, w, i = False, 1, 0
        while i < len(tried):
            batch: list[tuple[int, torch.Tensor]] = []
            j = i
            while j < len(tried) and len(batch) < w:
                if mask[tried[j]]:  # a closure may have dropped it already
                    cand = mask.clone()
                    cand[tried[j]] = False
                    batch.append((j, closure(cand) if closure is not None else cand))
                j += 1
            if not batch:
                break
            f = list(effects([c for _, c in batch]))
            n_eval += len(batch)
            ok = next((k for k, v in enumerate(f) if v >= target), None)
            if ok is None:
                i, w = j, min(2 * w, window)
                continue
            mask, f_now, dropped = batch[ok][1], float(f[ok]), True
            i, w = batch[ok][0] + 1, 1 if ok == 0 else w
        if not dropped:
            return mask, f_now, n_eval
        tried = [e for e in tried if mask[e]]


def minimize(model, circuit: Graph, ds: TaskDataset, target: float = 0.9, *, absolute: bool = True,
             ablation: Ablation | str = Ablation.PATCHING, batch_size: int = DEFAULT_BATCH_SIZE, prune: bool = True,
             known: tuple[float, float] | None = None) -> Graph:
    """The circuit with every edge it does not need dropped (:func:`eliminate`, lowest |score| first):
    f ≥ ``target`` still, and dropping any one edge left (then the edges left dangling, with
    ``prune``) gives f < ``target``. ``circuit`` must reach ``target`` (a :func:`greedy` circuit or a
    study's minimal prefix); ``known`` = (m(N), m(∅)) when already measured on ``ds``. Works on a
    position-resolved graph the same way."""
    if not 0.0 < target <= 1.0:
        raise CircuitkitError(f"target must be a fraction in (0, 1], got {target}")
    if known is None:
        full = circuit.with_in_graph(circuit.real_mask)
        empty = circuit.with_in_graph(torch.zeros_like(circuit.in_graph))
        m = metric_with_graphs(model, [full, empty], ds, ablation, batch_size).mean(1)  # [2]
        known = (float(m[0]), float(m[1]))
    m_full, m_empty = known

    def effects(masks: list[torch.Tensor]) -> list[float]:
        m = metric_with_graphs(model, [circuit.with_in_graph(c) for c in masks], ds, ablation, batch_size).mean(1)
        return explained_effect(m, m_full, m_empty).tolist()  # [len(masks)]

    def closure(mask: torch.Tensor) -> torch.Tensor:
        return remove_dangling(circuit.with_in_graph(mask)).in_graph

    start = remove_dangling(circuit) if prune else circuit
    order = edge_order(start, absolute)  # [n_real, 2 or 3], best first
    order = order[start.in_graph[tuple(order.T)]].flip(0)  # the circuit's edges, lowest |score| first
    f_start = effects([start.in_graph])[0]
    mask, f, n_eval = eliminate(start.in_graph, order, effects, target, f_start, closure if prune else None)
    return start.with_in_graph(mask, selection="minimized", target=target, explained_effect=f,
                               from_edges=start.n_edges, evaluations=n_eval)


def from_nodes(spec_or_graph: GraphSpec | Graph | PositionGraph, heads: torch.Tensor,  # [n_layers, n_heads] bool
               mlps: torch.Tensor | None = None) -> Graph | PositionGraph:  # [n_layers] bool; None keeps every MLP
    """The circuit of all real edges between kept nodes (``input`` and ``logits`` always kept; for a
    position-resolved graph at every position)."""
    graph = Graph.full(spec_or_graph) if isinstance(spec_or_graph, GraphSpec) else spec_or_graph
    spec = graph.spec
    if tuple(heads.shape) != (spec.n_layers, spec.n_heads) or heads.dtype != torch.bool:
        raise CircuitkitError(f"heads must be a bool tensor [n_layers={spec.n_layers}, n_heads={spec.n_heads}], "
                              f"got {heads.dtype} {tuple(heads.shape)}")
    n_mlps = len(spec.mlp_rows)  # 0 for attention-only models
    if mlps is None:
        mlps = torch.ones(n_mlps, dtype=torch.bool)
    if tuple(mlps.shape) != (n_mlps,) or mlps.dtype != torch.bool:
        raise CircuitkitError(f"mlps must be a bool tensor [{n_mlps}] (one per MLP), got {tuple(mlps.shape)}")
    keep = torch.ones(spec.n_nodes, dtype=torch.bool)  # [n_nodes]
    keep[spec.head_rows.flatten()] = heads.flatten()
    keep[spec.mlp_rows] = mlps
    member = graph.real_mask & keep[: spec.n_src, None] & keep[spec.dst_node][None, :]
    return graph.with_in_graph(member, selection="nodes", n_heads_kept=int(heads.sum()))


def top_heads(graph: Graph, n: int, node_scores: torch.Tensor | None = None,  # [n_src]
              *, keep_mlps: bool = True, absolute: bool = True) -> Graph:
    """The circuit of the ``n`` heads with the largest node scores (and every MLP when ``keep_mlps``).

    ``node_scores`` default to the graph's own (sum of outgoing edge scores); pass
    :func:`circuitkit.circuits.attribute_nodes` output for node-level patching scores.
    """
    spec = graph.spec
    scores = graph.node_scores if node_scores is None else node_scores
    if tuple(scores.shape) != (spec.n_src,):
        raise CircuitkitError(f"node scores must be [n_src={spec.n_src}], got {tuple(scores.shape)}")
    total = spec.n_layers * spec.n_heads
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= total:
        raise CircuitkitError(f"the number of heads must be an integer in [0, {total}], got {n!r}")
    hs = scores[spec.head_rows].flatten()  # [n_layers * n_heads]
    hs = torch.nan_to_num(hs.abs() if absolute else hs, nan=-math.inf)
    heads = torch.zeros(total, dtype=torch.bool)
    heads[torch.argsort(hs, descending=True, stable=True)[:n]] = True
    mlps = torch.full((len(spec.mlp_rows),), keep_mlps, dtype=torch.bool)  # [n_mlps]: none when attention-only
    return from_nodes(graph, heads.reshape(spec.n_layers, spec.n_heads), mlps)
