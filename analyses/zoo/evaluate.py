"""Held-out accuracy of every shipped zoo model, per task — the numbers in the README's zoo table.

    python analyses/zoo/evaluate.py            # prints a markdown table, writes analyses/zoo/zoo_eval.json

toy-addition is scored on every one of the 10,000 operand pairs and, separately, on the
1,000 pairs held out of training; the other tasks on 2,000 held-out prompts (seed 12345).
Sparse models are evaluated with their gates attached (evaluation mode), and their
kept-edge fraction is measured over the same prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from circuitkit.models import load_card, zoo_names
from circuitkit.sparsity import load_model
from circuitkit.tasks import get_task

OUT = Path(__file__).with_name("zoo_eval.json")


@torch.no_grad()
def accuracy(model, ds, batch_size: int = 1000) -> float:
    return torch.cat([b.accuracy(model(b.clean)).float() for b in ds.batches(batch_size)]).mean().item()


def main() -> None:
    results = {}
    for name in zoo_names():
        model = load_model(name)
        card = load_card(name)
        tasks = list(card.get("tasks", {}))
        row = {}
        for task in tasks:
            t = get_task(task, **card.get("task_options", {}).get(task, {}))
            if task == "addition":
                row["addition (all 10,000 pairs)"] = accuracy(model, t.exhaustive("all"))
                row["addition (1,000 unseen pairs)"] = accuracy(model, t.exhaustive("heldout"))
            else:
                row[task] = accuracy(model, t.dataset(2000, seed=12345))
        if card.get("kept_edges") is not None:
            row["kept attention edges"] = card["kept_edges"]
        if card.get("mlp_active") is not None:
            row["active MLP neurons"] = card["mlp_active"]
        results[name] = row
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    cols = sorted({c for r in results.values() for c in r}, key=lambda c: (c.startswith(("kept", "active")), c))
    print("| model | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name, row in results.items():
        print(f"| {name} | " + " | ".join(f"{100 * row[c]:.2f}%" if c in row else "" for c in cols) + " |")


if __name__ == "__main__":
    main()
