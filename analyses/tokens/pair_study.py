"""Token-level base-vs-sparse study: attribution mass and minimal pair circuits (issue 13, items 3 and 5).

    python analyses/tokens/pair_study.py                    # toy-addition and toy-multitask pairs
    python analyses/tokens/pair_study.py --pairs 6l --n 16  # the 6-layer pair (slow on CPU)

For every (base, sparse, task): exact attention-pair scores (circuitkit.circuits.attention_pairs)
on ``--n`` prompts, the attribution-mass curves for pairs and heads (base ÷ sparse k at 80% / 90%),
the pair-level faithfulness curve and the minimal token-level circuit (fewest top pairs with
f ≥ 0.9), and the Pearson correlation of the gradient scores with the exact ones. Writes
``analyses/tokens/pair_study.{csv,md,json}`` and ``figures/token_mass.{png,svg}``. Scores are
cached in ``analyses/tokens/scores/`` (a rerun with the same n, seed and method reuses them).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from circuitkit.circuits.attention_pairs import PairScores, attribute_pairs
from circuitkit.evaluation.compare import write_table
from circuitkit.evaluation.pairs import PAPER_MASS_RATIOS, analyse_pairs, pair_row
from circuitkit.io import write_json
from circuitkit.plotting import pair_mass_figure
from circuitkit.sparsity import load_model
from circuitkit.tasks import TOY_TASKS, get_task

REPO = Path(__file__).resolve().parents[2]
HERE = REPO / "analyses/tokens"
PAIRS = {"addition": ("toy-addition", "toy-addition-sparse", ("addition",)),
         "multitask": ("toy-multitask", "toy-multitask-sparse", TOY_TASKS),
         "6l": ("toy-multitask-6l", "toy-multitask-6l-sparse", TOY_TASKS)}


def cached_scores(model, name: str, ds, method: str, seed: int, batch_size: int) -> PairScores:
    path = HERE / "scores" / f"{name}__{ds.task}__{method}.safetensors"
    if path.exists():
        s = PairScores.load(path)
        if s.n_examples == len(ds) and s.metadata.get("seed") == seed and s.spec.seq_len == ds.seq_len:
            return s
    s = attribute_pairs(model, ds, method, batch_size).with_metadata(model=name, seed=seed)
    s.save(path)
    return s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", default="addition,multitask", help=f"comma-separated: {', '.join(PAIRS)}")
    p.add_argument("--n", type=int, default=32, help="prompts per task (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--stem", default="pair_study", help="output name under analyses/tokens/ (default pair_study)")
    args = p.parse_args()
    rows, record, panels = [], [], []
    for key in args.pairs.split(","):
        base_name, sparse_name, tasks = PAIRS[key]
        models = {n: load_model(n) for n in (base_name, sparse_name)}
        for task in tasks:
            ds = get_task(task).dataset(args.n, seed=args.seed)
            results = {}
            for name, model in models.items():
                t0 = time.perf_counter()
                exact = cached_scores(model, name, ds, "exact", args.seed, args.batch_size)
                grad = cached_scores(model, name, ds, "gradient", args.seed, args.batch_size)
                c = exact.spec.causal
                r = float(torch.corrcoef(torch.stack([exact.scores[c], grad.scores[c]]))[0, 1])
                res = analyse_pairs(model, name, ds, threshold=args.threshold, batch_size=args.batch_size,
                                    rank_by=exact)
                results[name] = (res, r)
                print(f"{name} / {task}: minimal {res.minimal.k} pairs (f={res.minimal.f:.3f}), "
                      f"grad~exact r={r:.3f}, {time.perf_counter() - t0:.0f} s", flush=True)
            (b, rb), (s, rs) = results[base_name], results[sparse_name]
            row = pair_row(b, s)
            row.update({"base_grad_exact_r": rb, "sparse_grad_exact_r": rs})
            rows.append(row)
            record.append({"base": b.to_dict(), "sparse": s.to_dict(), "row": row})
            panels.append((f"{base_name} / {task}", b, s))
    df = pd.DataFrame(rows)
    cols = ["base_model", "task", "n_prompts", "causal_pairs", "base_pairs_80", "sparse_pairs_80", "pairs_ratio_80",
            "base_pairs_90", "sparse_pairs_90", "pairs_ratio_90", "base_heads_80", "sparse_heads_80", "heads_ratio_80",
            "base_heads_90", "sparse_heads_90", "heads_ratio_90", "base_minimal_pairs", "sparse_minimal_pairs",
            "minimal_pair_ratio", "base_minimal_f", "sparse_minimal_f", "base_minimal_heads", "sparse_minimal_heads",
            "base_grad_exact_r", "sparse_grad_exact_r"]
    write_table(df[cols], HERE / args.stem)
    write_json(HERE / f"{args.stem}.json", {"n": args.n, "seed": args.seed, "threshold": args.threshold,
                                            "method": "exact", "results": record})
    fig_stem = "token_mass" if args.stem == "pair_study" else f"token_mass_{args.stem}"
    print(pair_mass_figure(panels, REPO / "figures" / fig_stem, args.threshold, PAPER_MASS_RATIOS))
    print(df[cols].to_markdown(index=False, floatfmt=".3g"))


if __name__ == "__main__":
    main()
