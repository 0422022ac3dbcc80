"""Position-resolved edge graphs: every edge of the component graph at every token position.

Why: the component graph (:mod:`~circuitkit.circuits.graph`) sums each edge over positions, so
where in the prompt a circuit acts (which digit, which name) is invisible. This module owns the
position level: the numbering of positions (:class:`Positions`, named by the task's roles where
the task gives them, ``TaskDataset.position_labels``), :class:`PositionGraph` (one dense score
tensor and one membership tensor, ``[pos, n_src, n_dst]``, with thin views), its JSON and
networkx forms, dangling-edge removal with attention's reach across positions, and
:func:`attribute_positions`, which scores a :class:`PositionGraph` with a method of the one
attribution registry (:mod:`~circuitkit.circuits.attribution`: ``eap``, ``eap-ig`` and exact
``patching`` have position-level variants).

The edge ``u@p -> v@p`` is the sender's output at position ``p`` read by the receiver's input at
``p`` (``docs/method.md`` §2, "Position-resolved graphs"). Attention moves information across
positions inside a head node: its k and v inputs at a key position and its q input at a query
position are separate receivers, and a head's output at query position ``q`` reads its k/v
inputs at every key position ``≤ q``. Ablating ``u@p -> v@p`` gives ``v`` at ``p`` the input
``clean + a_u^ablate[p] - a_u^current[p]`` (the general patched pass of
:mod:`~circuitkit.circuits.interventions` takes masks with a position axis). Selection
(:mod:`~circuitkit.circuits.selection`) and faithfulness take a :class:`PositionGraph` wherever
they take a :class:`~circuitkit.circuits.graph.Graph`.

For eap the position-resolved scores sum over positions to the component scores exactly: the
same two forwards and one backward, with the contraction keeping the position axis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterator, Mapping

import torch

from circuitkit import CircuitkitError
from circuitkit.circuits.attribution import POSITION, _check_finite, exact_position_patching, get_method
from circuitkit.circuits.graph import QKV, Edge, Graph, GraphSpec, JsonFile, Node, _plain, settle_tensors
from circuitkit.circuits.interventions import DEFAULT_BATCH_SIZE, Ablation, check_dataset
from circuitkit.tasks.base import TaskDataset

POSITION_GRAPH_FORMAT = "circuitkit.position_graph"
POSITION_GRAPH_VERSION = 1
_RESERVED = ("@", "->", "<", ">")  # characters that structure an edge name


# ---------------------------------------------------------------- positions

@dataclass(frozen=True)
class Positions:
    """Names of the token positions of one prompt length: a task role (``"="``, ``"S"``) or the index.

    An all-digit name must be its own index, so ``@3`` always means position 3.
    """

    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        labels = tuple(self.labels)
        if not labels:
            raise CircuitkitError("a position-resolved graph needs at least one position")
        for i, x in enumerate(labels):
            if not isinstance(x, str) or not x or any(r in x for r in _RESERVED) or x != x.strip():
                raise CircuitkitError(f"position name {x!r} (position {i}) must be a non-empty string without "
                                      f"spaces around it and without {', '.join(map(repr, _RESERVED))}")
            if x.isdigit() and int(x) != i:
                raise CircuitkitError(f"position {i} is named {x!r}: a number names its own position only")
        if len(set(labels)) != len(labels):
            raise CircuitkitError(f"position names must be distinct, got {labels!r}")
        object.__setattr__(self, "labels", labels)

    @classmethod
    def by_index(cls, n: int) -> "Positions":
        return cls(tuple(str(i) for i in range(n)))

    @classmethod
    def of(cls, ds: TaskDataset) -> "Positions":
        """The dataset's position roles (``ds.position_labels``), else indices."""
        labels = getattr(ds, "position_labels", None)
        return cls(tuple(labels)) if labels is not None else cls.by_index(ds.seq_len)

    @classmethod
    def coerce(cls, value: "Positions | TaskDataset | int | tuple | list") -> "Positions":
        if isinstance(value, Positions):
            return value
        if isinstance(value, TaskDataset):
            return cls.of(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return cls.by_index(value)
        if isinstance(value, (tuple, list)):
            return cls(tuple(value))
        raise CircuitkitError(f"positions must be Positions, a TaskDataset, a prompt length or a list of names, "
                              f"got {type(value).__name__}")

    def __len__(self) -> int:
        return len(self.labels)

    @cached_property
    def _index(self) -> Mapping[str, int]:
        return {x: i for i, x in enumerate(self.labels)}

    def index(self, name: str) -> int:
        """Position of ``name``: its role name or its index as digits."""
        if name in self._index:
            return self._index[name]
        if isinstance(name, str) and name.isdigit() and int(name) < len(self):
            return int(name)
        raise CircuitkitError(f"unknown position {name!r}; positions are {', '.join(self.labels)} "
                              f"(or an index below {len(self)})")


# ---------------------------------------------------------------- views

@dataclass(frozen=True)
class PositionEdge:
    """A read-only view of one real edge at one position of a :class:`PositionGraph`."""

    graph: "PositionGraph" = field(repr=False, compare=False)
    pos: int
    src: int
    dst: int

    @property
    def name(self) -> str:
        return self.graph.edge_name(self.pos, self.src, self.dst)

    @property
    def position(self) -> str:
        return self.graph.positions.labels[self.pos]

    @property
    def component(self) -> Edge:
        """The same edge in the position-summed graph (:attr:`PositionGraph.component`)."""
        return Edge(self.graph.component, self.src, self.dst)

    @property
    def qkv(self) -> str | None:
        return self.component.qkv

    @property
    def score(self) -> float:
        return float(self.graph.scores[self.pos, self.src, self.dst])

    @property
    def in_graph(self) -> bool:
        return bool(self.graph.in_graph[self.pos, self.src, self.dst])

    def __str__(self) -> str:
        return self.name


# ---------------------------------------------------------------- the graph

@dataclass(frozen=True, eq=False)
class PositionGraph(JsonFile):
    """Edge scores and circuit membership per token position, as dense tensors.

    ``scores[p, s, d]`` scores the edge ``s -> d`` at position ``p`` (0 on non-edges);
    ``in_graph[p, s, d]`` says whether it is in the circuit. The real edges are those of the
    component graph at every position. Selection functions return new graphs; nothing here
    mutates in place.
    """

    WHAT = "position graph"

    spec: GraphSpec
    positions: Positions
    scores: torch.Tensor  # [pos, n_src, n_dst] float32
    in_graph: torch.Tensor  # [pos, n_src, n_dst] bool
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "positions", Positions.coerce(self.positions))
        settle_tensors(self, (len(self.positions), self.spec.n_src, self.spec.n_dst), "position graph",
                       "[pos, n_src, n_dst]", f"{len(self.positions)} positions of a", self.edge_name)

    # -- constructors
    @classmethod
    def from_model(cls, model_or_spec, positions, scores: torch.Tensor | None = None,
                   in_graph: torch.Tensor | None = None, metadata: Mapping[str, Any] | None = None) -> "PositionGraph":
        """A graph for ``model_or_spec`` at ``positions`` (Positions, a TaskDataset or a prompt length);
        by default no scores and every real edge at every position in the circuit."""
        spec = model_or_spec if isinstance(model_or_spec, GraphSpec) else GraphSpec.from_model(model_or_spec)
        positions = Positions.coerce(positions)
        shape = (len(positions), spec.n_src, spec.n_dst)
        if scores is None:
            scores = torch.zeros(shape)
        if in_graph is None:
            in_graph = spec.real.expand(shape).clone()
        return cls(spec, positions, scores, in_graph, metadata or {})

    @classmethod
    def full(cls, model_or_spec, positions) -> "PositionGraph":
        return cls.from_model(model_or_spec, positions)

    @classmethod
    def empty(cls, model_or_spec, positions) -> "PositionGraph":
        spec = model_or_spec if isinstance(model_or_spec, GraphSpec) else GraphSpec.from_model(model_or_spec)
        positions = Positions.coerce(positions)
        return cls.from_model(spec, positions, in_graph=torch.zeros(len(positions), spec.n_src, spec.n_dst,
                                                                    dtype=torch.bool))

    @classmethod
    def from_component(cls, graph: Graph, positions) -> "PositionGraph":
        """A component circuit at every position (the same computation as ``graph``); no scores."""
        positions = Positions.coerce(positions)
        member = graph.in_graph.expand(len(positions), *graph.in_graph.shape).clone()
        return cls.from_model(graph.spec, positions, in_graph=member, metadata=graph.metadata)

    def with_in_graph(self, in_graph: torch.Tensor, **metadata) -> "PositionGraph":
        """The same scores with another membership ``[pos, n_src, n_dst]`` (bool)."""
        return PositionGraph(self.spec, self.positions, self.scores, in_graph, {**self.metadata, **metadata})

    def with_scores(self, scores: torch.Tensor, **metadata) -> "PositionGraph":
        return PositionGraph(self.spec, self.positions, scores, self.in_graph, {**self.metadata, **metadata})

    def with_metadata(self, **metadata) -> "PositionGraph":
        return PositionGraph(self.spec, self.positions, self.scores, self.in_graph, {**self.metadata, **metadata})

    def check_model(self, model) -> None:
        """Raise unless this graph was made for a model shaped like ``model``."""
        self.component.check_model(model)

    def check_dataset(self, ds: TaskDataset) -> None:
        if ds.seq_len != len(self.positions):
            raise CircuitkitError(f"this position-resolved graph has {len(self.positions)} positions but task "
                                  f"{ds.task!r} prompts have {ds.seq_len} tokens")

    # -- counts and node-level views
    @property
    def n_positions(self) -> int:
        return len(self.positions)

    @property
    def real_mask(self) -> torch.Tensor:  # [pos, n_src, n_dst] bool (a fresh tensor)
        return self.spec.real.expand(self.n_positions, *self.spec.real.shape).clone()

    @property
    def n_real_edges(self) -> int:
        return self.n_positions * self.spec.n_real_edges

    @property
    def ablated(self) -> torch.Tensor:  # [pos, n_src, n_dst] bool: real edges not in the circuit
        return self.spec.real & ~self.in_graph

    @property
    def n_edges(self) -> int:
        """Position edges in the circuit."""
        return int(self.in_graph.sum())

    @cached_property
    def component(self) -> Graph:
        """The position-summed graph: scores summed over positions, an edge in it where it is in at any position.
        (For eap, its scores are the component-level eap scores.)"""
        return Graph(self.spec, self.scores.sum(0), self.in_graph.any(0), self.metadata)

    @property
    def node_mask(self) -> torch.Tensor:  # [n_nodes] bool
        return self.component.node_mask

    @property
    def head_mask(self) -> torch.Tensor:  # [n_layers, n_heads] bool
        return self.component.head_mask

    @property
    def mlp_mask(self) -> torch.Tensor:  # [n_layers] bool
        return self.component.mlp_mask

    @property
    def n_heads(self) -> int:
        return self.component.n_heads

    @property
    def n_mlps(self) -> int:
        return self.component.n_mlps

    @property
    def n_attention_edges(self) -> int:
        return int((self.in_graph & self.spec.attention_edges).sum())

    @property
    def node_scores(self) -> torch.Tensor:  # [n_src]
        return self.component.node_scores

    @property
    def position_node_scores(self) -> torch.Tensor:  # [pos, n_src]: Σ of each sender's outgoing scores at p
        return self.scores.sum(2)

    @property
    def head_scores(self) -> torch.Tensor:  # [n_layers, n_heads]
        return self.component.head_scores

    # -- names, views and lookups
    def edge_name(self, pos: int, src: int, dst: int) -> str:
        at = self.positions.labels[pos]
        return f"{self.spec.src_names[src]}@{at}->{self.spec.dst_names[dst]}@{at}"

    def parse_edge(self, name: str) -> tuple[int, int, int]:
        """``"a0.h1@3->a2.h3<k>@3"`` -> (pos, src, dst); raises for unknown or non-causal edges."""
        if not isinstance(name, str) or "->" not in name:
            raise CircuitkitError(f"bad position edge name {name!r}; they are written like 'a0.h1@3->a2.h3<k>@3' "
                                  "or 'm1@=->logits@='")
        src_part, dst_part = name.split("->", 1)
        if src_part.count("@") != 1 or dst_part.count("@") != 1:
            raise CircuitkitError(f"bad position edge name {name!r}: both ends need one '@position', as in "
                                  "'a0.h1@3->a2.h3<k>@3'")
        (src_name, p_src), (dst_name, p_dst) = src_part.split("@"), dst_part.split("@")
        if p_src != p_dst and self.positions.index(p_src) != self.positions.index(p_dst):
            raise CircuitkitError(f"{name!r} joins two positions; a position edge joins a sender and a receiver at "
                                  "the same position (attention moves information across positions inside a head)")
        src, dst = self.spec.parse_edge(f"{src_name}->{dst_name}")
        return self.positions.index(p_src), src, dst

    def edge(self, name: str) -> PositionEdge:
        return PositionEdge(self, *self.parse_edge(name))

    def node(self, name: str) -> Node:
        """A node of the position-summed graph (nodes are not resolved by position)."""
        return self.component.node(name)

    def edges(self, in_graph_only: bool = True) -> Iterator[PositionEdge]:
        """Edges in position-major, then sender-major order; all real edges with ``in_graph_only=False``."""
        mask = self.in_graph if in_graph_only else self.real_mask
        for p, s, d in mask.nonzero().tolist():
            yield PositionEdge(self, p, s, d)

    def edge_names(self, in_graph_only: bool = True) -> list[str]:
        return [e.name for e in self.edges(in_graph_only)]

    def __repr__(self) -> str:
        return (f"PositionGraph({self.spec.n_layers}L x {self.spec.n_heads}H x {self.n_positions} positions, "
                f"{self.n_edges}/{self.n_real_edges} edges, {self.n_heads} heads, metadata={dict(self.metadata)})")

    # -- JSON
    def to_dict(self) -> dict[str, Any]:
        """Plain data: model summary, positions, node names, real position edges with scores and flags."""
        p, s, d = self.real_mask.nonzero(as_tuple=True)
        return {
            "format": POSITION_GRAPH_FORMAT, "version": POSITION_GRAPH_VERSION,
            "model": self.spec.summary(), "positions": list(self.positions.labels),
            "nodes": list(self.spec.node_names),
            "n_edges_in_graph": self.n_edges, "n_heads_in_graph": self.n_heads,
            "edges": [self.edge_name(*e) for e in zip(p.tolist(), s.tolist(), d.tolist())],
            "scores": self.scores[p, s, d].tolist(),  # float32 -> float is exact; json writes repr
            "in_graph": self.in_graph[p, s, d].tolist(),
            "metadata": _plain(self.metadata),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PositionGraph":
        if not isinstance(d, Mapping) or d.get("format") != POSITION_GRAPH_FORMAT:
            got = d.get("format") if isinstance(d, Mapping) else type(d).__name__
            raise CircuitkitError(f"not a circuitkit position-resolved graph: expected format={POSITION_GRAPH_FORMAT!r}, "
                                  f"got {got!r} (a component graph loads with Graph.load)")
        if d.get("version") != POSITION_GRAPH_VERSION:
            raise CircuitkitError(f"position graph format version {d.get('version')!r} is not supported (this "
                                  f"circuitkit reads version {POSITION_GRAPH_VERSION})")
        spec = GraphSpec.from_summary(d.get("model", {}))
        if list(d.get("nodes", [])) != list(spec.node_names):
            raise CircuitkitError("the graph's node list does not match its model summary; the file was edited or "
                                  "is corrupt")
        positions = Positions(tuple(d.get("positions") or ()))
        names, scores, flags = d.get("edges"), d.get("scores"), d.get("in_graph")
        if not (isinstance(names, list) and isinstance(scores, list) and isinstance(flags, list)
                and len(names) == len(scores) == len(flags)):
            raise CircuitkitError("a position graph needs 'edges', 'scores' and 'in_graph' lists of equal length")
        shape = (len(positions), spec.n_src, spec.n_dst)
        empty = cls(spec, positions, torch.zeros(shape), torch.zeros(shape, dtype=torch.bool))
        idx = torch.tensor([empty.parse_edge(n) for n in names], dtype=torch.long).reshape(-1, 3)
        dense = torch.zeros(shape, dtype=torch.float32)
        member = torch.zeros(shape, dtype=torch.bool)
        dense[tuple(idx.T)] = torch.tensor([float(x) for x in scores], dtype=torch.float32)
        member[tuple(idx.T)] = torch.tensor([bool(x) for x in flags], dtype=torch.bool)
        return cls(spec, positions, dense, member, d.get("metadata", {}) or {})

    # -- networkx
    def to_networkx(self, in_graph_only: bool = False):
        """A ``networkx.DiGraph`` whose paths run ``input@p -> ... -> logits@q``.

        Nodes: every graph node at every position, ``a0.h1@3`` (attributes kind, layer, head,
        position, pos), and one port node per head input and position, ``a2.h3<k>@3``. Internal
        edges (``internal=True``) join a q port at ``p`` to its head at ``p`` and a k or v port at
        key position ``p`` to its head at every query position ``q ≥ p``. Real edges carry
        ``name``, ``score`` and ``in_graph``.
        """
        import networkx as nx

        spec, labels = self.spec, self.positions.labels
        g = nx.DiGraph(model=spec.summary(), positions=list(labels), metadata=_plain(self.metadata),
                       format=POSITION_GRAPH_FORMAT)
        comp = self.component
        for node in comp.nodes:
            for p, at in enumerate(labels):
                g.add_node(f"{node.name}@{at}", kind=node.kind, layer=node.layer, head=node.head, position=at, pos=p,
                           node=node.name)
        for j, dname in enumerate(spec.dst_names):
            if not dname.endswith(">"):
                continue
            owner, port = spec.node_names[int(spec.dst_node[j])], dname[-2]
            for p, at in enumerate(labels):
                g.add_node(f"{dname}@{at}", kind="head_input", port=port, head_node=owner, position=at, pos=p)
                for q in ([p] if port == "q" else range(p, len(labels))):
                    g.add_edge(f"{dname}@{at}", f"{owner}@{labels[q]}", internal=True)
        for e in self.edges(in_graph_only):
            at = labels[e.pos]
            g.add_edge(f"{spec.src_names[e.src]}@{at}", f"{spec.dst_names[e.dst]}@{at}", name=e.name, score=e.score,
                       in_graph=e.in_graph, internal=False)
        return g

    @classmethod
    def from_networkx(cls, g) -> "PositionGraph":
        """Back from :meth:`to_networkx`; real edges missing from ``g`` get score 0, not in graph."""
        if g.graph.get("format") != POSITION_GRAPH_FORMAT or "model" not in g.graph:
            raise CircuitkitError("this networkx graph was not written by PositionGraph.to_networkx")
        spec = GraphSpec.from_summary(g.graph["model"])
        out = cls.empty(spec, Positions(tuple(g.graph.get("positions") or ())))
        scores, member = out.scores.clone(), out.in_graph.clone()
        for _, _, attrs in g.edges(data=True):
            if attrs.get("internal"):
                continue
            idx = out.parse_edge(attrs.get("name", ""))
            scores[idx] = float(attrs.get("score", 0.0))
            member[idx] = bool(attrs.get("in_graph", False))
        return cls(spec, out.positions, scores, member, g.graph.get("metadata", {}) or {})


# ---------------------------------------------------------------- dangling edges

def _key_value_receivers(spec: GraphSpec) -> torch.Tensor:  # [n_dst] bool: k and v inputs of heads
    kv = torch.zeros(spec.n_dst, dtype=torch.bool)
    for layer in range(spec.n_layers):
        for c in QKV[1:]:
            kv[spec.head_dst(layer, 0, c): spec.head_dst(layer, 0, c) + spec.n_heads] = True
    return kv


def remove_dangling_positions(graph: PositionGraph) -> PositionGraph:
    """Keep only in-graph edges ``u@p -> v@p`` on a path from some ``input@·`` to some ``logits@·``.

    A path continues inside a node at the same position, except through attention: a k or v
    input at key position ``p`` reaches the head's output at every query position ``q ≥ p``.
    (So, as for the component graph, a head or MLP at a position cut off from ``input`` sees
    only ablated inputs and already outputs its ablated value under PATCHING.)
    """
    spec, edges = graph.spec, graph.in_graph  # [pos, n_src, n_dst]
    n_pos, dst_node = graph.n_positions, spec.dst_node  # [n_dst]
    kv = _key_value_receivers(spec)  # [n_dst]
    from_input = torch.zeros(n_pos, spec.n_nodes, dtype=torch.bool)
    from_input[:, 0] = True
    while True:  # forward reachability, one layer of depth per round
        hit = (edges & from_input[:, : spec.n_src, None]).any(1)  # [pos, n_dst]: reads a reached sender
        hit = torch.where(kv, hit.cumsum(0) > 0, hit)  # a key/value at p reaches queries at q >= p
        new = from_input | (torch.zeros(n_pos, spec.n_nodes, dtype=torch.long).index_add_(1, dst_node, hit.long()) > 0)
        if torch.equal(new, from_input):
            break
        from_input = new

    def useful_receivers(to_logits: torch.Tensor) -> torch.Tensor:  # [pos, n_nodes] -> [pos, n_dst]
        own = to_logits[:, dst_node]  # the receiver's node at the same position
        later = own.flip(0).cumsum(0).flip(0) > 0  # ... at some position q >= p
        return torch.where(kv, later, own)

    to_logits = torch.zeros(n_pos, spec.n_nodes, dtype=torch.bool)
    to_logits[:, spec.logits_node] = True
    while True:  # backward reachability
        ok = (edges & useful_receivers(to_logits)[:, None, :]).any(2)  # [pos, n_src]
        new = to_logits.clone()
        new[:, : spec.n_src] |= ok
        if torch.equal(new, to_logits):
            break
        to_logits = new
    keep = edges & from_input[:, : spec.n_src, None] & useful_receivers(to_logits)[:, None, :]
    return graph.with_in_graph(keep)


# ---------------------------------------------------------------- attribution

def exact_position_scores(model, ds: TaskDataset, at: list[int | str] | None = None, *,
                          ablation: Ablation | str = Ablation.PATCHING, batch_size: int = DEFAULT_BATCH_SIZE,
                          progress: bool = False) -> torch.Tensor:  # [pos, n_src, n_dst]
    """Exact position-level patching (:func:`~circuitkit.circuits.attribution.exact_position_patching`):
    the mean metric change when one edge at one position alone is ablated; ``at`` (position names
    or indices) measures those positions only and leaves the others' scores 0 (not measured)."""
    check_dataset(model, ds)
    names = Positions.of(ds)
    chosen = None if at is None else [p if isinstance(p, int) else names.index(p) for p in at]
    return exact_position_patching(model, ds, chosen, ablation=ablation, batch_size=batch_size, progress=progress)


def attribute_positions(model, ds: TaskDataset, method: str = "eap", *, ablation: Ablation | str = Ablation.PATCHING,
                        batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False, **options) -> PositionGraph:
    """Position-resolved edge scores of ``method`` (a registered method with a position-level
    variant, :data:`~circuitkit.circuits.attribution.POSITION_METHODS`) as a :class:`PositionGraph`
    holding every real position edge (select from it next, with :mod:`~circuitkit.circuits.selection`)."""
    m = get_method(method).check_level(POSITION)
    check_dataset(model, ds)
    ablation = Ablation.parse(ablation)
    scores = m.position_scores(model, ds, ablation=ablation, batch_size=batch_size, progress=progress, **options)
    _check_finite(scores, f"{m.name} position edge scores")
    meta = {"method": m.name, "level": POSITION, "ablation": ablation.value, "task": ds.task, "n_examples": len(ds),
            "metric": ds.metric.value, **options}
    return PositionGraph.from_model(model, Positions.of(ds), scores=scores, metadata=meta)
