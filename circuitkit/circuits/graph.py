"""The computational graph of a pre-norm transformer, as two dense tensors.

Why: every circuit method (attribution, ablation, selection, comparison, plotting) talks
about the same edges. This module owns their numbering and names, and a :class:`Graph`
holding one score tensor and one membership tensor, both ``[n_src, n_dst]`` — the single
source of truth (EAP-IG style). :class:`Node` and :class:`Edge` are thin read-only views
into those tensors. It also owns export and import (JSON as plain data, networkx).

Numbering (L layers, H heads, M = 1 MLP per block, or M = 0 for attention-only models):

- senders: ``0 = input``; layer ``l``: head ``h`` at ``1 + l*(H+M) + h``, MLP at ``1 + l*(H+M) + H``.
  Sender ``i`` is also node ``i``; ``logits`` is node ``n_src``. So ``n_src = 1 + L*(H+M)``.
- receivers: layer ``l``: q of head ``h`` at ``l*(3H+M) + h``, k at ``+H+h``, v at ``+2H+h``,
  MLP at ``l*(3H+M) + 3H``; ``logits`` last at ``L*(3H+M)``. So ``n_dst = L*(3H+M) + 1``.

See ``docs/method.md`` §2 for the graph in words and equations.

A real edge goes from a sender computed before its receiver reads the residual stream.
For every receiver the real senders form a prefix of the sender order, which the
intervention and attribution code use to slice instead of mask.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from circuitkit import CircuitkitError
from circuitkit.io import write_json
from circuitkit.models import check_supported

GRAPH_FORMAT = "circuitkit.graph"
GRAPH_VERSION = 1
QKV = ("q", "k", "v")


# ---------------------------------------------------------------- layout

@dataclass(frozen=True)
class ReceiverGroup:
    """A contiguous block of receivers read at one hook point."""

    hook: str  # TransformerLens hook name
    cols: slice  # receiver indices
    prefix: int  # receivers here read senders [0, prefix)
    per_head: bool  # activation is [batch, pos, n_heads, d_model] (else [batch, pos, d_model])


@dataclass(frozen=True)
class SenderGroup:
    """A contiguous block of senders whose outputs are read at one hook point.

    Head outputs are read as ``hook_z`` and multiplied by ``W_O`` per head (what
    ``attn.hook_result`` would hold, without TransformerLens materialising
    [batch, pos, n_heads, d_head, d_model] to get it).
    """

    hook: str
    rows: slice
    layer: int | None  # None for the input embeddings
    per_head: bool
    grad_hook: str  # its activation's gradient is ∂m/∂(output) of every sender here


@dataclass(frozen=True)
class GraphSpec:
    """The shape of a model's graph: what decides node and edge numbering.

    Equality compares the structure only (layers, heads, parallel attention/MLP, whether
    blocks have MLPs); the model name and width ride along for summaries. An attention-only
    spec (``attn_only=True``, TransformerLens's flag of the same name) has no MLP nodes and no
    MLP receivers.
    """

    n_layers: int
    n_heads: int
    parallel_attn_mlp: bool = False
    attn_only: bool = False
    model_name: str = field(default="", compare=False)
    d_model: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.n_layers < 1 or self.n_heads < 1:
            raise CircuitkitError(f"a graph needs at least one layer and one head, got n_layers={self.n_layers}, "
                                  f"n_heads={self.n_heads}")

    # -- construction
    @classmethod
    def from_model(cls, model) -> "GraphSpec":
        """The spec of a ``HookedTransformer``; raises for architectures the graph cannot describe."""
        check_graph_support(model)
        return cls.from_config(model.cfg)

    @classmethod
    def from_config(cls, cfg) -> "GraphSpec":
        return cls(n_layers=int(cfg.n_layers), n_heads=int(cfg.n_heads),
                   parallel_attn_mlp=bool(getattr(cfg, "parallel_attn_mlp", False)),
                   attn_only=bool(getattr(cfg, "attn_only", False)),
                   model_name=str(getattr(cfg, "model_name", "") or ""), d_model=int(cfg.d_model))

    def summary(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "n_layers": self.n_layers, "n_heads": self.n_heads,
                "d_model": self.d_model, "parallel_attn_mlp": self.parallel_attn_mlp, "attn_only": self.attn_only}

    @classmethod
    def from_summary(cls, d: Mapping[str, Any]) -> "GraphSpec":
        try:
            return cls(n_layers=int(d["n_layers"]), n_heads=int(d["n_heads"]),
                       parallel_attn_mlp=bool(d.get("parallel_attn_mlp", False)),
                       attn_only=bool(d.get("attn_only", False)),  # absent in files from before attn-only support
                       model_name=str(d.get("model_name", "") or ""),
                       d_model=None if d.get("d_model") is None else int(d["d_model"]))
        except (KeyError, TypeError, ValueError) as e:
            raise CircuitkitError(f"bad model summary {dict(d)!r} ({e}); it needs n_layers and n_heads") from None

    # -- sizes and indices
    @property
    def has_mlp(self) -> bool:
        """Whether every block has an MLP node (False for attention-only models)."""
        return not self.attn_only

    @property
    def src_per_layer(self) -> int:  # senders per block: its heads, then its MLP if any
        return self.n_heads + int(self.has_mlp)

    @property
    def dst_per_layer(self) -> int:  # receivers per block: q, k, v of each head, then the MLP input if any
        return 3 * self.n_heads + int(self.has_mlp)

    @property
    def n_src(self) -> int:
        return 1 + self.n_layers * self.src_per_layer

    @property
    def n_dst(self) -> int:
        return self.n_layers * self.dst_per_layer + 1

    @property
    def n_nodes(self) -> int:
        return self.n_src + 1

    def head_src(self, layer: int, head: int) -> int:
        return 1 + layer * self.src_per_layer + head

    def mlp_src(self, layer: int) -> int:
        self._need_mlp()
        return 1 + layer * self.src_per_layer + self.n_heads

    def head_dst(self, layer: int, head: int, qkv: str) -> int:
        return layer * self.dst_per_layer + QKV.index(qkv) * self.n_heads + head

    def mlp_dst(self, layer: int) -> int:
        self._need_mlp()
        return layer * self.dst_per_layer + 3 * self.n_heads

    def dst_layer(self, dst: int) -> int | None:
        """The block whose input receiver ``dst`` is (None for the logits)."""
        return None if dst == self.logits_dst else dst // self.dst_per_layer

    def _need_mlp(self) -> None:
        if not self.has_mlp:
            raise CircuitkitError("this model is attention-only (attn_only=True): its graph has no MLP nodes")

    @property
    def logits_dst(self) -> int:
        return self.n_dst - 1

    @property
    def logits_node(self) -> int:
        return self.n_src

    # -- names
    @cached_property
    def node_names(self) -> tuple[str, ...]:
        names = ["input"]
        for layer in range(self.n_layers):
            names += [f"a{layer}.h{h}" for h in range(self.n_heads)] + ([f"m{layer}"] if self.has_mlp else [])
        return tuple(names + ["logits"])

    @property
    def src_names(self) -> tuple[str, ...]:
        return self.node_names[:-1]

    @cached_property
    def dst_names(self) -> tuple[str, ...]:
        names = []
        for layer in range(self.n_layers):
            for c in QKV:
                names += [f"a{layer}.h{h}<{c}>" for h in range(self.n_heads)]
            if self.has_mlp:
                names.append(f"m{layer}")
        return tuple(names + ["logits"])

    @cached_property
    def node_index(self) -> Mapping[str, int]:
        return {n: i for i, n in enumerate(self.node_names)}

    @cached_property
    def dst_index(self) -> Mapping[str, int]:
        return {n: i for i, n in enumerate(self.dst_names)}

    @cached_property
    def dst_node(self) -> torch.Tensor:  # [n_dst] long: the node each receiver belongs to
        idx = []
        for layer in range(self.n_layers):
            for _ in QKV:
                idx += [self.head_src(layer, h) for h in range(self.n_heads)]
            if self.has_mlp:
                idx.append(self.mlp_src(layer))
        return torch.tensor(idx + [self.logits_node], dtype=torch.long)

    def edge_name(self, src: int, dst: int) -> str:
        return f"{self.src_names[src]}->{self.dst_names[dst]}"

    def parse_edge(self, name: str) -> tuple[int, int]:
        """``"a0.h1->a2.h3<q>"`` -> (src, dst); raises for unknown or non-causal edges."""
        if not isinstance(name, str) or "->" not in name:
            raise CircuitkitError(f"bad edge name {name!r}; edges are written like 'a0.h1->a2.h3<q>', "
                                  "'input->m0' or 'm1->logits'")
        src_name, dst_name = name.split("->", 1)
        src = self.node_index.get(src_name)
        if src is None or src == self.logits_node:
            raise CircuitkitError(f"unknown sender {src_name!r} in edge {name!r}; senders are 'input', "
                                  f"'a{{l}}.h{{h}}'{self._mlp_words} with l < {self.n_layers}, h < {self.n_heads}")
        dst = self.dst_index.get(dst_name)
        if dst is None:
            raise CircuitkitError(f"unknown receiver {dst_name!r} in edge {name!r}; receivers are "
                                  f"'a{{l}}.h{{h}}<q|k|v>'{self._mlp_words} and 'logits' with l < {self.n_layers}, "
                                  f"h < {self.n_heads}")
        if not bool(self.real[src, dst]):
            raise CircuitkitError(f"{name!r} is not an edge of this model: {src_name} is computed after "
                                  f"{dst_name} reads the residual stream")
        return src, dst

    def node_id(self, name: str) -> int:
        idx = self.node_index.get(name)
        if idx is None:
            raise CircuitkitError(f"unknown node {name!r}; nodes are 'input', 'a{{l}}.h{{h}}'{self._mlp_words}, "
                                  f"'logits' with l < {self.n_layers}, h < {self.n_heads}")
        return idx

    @property
    def _mlp_words(self) -> str:
        return ", 'm{l}'" if self.has_mlp else " (no MLPs: the model is attention-only)"

    # -- structure
    @cached_property
    def src_prefix(self) -> torch.Tensor:  # [n_dst] long: receiver j reads senders [0, src_prefix[j])
        out = []
        for layer in range(self.n_layers):
            before = 1 + layer * self.src_per_layer
            out += [before] * (3 * self.n_heads)
            if self.has_mlp:
                out.append(before if self.parallel_attn_mlp else before + self.n_heads)
        return torch.tensor(out + [self.n_src], dtype=torch.long)

    @cached_property
    def real(self) -> torch.Tensor:  # [n_src, n_dst] bool: the real (causal-in-depth) edges
        return torch.arange(self.n_src)[:, None] < self.src_prefix[None, :]

    @property
    def n_real_edges(self) -> int:
        return int(self.src_prefix.sum())

    @cached_property
    def receiver_groups(self) -> tuple[ReceiverGroup, ...]:
        groups = []
        h = self.n_heads
        for layer in range(self.n_layers):
            base = layer * self.dst_per_layer
            for i, c in enumerate(QKV):
                groups.append(ReceiverGroup(f"blocks.{layer}.hook_{c}_input", slice(base + i * h, base + (i + 1) * h),
                                            int(self.src_prefix[base]), True))
            if self.has_mlp:
                groups.append(ReceiverGroup(f"blocks.{layer}.hook_mlp_in", slice(base + 3 * h, base + 3 * h + 1),
                                            int(self.src_prefix[base + 3 * h]), False))
        groups.append(ReceiverGroup(f"blocks.{self.n_layers - 1}.hook_resid_post",
                                    slice(self.n_dst - 1, self.n_dst), self.n_src, False))
        return tuple(groups)

    @cached_property
    def sender_groups(self) -> tuple[SenderGroup, ...]:
        first = "blocks.0.hook_resid_pre"
        groups = [SenderGroup(first, slice(0, 1), None, False, first)]
        for layer in range(self.n_layers):
            h0 = self.head_src(layer, 0)
            groups.append(SenderGroup(f"blocks.{layer}.attn.hook_z", slice(h0, h0 + self.n_heads), layer, True,
                                      f"blocks.{layer}.hook_attn_out"))
            if self.has_mlp:
                mlp = f"blocks.{layer}.hook_mlp_out"
                groups.append(SenderGroup(mlp, slice(h0 + self.n_heads, h0 + self.n_heads + 1), layer, False, mlp))
        return tuple(groups)

    @cached_property
    def head_group_layer(self) -> Mapping[int, int]:
        """First sender index of each block's heads -> the block (keys of :attr:`sender_groups` rows)."""
        return {g.rows.start: g.layer for g in self.sender_groups if g.per_head}

    @cached_property
    def head_rows(self) -> torch.Tensor:  # [n_layers, n_heads] long: sender index of each head
        return torch.tensor([[self.head_src(l, h) for h in range(self.n_heads)] for l in range(self.n_layers)])

    @cached_property
    def mlp_rows(self) -> torch.Tensor:  # [n_layers] long ([0] for attention-only models)
        return torch.tensor([self.mlp_src(l) for l in range(self.n_layers)] if self.has_mlp else [], dtype=torch.long)

    @cached_property
    def attention_edges(self) -> torch.Tensor:  # [n_src, n_dst] bool
        """Real edges with an attention head at either end: the edges sparse attention can remove.

        The rest (input, MLPs and logits only) form a backbone that attention gates leave alone.
        """
        is_head = torch.zeros(self.n_nodes, dtype=torch.bool)
        is_head[self.head_rows.flatten()] = True
        return self.real & (is_head[: self.n_src, None] | is_head[self.dst_node][None, :])


def check_graph_support(model) -> None:
    """Raise :class:`CircuitkitError` unless the graph describes ``model`` exactly."""
    check_supported(model)
    cfg = model.cfg
    if getattr(cfg, "n_key_value_heads", None) is not None and not getattr(cfg, "ungroup_grouped_query_attention", False):
        raise CircuitkitError(f"{cfg.model_name} uses grouped-query attention; circuitkit's graph needs one key and "
                              "value input per head (call model.set_ungroup_grouped_query_attention(True) first)")
    if getattr(cfg, "use_normalization_before_and_after", False):
        raise CircuitkitError(f"{cfg.model_name} normalises attention and MLP outputs before the residual add; "
                              "circuitkit supports blocks that read and write the residual stream directly "
                              "(pre-norm or no normalisation; see docs/method.md §2)")
    if cfg.positional_embedding_type == "shortformer":
        raise CircuitkitError(f"{cfg.model_name} adds positional embeddings to queries and keys outside the residual "
                              "stream (shortformer); circuitkit's graph does not describe that")
    try:
        from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES
    except ImportError:  # older TransformerLens
        POST_NORM_ARCHITECTURES = ()
    if (cfg.original_architecture or "") in POST_NORM_ARCHITECTURES:
        raise CircuitkitError(f"{cfg.model_name} ({cfg.original_architecture}) is a post-norm model; circuitkit "
                              "supports pre-norm and normalisation-free models only (see docs/method.md §2)")


# ---------------------------------------------------------------- views

@dataclass(frozen=True)
class Node:
    """A read-only view of one node of a :class:`Graph`."""

    graph: "Graph" = field(repr=False, compare=False)
    index: int  # node index; equals the sender index for every node but logits

    @property
    def name(self) -> str:
        return self.graph.spec.node_names[self.index]

    @property
    def kind(self) -> str:  # "input" | "head" | "mlp" | "logits"
        n = self.name
        return n if n in ("input", "logits") else ("head" if ".h" in n else "mlp")

    @property
    def layer(self) -> int | None:
        n = self.name
        if n in ("input", "logits"):
            return None
        return int(n[1:].split(".")[0])

    @property
    def head(self) -> int | None:
        return int(self.name.split(".h")[1]) if self.kind == "head" else None

    @property
    def in_graph(self) -> bool:
        return bool(self.graph.node_mask[self.index])

    @property
    def score(self) -> float:
        """Sum of the scores of the node's outgoing real edges (nan for logits)."""
        if self.index == self.graph.spec.logits_node:
            return math.nan
        return float(self.graph.node_scores[self.index])

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Edge:
    """A read-only view of one real edge of a :class:`Graph`."""

    graph: "Graph" = field(repr=False, compare=False)
    src: int  # sender index
    dst: int  # receiver index

    @property
    def name(self) -> str:
        return self.graph.spec.edge_name(self.src, self.dst)

    @property
    def src_node(self) -> Node:
        return Node(self.graph, self.src)

    @property
    def dst_node(self) -> Node:
        return Node(self.graph, int(self.graph.spec.dst_node[self.dst]))

    @property
    def qkv(self) -> str | None:
        d = self.graph.spec.dst_names[self.dst]
        return d[-2] if d.endswith(">") else None

    @property
    def score(self) -> float:
        return float(self.graph.scores[self.src, self.dst])

    @property
    def in_graph(self) -> bool:
        return bool(self.graph.in_graph[self.src, self.dst])

    def __str__(self) -> str:
        return self.name


# ---------------------------------------------------------------- the graph

def settle_tensors(graph, shape: tuple[int, ...], what: str, layout: str, context: str,
                   edge_name: Callable[..., str]) -> None:
    """The checks and normal form shared by :class:`Graph` and the position-resolved graph:
    ``scores`` and ``in_graph`` tensors of ``shape`` (``layout`` names its axes), ``in_graph`` bool
    and only on real edges (``edge_name(*index)`` names the first offender); scores stored as CPU
    float32 with 0 off the real edges, ``in_graph`` on the CPU, ``metadata`` a plain dict."""
    spec = graph.spec
    for name, t in (("scores", graph.scores), ("in_graph", graph.in_graph)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise CircuitkitError(f"{what} {name} must be a tensor of shape {layout} = {list(shape)} for {context} "
                                  f"{spec.n_layers}-layer, {spec.n_heads}-head model, got {got}")
    if graph.in_graph.dtype != torch.bool:
        raise CircuitkitError(f"in_graph must be a bool tensor, got {graph.in_graph.dtype}")
    real = spec.real  # [n_src, n_dst], broadcast over any leading axes
    in_graph = graph.in_graph.detach().cpu()
    if bool((in_graph & ~real).any()):
        raise CircuitkitError(f"in_graph marks {edge_name(*(in_graph & ~real).nonzero()[0].tolist())}, which is not "
                              "a real edge (the sender is computed after the receiver); only real edges "
                              "(graph.spec.real) may be in a circuit")
    scores = graph.scores.detach().cpu().to(torch.float32)
    object.__setattr__(graph, "scores", torch.where(real, scores, torch.zeros((), dtype=torch.float32)))
    object.__setattr__(graph, "in_graph", in_graph)
    object.__setattr__(graph, "metadata", dict(graph.metadata))


class JsonFile:
    """``to_json`` / ``from_json`` / ``save`` / ``load`` around a class's ``to_dict`` / ``from_dict``
    (the component graph and the position-resolved graph share them); ``WHAT`` names it in errors."""

    WHAT = "graph"

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str):
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise CircuitkitError(f"{cls.WHAT} JSON does not parse: {e}") from None

    def save(self, path: str | os.PathLike) -> Path:
        write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike):
        p = Path(path)
        if not p.is_file():
            raise CircuitkitError(f"no {cls.WHAT} file at {p}")
        return cls.from_json(p.read_text())


