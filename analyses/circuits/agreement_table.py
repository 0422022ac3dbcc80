"""eap-ig and eap against exact patching on the zoo (issue: circuit discovery, agreement criterion).

    python analyses/circuits/agreement_table.py   # prints a markdown table; ~2 min on 1 thread

Same setting as tests/test_circuits_agreement.py: 64 prompts (seed 0), patching ablation,
top-50 overlap of |score| and Pearson over all real edges.
"""

import torch

from circuitkit.circuits import attribute
from circuitkit.circuits.agreement import compare_scores
from circuitkit.models import load_model
from circuitkit.tasks import TOY_TASKS, get_task

CASES = [("toy-addition", "addition")] + [("toy-multitask", t) for t in TOY_TASKS]

torch.set_num_threads(1)
print("| model / task | eap-ig overlap | eap-ig Pearson | eap overlap | eap Pearson |")
print("|---|---|---|---|---|")
for name, task in CASES:
    model = load_model(name)
    ds = get_task(task).dataset(64, seed=0)
    ref = attribute(model, ds, "patching", batch_size=64)
    row = [compare_scores(ref, attribute(model, ds, m, batch_size=64), k=50) for m in ("eap-ig", "eap")]
    print(f"| {name} / {task} | " + " | ".join(f"{a.top_k_overlap:.2f} | {a.pearson:.3f}" for a in row) + " |",
          flush=True)
