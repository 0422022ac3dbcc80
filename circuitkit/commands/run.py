"""``circuitkit run``: the whole study of a run config (default: the shipped zoo) into one results folder."""

from __future__ import annotations

import argparse
from dataclasses import replace

from circuitkit.commands.options import add_progress_flag, add_resume_flags
from circuitkit.evaluation.compare import check_results_folder
from circuitkit.pipeline import RunConfig, retrain, run


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="run config TOML (default: the shipped zoo, see analyses/run/default.toml)")
    p.add_argument("--out", help="results folder (overrides the config's out)")
    p.add_argument("--retrain", action="store_true", help="rebuild the zoo from analyses/zoo/*.toml first")
    add_resume_flags(p, pair_level=True)
    add_progress_flag(p)


def run_cli(args: argparse.Namespace) -> int:
    cfg = RunConfig.from_toml(args.config) if args.config else RunConfig()
    if args.out:
        cfg = replace(cfg, out=args.out)
    check_results_folder(cfg.out, args.resume, args.force)  # before any retraining or study
    if args.retrain:
        retrain(cfg, progress=not args.no_progress)
    out = run(cfg, progress=not args.no_progress, resume=args.resume, force=args.force)
    print(f"report: {out / 'report.md'}")
    return 0
