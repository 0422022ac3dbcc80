"""``circuitkit curves``: the course of sparse runs from their step logs — kept edges and training CE
against step, and the in-run held-out evaluations as a trade-off (held-out CE against kept edges).

Why: a sparse run's own evaluations are the quickest read of where along the run a CE bound is
met at the fewest edges, which is how one picks a stopping point or the next lever. Reads only
``log.jsonl`` (and, once a run is finished, its model card for the held-out bound), so it works
on a run that is still going.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pandas as pd

from circuitkit import CircuitkitError
from circuitkit.io import write_text
from circuitkit.models import CARD_FILE
from circuitkit.plotting import training_curves_figure
from circuitkit.training import read_run_log


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders of `circuitkit sparsify` (run_dir)")
    p.add_argument("--labels", help="comma-separated labels, one per run (default: the folders' names)")
    p.add_argument("--out", help="figure stem: writes STEM.png and STEM.svg (default: RUN_DIR/curves of the first)")
    p.add_argument("--table", help="also write the held-out evaluations as a markdown table to this file")
    p.add_argument("--since", type=int, default=0, metavar="STEP",
                   help="draw and list only the steps after this one (e.g. where a resumed lever began)")
    p.add_argument("--smooth", type=int, default=50, help="rolling window of the training-CE curve (default 50)")


def finished_card(run_dir: Path) -> dict[str, Any] | None:
    """The card of the model a run in ``run_dir`` wrote (its config's ``out``), once it is finished."""
    try:
        cfg = json.loads((run_dir / "config.json").read_text())
        return json.loads((Path(cfg["out"]) / CARD_FILE).read_text())
    except (OSError, KeyError, ValueError):
        return None


def heldout_bound(card: dict[str, Any] | None) -> float | None:
    """A finished model's held-out CE bound (its card's criterion): a corpus run's
    ``heldout_target_ce``, or a run's single ``target_ce`` (per-task runs have none); else None."""
    bound = (card or {}).get("heldout_target_ce", (card or {}).get("target_ce"))
    return float(bound) if isinstance(bound, (int, float)) else None


def final_point(card: dict[str, Any] | None) -> dict[str, Any] | None:
    """A finished model's card as one evaluation: ``step``, ``kept_edges``, held-out ``ce`` and each
    task's held-out ``accuracy`` where the card has them, measured as the card measures."""
    if not card or not isinstance(card.get("heldout_ce"), (int, float)) or card.get("kept_edges") is None:
        return None
    acc = {t: v["accuracy"] for t, v in (card.get("heldout") or {}).items()
           if isinstance(v, dict) and "accuracy" in v}
    return {"step": int(card["steps"]), "kept_edges": float(card["kept_edges"]), "ce": float(card["heldout_ce"]),
            "accuracy": acc}


def evaluation_table(label: str, records: list[dict[str, Any]], bound: float | None,
                     final: dict[str, Any] | None = None) -> pd.DataFrame:
    """One row per in-run held-out evaluation: step, held-out CE, kept edges (%), each task's
    accuracy where logged, and whether the CE is within ``bound``; the finished model's card
    (``final``, from :func:`final_point`) as a last row marked ``card``."""
    points = [dict(r["eval"], step=r["step"], source="log") for r in records if isinstance(r.get("eval"), dict)]
    if final is not None:
        points.append(dict(final, source="card"))
    rows = []
    for e in points:
        row = {"run": label, "step": e["step"], "heldout_ce": e["ce"], "kept_edges_pct": 100 * e["kept_edges"]}
        row.update({f"acc_{t}": a for t, a in (e.get("accuracy") or {}).items()})
        row["source"] = e["source"]
        if bound is not None:
            row["within_bound"] = "yes" if e["ce"] <= bound else "no"
        rows.append(row)
    return pd.DataFrame(rows)


def run_cli(args: argparse.Namespace) -> int:
    if args.smooth < 1:
        raise CircuitkitError(f"--smooth must be a positive number of steps, got {args.smooth}")
    dirs = [Path(d) for d in args.run_dirs]
    labels = [x.strip() for x in args.labels.split(",")] if args.labels else [d.name for d in dirs]
    if len(labels) != len(dirs):
        raise CircuitkitError(f"--labels gives {len(labels)} labels for {len(dirs)} runs; give one per run")
    runs, tables = [], []
    for d, label in zip(dirs, labels):
        logged = read_run_log(d)
        records = [r for r in logged if r["step"] > args.since]
        if not records:
            raise CircuitkitError(f"{d}: no steps after --since {args.since}; its log ends at step "
                                  f"{logged[-1]['step']}")
        if "attn_hard_mean" not in records[0]:
            raise CircuitkitError(f"{d} is not a sparse run with attention gates (its log has no kept-edge "
                                  "densities); give the run_dir of a `circuitkit sparsify` run")
        card = finished_card(d)
        bound, final = heldout_bound(card), final_point(card)
        runs.append((label, records, bound, final))
        tables.append(evaluation_table(label, records, bound, final))
    stem = Path(args.out) if args.out else dirs[0] / "curves"
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = training_curves_figure(runs, stem, smooth=args.smooth)
    table = pd.concat(tables, ignore_index=True)
    text = (table.to_markdown(index=False, floatfmt=".4g") if len(table)
            else "(no held-out evaluations in these logs yet: they come every eval_every steps)")
    print(text)
    if args.table:
        write_text(Path(args.table), text + "\n")
    print("wrote " + ", ".join(map(str, paths)))
    return 0
