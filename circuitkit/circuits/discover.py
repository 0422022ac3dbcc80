"""Find one task's circuit in one model and verify it (what ``circuitkit discover`` runs).

Why: the one sequence the circuits package offers end to end. :func:`discover` scores
every edge with an attribution method, selects a circuit (top-n edges, a threshold, or
greedily to a target explained effect), removes dangling edges and measures m(full),
m(ablated), m(circuit); :func:`write_discovery` writes ``circuit.json`` (the graph, see
:meth:`Graph.to_dict`), ``summary.json`` and ``summary.md``. Wall times go to the
summaries only, so two identical runs write byte-identical ``circuit.json`` files.
At :attr:`Level.POSITION` the graph is position-resolved (:mod:`~circuitkit.circuits.positions`):
every edge at every token position, ``circuit.json`` a :class:`PositionGraph`.
The flags are in :mod:`circuitkit.commands.discover`.
"""

from __future__ import annotations

import os
import time
from enum import Enum
from pathlib import Path
from typing import Any

from circuitkit.circuits.attribution import COMPONENT, POSITION, attribute, get_method, method_names
from circuitkit import CircuitkitError, parse_enum
from circuitkit.circuits.graph import Graph
from circuitkit.circuits.interventions import DEFAULT_BATCH_SIZE, Ablation, faithfulness
from circuitkit.circuits.positions import PositionGraph, attribute_positions
from circuitkit.circuits.selection import greedy, minimize as minimize_circuit, threshold, top_n
from circuitkit.io import write_json, write_text
from circuitkit.tasks import NL_SUFFIX

DEFAULT_EDGES = 200


class Level(Enum):
    """The graph a circuit is found in: components summed over positions, or every edge at every position."""

    COMPONENT = COMPONENT
    POSITION = POSITION

    @classmethod
    def parse(cls, value: "Level | str") -> "Level":
        return parse_enum(cls, value, "level")

    def method_defaults(self, method: str) -> dict[str, Any]:
        """The method's option defaults; raises when the method has no variant at this level."""
        return get_method(method).check_level(self.value).defaults()

    def attribute(self, model, ds, method: str, **kwargs) -> Graph | PositionGraph:
        return (attribute_positions if self is Level.POSITION else attribute)(model, ds, method, **kwargs)

    @property
    def methods(self) -> tuple[str, ...]:
        """The registered methods with a variant at this level."""
        return tuple(method_names(self.value))


def untrained_task_warning(task: str, model) -> str | None:
    """A warning when ``model``'s card names the tasks it was trained on and ``task`` is not one
    of them (its circuit would be that of a model that cannot do the task); else ``None``."""
    trained = (getattr(model, "circuitkit_card", None) or {}).get("tasks")
    if not trained:
        return None  # pretrained models and cards without tasks: nothing to check against
    base = task[: -len(NL_SUFFIX)] if task.endswith(NL_SUFFIX) else task
    if base in trained or task in trained:
        return None
    name = (model.circuitkit_card or {}).get("name", "this model")
    return (f"warning: {name} was not trained on {task!r} (its card lists {', '.join(trained)}); the circuit found "
            "is that of a model that may not do the task at all")


def discover(model, ds, *, method: str = "eap-ig", edges: int | None = None, threshold_value: float | None = None,
             target: float | None = None, ablation: str = "patching", batch_size: int = DEFAULT_BATCH_SIZE,
             prune: bool = True, progress: bool = False, level: Level | str = Level.COMPONENT,
             minimize: bool = False, **options) -> tuple[Graph | PositionGraph, dict[str, Any]]:
    """Attribute, select and verify; returns ``(circuit graph, summary dict)``.

    ``options`` are the method's own (``steps`` for eap-ig, ``tau`` for acdc; its defaults
    otherwise). The summary holds the wall times; the graph's metadata does not. ``level``
    ``"position"`` scores and selects position edges (methods: eap, eap-ig, patching). ``minimize``
    (with ``target``): the greedy circuit, then every edge it does not need dropped (:func:`minimize`).
    """
    if minimize and target is None:
        raise CircuitkitError("minimize needs a target: the explained effect the circuit must keep")
    t0 = time.perf_counter()
    level = Level.parse(level)
    options = {**level.method_defaults(method), **options}
    if "tau" in options and edges is None and threshold_value is None and target is None:
        threshold_value = options["tau"]  # acdc: the edges it kept
    scored = level.attribute(model, ds, method, ablation=ablation, batch_size=batch_size, progress=progress,
                             **options)
    t_attr = time.perf_counter() - t0
    if threshold_value is not None:
        circuit = threshold(scored, threshold_value, prune=prune)
    elif target is not None:
        circuit = greedy(model, scored, ds, target, ablation=ablation, batch_size=batch_size, prune=prune,
                         progress=progress)
        if minimize and circuit.metadata.get("reached"):
            circuit = minimize_circuit(model, circuit, ds, target, ablation=ablation, batch_size=batch_size,
                                       prune=prune)
    else:
        circuit = top_n(scored, DEFAULT_EDGES if edges is None else edges, prune=prune)
    faith = faithfulness(model, circuit, ds, ablation, batch_size, progress)
    summary: dict[str, Any] = {
        "method": method, "level": level.value, "task": ds.task, "n_examples": len(ds),
        "ablation": Ablation.parse(ablation).value,
        "selection": circuit.metadata.get("selection"), "edges": circuit.n_edges, "heads": circuit.n_heads,
        "mlps": circuit.n_mlps, "real_edges": circuit.n_real_edges,
        "heads_total": circuit.spec.n_layers * circuit.spec.n_heads,
        "metric": ds.metric.value, **faith.to_dict(),
    }
    if circuit.metadata.get("selection") == "minimized":
        summary["prefix_edges"] = circuit.metadata["from_edges"]  # the greedy circuit it was minimized from
    timing = {"attribution_seconds": round(t_attr, 3), "total_seconds": round(time.perf_counter() - t0, 3)}
    return circuit.with_metadata(summary=summary), {**summary, **timing}


def summary_markdown(summary: dict[str, Any], model_name: str) -> str:
    rows = [("model", model_name), ("task", summary["task"]), ("method", summary["method"]),
            ("level", summary.get("level", Level.COMPONENT.value)),
            ("ablation", summary["ablation"]), ("examples", summary["n_examples"]),
            ("edges", f"{summary['edges']} / {summary['real_edges']}"),
            ("heads", f"{summary['heads']} / {summary['heads_total']}"), ("MLPs", summary["mlps"]),
            (f"metric ({summary['metric']}) full model", f"{summary['m_full']:.4f}"),
            ("metric, all edges ablated", f"{summary['m_empty']:.4f}"),
            ("metric, circuit", f"{summary['m_circuit']:.4f}"),
            ("explained effect f(C)", f"{summary['explained_effect']:.4f}"),
            ("attribution time (s)", summary["attribution_seconds"])]
    lines = [f"# Circuit: {model_name} / {summary['task']} / {summary['method']}", "", "| | |", "|---|---|"]
    return "\n".join(lines + [f"| {k} | {v} |" for k, v in rows]) + "\n"


def write_discovery(out: str | os.PathLike, circuit: Graph | PositionGraph, summary: dict[str, Any], model_name: str) -> list[Path]:
    """``circuit.json``, ``summary.json`` and ``summary.md`` in ``out``, each written atomically."""
    out = Path(out)
    paths = [circuit.save(out / "circuit.json"), out / "summary.json", out / "summary.md"]
    write_json(paths[1], summary)
    write_text(paths[2], summary_markdown(summary, model_name))
    return paths
