"""Share of each minimal circuit's edges that touch an MLP node (README, "What holds").

    python analyses/run/mlp_share.py [results/default]
"""

import sys
from pathlib import Path

from circuitkit.circuits.graph import Graph

folder = Path(sys.argv[1] if len(sys.argv) > 1 else "results/default") / "circuits"
for p in sorted(folder.glob("*.json")):
    names = Graph.load(p).edge_names()
    mlp = sum(1 for n in names if any(part.startswith("m") for part in n.split("->")))
    print(f"{p.stem:45s} edges={len(names):4d} touching an MLP={mlp / max(len(names), 1):.0%}")
