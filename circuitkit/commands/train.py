"""``circuitkit train``: train a toy model or a language model from a TOML config (:class:`circuitkit.training.TrainConfig`),
with flags that override the config's steps and folders."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from circuitkit.commands.options import add_progress_flag, add_stop_at_flag, positive, report_stop
from circuitkit.training import TrainConfig, train


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="TOML training config (see analyses/zoo/*.toml)")
    p.add_argument("--resume", action="store_true", help="continue exactly from the checkpoint in run_dir")
    p.add_argument("--force", action="store_true",
                   help="replace a finished model in out and discard a checkpoint in run_dir")
    p.add_argument("--steps", type=int, help="override the number of steps (--resume accepts a change)")
    p.add_argument("--out", help="override the output model folder (default: the config's out)")
    p.add_argument("--run-dir", help="override the checkpoint and log folder (default: the config's run_dir)")
    add_stop_at_flag(p)
    add_progress_flag(p)


def run_cli(args: argparse.Namespace) -> int:
    positive(args, "stop_at")
    cfg = TrainConfig.from_toml(args.config, steps=args.steps, out=args.out, run_dir=args.run_dir)
    command = "circuitkit " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    card = train(cfg, resume=args.resume, max_steps=args.stop_at, progress=not args.no_progress, command=command,
                 force=args.force)
    if report_stop(card, cfg.steps, cfg.run_dir):
        return 0
    keys = ("name", "steps", "wall_time_s", "heldout", "heldout_ce", "train_ce", "bigram_heldout_ce", "tokens_seen")
    print(json.dumps({k: card[k] for k in keys if k in card}, indent=2))
    return 0
