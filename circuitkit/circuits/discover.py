"""``circuitkit discover``: find one task's circuit in one model and verify it.

Why: the command line entry to the circuits package. It loads a model and a task,
scores every edge with an attribution method, selects a circuit (top-n edges, a
threshold, or greedily to a target explained effect), removes dangling edges, measures
m(full), m(ablated), m(circuit), and writes ``circuit.json`` (the graph, see
:meth:`Graph.to_dict`), ``summary.json`` and ``summary.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from circuitkit import CircuitkitError
from circuitkit.circuits.attribution import DEFAULT_ACDC_TAU, DEFAULT_IG_STEPS, attribute, get_method, method_names
from circuitkit.circuits.interventions import Ablation, faithfulness
from circuitkit.circuits.selection import greedy, threshold, top_n
from circuitkit.io import check_writable_dir, write_json, write_text
from circuitkit.tasks import NL_SUFFIX, task_for_model

DEFAULT_EDGES = 200


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="zoo name, checkpoint folder, or pretrained name (gpt2)")
    parser.add_argument("--task", required=True, help="task name, e.g. addition, ioi, greater-than")
    parser.add_argument("--method", default="eap-ig", choices=method_names(), help="attribution method")
    pick = parser.add_mutually_exclusive_group()
    pick.add_argument("--edges", type=int, default=None,
                      help=f"keep the N edges with the largest |score| (default {DEFAULT_EDGES})")
    pick.add_argument("--threshold", type=float, default=None, help="keep edges with |score| >= X")
    pick.add_argument("--target", type=float, default=None,
                      help="greedy: fewest edges whose circuit explains this fraction of the effect (e.g. 0.9)")
    parser.add_argument("--n", type=int, default=200, help="number of task examples")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--ablation", default="patching", choices=[a.value for a in Ablation])
    parser.add_argument("--steps", type=int, default=DEFAULT_IG_STEPS,
                        help="integration steps for eap-ig and eap-ig-senders")
    parser.add_argument("--tau", type=float, default=DEFAULT_ACDC_TAU,
                        help="acdc: prune an edge when removing it moves the metric by less than this; the "
                             "circuit is then the edges it kept (unless --edges/--threshold/--target say otherwise)")
    parser.add_argument("--no-prune", action="store_true", help="keep dangling edges")
    parser.add_argument("--out", default=None, help="output folder (default circuits/<model>-<task>-<method>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


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
             target: float | None = None, ablation: str = "patching", batch_size: int = 50, steps: int = 5,
             tau: float = DEFAULT_ACDC_TAU, prune: bool = True, progress: bool = False):
    """Attribute, select and verify; returns ``(circuit graph, summary dict)``."""
    t0 = time.perf_counter()
    options = get_method(method).pick(steps=steps, tau=tau)
    if "tau" in options and edges is None and threshold_value is None and target is None:
        threshold_value = tau  # acdc: the edges it kept
    scored = attribute(model, ds, method, ablation=ablation, batch_size=batch_size, progress=progress, **options)
    t_attr = time.perf_counter() - t0
    if threshold_value is not None:
        circuit = threshold(scored, threshold_value, prune=prune)
    elif target is not None:
        circuit = greedy(model, scored, ds, target, ablation=ablation, batch_size=batch_size, prune=prune,
                         progress=progress)
    else:
        circuit = top_n(scored, DEFAULT_EDGES if edges is None else edges, prune=prune)
    faith = faithfulness(model, circuit, ds, ablation, batch_size, progress)
    summary: dict[str, Any] = {
        "method": method, "task": ds.task, "n_examples": len(ds), "ablation": Ablation.parse(ablation).value,
        "selection": circuit.metadata.get("selection"), "edges": circuit.n_edges, "heads": circuit.n_heads,
        "mlps": circuit.n_mlps, "real_edges": circuit.spec.n_real_edges,
        "heads_total": circuit.spec.n_layers * circuit.spec.n_heads,
        "metric": ds.metric.value, **faith.to_dict(), "attribution_seconds": round(t_attr, 3),
        "total_seconds": round(time.perf_counter() - t0, 3),
    }
    return circuit.with_metadata(summary=summary), summary


def summary_markdown(summary: dict[str, Any], model_name: str) -> str:
    rows = [("model", model_name), ("task", summary["task"]), ("method", summary["method"]),
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


def run_cli(args: argparse.Namespace) -> int:
    from circuitkit.models import load_model

    if args.n <= 0 or args.batch_size <= 0:
        raise CircuitkitError("--n and --batch-size must be positive")
    if args.edges is not None and args.edges < 0:
        raise CircuitkitError("--edges must be a non-negative number of edges")
    model_name = Path(str(args.model)).name
    out = Path(args.out) if args.out else Path("circuits") / f"{model_name}-{args.task}-{args.method}"
    check_writable_dir(out, "the output folder (--out)")  # before the computation, not after it
    model = load_model(args.model)
    ds = task_for_model(args.task, model).dataset(args.n, seed=args.seed)
    warning = untrained_task_warning(args.task, model)
    if warning:
        print(warning, file=sys.stderr)
    circuit, summary = discover(model, ds, method=args.method, edges=args.edges, threshold_value=args.threshold,
                                target=args.target, ablation=args.ablation, batch_size=args.batch_size,
                                steps=args.steps, tau=args.tau, prune=not args.no_prune, progress=not args.no_progress)
    summary = {"model": str(args.model), "seed": args.seed, **summary}
    circuit.with_metadata(model=str(args.model), seed=args.seed).save(out / "circuit.json")
    write_json(out / "summary.json", summary)
    write_text(out / "summary.md", summary_markdown(summary, model_name))
    print(json.dumps({k: summary[k] for k in ("edges", "heads", "m_full", "m_empty", "m_circuit",
                                              "explained_effect")}, indent=2))
    print(f"wrote {out / 'circuit.json'}, {out / 'summary.json'}, {out / 'summary.md'}")
    return 0
