"""How minimal is the minimal token-level circuit? Greedy pruning of the top-k pair circuit (issue 13).

    python analyses/tokens/pruned_minimal.py            # the default study's 6-layer pair, every task

The study's minimal token-level circuit is the smallest *prefix* of the pairs ranked by their exact
score that reaches f ≥ 0.9 (circuitkit.evaluation.pairs.minimal_pair_circuit). This script then removes,
one at a time from the lowest |score| up, every pair of that circuit whose removal keeps f ≥ 0.9 (each
decision measured: one forward of the prompts with the pair set removed), and reports both sizes for the
base and the sparse model, and their ratios. Same prompts as the token-level study
(analyses/run/tokens_6l_hp025.toml: 16 prompts, seed 0, exact scores). Writes
``analyses/tokens/pruned_minimal.{csv,md}``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

from circuitkit.circuits.attention_pairs import metric_with_pairs
from circuitkit.circuits.interventions import explained_effect
from circuitkit.evaluation.compare import write_table
from circuitkit.evaluation.pairs import analyse_pairs
from circuitkit.sparsity import load_model
from circuitkit.tasks import TOY_TASKS, task_for_model

HERE = Path(__file__).resolve().parent


def prune(model, ds, keep: torch.Tensor,  # [layer, head, query, key] bool
          scores: torch.Tensor,  # [layer, head, query, key]
          m_full: float, m_empty: float, threshold: float, f_start: float) -> tuple[torch.Tensor, float]:
    """Drop kept pairs, lowest |score| first, while f stays ≥ threshold; (kept pairs, their f). ``f_start``:
    the f of ``keep`` itself, which stands when no pair can go."""
    keep = keep.clone()
    idx = keep.nonzero()  # [k, 4]
    order = torch.argsort(scores[idx[:, 0], idx[:, 1], idx[:, 2], idx[:, 3]].abs(), stable=True)
    f_now = f_start
    for i in order.tolist():
        pair = tuple(idx[i].tolist())
        keep[pair] = False
        f = float(explained_effect(metric_with_pairs(model, ds, keep).mean(1), m_full, m_empty)[0])
        if f < threshold:
            keep[pair] = True
        else:
            f_now = f
    return keep, f_now


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="toy-multitask-6l")
    ap.add_argument("--sparse", default="toy-multitask-6l-sparse-hp025")
    ap.add_argument("--tasks", default=",".join(TOY_TASKS))
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threshold", type=float, default=0.9)
    args = ap.parse_args()
    torch.manual_seed(0)
    models = {name: load_model(name) for name in (args.base, args.sparse)}
    rows = []
    for task in args.tasks.split(","):
        row = {"task": task}
        for role, name in (("base", args.base), ("sparse", args.sparse)):
            model = models[name]
            ds = task_for_model(task, model).dataset(args.n, seed=args.seed)
            r = analyse_pairs(model, name, ds, "exact", args.threshold)
            kept, f = prune(model, ds, r.minimal.keep, r.scores.scores, r.curve.m_full, r.curve.m_empty,
                            args.threshold, r.minimal.f)
            row.update({f"{role}_top_k": r.minimal.k, f"{role}_top_k_f": round(r.minimal.f, 3),
                        f"{role}_pruned": int(kept.sum()), f"{role}_pruned_f": round(f, 3),
                        f"{role}_pruned_heads": int(kept.any(-1).any(-1).sum())})
            print(task, role, row, flush=True)
        row["top_k_ratio"] = round(row["base_top_k"] / row["sparse_top_k"], 2)
        row["pruned_ratio"] = round(row["base_pruned"] / row["sparse_pruned"], 2)
        rows.append(row)
    df = pd.DataFrame(rows)
    write_table(df, HERE / "pruned_minimal")
    print(df.to_string())


if __name__ == "__main__":
    main()
