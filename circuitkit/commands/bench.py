"""``circuitkit bench``: its flags; the benchmarks are :mod:`circuitkit.bench`."""

from __future__ import annotations

import argparse
import sys

from circuitkit.bench.config import DEFAULT_MODEL, FALLBACK_ARCH, PARTS, config_from_args
from circuitkit.bench.parts import replot_scaling, run_bench
from circuitkit.bench.report import _command_line, write_results
from circuitkit.bench.timing import CLOCK, Clock


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated parts to run (default all: {','.join(PARTS)})")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"zoo name or checkpoint folder (default {DEFAULT_MODEL}; a random {FALLBACK_ARCH} "
                        f"model when it is not there); 'random:ARCH' for random weights, ARCH a toy "
                        f"architecture, a named shape (gpt2-small-shape: 12 layers, 12 heads, d_model 768, "
                        f"d_mlp 3072, toy vocabulary) or a JSON object of HookedTransformerConfig fields")
    p.add_argument("--task", default="ioi", help="task whose clean/corrupted batch is attributed (default ioi)")
    p.add_argument("--batch", type=int, default=64, help="examples in the attributed batch (default 64)")
    p.add_argument("--ig-steps", type=int, default=5, help="eap-ig steps (default 5)")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (median; default 7)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--patching-repeats", type=int, default=2, help="timed runs of exact patching (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the peak-memory subprocesses")
    p.add_argument("--seq-mults", default="1,2,4", help="scaling: multiples of the task's prompt length")
    p.add_argument("--layers", default="2,4,8,12", help="scaling: layer counts (random weights)")
    p.add_argument("--scaling-arch", default=FALLBACK_ARCH, help="scaling: toy architecture widths")
    p.add_argument("--sparsity-batch", type=int, default=128, help="sparsity step batch (default 128)")
    p.add_argument("--sparsity-steps", type=int, default=30, help="sparsity steps per variant (default 30)")
    p.add_argument("--sparsity-seq-lens", default="0",
                   help="sparsity: comma-separated sequence lengths of random-token batches (0: the addition "
                        "prompts, 12 tokens; default 0)")
    p.add_argument("--sparsity-model", default="",
                   help="sparsity: model for the step, a spec as --model (e.g. random:gpt2-small-shape); "
                        "default the bench's model")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall time, or this process's CPU time (user + system) for a machine shared with other "
                        "jobs (default wall)")
    p.add_argument("--out", default="benchmarks", help="folder for NAME.json and NAME.md (default benchmarks)")
    p.add_argument("--name", default="bench", help="file stem of the results (default bench)")
    p.add_argument("--figure", default="figures/scaling",
                   help="scaling figure path without suffix; .png and .svg are written (default figures/scaling)")
    p.add_argument("--scaling-with", default="",
                   help="scaling: comma-separated committed results at other shapes whose cost ratios are drawn "
                        "into the figure's ratio panels (a circuitkit bench result with an attribution part, e.g. "
                        "benchmarks/gpt2-small-shape.json; scripts/bench_gate_blocks.py's JSON, e.g. "
                        "benchmarks/gate-blocks.json)")
    p.add_argument("--replot", default="", metavar="RESULT",
                   help="measure nothing: redraw the scaling figure (--figure) from RESULT's scaling part (e.g. "
                        "benchmarks/bench.json) and --scaling-with")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes for a smoke test (batch 4, 1 repeat, no memory, small scaling grid)")


def run_cli(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.replot:
        paths = replot_scaling(args.replot, args.figure, cfg["scaling_with"])
        print(f"wrote {' and '.join(paths)} from {args.replot}"
              + (f" and {', '.join(cfg['scaling_with'])}" if cfg["scaling_with"] else ""))
        return 0
    CLOCK[0] = Clock(args.clock)
    command = _command_line()
    res = run_bench(cfg, log=lambda s: print(s, file=sys.stderr, flush=True),
                    figure=args.figure if "scaling" in cfg["parts"] else None)
    jpath, mpath = write_results(res, args.out, args.name, command.strip())
    print(mpath.read_text())
    print(f"wrote {jpath} and {mpath}")
    return 0
