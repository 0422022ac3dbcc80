"""``circuitkit run``: the whole study — for each (base, sparse) model pair and task:
discover (eap-ig), verify, compare — written as one results folder with ``report.md``.

Owns the run config (TOML; defaults = the shipped zoo, :data:`DEFAULT_CONFIG`), the
optional ``--retrain`` of the zoo, and the report. The science lives in the modules it
calls; this file only orders the work and writes it down.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from circuitkit import CircuitkitError
from circuitkit.circuits.graph import GraphSpec
from circuitkit.evaluation.compare import overlap_table, pair_table, save_result, write_table
from circuitkit.evaluation.study import StudyConfig, TaskResult, analyse
from circuitkit.io import check_keys, read_toml, write_text
from circuitkit.tasks import TOY_TASKS

REPO = Path(__file__).resolve().parent.parent
# how the circuits shrink with the size of the graph: one row per (pair, task)
RATIO_VS_SIZE_COLUMNS = ["base_model", "task", "graph_edges", "graph_heads", "n_prompts", "base_edges",
                         "sparse_edges", "edge_ratio", "base_heads", "sparse_heads", "head_ratio", "attn_edge_ratio",
                         "base_f", "sparse_f"]


@dataclass(frozen=True)
class Pair:
    base: str
    sparse: str
    tasks: tuple[str, ...]
    n: int | None = None  # prompts per task for this pair (default: the study's n)


@dataclass(frozen=True)
class RunConfig:
    out: str = "results/default"
    study: StudyConfig = field(default_factory=StudyConfig)
    pairs: tuple[Pair, ...] = (
        Pair("toy-addition", "toy-addition-sparse", ("addition",)),
        Pair("toy-multitask", "toy-multitask-sparse", TOY_TASKS),
        Pair("toy-multitask-6l", "toy-multitask-6l-sparse", TOY_TASKS),
    )
    figures: bool = True
    # figures of the sparse post-training stage, linked into the report when they exist
    sparsity_figures: tuple[str, ...] = ("figures/teaser_attention.png", "figures/sparsity_vs_capability.png")
    # zoo configs rebuilt by --retrain, in order
    retrain: tuple[str, ...] = ("analyses/zoo/toy-addition.toml", "analyses/zoo/toy-multitask.toml",
                                "analyses/zoo/toy-multitask-6l.toml", "analyses/zoo/toy-addition-sparse.toml",
                                "analyses/zoo/toy-multitask-sparse.toml", "analyses/zoo/toy-multitask-6l-sparse.toml")

    @classmethod
    def from_toml(cls, path: str | Path) -> "RunConfig":
        return cls.from_dict(read_toml(path), str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "RunConfig":
        raw = dict(raw)
        check_keys(raw, {f.name for f in fields(cls)}, source=source)
        study = raw.pop("study", {})
        check_keys(study, {f.name for f in fields(StudyConfig)}, source=f"{source} [study]")
        kw: dict[str, Any] = {"study": StudyConfig(**study)}
        if "pairs" in raw:
            pairs = []
            for p in raw.pop("pairs"):
                if not {"base", "sparse", "tasks"} <= set(p) <= {"base", "sparse", "tasks", "n"}:
                    raise CircuitkitError(f"{source}: each [[pairs]] needs base, sparse and tasks (and optionally n, "
                                          f"the prompts per task for that pair); got {sorted(p)}")
                n = p.get("n")
                if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n <= 0):
                    raise CircuitkitError(f"{source}: [[pairs]] n must be a positive integer, got {n!r}")
                pairs.append(Pair(p["base"], p["sparse"], tuple(p["tasks"]), n))
            if not pairs:
                raise CircuitkitError(f"{source}: [[pairs]] is empty; name at least one base/sparse model pair")
            kw["pairs"] = tuple(pairs)
        for k in ("sparsity_figures", "retrain"):
            if k in raw:
                kw[k] = tuple(raw.pop(k))
        kw.update(raw)
        return cls(**kw)


def retrain(cfg: RunConfig, progress: bool = True) -> None:
    """Rebuild the zoo from its configs (needs a checkout: the configs live in analyses/)."""
    from circuitkit.sparsity import finetune
    from circuitkit.training import TrainConfig, train

    for rel in cfg.retrain:
        path = REPO / rel
        if not path.exists():
            raise CircuitkitError(f"--retrain needs {rel}; run it from a checkout of the circuitkit repository")
        print(f"[retrain] {rel}", flush=True)
        if "sparse" in path.stem:
            finetune.finetune(finetune.SparsifyConfig.from_toml(path), progress=progress,
                              command=f"circuitkit sparsify --config {rel}")
        else:
            train(TrainConfig.from_toml(path), progress=progress, command=f"circuitkit train --config {rel}")


def run(cfg: RunConfig, progress: bool = True) -> Path:
    """Run the study; return the results folder."""
    from circuitkit.models import load_model
    from circuitkit.tasks import task_for_model

    t0 = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[TaskResult]] = {}
    pair_rows: list[tuple[str, TaskResult, TaskResult]] = []
    tables = []
    for pair in cfg.pairs:
        per_role = {}
        study = cfg.study if pair.n is None else replace(cfg.study, n=pair.n)
        for role, name in (("base", pair.base), ("sparse", pair.sparse)):
            model = load_model(name)
            label = Path(name).name
            if role == "base":
                spec = GraphSpec.from_model(model)
            rs = []
            for task in pair.tasks:
                t = time.time()
                ds = task_for_model(task, model).dataset(study.n, seed=study.seed)
                r = analyse(model, label, ds, study)
                save_result(r, out)
                rs.append(r)
                if progress:
                    print(f"  {label:24s} {task:13s} edges={r.n_edges:4d} heads={r.minimal.n_heads:2d} "
                          f"f={r.f_minimal:.3f} completeness={r.completeness:.3f} ({time.time() - t:.1f}s)", flush=True)
            results[label] = rs
            per_role[role] = rs
        table = pair_table(per_role["base"], per_role["sparse"])
        table.insert(0, "base_model", Path(pair.base).name)
        # the size of the whole graph the circuits are drawn from, and the prompts they were found on
        table.insert(2, "graph_edges", spec.n_real_edges)
        table.insert(3, "graph_heads", spec.n_layers * spec.n_heads)
        table.insert(4, "n_prompts", study.n)
        tables.append(table)
        pair_rows += [(f"{Path(pair.base).name}: {b.task}", b, s) for b, s in zip(per_role["base"], per_role["sparse"])]
    import pandas as pd

    main_table = pd.concat(tables, ignore_index=True)
    write_table(main_table, out / "base_vs_sparse")
    write_table(main_table[RATIO_VS_SIZE_COLUMNS], out / "ratio_vs_size")
    overlaps = {m: overlap_table(rs) for m, rs in results.items() if len(rs) > 1}
    for m, df in overlaps.items():
        write_table(df, out / f"task_overlap__{m}")
    figs: list[Path] = []
    if cfg.figures:
        from circuitkit import plotting

        figs += plotting.faithfulness_figure(pair_rows, out / "figures" / "faithfulness", cfg.study.threshold)
        figs += plotting.ratio_vs_size_figure(main_table, out / "figures" / "ratio_vs_size", cfg.study.threshold)
        for title, b, s in pair_rows:
            stem = f"circuit__{b.model}__{b.task}"
            figs += plotting.circuit_figure(b.minimal, s.minimal, out / "figures" / stem, title=b.task)
    wall = time.time() - t0
    write_text(out / "report.md", report(cfg, main_table, overlaps, figs, out, wall))
    write_text(out / "run.json", json.dumps({"config": asdict(cfg), "wall_time_s": round(wall, 1)}, indent=2))
    return out


def report(cfg: RunConfig, table, overlaps, figs: list[Path], out: Path, wall: float) -> str:
    s = cfg.study
    lines = ["# circuitkit study", "",
             f"Method `{s.method}` (IG steps {s.ig_steps}), ablation `{s.ablation}`, {s.n} prompts per task "
             f"(seed {s.seed}; a pair may set its own, see `n_prompts`), minimal circuit = fewest top-scoring edges with explained effect f ≥ {s.threshold}. "
             f"Wall time {wall:.0f} s.", "",
             "## Base vs sparse: minimal circuits", "",
             "`edge_ratio` = base edges ÷ sparse edges; `head_ratio` likewise for the heads the minimal edge "
             "circuit touches; `attn_edges` = circuit edges with an attention head at either end (the rest — "
             "input, MLP and logits edges — form a backbone that attention gates cannot remove). Completeness = "
             "share of the effect removed when the circuit is knocked out of the full model; minimality = "
             "share of circuit edges whose single removal lowers f by more than "
             f"{s.minimality_eps}"
             + (f" (estimated on {s.minimality_max_edges} edges drawn at random for larger circuits)."
                if s.minimality_max_edges else "."), "",
             table.to_markdown(index=False, floatfmt=".3g"), ""]
    for m, df in overlaps.items():
        lines += [f"## Tasks sharing circuit parts in `{m}`", "", df.to_markdown(index=False, floatfmt=".3g"), ""]
    if figs:
        lines += ["## Figures", ""]
        for f in figs:
            if f.suffix == ".png":
                lines.append(f"![{f.stem}]({f.relative_to(out).as_posix()})")
        lines.append("")
    linked = []
    for rel in cfg.sparsity_figures:
        src = REPO / rel
        if src.exists():
            dst = out / "figures" / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            linked.append(f"![{src.stem}]({dst.relative_to(out).as_posix()})")
    if linked:
        lines += ["## Sparse post-training", "", *linked, ""]
    lines += ["Circuits: `circuits/<model>__<task>.json`; per-task summaries with the curves: `summaries/`.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="run config TOML (default: the shipped zoo, see analyses/run/default.toml)")
    p.add_argument("--out", help="results folder (overrides the config)")
    p.add_argument("--retrain", action="store_true", help="rebuild the zoo from analyses/zoo/*.toml first")
    p.add_argument("--no-progress", action="store_true")


def run_cli(args: argparse.Namespace) -> int:
    cfg = RunConfig.from_toml(args.config) if args.config else RunConfig()
    if args.out:
        cfg = RunConfig(**{**{f.name: getattr(cfg, f.name) for f in fields(cfg)}, "out": args.out})
    if args.retrain:
        retrain(cfg, progress=not args.no_progress)
    out = run(cfg, progress=not args.no_progress)
    print(f"report: {out / 'report.md'}")
    return 0
