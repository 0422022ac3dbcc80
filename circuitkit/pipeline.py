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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from circuitkit import CircuitkitError
from circuitkit.evaluation.compare import check_pair, overlap_table, pair_table, save_result, write_table
from circuitkit.evaluation.study import StudyConfig, TaskResult, analyse
from circuitkit.io import TomlConfig, check_fields, check_keys, check_writable_dir, write_text
from circuitkit.tasks import TOY_TASKS

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Pair(TomlConfig):
    """One ``[[pairs]]`` entry: a base model, its sparse model and the tasks to compare them on."""

    base: str
    sparse: str
    tasks: tuple[str, ...]

    REQUIRED = frozenset({"base", "sparse", "tasks"})

    def check(self, source: str) -> None:
        if not self.tasks:
            raise CircuitkitError(f"{source}: tasks is empty; name at least one task, e.g. tasks = [\"addition\"]")


@dataclass(frozen=True)
class RunConfig(TomlConfig):
    """What ``circuitkit run`` reads from TOML; every field, and those of ``[study]`` and each
    ``[[pairs]]``, is checked against its type (:class:`circuitkit.io.TomlConfig`)."""

    out: str = "results/default"
    study: StudyConfig = field(default_factory=StudyConfig)
    pairs: tuple[Pair, ...] = (
        Pair("toy-addition", "toy-addition-sparse", ("addition",)),
        Pair("toy-multitask", "toy-multitask-sparse", TOY_TASKS),
    )
    figures: bool = True
    # figures of the sparse post-training stage, linked into the report when they exist
    sparsity_figures: tuple[str, ...] = ("figures/teaser_attention.png", "figures/sparsity_vs_capability.png")
    # zoo configs rebuilt by --retrain, in order
    retrain: tuple[str, ...] = ("analyses/zoo/toy-addition.toml", "analyses/zoo/toy-multitask.toml",
                                "analyses/zoo/toy-addition-sparse.toml", "analyses/zoo/toy-multitask-sparse.toml")

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "RunConfig":
        check_keys(raw, {f.name for f in fields(cls)}, source=source)
        raw = dict(raw)
        kw: dict[str, Any] = {"study": StudyConfig.from_dict(raw.pop("study", {}), source=f"{source} [study]")}
        if "pairs" in raw:
            pairs = raw.pop("pairs")
            if not isinstance(pairs, list) or not pairs:
                raise CircuitkitError(f"{source}: [[pairs]] must list at least one base/sparse model pair")
            kw["pairs"] = tuple(Pair.from_dict(p, source=f"{source} [[pairs]] #{i + 1}") for i, p in enumerate(pairs))
        check_fields(cls, raw, source)
        kw.update({k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
        return cls(**kw)


def retrain(cfg: RunConfig, progress: bool = True) -> None:
    """Rebuild the zoo from its configs (needs a checkout: the configs live in analyses/).

    The configs write outside the package (``models/NAME``); asked for explicitly here, each
    model replaces its shipped copy in ``circuitkit/zoo/NAME`` (``--out ... --force``).
    """
    from circuitkit.models import ZOO_DIR
    from circuitkit.sparsity import finetune
    from circuitkit.training import TrainConfig, train

    for rel in cfg.retrain:
        path = REPO / rel
        if not path.exists():
            raise CircuitkitError(f"--retrain needs {rel}; run it from a checkout of the circuitkit repository")
        print(f"[retrain] {rel}", flush=True)
        out = ZOO_DIR / path.stem
        shown = out.resolve().relative_to(REPO).as_posix() if out.resolve().is_relative_to(REPO) else out
        flags = f"--config {rel} --out {shown} --force"
        if "sparse" in path.stem:
            finetune.finetune(finetune.SparsifyConfig.from_toml(path, out=str(out)), progress=progress,
                              command=f"circuitkit sparsify {flags}", force=True)
        else:
            train(TrainConfig.from_toml(path, out=str(out)), progress=progress, command=f"circuitkit train {flags}",
                  force=True)


def run(cfg: RunConfig, progress: bool = True) -> Path:
    """Run the study; return the results folder."""
    from circuitkit.models import load_model
    from circuitkit.tasks import task_for_model

    t0 = time.time()
    out = check_writable_dir(cfg.out, "the results folder (out)")
    for pair in cfg.pairs:  # before any work: the models of each pair must share one graph
        check_pair(pair.base, pair.sparse)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[TaskResult]] = {}
    pair_rows: list[tuple[str, TaskResult, TaskResult]] = []
    tables = []
    for pair in cfg.pairs:
        per_role = {}
        for role, name in (("base", pair.base), ("sparse", pair.sparse)):
            model = load_model(name)
            label = Path(name).name
            rs = []
            for task in pair.tasks:
                t = time.time()
                ds = task_for_model(task, model).dataset(cfg.study.n, seed=cfg.study.seed)
                r = analyse(model, label, ds, cfg.study)
                save_result(r, out)
                rs.append(r)
                if progress:
                    print(f"  {label:24s} {task:13s} edges={r.n_edges:4d} heads={r.minimal.n_heads:2d} "
                          f"f={r.f_minimal:.3f} completeness={r.completeness:.3f} ({time.time() - t:.1f}s)", flush=True)
            results[label] = rs
            per_role[role] = rs
        table = pair_table(per_role["base"], per_role["sparse"])
        table.insert(0, "base_model", Path(pair.base).name)
        tables.append(table)
        pair_rows += [(f"{Path(pair.base).name}: {b.task}", b, s) for b, s in zip(per_role["base"], per_role["sparse"])]
    import pandas as pd

    main_table = pd.concat(tables, ignore_index=True)
    write_table(main_table, out / "base_vs_sparse")
    overlaps = {m: overlap_table(rs) for m, rs in results.items() if len(rs) > 1}
    for m, df in overlaps.items():
        write_table(df, out / f"task_overlap__{m}")
    figs: list[Path] = []
    if cfg.figures:
        from circuitkit import plotting

        figs += plotting.faithfulness_figure(pair_rows, out / "figures" / "faithfulness", cfg.study.threshold)
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
             f"(seed {s.seed}), minimal circuit = fewest top-scoring edges with explained effect f ≥ {s.threshold}. "
             f"Wall time {wall:.0f} s.", "",
             "## Base vs sparse: minimal circuits", "",
             "`edge_ratio` = base edges ÷ sparse edges; `head_ratio` likewise for the heads the minimal edge "
             "circuit touches; `attn_edges` = circuit edges with an attention head at either end (the rest — "
             "input, MLP and logits edges — form a backbone that attention gates cannot remove). Completeness = "
             "share of the effect removed when the circuit is knocked out of the full model; minimality = "
             "share of circuit edges whose single removal lowers f by more than "
             f"{s.minimality_eps}.", "",
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
    check_writable_dir(cfg.out, "the results folder (--out)")
    if args.retrain:
        retrain(cfg, progress=not args.no_progress)
    out = run(cfg, progress=not args.no_progress)
    print(f"report: {out / 'report.md'}")
    return 0
