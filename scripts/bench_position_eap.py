"""Position-resolved eap vs component-level eap, side by side on the same batch.

The target (issue 13): position-resolved eap costs at most 2x component-level eap, since it is
the same two forwards and one backward, with the score contraction keeping the position axis
(circuitkit/circuits/positions.py). Two models: the shipped toy-addition (addition prompts) and a
random-weight GPT-2-small shape (12 layers, 12 heads, d_model 768, d_mlp 3072, toy vocabulary;
ioi prompts). Batch 16 prompts; one warm-up run each, then ``--repeats`` runs with the two
variants interleaved; medians reported, and the largest |Σ_p position score − component score|
as a check that both computed the same thing.

    python scripts/bench_position_eap.py [--repeats 5] [--threads 1] [--device cpu] [--clock wall|cpu]
        [--out FILE.json]

``--clock cpu`` times this process's CPU time (user + system) instead of wall time, for a machine
shared with other jobs (CPU only: a GPU's work is not this process's CPU time).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch

from circuitkit.bench.config import build_shape
from circuitkit.bench.timing import CLOCK, Clock, now
from circuitkit.circuits import attribute, attribute_positions
from circuitkit.io import write_json
from circuitkit.models import load_model
from circuitkit.tasks import get_task



def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(name: str, model, ds, repeats: int, device: str) -> dict:
    times: dict[str, list[float]] = {"component": [], "position": []}
    runs = {"component": lambda: attribute(model, ds, "eap", batch_size=len(ds)),
            "position": lambda: attribute_positions(model, ds, "eap", batch_size=len(ds))}
    out = {k: f() for k, f in runs.items()}  # warm-up
    for _ in range(repeats):
        for k, f in runs.items():  # interleaved, so drifting load hits both alike
            _sync(device)
            t0 = now()
            f()
            _sync(device)
            times[k].append(now() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    err = float((out["position"].scores.sum(0) - out["component"].scores).abs().max())
    row = {"model": name, "task": ds.task, "batch": len(ds), "seq_len": ds.seq_len,
           "component_ms": round(1e3 * med["component"], 2), "position_ms": round(1e3 * med["position"], 2),
           "ratio": round(med["position"] / med["component"], 3), "max_abs_sum_error": err,
           "component_runs_ms": [round(1e3 * t, 2) for t in times["component"]],
           "position_runs_ms": [round(1e3 * t, 2) for t in times["position"]]}
    print(f"{name:22s} {ds.task:9s} {len(ds)}x{ds.seq_len}: component {row['component_ms']:8.1f} ms, "
          f"position {row['position_ms']:8.1f} ms, ratio {row['ratio']:.2f}x (Σ_p check {err:.1e})", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per variant (default 5)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--batch", type=int, default=16, help="prompts per batch (default 16)")
    ap.add_argument("--clock", choices=[c.value for c in Clock], default="wall",
                    help="wall time or this process's CPU time (default wall)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.clock == "cpu" and args.device != "cpu":
        ap.error("--clock cpu times CPU work only; use the wall clock with --device cuda")
    CLOCK[0] = Clock(args.clock)
    torch.set_num_threads(args.threads)
    rows = []
    toy = load_model("toy-addition", device=args.device)
    rows.append(measure("toy-addition", toy, get_task("addition").dataset(args.batch, seed=0), args.repeats,
                        args.device))
    gpt2 = build_shape("gpt2-small-shape").to(args.device)  # the bench's shape (circuitkit.bench.config)
    rows.append(measure("random gpt2-small shape", gpt2, get_task("ioi").dataset(args.batch, seed=0), args.repeats,
                        args.device))
    if args.out:
        write_json(args.out, {"rows": rows, "threads": args.threads, "device": args.device, "clock": args.clock,
                              "command": "python scripts/bench_position_eap.py " + " ".join(sys.argv[1:]),
                              "torch": torch.__version__, "machine": platform.machine(),
                              "when": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime())})


if __name__ == "__main__":
    main()
