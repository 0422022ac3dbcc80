"""Re-measure a shipped sparse zoo model against its targets, independently of the training run.

    python analyses/sparsity/check_sparse_zoo.py toy-addition-sparse [--n 10000]
    python analyses/sparsity/check_sparse_zoo.py toy-multitask-sparse --n 2000

Loads the sparse model with ``circuitkit.sparsity.load_model`` (gates restored in evaluation
mode) and its base model (``card["base_model"]``), evaluates both on held-out data
(``get_task(t).dataset(n, seed=12345)``: for addition, sums drawn from the held-out operand
pairs; also every held-out pair and every one of the 10,000 pairs once), measures kept
attention edges / active MLP neurons, and checks the targets:

- toy-addition-sparse: exact-match accuracy >= 99.9%, held-out CE <= the card's target,
  kept edges <= 2%;
- toy-addition-sparse-mlp: the same accuracy bar and CE target, active MLP neurons <= 20%;
- toy-multitask-sparse: every task within 1 point of the base accuracy, kept edges <= 5%;
- toy-multitask-6l-sparse (and its lever variants, named toy-multitask-6l-sparse-*): every task
  within 0.5 points of the base accuracy, kept edges <= 1% (stretch 0.5%);
- toy-multitask-8l-sparse and toy-multitask-6l-more-sparse (eight tasks): the 6-layer pair's targets
  (0.5 points, <= 1% kept);
- toy-addition-6l-sparse (and its lever variants): toy-addition-sparse's accuracy bar and CE target,
  kept edges <= 1% as for the 6-layer zoo.

Kept edges are reported over all tasks, per layer, per head, per task, and per task and layer.

Prints JSON; exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from circuitkit.models import load_card
from circuitkit.sparsity import load_model
from circuitkit.sparsity import measure_sparsity
from circuitkit.training import build_tasks, evaluate

TARGETS = {
    "toy-addition-sparse": {"min_accuracy": 0.999, "max_kept_edges": 0.02, "ce_target": True},
    "toy-addition-sparse-mlp": {"min_accuracy": 0.999, "max_mlp_active": 0.20, "ce_target": True},
    "toy-multitask-sparse": {"max_accuracy_drop": 0.01, "max_kept_edges": 0.05},
    "toy-multitask-6l-sparse": {"max_accuracy_drop": 0.005, "max_kept_edges": 0.01},
    "toy-multitask-8l-sparse": {"max_accuracy_drop": 0.005, "max_kept_edges": 0.01},
    "toy-multitask-6l-more-sparse": {"max_accuracy_drop": 0.005, "max_kept_edges": 0.01},
    "toy-addition-6l-sparse": {"min_accuracy": 0.999, "max_kept_edges": 0.01, "ce_target": True},
}


def targets_for(name: str) -> dict:
    """The targets of ``name``, or of the zoo model it is a variant of (``NAME-<lever>``)."""
    matches = [k for k in TARGETS if name == k or name.startswith(k + "-")]
    return TARGETS[max(matches, key=len)] if matches else {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", help="sparse zoo name or checkpoint folder")
    p.add_argument("--n", type=int, default=None, help="held-out examples per task (default: the card's eval_n)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    card = load_card(args.name)
    cfg = card["finetune_config"]
    n = args.n or cfg["eval_n"]
    tasks = build_tasks(cfg["tasks"], cfg.get("task_options"))
    sparse, base = load_model(args.name), load_model(card["base_model"])
    res_s, res_b = evaluate(sparse, tasks, n=n, seed=12345), evaluate(base, tasks, n=n, seed=12345)
    total = sum(cfg["tasks"].values())
    ce = sum(res_s[t]["ce"] * cfg["tasks"][t] for t in tasks) / total
    measure = {t: task.dataset(min(n, cfg["measure_n"]), seed=12345) for t, task in tasks.items()}
    rep = measure_sparsity(sparse, list(measure.values()))
    out = {"model": args.name, "n_per_task": n, "heldout_ce": ce, "target_ce": card["target_ce"],
           "accuracy": {t: res_s[t]["accuracy"] for t in tasks},
           "accuracy_base": {t: res_b[t]["accuracy"] for t in tasks},
           "kept_edges": rep.kept_edges, "kept_edges_layer": rep.kept_edges_layer,
           "kept_edges_head": rep.kept_edges_head,
           "kept_edges_task": {}, "kept_edges_task_layer": {},
           "mlp_active": rep.mlp_active}
    for t, ds in measure.items():  # which task keeps which layer's edges
        rep_t = measure_sparsity(sparse, ds)
        out["kept_edges_task"][t], out["kept_edges_task_layer"][t] = rep_t.kept_edges, rep_t.kept_edges_layer
    if "addition" in tasks:  # every operand pair once: the held-out ones, and all 10,000
        with torch.no_grad():
            for split in ("heldout", "all"):
                ds = tasks["addition"].exhaustive(split)
                acc = torch.cat([b.accuracy(sparse(b.clean)) for b in ds.batches(1000)]).float().mean().item()
                out[f"addition_exact_match_{split}_pairs"] = {"pairs": len(ds), "accuracy": acc}
    tg = targets_for(card.get("name", ""))
    checks = {}
    if "min_accuracy" in tg:
        checks["accuracy"] = all(a >= tg["min_accuracy"] for a in out["accuracy"].values())
    if "max_accuracy_drop" in tg:
        checks[f"accuracy_within_{tg['max_accuracy_drop'] * 100:g}pt"] = all(
            out["accuracy_base"][t] - out["accuracy"][t] <= tg["max_accuracy_drop"] for t in tasks)
    if tg.get("ce_target"):
        checks["ce_le_target"] = ce <= card["target_ce"]
    if "max_kept_edges" in tg:
        checks["kept_edges"] = rep.kept_edges <= tg["max_kept_edges"]
    if "max_mlp_active" in tg:
        checks["mlp_active"] = rep.mlp_active is not None and rep.mlp_active <= tg["max_mlp_active"]
    out["checks"] = checks
    print(json.dumps(out, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
