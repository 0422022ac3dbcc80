"""ACDC-style pruning against eap-ig top-n at the same circuit size (issue: circuit discovery).

    python analyses/circuits/acdc_vs_eap_ig.py [--task ioi] [--n 64] [--taus 0.05,0.2]

For each tau: ACDC's circuit (the edges whose single removal, in its sequential order, moved
the metric by >= tau; dangling edges removed) and eap-ig's top-n circuit with the same number
of edges, each with its explained effect f = (m(C) - m(∅)) / (m(N) - m(∅)) on the same prompts.
"""

import argparse
import time

import torch

from circuitkit.circuits import attribute, faithfulness, threshold, top_n
from circuitkit.sparsity import load_model
from circuitkit.tasks import get_task

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--model", default="toy-multitask")
p.add_argument("--task", default="ioi")
p.add_argument("--n", type=int, default=64)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--taus", default="0.05,0.2")
args = p.parse_args()

torch.set_num_threads(1)
model = load_model(args.model)
ds = get_task(args.task).dataset(args.n, seed=args.seed)
ig = attribute(model, ds, "eap-ig", batch_size=args.n)
print(f"{args.model} / {args.task}, {args.n} prompts (seed {args.seed}), {ig.spec.n_real_edges} edges")
print("| tau | acdc edges | acdc f | acdc seconds (1 thread) | eap-ig top-n edges | eap-ig f |")
print("|---|---|---|---|---|---|")
for tau in (float(t) for t in args.taus.split(",")):
    t = time.perf_counter()
    scored = attribute(model, ds, "acdc", tau=tau, batch_size=args.n)
    seconds = time.perf_counter() - t
    circuit = threshold(scored, tau)
    same_size = top_n(ig, circuit.n_edges)
    fa = faithfulness(model, circuit, ds, batch_size=args.n).explained
    fi = faithfulness(model, same_size, ds, batch_size=args.n).explained
    print(f"| {tau} | {circuit.n_edges} | {fa:.3f} | {seconds:.0f} | {same_size.n_edges} | {fi:.3f} |", flush=True)
