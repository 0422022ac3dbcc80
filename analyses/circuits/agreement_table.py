"""Gradient methods against exact patching on the zoo (issue: circuit discovery, agreement criterion).

    python analyses/circuits/agreement_table.py                 # the test's setting: 1,024 prompts, seed 0
    python analyses/circuits/agreement_table.py --seed 1        # other prompts
    python analyses/circuits/agreement_table.py --n 64          # few prompts: the overlap moves by up to 0.1
    python analyses/circuits/agreement_table.py --ig-steps 50   # finer IG
    python analyses/circuits/agreement_table.py --misses        # also list patching's top-50 edges eap-ig misses
    python analyses/circuits/agreement_table.py --methods eap-ig,eap   # skip the slow eap-ig-senders
    python analyses/circuits/agreement_table.py --level position --methods eap-ig,eap --n 64
                                                                 # position edges against exact position patching

Default setting as tests/test_circuits_agreement.py: 1,024 prompts (seed 0), patching
ablation, top-50 overlap of |score| and Pearson over all real edges, for each method in
``--methods`` (default eap-ig, eap, eap-ig-senders). m(N) / m(∅) are the metric of the full
model on the clean and on the corrupted prompts: the effect there is to attribute. About 4 min
per case on 1 thread at 1,024 prompts (patching and eap-ig-senders take 1-2 min each).
``--level position`` compares position-resolved scores (every edge at every token position,
circuitkit/circuits/positions.py) against exact position-level patching, which costs the prompt
length (12-20) times component patching: use fewer prompts.
"""

import argparse
import time

import torch

from circuitkit import CircuitkitError
from circuitkit.circuits import (
    POSITION_METHODS, Graph, attribute, attribute_positions, compare_scores, edge_order, faithfulness, get_method,
)
from circuitkit.sparsity import load_model
from circuitkit.tasks import TOY_TASKS, get_task

CASES = [("toy-addition", "addition")] + [("toy-multitask", t) for t in TOY_TASKS]
K = 50

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--n", type=int, default=1024, help="prompts per task")
p.add_argument("--seed", type=int, default=0, help="dataset seed")
p.add_argument("--batch-size", type=int, default=256)
p.add_argument("--ig-steps", type=int, default=None, help="IG steps (default: each method's default)")
p.add_argument("--methods", default="eap-ig,eap,eap-ig-senders", help="comma-separated methods to compare")
p.add_argument("--misses", action="store_true", help="list patching's top-50 edges outside eap-ig's top 50")
p.add_argument("--level", choices=["component", "position"], default="component",
               help="component edges (default) or position-resolved edges (methods: eap, eap-ig)")
args = p.parse_args()
methods = args.methods.split(",")
positions = args.level == "position"
try:
    for m in methods:
        get_method(m)  # unknown names fail here, before any work
        if positions and m not in POSITION_METHODS:
            raise CircuitkitError(f"{m} has no position-level variant; use --methods from {', '.join(POSITION_METHODS)}")
except CircuitkitError as e:
    p.error(str(e))
if positions and args.misses:
    p.error("--misses lists component edges; leave it out with --level position")
score = attribute_positions if positions else attribute

torch.set_num_threads(1)
print(f"{args.n} prompts, seed {args.seed}, IG steps {args.ig_steps or 'default'}, {args.level} level")
print("| model / task | m(N) | m(∅) | " + " | ".join(f"{m} overlap | {m} Pearson" for m in methods) + " |")
print("|---|---|---|" + "---|---|" * len(methods))
missed, timings = [], []
for name, task in CASES:
    model = load_model(name)
    ds = get_task(task).dataset(args.n, seed=args.seed)
    full = faithfulness(model, Graph.full(model), ds, batch_size=args.batch_size)
    t = time.perf_counter()
    ref = score(model, ds, "patching", batch_size=args.batch_size)
    seconds = {"patching": time.perf_counter() - t}
    scored = {}
    for m in methods:
        steps = {} if args.ig_steps is None else get_method(m).pick(steps=args.ig_steps)
        t = time.perf_counter()
        scored[m] = score(model, ds, m, batch_size=args.batch_size, **steps)
        seconds[m] = time.perf_counter() - t
    timings.append(f"{name} / {task}: " + ", ".join(f"{m} {s:.0f} s" for m, s in seconds.items()))
    row = [compare_scores(ref, scored[m], k=K) for m in methods]
    print(f"| {name} / {task} | {full.m_full:.2f} | {full.m_empty:.2f} | "
          + " | ".join(f"{a.top_k_overlap:.2f} | {a.pearson:.3f}" for a in row) + " |", flush=True)
    if args.misses and "eap-ig" in scored:
        ig = scored["eap-ig"]
        rank_ig = {tuple(e): r for r, e in enumerate(edge_order(ig).tolist())}
        for r, (s, d) in enumerate(edge_order(ref)[:K].tolist()):
            if rank_ig[(s, d)] >= K:
                missed.append(f"| {name} / {task} | `{ref.spec.edge_name(s, d)}` | {ref.scores[s, d]:+.3f} "
                              f"(rank {r + 1}) | {ig.scores[s, d]:+.3f} (rank {rank_ig[(s, d)] + 1}) |")
print("\nwall time (1 thread):\n" + "\n".join(timings))
if args.misses:
    print("\n| model / task | edge | patching | eap-ig |\n|---|---|---|---|")
    print("\n".join(missed))
