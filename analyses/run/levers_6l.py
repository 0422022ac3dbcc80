"""The 6-layer sparse models side by side: kept attention edges against circuit size, task by task.

    python analyses/run/levers_6l.py            # -> analyses/run/6l_levers.{md,csv}, figures/levers_6l.{png,svg}

Reads, for each sparse model of the 6-layer zoo, the study of its pair (``analyses/run/6l_<x>_results.csv``,
written by ``circuitkit run --config analyses/run/6l_<x>.toml``; the same base rows, seeds and prompts in every
one) and its independent check (``analyses/sparsity/check_6l_<x>.json``, written by
``analyses/sparsity/check_sparse_zoo.py MODEL --n 2000``), and writes one row per (model, task): kept edges (all
prompts, and the task's own), open heads, accuracy against the base (the table: each model's largest loss), and the
minimal circuit at f >= 0.9 in edges and heads with its ratio to the base's. The figure draws edge ratio and head
ratio against kept edges, a point per (model, task): the trade-off the levers move along.
Models whose files are missing are left out with a note on stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from circuitkit.plotting import plt, save

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# (suffix of the results/check files, model, the lever in a few words), in the order the models were made
MODELS = [
    ("long", "toy-multitask-6l-sparse-long", "10,000 steps"),
    ("l0w", "toy-multitask-6l-sparse-l0w", "layer 0 weighted 5"),
    ("hp05", "toy-multitask-6l-sparse-hp05", "head power 0.5"),
    ("hp05_l0w", "toy-multitask-6l-sparse-hp05-l0w", "head power 0.5, layer 0 x5"),
    ("hp025", "toy-multitask-6l-sparse-hp025", "head power 0.25, layer 0 x5"),
    ("hp01", "toy-multitask-6l-sparse-hp01", "head power 0.1, layer 0 x5"),
]
TASKS = ["addition", "induction", "ioi", "greater-than", "docstring"]


def rows() -> list[dict]:
    out = []
    for key, model, lever in MODELS:
        res, chk = HERE / f"6l_{key}_results.csv", ROOT / "analyses" / "sparsity" / f"check_6l_{key}.json"
        if not (res.exists() and chk.exists()):
            print(f"{model}: no {res.name} or {chk.name}; left out", file=sys.stderr)
            continue
        table = pd.read_csv(res).set_index("task")
        check = json.loads(chk.read_text())
        open_heads = sum(1 for layer in check["kept_edges_head"] for h in layer if h > 0)
        for task in TASKS:
            r = table.loc[task]
            out.append({
                "model": model, "lever": lever, "task": task,
                "kept_edges": check["kept_edges"], "kept_edges_task": check["kept_edges_task"][task],
                "open_heads": open_heads,
                "accuracy": check["accuracy"][task], "accuracy_base": check["accuracy_base"][task],
                "base_edges": int(r.base_edges), "sparse_edges": int(r.sparse_edges), "edge_ratio": r.edge_ratio,
                "base_heads": int(r.base_heads), "sparse_heads": int(r.sparse_heads), "head_ratio": r.head_ratio,
                "sparse_f": r.sparse_f, "sparse_completeness": r.sparse_completeness,
            })
    return out


def markdown(df: pd.DataFrame) -> str:
    """One row per model: kept edges, open heads, the largest accuracy loss, and per task 'edges (heads)' of the
    minimal circuit with the edge and head ratios; the base row first."""
    lines = ["| model | kept edges | open heads | largest accuracy loss | " + " | ".join(TASKS) + " |",
             "|---|---|---|---|" + "---|" * len(TASKS)]
    base = {t: df[df.task == t].iloc[0] for t in TASKS}
    lines.append("| toy-multitask-6l (base) | 100% | 48 | | "
                 + " | ".join(f"{int(base[t].base_edges)} ({int(base[t].base_heads)})" for t in TASKS) + " |")
    for model, g in df.groupby("model", sort=False):
        g = g.set_index("task")
        cells = [f"{int(g.loc[t].sparse_edges)} ({int(g.loc[t].sparse_heads)}): {g.loc[t].edge_ratio:.3g}× / "
                 f"{g.loc[t].head_ratio:.3g}×" for t in TASKS]
        loss = g.accuracy_base - g.accuracy  # per task, in [0, 1]; negative = better than the base
        worst = loss.idxmax()
        lost = f"{100 * loss[worst]:.2f} points ({worst})" if loss[worst] > 0 else "none"
        lines.append(f"| {model} ({g.iloc[0].lever}) | {100 * g.iloc[0].kept_edges:.2f}% | "
                     f"{int(g.iloc[0].open_heads)} | {lost} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(df: pd.DataFrame, stem: Path) -> list[Path]:
    """Edge and head ratio against kept edges: a point per (model, task), no lines (the models are branches of one
    run, not one sweep), each model named at its density along the top."""
    import matplotlib.ticker as ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharex=True)
    for task in TASKS:
        g = df[df.task == task]
        for ax, col in zip(axes, ("edge_ratio", "head_ratio")):
            ax.scatter(100 * g.kept_edges, g[col], label=task, s=28)
    models = df.drop_duplicates("model")
    for ax, name in zip(axes, ("edge ratio (base ÷ sparse)", "head ratio (base ÷ sparse)")):
        ax.axhline(10 if "edge" in name else 2, color="grey", ls="--", lw=0.8)
        ax.set_xscale("log"), ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xticks([0.4, 0.5, 0.65, 1, 1.33, 1.77])
        ax.set_yticks([0.5, 1, 2, 5, 10, 20, 40])
        ax.set_xlabel("kept causal attention edges, % (held-out)")
        ax.set_ylabel(name)
        for _, m in models.iterrows():
            ax.annotate(m.model.replace("toy-multitask-6l-sparse-", "-"), (100 * m.kept_edges, 1.0),
                        xycoords=("data", "axes fraction"), rotation=90, fontsize=7, ha="center", va="top",
                        color="dimgrey")
    axes[0].legend(fontsize=8, loc="center left")
    fig.suptitle("6-layer sparse models: minimal circuit (f ≥ 0.9) against attention density; "
                 "dashed: the issue's targets")
    fig.tight_layout()
    return save(fig, stem)


def main() -> int:
    data = rows()
    if not data:
        print("no model has both files; run the studies and checks first", file=sys.stderr)
        return 1
    df = pd.DataFrame(data)
    df.to_csv(HERE / "6l_levers.csv", index=False)
    (HERE / "6l_levers.md").write_text(markdown(df))
    for p in figure(df, ROOT / "figures" / "levers_6l"):
        print(p)
    print(markdown(df))
    return 0


if __name__ == "__main__":
    sys.exit(main())
