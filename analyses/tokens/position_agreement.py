"""Position-level attribution against exact position-level patching on the toy zoo (issue 13, item 1).

    python analyses/tokens/position_agreement.py               # 16 prompts per task, seed 0
    python analyses/tokens/position_agreement.py --n 64        # more prompts (exact costs grow with n)

For toy-addition / addition and every toy-multitask task: exact position-level patching (the
metric change when one edge at one token position alone is ablated, patching ablation; the
ground truth, ``circuitkit.circuits.positions.exact_position_scores``) against position-resolved
``eap`` and ``eap-ig`` (5 steps) on the same prompts: Pearson and Spearman over every real
position edge, and the top-k overlap of |score| (k = 20, 50, 200). Exact scores cost the prompt
length (12-20) times component patching, so they are cached in ``analyses/tokens/scores/`` (a
rerun with the same n and seed reuses them). Writes ``analyses/tokens/position_agreement.{json,md}``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from circuitkit.circuits import PositionGraph, Positions, attribute_positions, compare_scores, exact_position_scores
from circuitkit.io import atomic_path, write_json, write_text
from circuitkit.sparsity import load_model
from circuitkit.tasks import TOY_TASKS, get_task

REPO = Path(__file__).resolve().parents[2]
HERE = REPO / "analyses/tokens"
CASES = [("toy-addition", "addition")] + [("toy-multitask", t) for t in TOY_TASKS]
KS = (20, 50, 200)
METHODS = ("eap-ig", "eap")


def exact_scores(model, name: str, ds, seed: int, batch_size: int) -> tuple[torch.Tensor, float]:
    """[pos, n_src, n_dst] exact position patching scores (cached) and the seconds they took (0 if cached)."""
    path = HERE / "scores" / f"position_exact__{name}__{ds.task}__n{len(ds)}__seed{seed}.safetensors"
    if path.exists():
        return load_file(str(path))["scores"], 0.0
    t = time.perf_counter()
    scores = exact_position_scores(model, ds, batch_size=batch_size)
    seconds = time.perf_counter() - t
    with atomic_path(path) as tmp:
        save_file({"scores": scores.contiguous()}, str(tmp), metadata={"seconds": f"{seconds:.1f}"})
    return scores, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16, help="prompts per task (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--stem", default="position_agreement")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows, record = [], []
    for name, task in CASES:
        model = load_model(name)
        ds = get_task(task).dataset(args.n, seed=args.seed)
        exact, t_exact = exact_scores(model, name, ds, args.seed, args.batch_size)
        ref = PositionGraph.from_model(model, Positions.of(ds), scores=exact, metadata={"method": "patching"})
        entry = {"model": name, "task": task, "n": args.n, "seed": args.seed, "positions": ds.seq_len,
                 "real_position_edges": ref.n_real_edges, "exact_seconds": t_exact, "methods": {}}
        row = {"model / task": f"{name} / {task}", "position edges": ref.n_real_edges}
        for m in METHODS:
            t = time.perf_counter()
            g = attribute_positions(model, ds, m, batch_size=args.batch_size)
            seconds = time.perf_counter() - t
            agree = {k: compare_scores(ref, g, k=k) for k in KS}
            entry["methods"][m] = {"pearson": agree[50].pearson, "spearman": agree[50].spearman, "seconds": seconds,
                                   **{f"top_{k}_overlap": a.top_k_overlap for k, a in agree.items()}}
            row.update({f"{m} Pearson": agree[50].pearson, f"{m} Spearman": agree[50].spearman,
                        f"{m} top-50": agree[50].top_k_overlap, f"{m} top-200": agree[200].top_k_overlap})
        rows.append(row)
        record.append(entry)
        print(row, flush=True)
    df = pd.DataFrame(rows)
    write_json(HERE / f"{args.stem}.json", {"n": args.n, "seed": args.seed, "ablation": "patching", "ig_steps": 5,
                                            "ks": list(KS), "cases": record})
    md = df.to_markdown(index=False, floatfmt=".2f")
    write_text(HERE / f"{args.stem}.md", md + "\n")
    print(md)


if __name__ == "__main__":
    main()
