"""Exact patching before and after the last-block cut, side by side in one run.

Exact patching now computes the last block's MLP, the final LayerNorm and the unembedding only
from the batch's first answer position on (``circuitkit.circuits.attribution._last_block_tail``).
This script loads the attribution module as it was at an earlier commit (``--against``, default
the commit before the change) beside today's, and times both on the same models and prompts,
interleaved round by round, with the largest score difference (0 means the same bits).

    python scripts/bench_patching_tail.py [--against ec1f4e3] [--n 256] [--repeats 3] [--clock cpu] [--json FILE]

Models: the zoo's toy-multitask (ioi, docstring, addition) and toy-multitask-sparse (ioi); 1 thread.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from circuitkit.circuits import attribution as current
from circuitkit.io import write_json
from circuitkit.sparsity import load_model
from circuitkit.tasks import get_task

CASES = [("toy-multitask", "ioi"), ("toy-multitask", "docstring"), ("toy-multitask", "addition"),
         ("toy-multitask-sparse", "ioi")]


def module_at(commit: str):
    """circuitkit/circuits/attribution.py as it was at ``commit``, imported under another name."""
    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "-C", str(root), "show", f"{commit}:circuitkit/circuits/attribution.py"],
                         check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "attribution_before.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("attribution_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["attribution_before"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--against", default="ec1f4e3", help="the commit whose patching is 'before'")
    p.add_argument("--n", type=int, default=256, help="prompts per case")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clock", choices=["wall", "cpu"], default="cpu",
                   help="cpu: this process's CPU time, robust to other jobs on the machine")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    before = module_at(args.against)
    rows = []
    for name, task in CASES:
        model = load_model(name)
        ds = get_task(task).dataset(args.n, seed=0)
        times = {"before": [], "after": []}
        scores = {}
        for _ in range(args.repeats):
            for label, module in (("before", before), ("after", current)):
                t = clock()
                scores[label] = module._patching_edges(model, ds, ablation="patching", batch_size=256, progress=False)
                times[label].append(clock() - t)
        b, a = statistics.median(times["before"]), statistics.median(times["after"])
        rows.append({"model": name, "task": task, "before_s": round(b, 3), "after_s": round(a, 3),
                     "ratio": round(a / b, 3), "max_abs_diff": float((scores["before"] - scores["after"]).abs().max())})
        print(f"| {name} | {task} | {b:.2f} s | {a:.2f} s | {a / b:.2f}× | {rows[-1]['max_abs_diff']:.1e} |",
              flush=True)
    if args.json:
        write_json(args.json, {"against": args.against, "n": args.n, "repeats": args.repeats, "clock": args.clock,
                               "threads": 1, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
