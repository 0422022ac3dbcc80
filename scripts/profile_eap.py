"""Where eap's time goes beyond its floor: torch.profiler's operators, eap against the floor.

The floor is the bench's (a no-grad forward on the corrupted prompts + a forward and backward to the
input activations on the clean ones, bare model; circuitkit/bench/timing.py). Both run ``--repeats``
times under the profiler after a warm-up; per call, each operator's self CPU time and call count for
eap and for the floor, the operators whose time differs most first, and the floating-point operations
of the matrix products (torch's FlopCounterMode) with the rate each side's products ran at.

    python scripts/profile_eap.py [--model random:gpt2-small-shape] [--task ioi] [--batch 8] [--repeats 3]
        [--threads 1] [--top 12]

Profiler times include its own overhead; compare the large differences only.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from circuitkit.bench.config import _dataset, _load
from circuitkit.bench.timing import count_flops, floor_fns
from circuitkit.circuits import attribute

PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm")


def per_call(fn, repeats: int) -> dict[str, tuple[float, float]]:
    """operator -> (self CPU ms per call, calls per call) over ``repeats`` profiled calls."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            fn()
    return {e.key: (e.self_cpu_time_total / 1e3 / repeats, e.count / repeats) for e in prof.key_averages()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="random:gpt2-small-shape")
    ap.add_argument("--task", default="ioi")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, desc = _load(args.model)
    ds = _dataset(model, args.task, args.batch)
    fl = floor_fns(model, ds)
    fns = {"eap": lambda: attribute(model, ds, "eap", batch_size=len(ds)),
           "floor": lambda: (fl["forward_nograd"](), fl["fwd_bwd_inputs"]())}
    for fn in fns.values():
        fn()  # warm-up
    ops = {name: per_call(fn, args.repeats) for name, fn in fns.items()}
    flops = count_flops(fns)
    total = {name: sum(t for t, _ in v.values()) for name, v in ops.items()}
    print(f"{desc}, task {args.task}, batch {len(ds)} x {ds.seq_len}, {args.threads} thread(s), "
          f"{args.repeats} profiled calls each; self CPU ms per call")
    print(f"total: eap {total['eap']:.1f} ms, floor {total['floor']:.1f} ms ({total['eap'] / total['floor']:.2f}x)")
    print(f"{'operator':44s} {'eap ms':>9s} {'calls':>6s} {'floor ms':>9s} {'calls':>6s} {'diff ms':>9s}")
    keys = sorted(set(ops["eap"]) | set(ops["floor"]),
                  key=lambda k: -abs(ops["eap"].get(k, (0, 0))[0] - ops["floor"].get(k, (0, 0))[0]))
    for k in keys[: args.top]:
        (a, na), (b, nb) = ops["eap"].get(k, (0, 0)), ops["floor"].get(k, (0, 0))
        print(f"{k[:44]:44s} {a:9.1f} {na:6.0f} {b:9.1f} {nb:6.0f} {a - b:+9.1f}")
    for name in fns:
        ms = sum(ops[name].get(k, (0, 0))[0] for k in PRODUCTS)
        print(f"{name}: matrix products {flops[name] / 1e9:.2f} GFLOP in {ms:.0f} ms of mm/addmm/bmm "
              f"({flops[name] / 1e6 / ms:.0f} GFLOP/s)")
    extra_flops, extra_ms = flops["eap"] - flops["floor"], sum(
        ops["eap"].get(k, (0, 0))[0] - ops["floor"].get(k, (0, 0))[0] for k in PRODUCTS)
    print(f"eap's extra products: {extra_flops / 1e9:.2f} GFLOP in {extra_ms:.0f} ms "
          f"({extra_flops / 1e6 / max(extra_ms, 1e-9):.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
