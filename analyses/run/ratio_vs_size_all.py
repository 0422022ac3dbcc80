"""Ratio against graph size with every pair size: the default study's rows and the 8-layer pair's (issue 12).

    python analyses/run/ratio_vs_size_all.py     # -> figures/ratio_vs_size_all.{png,svg}, analyses/run/ratio_vs_size_all.{csv,md}

The default study (`circuitkit run`) draws figures/ratio_vs_size from its own pairs (4 and 6 layers); the 8-layer
pair has its own study (analyses/run/8l.toml, 13 minutes on 1 thread), which would take the default run past its
15 minutes. This script puts the two committed tables together (analyses/run/default_results.csv and
analyses/run/8l_results.csv, both written by `circuitkit run` with the same settings and 50 prompts per task for the
6- and 8-layer pairs) and draws them with the study's own figure function.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from circuitkit import plotting
from circuitkit.evaluation.compare import write_table
from circuitkit.pipeline import RATIO_VS_SIZE_COLUMNS

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def main() -> None:
    table = pd.concat([pd.read_csv(HERE / "default_results.csv"), pd.read_csv(HERE / "8l_results.csv")],
                      ignore_index=True)[RATIO_VS_SIZE_COLUMNS]
    write_table(table, HERE / "ratio_vs_size_all")
    for path in plotting.ratio_vs_size_figure(table, ROOT / "figures" / "ratio_vs_size_all"):
        print(f"wrote {path}")
    med = table.groupby(["graph_edges", "graph_heads"])[["edge_ratio", "head_ratio"]].median()
    print(med.to_string())


if __name__ == "__main__":
    main()
