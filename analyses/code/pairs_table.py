"""Minimal token-level circuits of one task, base against sparse models, from ``circuitkit pairs`` runs.

Each FOLDER is the --out of ``circuitkit pairs --minimal [--minimize]`` (summary.json); the first is the base.
Prints (and with --out writes) a markdown table: the ranked prefix with f >= threshold, the minimized circuit
where the run minimized, their heads, f, the pair mass at 80% / 90%, and base / sparse ratios.

  python analyses/code/pairs_table.py results/pairs-min/code-lm-copy-code-induction \
      results/pairs-min/code-lm-copy-sparse-code-induction --out analyses/code/code_induction_pairs_minimized.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from circuitkit.io import write_text


def load(folder: str) -> dict:
    path = Path(folder) / "summary.json"
    if not path.is_file():
        raise SystemExit(f"no summary.json in {folder}: give the --out folders of circuitkit pairs --minimal runs")
    s = json.loads(path.read_text())
    if "minimal_pairs" not in s:
        raise SystemExit(f"{path} has no minimal circuit: that run lacked --minimal")
    return s


def ratio(a, b) -> str:
    return f"{a / b:.2f}×" if a and b else "–"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", help="circuitkit pairs output folders, the base first")
    ap.add_argument("--out", help="also write the table to this markdown file")
    args = ap.parse_args()
    runs = [load(f) for f in args.folders]
    base = runs[0]
    b_prefix = base["prefix_pairs"] or base["minimal_pairs"]
    lines = ["| model | task | prompts | prefix pairs (f ≥ θ) | minimized pairs | f | heads | pairs at 80% / 90% of the "
             "mass | prefix ratio | minimized ratio | mass ratio 80% / 90% |", "|" + "---|" * 11]
    for s in runs:
        prefix = s["prefix_pairs"] or s["minimal_pairs"]
        minimized = s["minimal_pairs"] if s["prefix_pairs"] is not None else None
        pm, bpm = s["pair_mass"], base["pair_mass"]
        lines.append(
            f"| {Path(s['model']).name} | {s['task']} | {s['n_examples']} | {prefix} | {minimized if minimized else '–'} "
            f"| {s['minimal_f']:.3f} | {s['minimal_heads']} | {pm['k_at_80']} / {pm['k_at_90']} "
            f"| {ratio(b_prefix, prefix)} | {ratio(base['minimal_pairs'], s['minimal_pairs']) if minimized else '–'} "
            f"| {ratio(bpm['k_at_80'], pm['k_at_80'])} / {ratio(bpm['k_at_90'], pm['k_at_90'])} |")
    print("\n".join(lines))
    if args.out:  # atomically, as every file circuitkit writes
        write_text(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
