"""The "more tasks" lever at 6 layers: the five-task pair against the eight-task pair, task by task.

    python analyses/run/more_tasks_6l.py [--sparse toy-multitask-6l-more-sparse]
        # -> analyses/run/6l_more_compare.{md,csv}

The five-task pair is the default study's (toy-multitask-6l vs toy-multitask-6l-sparse-hp025: its rows of
``analyses/run/default_results.csv`` and, minimized, of ``analyses/run/minimized_results.csv``; its check
``analyses/sparsity/check_6l_hp025.json``). The eight-task pair is toy-multitask-6l-more (the five tasks and max,
progression, recall) vs the sparse model given, studied with the same settings by ``circuitkit run --config
analyses/run/6l_more<suffix>.toml`` (prefix) and ``analyses/run/6l_more<suffix>_minimized.toml`` (minimized), checked
by ``analyses/sparsity/check_sparse_zoo.py MODEL --n 2000`` (``analyses/sparsity/check_6l_more<suffix>.json``).
One row per (pair, task): kept edges (all prompts, and the task's), open heads, accuracy against the base, the
minimal circuit at f >= 0.9 (prefix and, where its study has been run, minimized) in edges and heads with its ratios.
A missing prefix study or check is an error that names the command that writes it; a missing minimized study leaves
its columns empty (the eight-task minimized studies take about an hour each on 1 thread).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from circuitkit.io import write_text

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
FIVE = ["addition", "induction", "ioi", "greater-than", "docstring"]
EIGHT = FIVE + ["max", "progression", "recall"]


def _need(path: Path, command: str) -> Path:
    if not path.exists():
        raise SystemExit(f"{path.relative_to(ROOT)} is missing; write it with: {command}")
    return path


def _study(path: Path, base: str, command: str, optional: bool = False) -> pd.DataFrame | None:
    if optional and not path.exists():
        print(f"{path.relative_to(ROOT)} is missing (made by: {command}); minimized columns left empty")
        return None
    t = pd.read_csv(_need(path, command))
    return t[t.base_model == base].set_index("task")


def pair_rows(label: str, base: str, tasks: list[str], prefix: pd.DataFrame, minimized: pd.DataFrame | None,
              check: dict) -> list[dict]:
    open_heads = sum(1 for layer in check["kept_edges_head"] for h in layer if h > 0)
    out = []
    for task in tasks:
        p = prefix.loc[task]
        if minimized is None:  # the prefix columns only; the minimized ones empty
            m = pd.Series(float("nan"), index=p.index)
        else:
            m = minimized.loc[task]
            if (int(m.base_prefix_edges), int(m.sparse_prefix_edges)) != (int(p.base_edges), int(p.sparse_edges)):
                raise SystemExit(f"{label} / {task}: the minimized study's prefixes ({int(m.base_prefix_edges)}, "
                                 f"{int(m.sparse_prefix_edges)}) are not the prefix study's circuits "
                                 f"({int(p.base_edges)}, {int(p.sparse_edges)}): the two studies were not made with "
                                 "the same settings")
        out.append({
            "pair": label, "task": task, "kept_edges": check["kept_edges"],
            "kept_edges_task": check["kept_edges_task"][task], "open_heads": open_heads,
            "accuracy_base": check["accuracy_base"][task], "accuracy": check["accuracy"][task],
            "base_edges": int(p.base_edges), "sparse_edges": int(p.sparse_edges), "edge_ratio": p.edge_ratio,
            "base_heads": int(p.base_heads), "sparse_heads": int(p.sparse_heads), "head_ratio": p.head_ratio,
            "base_edges_min": m.base_edges, "sparse_edges_min": m.sparse_edges, "edge_ratio_min": m.edge_ratio,
            "base_heads_min": m.base_heads, "sparse_heads_min": m.sparse_heads, "head_ratio_min": m.head_ratio,
            "min_f": pd.Series([p.base_f, p.sparse_f, m.base_f, m.sparse_f]).min(),
            "min_completeness": pd.Series([p.base_completeness, p.sparse_completeness, m.base_completeness,
                                           m.sparse_completeness]).min(),
        })
    return out


def markdown(df: pd.DataFrame) -> str:
    lines = ["| pair | task | kept edges (task's) | accuracy base → sparse | edges, prefix | ratio | heads | ratio "
             "| edges, minimized | ratio | heads | ratio |", "|" + "---|" * 12]

    def n(x) -> str:  # an edge or head count, or "–" where the minimized study was not run
        return "–" if pd.isna(x) else f"{int(x):,}"

    def ratio(x) -> str:
        return "–" if pd.isna(x) else f"{x:.3g}×"

    for r in df.itertuples():
        lines.append(
            f"| {r.pair} | {r.task} | {r.kept_edges:.2%} ({r.kept_edges_task:.2%}) | {r.accuracy_base:.2%} → "
            f"{r.accuracy:.2%} | {r.base_edges:,} → {r.sparse_edges:,} | {r.edge_ratio:.3g}× | {r.base_heads} → "
            f"{r.sparse_heads} | {r.head_ratio:.3g}× | {n(r.base_edges_min)} → {n(r.sparse_edges_min)} | "
            f"{ratio(r.edge_ratio_min)} | {n(r.base_heads_min)} → {n(r.sparse_heads_min)} | {ratio(r.head_ratio_min)} |")
    lines.append("")
    for label, g in df.groupby("pair", sort=False):
        five = g[g.task.isin(FIVE)]
        has_min = not five.edge_ratio_min.isna().any()
        lines.append(f"{label}: of the five shared tasks, edges ≥ 10× on {(five.edge_ratio >= 10).sum()} (minimized "
                     f"{(five.edge_ratio_min >= 10).sum() if has_min else '–'}), heads ≥ 2× on "
                     f"{(five.head_ratio >= 2).sum()} (minimized {(five.head_ratio_min >= 2).sum() if has_min else '–'}); "
                     f"open heads {g.open_heads.iloc[0]}; every circuit f ≥ "
                     f"{g.min_f.min():.3f}, completeness ≥ {g.min_completeness.min():.3f}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparse", default="toy-multitask-6l-more-sparse",
                    help="the eight-task sparse model; its files carry the suffix after toy-multitask-6l-more-sparse")
    args = ap.parse_args(argv)
    suffix = args.sparse.removeprefix("toy-multitask-6l-more-sparse").replace("-", "_")
    sparsity = ROOT / "analyses" / "sparsity"
    five = pair_rows(
        "five tasks (toy-multitask-6l-sparse-hp025)", "toy-multitask-6l", FIVE,
        _study(HERE / "default_results.csv", "toy-multitask-6l", "circuitkit run (analyses/run/default.toml)"),
        _study(HERE / "minimized_results.csv", "toy-multitask-6l", "circuitkit run --config analyses/run/minimized.toml"),
        json.loads(_need(sparsity / "check_6l_hp025.json", "python analyses/sparsity/check_sparse_zoo.py "
                         "toy-multitask-6l-sparse-hp025 --n 2000").read_text()))
    eight = pair_rows(
        f"eight tasks ({args.sparse})", "toy-multitask-6l-more", EIGHT,
        _study(HERE / f"6l_more{suffix}_results.csv", "toy-multitask-6l-more",
               f"circuitkit run --config analyses/run/6l_more{suffix}.toml"),
        _study(HERE / f"6l_more{suffix}_minimized_results.csv", "toy-multitask-6l-more",
               f"circuitkit run --config analyses/run/6l_more{suffix}_minimized.toml", optional=True),
        json.loads(_need(sparsity / f"check_6l_more{suffix}.json", "python analyses/sparsity/check_sparse_zoo.py "
                         f"{args.sparse} --n 2000").read_text()))
    df = pd.DataFrame(five + eight)
    name = f"6l_more{suffix}_compare"
    table = markdown(df)
    df.to_csv(HERE / f"{name}.csv", index=False)
    write_text(HERE / f"{name}.md", table)  # atomically, as every file circuitkit writes
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
