"""``circuitkit run``: the whole study — for each (base, sparse) model pair and task:
discover (eap-ig), verify, compare — written as one results folder with ``report.md``.

Owns the run config (TOML; defaults = the shipped zoo, :class:`RunConfig`), the
optional ``--retrain`` of the zoo, and the report. The science lives in the modules it
calls (the base-vs-sparse loop is :func:`circuitkit.evaluation.compare.study_pair`); this
file only orders the work and writes it down. The flags are in :mod:`circuitkit.commands.run`.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import pandas as pd

from circuitkit import CircuitkitError, plotting
from circuitkit.circuits.selection import MinimalRule
from circuitkit.evaluation.compare import (check_pair, check_results_folder, overlap_table, pair_table,
                                           position_table, study_pair, write_table)
from circuitkit.evaluation.pairs import PAPER_MASS_RATIOS, pair_row, study_pair_tokens
from circuitkit.evaluation.study import StudyConfig, TaskResult
from circuitkit.io import POSITIVE, TomlConfig, check_fields, check_keys, write_text
from circuitkit.models import ZOO_DIR
from circuitkit.sparsity.finetune import SparsifyConfig, finetune
from circuitkit.tasks import TOY_TASKS
from circuitkit.training import TrainConfig, train

REPO = Path(__file__).resolve().parent.parent
# how the circuits shrink with the size of the graph: one row per (pair, task)
RATIO_VS_SIZE_COLUMNS = ["base_model", "task", "graph_edges", "graph_heads", "n_prompts", "base_edges",
                         "sparse_edges", "edge_ratio", "base_heads", "sparse_heads", "head_ratio", "attn_edge_ratio",
                         "base_f", "sparse_f"]


@dataclass(frozen=True)
class Pair(TomlConfig):
    """One ``[[pairs]]`` entry: a base model, its sparse model and the tasks to compare them on."""

    base: str
    sparse: str
    tasks: tuple[str, ...]
    n: int | None = None  # prompts per task for this pair (default: the study's n)

    REQUIRED = frozenset({"base", "sparse", "tasks"})
    RANGES = {"n": POSITIVE}

    def check(self, source: str) -> None:
        if not self.tasks:
            raise CircuitkitError(f"{source}: tasks is empty; name at least one task, e.g. tasks = [\"addition\"]")


@dataclass(frozen=True)
class SparsityFigure:
    """A figure of the sparse post-training stage and the models it shows; the report links it
    only when the study looked at every one of them."""

    path: str  # relative to the repository
    models: tuple[str, ...]


@dataclass(frozen=True)
class RunConfig(TomlConfig):
    """What ``circuitkit run`` reads from TOML; every field, and those of ``[study]`` and each
    ``[[pairs]]``, is checked against its type (:class:`circuitkit.io.TomlConfig`)."""

    out: str = "results/default"
    study: StudyConfig = field(default_factory=StudyConfig)
    pairs: tuple[Pair, ...] = (
        Pair("toy-addition", "toy-addition-sparse", ("addition",)),
        Pair("toy-multitask", "toy-multitask-sparse", TOY_TASKS),
        Pair("toy-multitask-6l", "toy-multitask-6l-sparse-hp025", TOY_TASKS, n=50),  # see analyses/run/default.toml
        Pair("toy-addition-6l", "toy-addition-6l-sparse", ("addition",)),
    )
    figures: bool = True
    # figures of the sparse post-training stage, linked into the report when they exist and show studied models
    sparsity_figures: tuple[SparsityFigure, ...] = (
        SparsityFigure("figures/teaser_attention.png", ("toy-addition", "toy-addition-sparse")),
        # the sweep finetunes toy-addition with the recipe of toy-addition-sparse
        SparsityFigure("figures/sparsity_vs_capability.png", ("toy-addition", "toy-addition-sparse")),
    )
    # zoo configs rebuilt by --retrain, in order
    retrain: tuple[str, ...] = ("analyses/zoo/toy-addition.toml", "analyses/zoo/toy-multitask.toml",
                                "analyses/zoo/toy-multitask-6l.toml", "analyses/zoo/toy-addition-6l.toml",
                                "analyses/zoo/toy-addition-sparse.toml", "analyses/zoo/toy-multitask-sparse.toml",
                                "analyses/zoo/toy-multitask-6l-sparse.toml", "analyses/zoo/toy-addition-6l-sparse.toml")

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
        if "sparsity_figures" in raw:
            figs = []
            for f in raw.pop("sparsity_figures"):
                if not isinstance(f, dict) or set(f) != {"path", "models"}:
                    raise CircuitkitError(f"{source}: each sparsity_figures entry needs exactly path and models "
                                          f"(the models the figure shows), e.g. {{path = \"figures/x.png\", "
                                          f"models = [\"toy-addition\"]}}; got {f!r}")
                figs.append(SparsityFigure(str(f["path"]), tuple(f["models"])))
            kw["sparsity_figures"] = tuple(figs)
        check_fields(cls, raw, source)
        kw.update({k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
        return cls(**kw)


def retrain(cfg: RunConfig, progress: bool = True) -> None:
    """Rebuild the zoo from its configs (needs a checkout: the configs live in analyses/).

    The configs write outside the package (``models/NAME``); asked for explicitly here, each
    model replaces its shipped copy in ``circuitkit/zoo/NAME`` (``--out ... --force``).
    """
    for rel in cfg.retrain:
        path = REPO / rel
        if not path.exists():
            raise CircuitkitError(f"--retrain needs {rel}; run it from a checkout of the circuitkit repository")
        print(f"[retrain] {rel}", flush=True)
        out = ZOO_DIR / path.stem
        shown = out.resolve().relative_to(REPO).as_posix() if out.resolve().is_relative_to(REPO) else out
        flags = f"--config {rel} --out {shown} --force"
        if "sparse" in path.stem:
            finetune(SparsifyConfig.from_toml(path, out=str(out)), progress=progress,
                     command=f"circuitkit sparsify {flags}", force=True)
        else:
            train(TrainConfig.from_toml(path, out=str(out)), progress=progress, command=f"circuitkit train {flags}",
                  force=True)


def run(cfg: RunConfig, progress: bool = True, resume: bool = False, force: bool = False) -> Path:
    """Run the study; return the results folder. A folder that already holds a study is refused unless
    ``resume`` (each (model, task) result saved there under the same settings, model weights and prompts is
    reused; at the attention-pair level, the saved pair scores, from which the curves and the minimal pair
    circuit are computed again) or ``force`` (everything computed again)."""
    t0 = time.time()
    out = check_results_folder(cfg.out, resume, force)
    for pair in cfg.pairs:  # before any work: the models of each pair must share one graph
        check_pair(pair.base, pair.sparse)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[TaskResult]] = {}
    pair_rows: list[tuple[str, TaskResult, TaskResult]] = []
    token_panels: list[tuple[str, Any, Any]] = []  # (title, base PairResult, sparse PairResult)
    tables, position_tables = [], []
    for pair in cfg.pairs:
        study = cfg.study if pair.n is None else replace(cfg.study, n=pair.n)
        base, sparse = study_pair(pair.base, pair.sparse, pair.tasks, study, out, progress=progress, reuse=resume)
        results[Path(pair.base).name], results[Path(pair.sparse).name] = base, sparse
        table = pair_table(base, sparse)
        spec = base[0].scored.spec
        table.insert(0, "base_model", Path(pair.base).name)
        # the size of the whole graph the circuits are drawn from, and the prompts they were found on
        table.insert(2, "graph_edges", spec.n_real_edges)
        table.insert(3, "graph_heads", spec.n_layers * spec.n_heads)
        table.insert(4, "n_prompts", study.n)
        tables.append(table)
        pair_rows += [(f"{Path(pair.base).name}: {b.task}", b, s) for b, s in zip(base, sparse)]
        if "position" in study.levels:  # the position-resolved graph's minimal circuits
            ptable = position_table(base, sparse)
            ptable.insert(0, "base_model", Path(pair.base).name)
            ptable.insert(2, "n_prompts", study.n)
            position_tables.append(ptable)
        if "pairs" in study.levels:  # the token level: attention pairs (docs/method.md §10)
            for b, s in study_pair_tokens(pair.base, pair.sparse, pair.tasks, study.pair_method,
                                          study.pair_n or study.n, study.seed, study.threshold, study.batch_size,
                                          progress, minimal_rule=study.minimal, folder=out / "pairs",
                                          reuse=resume):
                token_panels.append((f"{b.model}: {b.scores.task}", b, s))
    main_table = pd.concat(tables, ignore_index=True)
    token_table = pd.DataFrame([pair_row(b, s) for _, b, s in token_panels]) if token_panels else None
    if token_table is not None:
        write_table(token_table, out / "token_pairs")
    positions = pd.concat(position_tables, ignore_index=True) if position_tables else None
    if positions is not None:
        write_table(positions, out / "token_positions")
    levels = level_table(main_table, positions, token_table)
    if levels is not None:
        write_table(levels, out / "token_levels")
    write_table(main_table, out / "base_vs_sparse")
    write_table(main_table[RATIO_VS_SIZE_COLUMNS], out / "ratio_vs_size")
    overlaps = {m: overlap_table(rs) for m, rs in results.items() if len(rs) > 1}
    for m, df in overlaps.items():
        write_table(df, out / f"task_overlap__{m}")
    figs: list[Path] = []
    if cfg.figures:
        figs += plotting.faithfulness_figure(pair_rows, out / "figures" / "faithfulness", cfg.study.threshold)
        figs += plotting.ratio_vs_size_figure(main_table, out / "figures" / "ratio_vs_size", cfg.study.threshold)
        for title, b, s in pair_rows:
            stem = f"circuit__{b.model}__{b.task}"
            figs += plotting.circuit_figure(b.minimal, s.minimal, out / "figures" / stem, title=b.task)
        if token_panels:
            figs += plotting.pair_mass_figure(token_panels, out / "figures" / "token_mass", cfg.study.threshold,
                                              PAPER_MASS_RATIOS)
    wall = time.time() - t0
    write_text(out / "report.md", report(cfg, main_table, overlaps, figs, out, wall, token_table, positions, levels))
    write_text(out / "run.json", json.dumps({"config": asdict(cfg), "wall_time_s": round(wall, 1)}, indent=2))
    return out


def level_table(main_table: pd.DataFrame, positions: pd.DataFrame | None,
                token_table: pd.DataFrame | None) -> pd.DataFrame | None:
    """The minimal circuits of every study level side by side, one row per (pair, task): component
    edges, position edges, attention pairs (base → sparse and the ratio); None at the component level alone."""
    if positions is None and token_table is None:
        return None
    keys = ["base_model", "task"]
    out = main_table[keys + ["base_edges", "sparse_edges", "edge_ratio"]]
    if positions is not None:
        out = out.merge(positions[keys + ["base_position_edges", "sparse_position_edges", "position_edge_ratio"]],
                        on=keys, how="left")
    if token_table is not None:
        out = out.merge(token_table[keys + ["base_minimal_pairs", "sparse_minimal_pairs", "minimal_pair_ratio"]],
                        on=keys, how="left")
    return out


def report(cfg: RunConfig, table, overlaps, figs: list[Path], out: Path, wall: float, token_table=None,
           positions=None, levels=None) -> str:
    s = cfg.study
    lines = ["# circuitkit study", "",
             f"Method `{s.method}` (IG steps {s.ig_steps}), ablation `{s.ablation}`, {s.n} prompts per task "
             f"(seed {s.seed}; a pair may set its own, see `n_prompts`), minimal circuit = fewest top-scoring edges with explained effect f ≥ {s.threshold}"
             + ("; then minimized: every edge (position edge, attention pair) it does not need dropped, until each "
                "one left is needed (`*_prefix_*` columns: the sizes before). "
                if MinimalRule.parse(s.minimal) is MinimalRule.MINIMIZED else ". ") +
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
    if levels is not None:
        lines += ["## Token level beside component level", "",
                  f"Minimal circuits (f ≥ {s.threshold}) of each level, base → sparse: `edge_ratio` counts component "
                  "edges (summed over positions), `position_edge_ratio` edges at single token positions (every edge "
                  "at every position, scored with the study's method and ablation), `minimal_pair_ratio` attention "
                  "pairs (layer, head, query, key) with every other pair removed from the pattern.", "",
                  levels.to_markdown(index=False, floatfmt=".3g"), ""]
    if positions is not None:
        lines += ["## Token level: position-resolved edges", "",
                  f"`{s.method}` scores every edge `u@p -> v@p` (sender output at position p into the receiver's "
                  f"input at p); minimal circuit = fewest top-scoring position edges with f ≥ {s.threshold} "
                  "(the component level's search, dangling edges removed across positions). `positions` = token "
                  "positions with at least one circuit edge; completeness as above.", "",
                  positions.to_markdown(index=False, floatfmt=".3g"), ""]
    if token_table is not None:
        lines += ["## Token level: attention pairs", "",
                  f"Pairs scored `{s.pair_method}` on {s.pair_n or s.n} prompts per task (docs/method.md §10). `pairs_ratio_80` = base ÷ sparse number of "
                  "top pairs holding 80% of the total |attribution| (`heads_*`: heads, a head's score = Σ |pair "
                  f"scores|; the paper: {PAPER_MASS_RATIOS['pairs']}× and {PAPER_MASS_RATIOS['heads']}× on GPT-2); "
                  f"`minimal_pair_ratio` = base ÷ sparse fewest top pairs with f ≥ {s.threshold}, every other pair "
                  "removed from the pattern.", "", token_table.to_markdown(index=False, floatfmt=".3g"), ""]
    for m, df in overlaps.items():
        lines += [f"## Tasks sharing circuit parts in `{m}`", "", df.to_markdown(index=False, floatfmt=".3g"), ""]
    if figs:
        lines += ["## Figures", ""]
        for f in figs:
            if f.suffix == ".png":
                lines.append(f"![{f.stem}]({f.relative_to(out).as_posix()})")
        lines.append("")
    linked = []
    studied = {Path(name).name for pair in cfg.pairs for name in (pair.base, pair.sparse)}
    for fig in cfg.sparsity_figures:
        src = REPO / fig.path
        if src.exists() and studied.issuperset(fig.models):
            dst = out / "figures" / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            linked.append(f"![{src.stem}]({dst.relative_to(out).as_posix()})")
    if linked:
        lines += ["## Sparse post-training", "", *linked, ""]
    lines += ["Circuits: `circuits/<model>__<task>.json`; per-task summaries with the curves: `summaries/`."
              + (" Attention-pair scores (`PairScores.load`) and the pair-level curves: "
                 "`pairs/<model>__<task>.{safetensors,json}`." if token_table is not None else ""), ""]
    return "\n".join(lines)
