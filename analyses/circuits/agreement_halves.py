"""Does the agreement criterion hold on half of the test's prompts? (Why the test keeps 1,024.)

    python analyses/circuits/agreement_halves.py

For each case of tests/test_circuits_agreement.py (1,024 prompts, seed 0): top-50 overlap and
Pearson of eap-ig against exact patching on the first 512 prompts, on the second 512, and on all
1,024 (the mean of the two halves' scores). 1 thread; about 15 minutes on a loaded machine.
"""

import json

import torch

from circuitkit.circuits import attribute, compare_scores
from circuitkit.sparsity import load_model
from circuitkit.tasks import TOY_TASKS, get_task

CASES = [("toy-addition", "addition")] + [("toy-multitask", t) for t in TOY_TASKS]

torch.set_num_threads(1)
for name, task in CASES:
    model = load_model(name)
    ds = get_task(task).dataset(1024, seed=0)
    halves = [ds[:512], ds[512:]]
    exact = [attribute(model, h, "patching", batch_size=256) for h in halves]
    ig = [attribute(model, h, "eap-ig", batch_size=256) for h in halves]
    out = {}
    for label, p, g in (("first512", exact[0], ig[0]), ("second512", exact[1], ig[1]),
                        ("all1024", exact[0].with_scores((exact[0].scores + exact[1].scores) / 2),
                         ig[0].with_scores((ig[0].scores + ig[1].scores) / 2))):
        a = compare_scores(p, g, k=50)
        out[label] = {"top50_overlap": round(a.top_k_overlap, 3), "pearson": round(a.pearson, 4)}
    print(name, task, json.dumps(out), flush=True)
