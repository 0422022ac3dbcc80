"""One model on one task, end to end: attribute, curve, minimal circuit, verification.

:func:`analyse` is the unit of work that ``circuitkit compare`` and ``circuitkit run``
repeat for every (model, task); :class:`TaskResult` holds everything the tables and the
figures need, and is written to disk as plain JSON. With ``"position"`` among the study's
levels it also holds the position-level minimal circuit (:class:`PositionResult`, every edge at
every token position, :mod:`circuitkit.circuits.positions`). Each result carries the key it was
made under (:func:`result_key`: the settings, the model's fingerprint, the prompts' fingerprint), so
that a saved result is reused (:meth:`TaskResult.from_saved`) only where it would be computed again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from circuitkit import CircuitkitError
from circuitkit.circuits import attribution
from circuitkit.circuits.attention_pairs import PairMethod
from circuitkit.circuits.graph import Graph
from circuitkit.circuits.interventions import DEFAULT_BATCH_SIZE, Ablation
from circuitkit.circuits.positions import PositionGraph, attribute_positions
from circuitkit.circuits.selection import MinimalRule, minimize
from circuitkit.evaluation.faithfulness import (Curve, cpr_cmd, completeness, edge_curve, head_curve,
                                                minimal_circuit, minimality)
from circuitkit.io import NON_NEGATIVE, POSITIVE, Range, TomlConfig
from circuitkit.sparsity import model_fingerprint
from circuitkit.tasks.base import TaskDataset


@dataclass(frozen=True)
class StudyConfig(TomlConfig):
    """The knobs of a verification study (read from the ``[study]`` table of a run config).
    Every field is checked against its type and ``RANGES`` (:class:`circuitkit.io.TomlConfig`)."""

    method: str = "eap-ig"
    ig_steps: int = 5
    ablation: str = "patching"
    threshold: float = 0.9
    n: int = 200
    seed: int = 0
    batch_size: int = DEFAULT_BATCH_SIZE
    minimality_eps: float = 0.01
    # circuits with more edges get minimality estimated on this many of them (None: every edge)
    minimality_max_edges: int | None = 100
    node_method: str = "eap"
    # "component": the edge-graph study above; "position": also the minimal circuit of the
    # position-resolved graph (every edge at every token position, scored with `method`,
    # circuitkit.circuits.positions); "pairs": also the attention-pair (token-level) study of
    # circuitkit.evaluation.pairs, scored with pair_method (docs/method.md §10)
    levels: tuple[str, ...] = ("component",)
    pair_method: str = "exact"
    pair_n: int | None = None  # prompts per task at the pair level (None: n; exact pair scores cost far more)
    # how the minimal circuit is chosen at every level (circuitkit.circuits.selection.MinimalRule): "prefix", the
    # fewest top-scoring edges (pairs) with f >= threshold; "minimized", that prefix with every edge (pair) it does
    # not need dropped, until each one left is needed (one more forward pass per edge tried)
    minimal: str = "prefix"

    RANGES = {"ig_steps": POSITIVE, "threshold": Range(0, 1, lo_open=True), "n": POSITIVE, "seed": NON_NEGATIVE,
              "batch_size": POSITIVE, "minimality_eps": NON_NEGATIVE, "pair_n": POSITIVE}
    LEVELS = ("component", "position", "pairs")
    # what analyse() reads: a saved result is reused only when these agree (pair_method and pair_n belong to the pair
    # level, which circuitkit.evaluation.pairs runs apart)
    RESULT_FIELDS = ("method", "ig_steps", "ablation", "threshold", "n", "seed", "batch_size", "minimality_eps",
                     "minimality_max_edges", "node_method", "minimal")

    def check(self, source: str) -> None:
        levels = tuple(self.levels)
        if not levels or set(levels) - set(self.LEVELS) or "component" not in levels:
            raise CircuitkitError(f"{source}: study levels must include \"component\" and may add \"position\" "
                                  f"and \"pairs\" (known: {', '.join(self.LEVELS)}), got {list(levels)}")
        if "position" in levels:
            try:
                attribution.get_method(self.method).check_level(attribution.POSITION)
            except CircuitkitError as e:
                raise CircuitkitError(f"{source}: levels include \"position\": {e}") from None
        try:
            PairMethod.parse(self.pair_method)
        except CircuitkitError as e:
            raise CircuitkitError(f"{source}: pair_method: {e}") from None
        try:
            MinimalRule.parse(self.minimal)
        except CircuitkitError as e:
            raise CircuitkitError(f"{source}: minimal: {e}") from None


@dataclass(frozen=True)
class TaskResult:
    model: str
    task: str
    scored: Graph  # every real edge with its attribution score
    minimal: Graph  # the minimal circuit (f >= threshold), dangling edges removed
    f_minimal: float
    reached: bool
    edge_curve: Curve
    head_curve: Curve
    heads_minimal: int | None  # fewest top heads (all MLPs kept) with f >= threshold
    cpr: float
    cmd: float
    completeness: float
    minimality: float
    m_full: float
    m_empty: float
    position: "PositionResult | None" = None  # the position level, when the study's levels include it
    prefix_edges: int | None = None  # with the "minimized" rule: the size of the prefix it started from
    key: dict[str, Any] | None = None  # what it was made under (result_key); None: not known

    @property
    def n_edges(self) -> int:
        return self.minimal.n_edges

    @classmethod
    def from_saved(cls, summary: dict[str, Any], minimal: Graph,
                   position_minimal: PositionGraph | None = None) -> "TaskResult":
        """The result :meth:`summary` and the saved circuit files describe. The circuit files hold every real edge
        with its score, so ``scored`` is the minimal circuit with every real edge in it; its metadata are the
        circuit's (the attribution's, plus how the circuit was selected)."""
        if ("position" in summary) != (position_minimal is not None):
            raise CircuitkitError("a saved result with a position level needs its position circuit, and only then")
        position = None
        if position_minimal is not None:
            p = summary["position"]
            position = PositionResult(position_minimal.with_in_graph(position_minimal.real_mask), position_minimal,
                                      float(p["f"]), bool(p["reached"]), Curve.from_dict(p["edge_curve"]),
                                      float(p["completeness"]), p["prefix_edges"])
        if minimal.n_edges != summary["edges"]:
            raise CircuitkitError(f"the saved circuit has {minimal.n_edges} edges but its summary says "
                                  f"{summary['edges']}; the files are from different runs")
        return cls(model=summary["model"], task=summary["task"], scored=minimal.with_in_graph(minimal.real_mask),
                   minimal=minimal, f_minimal=float(summary["f"]), reached=bool(summary["reached"]),
                   edge_curve=Curve.from_dict(summary["edge_curve"]), head_curve=Curve.from_dict(summary["head_curve"]),
                   heads_minimal=summary["heads_minimal"], cpr=float(summary["cpr"]), cmd=float(summary["cmd"]),
                   completeness=float(summary["completeness"]), minimality=float(summary["minimality"]),
                   m_full=float(summary["m_full"]), m_empty=float(summary["m_empty"]), position=position,
                   prefix_edges=summary["prefix_edges"], key=summary.get("key"))

    def summary(self) -> dict[str, Any]:
        out = {"model": self.model, "task": self.task, "edges": self.n_edges, "prefix_edges": self.prefix_edges,
               "heads": self.minimal.n_heads,
               "heads_minimal": self.heads_minimal, "f": self.f_minimal, "reached": self.reached,
               "cpr": self.cpr, "cmd": self.cmd, "completeness": self.completeness,
               "minimality": self.minimality, "m_full": self.m_full, "m_empty": self.m_empty,
               "edge_curve": self.edge_curve.to_dict(), "head_curve": self.head_curve.to_dict()}
        if self.position is not None:
            out["position"] = self.position.summary()
        if self.key is not None:
            out["key"] = self.key
        return out


def result_key(model_fp: str, ds: TaskDataset, cfg: StudyConfig) -> dict[str, Any]:
    """What :func:`analyse` of a model on ``ds`` under ``cfg`` depends on, as plain JSON data: the settings it
    reads, whether the position level is on, the model's fingerprint ``model_fp`` (weights and gates,
    :func:`circuitkit.sparsity.model_fingerprint`, taken once per model by the caller) and the prompts'
    (:meth:`TaskDataset.fingerprint`). It does not cover circuitkit's own code: after changing a method, recompute
    rather than reuse."""
    settings = {k: getattr(cfg, k) for k in StudyConfig.RESULT_FIELDS}
    return {"settings": settings, "position": "position" in cfg.levels, "model": model_fp,
            "dataset": ds.fingerprint()}


@dataclass(frozen=True)
class PositionResult:
    """The position-level minimal circuit of one model on one task: the fewest top-scoring
    position edges (every edge at every token position, :class:`PositionGraph`) with f ≥ threshold."""

    scored: PositionGraph  # every real position edge with its attribution score
    minimal: PositionGraph  # the minimal circuit, dangling edges removed
    f_minimal: float
    reached: bool
    curve: Curve
    completeness: float
    prefix_edges: int | None = None  # with the "minimized" rule: the size of the prefix it started from

    @property
    def n_edges(self) -> int:
        return self.minimal.n_edges

    @property
    def n_positions(self) -> int:
        """Token positions at which the minimal circuit has at least one edge."""
        return int(self.minimal.in_graph.flatten(1).any(1).sum())

    def summary(self) -> dict[str, Any]:
        return {"edges": self.n_edges, "prefix_edges": self.prefix_edges, "real_edges": self.minimal.n_real_edges,
                "heads": self.minimal.n_heads,
                "positions": self.n_positions, "component_edges": self.minimal.component.n_edges,
                "f": self.f_minimal, "reached": self.reached, "completeness": self.completeness,
                "m_full": self.curve.m_full, "m_empty": self.curve.m_empty, "edge_curve": self.curve.to_dict()}


def _minimal(model, scored: Graph | PositionGraph, ds: TaskDataset, curve: Curve, cfg: StudyConfig,
             **kw) -> tuple[Graph | PositionGraph, float, bool, int | None]:
    """The minimal circuit by ``cfg.minimal``: (circuit, its f, reached, the prefix's size when minimized)."""
    minimal = minimal_circuit(model, scored, ds, cfg.threshold, curve=curve, **kw)
    if MinimalRule.parse(cfg.minimal) is MinimalRule.PREFIX or not minimal.reached:
        return minimal.graph, minimal.f, minimal.reached, None
    graph = minimize(model, minimal.graph, ds, cfg.threshold, known=(curve.m_full, curve.m_empty), **kw)
    return graph, graph.metadata["explained_effect"], True, minimal.n_edges


def analyse_positions(model, model_name: str, ds: TaskDataset, cfg: StudyConfig = StudyConfig()) -> PositionResult:
    """The position level of :func:`analyse`: score every position edge with ``cfg.method``, the
    faithfulness curve over top-n position edges and the minimal circuit at ``cfg.threshold``
    (the same search as the component level), and its completeness."""
    ablation = Ablation.parse(cfg.ablation)
    options = attribution.get_method(cfg.method).pick(steps=cfg.ig_steps)
    scored = attribute_positions(model, ds, cfg.method, ablation=ablation, batch_size=cfg.batch_size, **options)
    kw = dict(ablation=ablation, batch_size=cfg.batch_size)
    curve = edge_curve(model, scored, ds, **kw)
    graph, f, reached, prefix = _minimal(model, scored, ds, curve, cfg, **kw)
    circuit = graph.with_metadata(model=model_name, threshold=cfg.threshold, explained_effect=f, reached=reached)
    return PositionResult(scored, circuit, f, reached, curve, completeness(model, circuit, ds, **kw), prefix)


def analyse(model, model_name: str, ds: TaskDataset, cfg: StudyConfig = StudyConfig(),
            key: dict[str, Any] | None = None) -> TaskResult:
    """Attribute with ``cfg.method``, then verify the minimal circuit at ``cfg.threshold``. ``key``: the result's
    :func:`result_key` when the caller has it (default: computed here)."""
    ablation = Ablation.parse(cfg.ablation)
    options = attribution.get_method(cfg.method).pick(steps=cfg.ig_steps)
    scored = attribution.attribute(model, ds, cfg.method, ablation=ablation, batch_size=cfg.batch_size, **options)
    kw = dict(ablation=ablation, batch_size=cfg.batch_size)
    curve = edge_curve(model, scored, ds, **kw)
    graph, f, reached, prefix = _minimal(model, scored, ds, curve, cfg, **kw)
    node_scores = attribution.attribute_nodes(model, ds, cfg.node_method, ablation=ablation,
                                              batch_size=cfg.batch_size)  # [n_src]
    hcurve = head_curve(model, scored, ds, node_scores, **kw)
    reach = [n for n, f in zip(hcurve.sizes, hcurve.f) if f >= cfg.threshold]
    mib = cpr_cmd(model, scored, ds, **kw)
    circuit = graph.with_metadata(model=model_name, threshold=cfg.threshold, explained_effect=f, reached=reached)
    position = analyse_positions(model, model_name, ds, cfg) if "position" in cfg.levels else None
    return TaskResult(
        model=model_name, task=ds.task, scored=scored, minimal=circuit, f_minimal=f,
        reached=reached, edge_curve=curve, head_curve=hcurve, heads_minimal=min(reach) if reach else None,
        cpr=mib.cpr, cmd=mib.cmd, completeness=completeness(model, circuit, ds, **kw),
        minimality=minimality(model, circuit, ds, cfg.minimality_eps, max_edges=cfg.minimality_max_edges,
                              seed=cfg.seed, **kw),
        m_full=curve.m_full, m_empty=curve.m_empty, position=position, prefix_edges=prefix,
        key=key or result_key(model_fingerprint(model), ds, cfg))


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a ∧ b| / |a ∨ b| of two bool masks of the same shape (1.0 when both are empty)."""
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union