@dataclass(frozen=True, eq=False)
class Graph(JsonFile):
    """Edge scores and circuit membership of one model, as dense tensors.

    ``scores[s, d]`` is an attribution score (0 on non-edges) and ``in_graph[s, d]`` says
    whether the real edge ``s -> d`` is in the circuit. Selection functions return new
    graphs; nothing here mutates in place.
    """

    spec: GraphSpec
    scores: torch.Tensor  # [n_src, n_dst] float32
    in_graph: torch.Tensor  # [n_src, n_dst] bool
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        settle_tensors(self, (self.spec.n_src, self.spec.n_dst), "graph", "[n_src, n_dst]", "a",
                       lambda s, d: f"{self.spec.src_names[s]}->{self.spec.dst_names[d]}")

    # -- constructors
    @classmethod
    def from_model(cls, model_or_spec, scores: torch.Tensor | None = None, in_graph: torch.Tensor | None = None,
                   metadata: Mapping[str, Any] | None = None) -> "Graph":
        """A graph for ``model_or_spec``; by default no scores and every real edge in the circuit."""
        spec = model_or_spec if isinstance(model_or_spec, GraphSpec) else GraphSpec.from_model(model_or_spec)
        if scores is None:
            scores = torch.zeros(spec.n_src, spec.n_dst)
        if in_graph is None:
            in_graph = spec.real.clone()
        return cls(spec, scores, in_graph, metadata or {})

    @classmethod
    def full(cls, model_or_spec) -> "Graph":
        """Every real edge in the circuit: behaves as the full model."""
        return cls.from_model(model_or_spec)

    @classmethod
    def empty(cls, model_or_spec) -> "Graph":
        """No edge in the circuit: behaves as the fully ablated model."""
        spec = model_or_spec if isinstance(model_or_spec, GraphSpec) else GraphSpec.from_model(model_or_spec)
        return cls.from_model(spec, in_graph=torch.zeros(spec.n_src, spec.n_dst, dtype=torch.bool))

    def with_in_graph(self, in_graph: torch.Tensor, **metadata) -> "Graph":
        """The same scores with another membership ``[n_src, n_dst]`` (bool)."""
        return Graph(self.spec, self.scores, in_graph, {**self.metadata, **metadata})

    def with_scores(self, scores: torch.Tensor, **metadata) -> "Graph":
        return Graph(self.spec, scores, self.in_graph, {**self.metadata, **metadata})

    def with_metadata(self, **metadata) -> "Graph":
        return Graph(self.spec, self.scores, self.in_graph, {**self.metadata, **metadata})

    def check_model(self, model) -> None:
        """Raise unless this graph was made for a model shaped like ``model``."""
        other = GraphSpec.from_model(model)
        if other != self.spec:
            raise CircuitkitError(f"this graph is for a {self.spec.n_layers}-layer, {self.spec.n_heads}-head model "
                                  f"(parallel_attn_mlp={self.spec.parallel_attn_mlp}, attn_only={self.spec.attn_only}) "
                                  f"but the model has {other.n_layers} layers, {other.n_heads} heads "
                                  f"(parallel_attn_mlp={other.parallel_attn_mlp}, attn_only={other.attn_only})")

    # -- counts and node-level views
    @property
    def real_mask(self) -> torch.Tensor:  # [n_src, n_dst] bool: the edges a circuit may hold (spec.real)
        """Shaped like :attr:`scores` (a fresh tensor); selection and faithfulness read it, so they
        serve position-resolved graphs (:class:`~circuitkit.circuits.positions.PositionGraph`) alike."""
        return self.spec.real.clone()

    @property
    def n_real_edges(self) -> int:
        return self.spec.n_real_edges

    @property
    def ablated(self) -> torch.Tensor:  # [n_src, n_dst] bool: real edges not in the circuit
        return self.spec.real & ~self.in_graph

    @property
    def n_edges(self) -> int:
        """Edges in the circuit."""
        return int(self.in_graph.sum())

    @property
    def node_mask(self) -> torch.Tensor:  # [n_nodes] bool: nodes touched by an in-circuit edge
        spec = self.spec
        out = torch.zeros(spec.n_nodes, dtype=torch.bool)
        out[: spec.n_src] = self.in_graph.any(1)
        incoming = self.in_graph.any(0).to(torch.long)  # [n_dst]
        hit = torch.zeros(spec.n_nodes, dtype=torch.long).index_add_(0, spec.dst_node, incoming) > 0
        return out | hit

    @property
    def head_mask(self) -> torch.Tensor:  # [n_layers, n_heads] bool: heads in the circuit
        return self.node_mask[self.spec.head_rows]

    @property
    def mlp_mask(self) -> torch.Tensor:  # [n_layers] bool ([0] attention-only): MLPs in the circuit
        return self.node_mask[self.spec.mlp_rows]

    @property
    def n_heads(self) -> int:
        """Heads in the circuit."""
        return int(self.head_mask.sum())

    @property
    def n_mlps(self) -> int:
        return int(self.mlp_mask.sum())

    @property
    def n_attention_edges(self) -> int:
        """Circuit edges with an attention head at either end (see :attr:`GraphSpec.attention_edges`)."""
        return int((self.in_graph & self.spec.attention_edges).sum())

    @property
    def node_scores(self) -> torch.Tensor:  # [n_src] float: Σ of each sender's outgoing edge scores
        """First-order node scores: for eap and eap-ig this is exactly the node-level score,
        since a sender's output enters every later receiver input with coefficient 1."""
        return self.scores.sum(1)

    @property
    def head_scores(self) -> torch.Tensor:  # [n_layers, n_heads]
        return self.node_scores[self.spec.head_rows]

    # -- views and lookups
    def node(self, name: str) -> Node:
        return Node(self, self.spec.node_id(name))

    def edge(self, name: str) -> Edge:
        src, dst = self.spec.parse_edge(name)
        return Edge(self, src, dst)

    @property
    def nodes(self) -> list[Node]:
        return [Node(self, i) for i in range(self.spec.n_nodes)]

    def edges(self, in_graph_only: bool = True) -> Iterator[Edge]:
        """Edges in sender-major order; all real edges with ``in_graph_only=False``."""
        mask = self.in_graph if in_graph_only else self.spec.real
        for s, d in mask.nonzero().tolist():
            yield Edge(self, s, d)

    def edge_names(self, in_graph_only: bool = True) -> list[str]:
        return [e.name for e in self.edges(in_graph_only)]

    def __repr__(self) -> str:
        return (f"Graph({self.spec.n_layers}L x {self.spec.n_heads}H, {self.n_edges}/{self.spec.n_real_edges} edges, "
                f"{self.n_heads} heads, metadata={dict(self.metadata)})")

    # -- JSON
    def to_dict(self) -> dict[str, Any]:
        """Plain data: model summary, node names, real edge names with their scores and flags."""
        real = self.spec.real
        src, dst = real.nonzero(as_tuple=True)
        return {
            "format": GRAPH_FORMAT, "version": GRAPH_VERSION,
            "model": self.spec.summary(),
            "nodes": list(self.spec.node_names),
            "n_edges_in_graph": self.n_edges, "n_heads_in_graph": self.n_heads,
            "edges": [self.spec.edge_name(s, d) for s, d in zip(src.tolist(), dst.tolist())],
            # float32 -> Python float is exact, and json writes floats with repr, which round-trips
            "scores": self.scores[src, dst].tolist(),
            "in_graph": self.in_graph[src, dst].tolist(),
            "metadata": _plain(self.metadata),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Graph":
        if not isinstance(d, Mapping) or d.get("format") != GRAPH_FORMAT:
            raise CircuitkitError(f"not a circuitkit graph: expected a JSON object with format={GRAPH_FORMAT!r} "
                                  "(written by Graph.save / circuitkit discover)")
        if d.get("version") != GRAPH_VERSION:
            raise CircuitkitError(f"graph format version {d.get('version')!r} is not supported (this circuitkit "
                                  f"reads version {GRAPH_VERSION})")
        spec = GraphSpec.from_summary(d.get("model", {}))
        if list(d.get("nodes", [])) != list(spec.node_names):
            raise CircuitkitError("the graph's node list does not match its model summary "
                                  f"({spec.n_layers} layers, {spec.n_heads} heads); the file was edited or is corrupt")
        names, scores, flags = d.get("edges"), d.get("scores"), d.get("in_graph")
        if not (isinstance(names, list) and isinstance(scores, list) and isinstance(flags, list)
                and len(names) == len(scores) == len(flags)):
            raise CircuitkitError("a graph needs 'edges', 'scores' and 'in_graph' lists of equal length")
        idx = torch.tensor([spec.parse_edge(n) for n in names], dtype=torch.long).reshape(-1, 2)
        dense = torch.zeros(spec.n_src, spec.n_dst, dtype=torch.float32)
        member = torch.zeros(spec.n_src, spec.n_dst, dtype=torch.bool)
        dense[idx[:, 0], idx[:, 1]] = torch.tensor([float(x) for x in scores], dtype=torch.float32)
        member[idx[:, 0], idx[:, 1]] = torch.tensor([bool(x) for x in flags], dtype=torch.bool)
        return cls(spec, dense, member, d.get("metadata", {}) or {})

    # -- networkx
    def to_networkx(self, in_graph_only: bool = False):
        """A ``networkx.DiGraph``.

        Nodes: every graph node (attributes kind, layer, head, in_graph, score) plus one port
        node per head input, ``a2.h3<q>``, joined to its head by an edge with ``internal=True``,
        so that paths run input -> ... -> logits. Real edges carry ``name``, ``score`` and
        ``in_graph``. Graph attributes: ``model`` (summary) and ``metadata``.
        """
        import networkx as nx

        g = nx.DiGraph(model=self.spec.summary(), metadata=_plain(self.metadata), format=GRAPH_FORMAT)
        mask = self.node_mask
        scores = self.node_scores
        for node in self.nodes:
            i = node.index
            g.add_node(node.name, kind=node.kind, layer=node.layer, head=node.head, in_graph=bool(mask[i]),
                       score=float(scores[i]) if i < self.spec.n_src else None)
        for j, dname in enumerate(self.spec.dst_names):
            if dname.endswith(">"):
                owner = self.spec.node_names[int(self.spec.dst_node[j])]
                g.add_node(dname, kind="head_input", port=dname[-2], head_node=owner)
                g.add_edge(dname, owner, internal=True)
        for e in self.edges(in_graph_only):
            g.add_edge(self.spec.src_names[e.src], self.spec.dst_names[e.dst], name=e.name, score=e.score,
                       in_graph=e.in_graph, internal=False)
        return g

    @classmethod
    def from_networkx(cls, g) -> "Graph":
        """Back from :meth:`to_networkx`; real edges missing from ``g`` get score 0, not in graph."""
        if g.graph.get("format") != GRAPH_FORMAT or "model" not in g.graph:
            raise CircuitkitError("this networkx graph was not written by Graph.to_networkx (no 'model' summary)")
        spec = GraphSpec.from_summary(g.graph["model"])
        scores = torch.zeros(spec.n_src, spec.n_dst, dtype=torch.float32)
        member = torch.zeros(spec.n_src, spec.n_dst, dtype=torch.bool)
        for _, _, attrs in g.edges(data=True):
            if attrs.get("internal"):
                continue
            s, d = spec.parse_edge(attrs.get("name", ""))
            scores[s, d] = float(attrs.get("score", 0.0))
            member[s, d] = bool(attrs.get("in_graph", False))
        return cls(spec, scores, member, g.graph.get("metadata", {}) or {})


def _plain(obj: Any) -> Any:
    """Metadata as JSON-ready plain data (tensors become lists, enums their values)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "value") and hasattr(obj, "name") and not isinstance(obj, (str, int, float)):
        return obj.value  # Enum
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if hasattr(obj, "item"):
        return obj.item()
    raise CircuitkitError(f"graph metadata must be plain data (str, numbers, lists, dicts), got {type(obj).__name__}")
