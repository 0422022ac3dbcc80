"""The gate bias as a lever after training: accuracy and kept attention edges of a sparse model
when its evaluation gates ``1[s + b > 0]`` use another bias ``b`` than the one it was trained with.

    python analyses/sparsity/gate_bias_sweep.py toy-multitask-6l-sparse --bias 1.0,0.5,0,-0.5,-1 --n 2000

A lower ``b`` closes every gate whose score is below ``-b``, so the model gets sparser with the
same weights; the table says what that costs on each task (held-out prompts, seed 12345, as the
zoo cards). Prints a markdown table and writes ``--out`` (JSON) when given.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from circuitkit.io import write_json
from circuitkit.models import load_card
from circuitkit.sparsity import attach, detach, load_model, measure_sparsity
from circuitkit.training import build_tasks, evaluate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", help="sparse zoo name or checkpoint folder")
    p.add_argument("--bias", default="1.0,0.5,0,-0.5,-1", help="comma-separated evaluation biases")
    p.add_argument("--n", type=int, default=2000, help="held-out prompts per task")
    p.add_argument("--measure-n", type=int, default=1000, help="held-out prompts per task for kept edges")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="JSON file for the results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    card = load_card(args.name)
    cfg = card["finetune_config"]
    tasks = build_tasks(cfg["tasks"], cfg.get("task_options"))
    model = load_model(args.name)
    trained = detach(model)
    if trained is None:
        raise SystemExit(f"{args.name} has no gates; give a sparse model")
    measure = {t: task.dataset(args.measure_n, seed=12345) for t, task in tasks.items()}
    rows = []
    for b in [float(x) for x in args.bias.split(",")]:
        attach(model, replace(trained, bias_gate=b))
        res = evaluate(model, tasks, n=args.n, seed=12345)
        rep = measure_sparsity(model, list(measure.values()))
        rows.append({"bias_gate": b, "kept_edges": rep.kept_edges, "kept_edges_layer": rep.kept_edges_layer,
                     "accuracy": {t: r["accuracy"] for t, r in res.items()}, "ce": {t: r["ce"] for t, r in res.items()}})
        detach(model)
    names = list(tasks)
    print(f"| bias (trained: {trained.bias_gate:g}) | kept edges | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 2) + "|")
    for r in rows:
        print(f"| {r['bias_gate']:g} | {100 * r['kept_edges']:.2f}% | "
              + " | ".join(f"{100 * r['accuracy'][t]:.2f}%" for t in names) + " |")
    if args.out:
        write_json(args.out, {"model": args.name, "trained_bias": trained.bias_gate, "n": args.n, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
