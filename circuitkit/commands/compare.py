"""``circuitkit compare``: base vs sparse minimal circuits for a list of tasks, as one table."""

from __future__ import annotations

import argparse

from circuitkit import CircuitkitError
from circuitkit.circuits.attribution import get_method
from circuitkit.commands.options import (add_ablation_flag, add_batch_size_flag, add_method_flags, add_progress_flag,
                                         add_resume_flags, method_options, positive)
from circuitkit.evaluation.compare import check_results_folder, pair_table, study_pair, write_table
from circuitkit.evaluation.study import StudyConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="base model (zoo name, folder, or pretrained name)")
    p.add_argument("--sparse", required=True, help="sparse model (zoo name or folder written by sparsify)")
    p.add_argument("--tasks", required=True, help="comma-separated task names, e.g. ioi,docstring")
    add_method_flags(p)
    add_ablation_flag(p)
    p.add_argument("--threshold", type=float, default=StudyConfig.threshold,
                   help=f"explained effect f the minimal circuit must reach (default {StudyConfig.threshold})")
    p.add_argument("--n", type=int, default=StudyConfig.n, help=f"examples per task (default {StudyConfig.n})")
    p.add_argument("--seed", type=int, default=StudyConfig.seed, help=f"dataset seed (default {StudyConfig.seed})")
    add_batch_size_flag(p)
    p.add_argument("--out", default="results/compare",
                   help="results folder: base_vs_sparse.{csv,md}, circuits/, summaries/ (default results/compare)")
    add_resume_flags(p)
    add_progress_flag(p)


def run_cli(args: argparse.Namespace) -> int:
    positive(args, "n", "batch_size")
    options = method_options(args)
    other = {k: v for k, v in options.items() if k != "steps" and v != get_method(args.method).defaults()[k]}
    if other:  # a study config carries ig_steps only
        raise CircuitkitError(f"compare runs {args.method!r} with its default options; it cannot pass "
                              f"{', '.join(sorted(other))} (use circuitkit discover for a single run with them)")
    cfg = StudyConfig.from_dict(dict(method=args.method, ablation=args.ablation, threshold=args.threshold, n=args.n,
                                     seed=args.seed, batch_size=args.batch_size,
                                     **({"ig_steps": options["steps"]} if "steps" in options else {})),
                                source="command line")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise CircuitkitError(f"--tasks {args.tasks!r} names no task; give a comma-separated list, e.g. "
                              "--tasks ioi,docstring")
    out = check_results_folder(args.out, args.resume, args.force, "the output folder (--out)")
    base, sparse = study_pair(args.base, args.sparse, tasks, cfg, out, progress=not args.no_progress,
                              reuse=args.resume)
    table = pair_table(base, sparse)
    write_table(table, out / "base_vs_sparse")
    print(table.to_markdown(index=False, floatfmt=".3g"))
    return 0
