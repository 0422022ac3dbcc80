"""``circuitkit discover``: one task's circuit in one model, verified, written to a folder."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from circuitkit import CircuitkitError
from circuitkit.circuits.discover import DEFAULT_EDGES, Level, discover, untrained_task_warning, write_discovery
from circuitkit.circuits.attribution import POSITION_METHODS
from circuitkit.commands.options import (add_ablation_flag, add_batch_size_flag, add_method_flags, add_progress_flag,
                                         method_options, positive)
from circuitkit.io import check_writable_dir
from circuitkit.sparsity import load_model
from circuitkit.tasks import task_for_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="zoo name, checkpoint folder, or pretrained name (gpt2)")
    parser.add_argument("--task", required=True, help="task name, e.g. addition, ioi, greater-than")
    add_method_flags(parser, aliases={"steps": ["--steps"]})
    parser.add_argument("--level", default=Level.COMPONENT.value, choices=[lv.value for lv in Level],
                        help="component: edges between nodes, summed over token positions (default); position: "
                             "every edge at every token position, named like 'a0.h1@=->a2.h3<k>@=' (methods "
                             f"{', '.join(POSITION_METHODS)}; edges and thresholds count position edges)")
    pick = parser.add_mutually_exclusive_group()
    pick.add_argument("--edges", type=int, default=None,
                      help=f"keep the N edges with the largest |score| (default {DEFAULT_EDGES})")
    pick.add_argument("--threshold", type=float, default=None, help="keep edges with |score| >= X")
    pick.add_argument("--target", type=float, default=None,
                      help="greedy: fewest edges whose circuit explains this fraction of the effect (e.g. 0.9)")
    parser.add_argument("--n", type=int, default=200, help="number of task examples (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    add_batch_size_flag(parser)
    add_ablation_flag(parser)
    parser.add_argument("--minimize", action="store_true",
                        help="with --target: then drop every edge the circuit does not need, until each edge left is "
                             "needed (one ablated forward pass per edge tried)")
    parser.add_argument("--no-prune", action="store_true", help="keep dangling edges")
    parser.add_argument("--out", default=None, help="output folder (default circuits/<model>-<task>-<method>)")
    add_progress_flag(parser)


def run_cli(args: argparse.Namespace) -> int:
    positive(args, "n", "batch_size")
    if args.edges is not None and args.edges < 0:
        raise CircuitkitError("--edges must be a non-negative number of edges")
    if args.minimize and args.target is None:
        raise CircuitkitError("--minimize needs --target, the explained effect the circuit must keep "
                              "(e.g. --target 0.9)")
    options = method_options(args)
    model_name = Path(str(args.model)).name
    level = Level.parse(args.level)
    level.method_defaults(args.method)  # a method without a variant at this level: refused before any work
    suffix = "" if level is Level.COMPONENT else f"-{level.value}"
    out = Path(args.out) if args.out else Path("circuits") / f"{model_name}-{args.task}-{args.method}{suffix}"
    check_writable_dir(out, "the output folder (--out)")  # before the computation, not after it
    model = load_model(args.model)
    ds = task_for_model(args.task, model).dataset(args.n, seed=args.seed)
    warning = untrained_task_warning(args.task, model)
    if warning:
        print(warning, file=sys.stderr)
    circuit, summary = discover(model, ds, method=args.method, edges=args.edges, threshold_value=args.threshold,
                                target=args.target, ablation=args.ablation, batch_size=args.batch_size,
                                prune=not args.no_prune, minimize=args.minimize, progress=not args.no_progress,
                                level=level, **options)
    summary = {"model": str(args.model), "seed": args.seed, **summary}
    paths = write_discovery(out, circuit.with_metadata(model=str(args.model), seed=args.seed), summary, model_name)
    print(json.dumps({k: summary[k] for k in ("edges", "heads", "m_full", "m_empty", "m_circuit",
                                              "explained_effect")}, indent=2))
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0
