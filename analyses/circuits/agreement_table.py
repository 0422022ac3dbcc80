"""eap-ig and eap against exact patching on the zoo (issue: circuit discovery, agreement criterion).

    python analyses/circuits/agreement_table.py                 # the test's setting; ~2 min on 1 thread
    python analyses/circuits/agreement_table.py --seed 1        # other prompts
    python analyses/circuits/agreement_table.py --n 200         # more prompts
    python analyses/circuits/agreement_table.py --ig-steps 50   # finer IG
    python analyses/circuits/agreement_table.py --misses        # also list patching's top-50 edges eap-ig misses

Default setting as tests/test_circuits_agreement.py: 64 prompts (seed 0), patching ablation,
top-50 overlap of |score| and Pearson over all real edges. m(N) / m(∅) are the metric of the
full model on the clean and on the corrupted prompts: the effect there is to attribute.
"""

import argparse

import torch

from circuitkit.circuits import Graph, attribute, faithfulness
from circuitkit.circuits import compare_scores, edge_order
from circuitkit.models import load_model
from circuitkit.tasks import TOY_TASKS, get_task

CASES = [("toy-addition", "addition")] + [("toy-multitask", t) for t in TOY_TASKS]
K = 50

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--n", type=int, default=64, help="prompts per task")
p.add_argument("--seed", type=int, default=0, help="dataset seed")
p.add_argument("--ig-steps", type=int, default=None, help="eap-ig steps (default: the method's default)")
p.add_argument("--misses", action="store_true", help="list patching's top-50 edges outside eap-ig's top 50")
args = p.parse_args()
ig_options = {} if args.ig_steps is None else {"steps": args.ig_steps}

torch.set_num_threads(1)
print(f"{args.n} prompts, seed {args.seed}, eap-ig steps {args.ig_steps or 'default'}")
print("| model / task | m(N) | m(∅) | eap-ig overlap | eap-ig Pearson | eap overlap | eap Pearson |")
print("|---|---|---|---|---|---|---|")
missed = []
for name, task in CASES:
    model = load_model(name)
    ds = get_task(task).dataset(args.n, seed=args.seed)
    full = faithfulness(model, Graph.full(model), ds, batch_size=args.n)
    ref = attribute(model, ds, "patching", batch_size=args.n)
    ig = attribute(model, ds, "eap-ig", batch_size=args.n, **ig_options)
    row = [compare_scores(ref, g, k=K) for g in (ig, attribute(model, ds, "eap", batch_size=args.n))]
    print(f"| {name} / {task} | {full.m_full:.2f} | {full.m_empty:.2f} | "
          + " | ".join(f"{a.top_k_overlap:.2f} | {a.pearson:.3f}" for a in row) + " |", flush=True)
    if args.misses:
        rank_ig = {tuple(e): r for r, e in enumerate(edge_order(ig).tolist())}
        for r, (s, d) in enumerate(edge_order(ref)[:K].tolist()):
            if rank_ig[(s, d)] >= K:
                missed.append(f"| {name} / {task} | `{ref.spec.edge_name(s, d)}` | {ref.scores[s, d]:+.3f} "
                              f"(rank {r + 1}) | {ig.scores[s, d]:+.3f} (rank {rank_ig[(s, d)] + 1}) |")
if args.misses:
    print("\n| model / task | edge | patching | eap-ig |\n|---|---|---|---|")
    print("\n".join(missed))
