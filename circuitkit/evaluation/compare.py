"""Comparison tables: base vs sparse per task, and tasks against each other within a model.

Owns the columns of the paper's headline table (minimal-circuit edges and heads and their
ratios, CPR/CMD, completeness, minimality, base/sparse overlap), those of the position-level
table (:data:`POSITION_COLUMNS`, when the study's levels include it) and the one loop that
analyses a base and a sparse model task by task (:func:`study_pair`), which both
``circuitkit compare`` and ``circuitkit run`` use, with the results folder it writes into: one
result per (model, task) saved as soon as it is done (:func:`save_result`), read back by ``--resume``
when its key still holds (:func:`load_result`), and a used folder refused without ``--resume`` or
``--force`` (:func:`check_results_folder`). Tables are pandas DataFrames, written as CSV and
markdown; the flags are in :mod:`circuitkit.commands.compare`.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Sequence

import pandas as pd
from tqdm.auto import tqdm

from circuitkit import CircuitkitError
from circuitkit.circuits.graph import Graph
from circuitkit.circuits.positions import PositionGraph
from circuitkit.evaluation.study import StudyConfig, TaskResult, analyse, jaccard, result_key
from circuitkit.io import check_writable_dir, read_json, write_json, write_text
from circuitkit.models import load_card
from circuitkit.sparsity import load_model, model_fingerprint
from circuitkit.tasks import task_for_model

PAIR_COLUMNS = ["task", "base_edges", "sparse_edges", "edge_ratio", "base_heads", "sparse_heads", "head_ratio",
                "base_attn_edges", "sparse_attn_edges", "attn_edge_ratio",
                "base_f", "sparse_f", "base_cpr", "sparse_cpr", "base_cmd", "sparse_cmd",
                "base_completeness", "sparse_completeness", "base_minimality", "sparse_minimality",
                "edge_jaccard", "head_jaccard"]
# the position level (study levels include "position"): minimal circuits of the position-resolved graph
POSITION_COLUMNS = ["task", "position_graph_edges", "base_position_edges", "sparse_position_edges",
                    "position_edge_ratio", "base_position_heads", "sparse_position_heads", "base_positions",
                    "sparse_positions", "base_position_f", "sparse_position_f", "base_position_completeness",
                    "sparse_position_completeness", "position_edge_jaccard"]
# with the "minimized" rule (StudyConfig.minimal): the size of the top-scoring prefix each minimal circuit started from
PREFIX_COLUMNS = ["base_prefix_edges", "sparse_prefix_edges"]
POSITION_PREFIX_COLUMNS = ["base_position_prefix_edges", "sparse_position_prefix_edges"]
OVERLAP_COLUMNS = ["model", "task_a", "task_b", "edges_a", "edges_b", "shared_edges", "edge_jaccard",
                   "heads_a", "heads_b", "shared_heads", "head_jaccard"]


def _ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None:
        return float("nan")
    return float("inf") if b == 0 else a / b


# What must agree for two models' circuits to be compared edge by edge (the same graph).
GRAPH_FIELDS = ("n_layers", "n_heads", "attn_only", "parallel_attn_mlp")


def _graph_shape(cfg) -> dict:
    get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
    return {k: get(k, False if k in ("attn_only", "parallel_attn_mlp") else None) for k in GRAPH_FIELDS}


def check_comparable(base_cfg, sparse_cfg, base: str, sparse: str) -> None:
    """Refuse, before any analysis, two models whose circuit graphs differ (their edges would not
    line up). ``*_cfg``: a ``HookedTransformerConfig`` or a card's ``config`` dict."""
    a, b = _graph_shape(base_cfg), _graph_shape(sparse_cfg)
    if a != b:
        diff = ", ".join(f"{k} {a[k]} vs {b[k]}" for k in GRAPH_FIELDS if a[k] != b[k])
        raise CircuitkitError(f"cannot compare {base} with {sparse}: their circuit graphs differ ({diff}); a sparse "
                              "model is compared with the base model it was post-trained from")


def check_pair(base: str, sparse: str) -> None:
    """:func:`check_comparable` from the two cards, without loading weights (pretrained names,
    which have no card, are checked once loaded)."""

    cards = load_card(base), load_card(sparse)
    if all("config" in c for c in cards):
        check_comparable(cards[0]["config"], cards[1]["config"], base, sparse)


def pair_row(base: TaskResult, sparse: TaskResult) -> dict:
    """One row of the base-vs-sparse table. Heads: heads in the minimal edge circuit."""
    if base.task != sparse.task:
        raise CircuitkitError(f"cannot compare task {base.task!r} with {sparse.task!r}")
    return {"task": base.task, "base_edges": base.n_edges, "sparse_edges": sparse.n_edges,
            "edge_ratio": _ratio(base.n_edges, sparse.n_edges),
            "base_heads": base.minimal.n_heads, "sparse_heads": sparse.minimal.n_heads,
            "head_ratio": _ratio(base.minimal.n_heads, sparse.minimal.n_heads),
            "base_attn_edges": base.minimal.n_attention_edges, "sparse_attn_edges": sparse.minimal.n_attention_edges,
            "attn_edge_ratio": _ratio(base.minimal.n_attention_edges, sparse.minimal.n_attention_edges),
            "base_f": base.f_minimal, "sparse_f": sparse.f_minimal,
            "base_cpr": base.cpr, "sparse_cpr": sparse.cpr, "base_cmd": base.cmd, "sparse_cmd": sparse.cmd,
            "base_completeness": base.completeness, "sparse_completeness": sparse.completeness,
            "base_minimality": base.minimality, "sparse_minimality": sparse.minimality,
            "edge_jaccard": jaccard(base.minimal.in_graph, sparse.minimal.in_graph),
            "head_jaccard": jaccard(_heads(base), _heads(sparse)),
            "base_prefix_edges": base.prefix_edges, "sparse_prefix_edges": sparse.prefix_edges}


def position_row(base: TaskResult, sparse: TaskResult) -> dict:
    """One row of the position-level base-vs-sparse table (both results need their position level)."""
    if base.task != sparse.task:
        raise CircuitkitError(f"cannot compare task {base.task!r} with {sparse.task!r}")
    b, s = base.position, sparse.position
    if b is None or s is None:
        raise CircuitkitError(f"task {base.task!r} has no position-level result; add \"position\" to the study's levels")
    return {"task": base.task, "position_graph_edges": b.minimal.n_real_edges,
            "base_position_edges": b.n_edges, "sparse_position_edges": s.n_edges,
            "position_edge_ratio": _ratio(b.n_edges, s.n_edges),
            "base_position_heads": b.minimal.n_heads, "sparse_position_heads": s.minimal.n_heads,
            "base_positions": b.n_positions, "sparse_positions": s.n_positions,
            "base_position_f": b.f_minimal, "sparse_position_f": s.f_minimal,
            "base_position_completeness": b.completeness, "sparse_position_completeness": s.completeness,
            "position_edge_jaccard": jaccard(b.minimal.in_graph, s.minimal.in_graph),
            "base_position_prefix_edges": b.prefix_edges, "sparse_position_prefix_edges": s.prefix_edges}


def _table(rows: list[dict], columns: list[str], prefix_columns: list[str]) -> pd.DataFrame:
    """The rows as a table; the prefix sizes only when some circuit was minimized (they are None otherwise)."""
    minimized = any(r[c] is not None for r in rows for c in prefix_columns)
    return pd.DataFrame(rows, columns=columns + (prefix_columns if minimized else []))


def position_table(base: list[TaskResult], sparse: list[TaskResult]) -> pd.DataFrame:
    by_task = {r.task: r for r in sparse}
    rows = [position_row(b, by_task[b.task]) for b in base if b.task in by_task]
    return _table(rows, POSITION_COLUMNS, POSITION_PREFIX_COLUMNS)


def _heads(r: TaskResult):
    return r.minimal.head_mask.flatten()  # [n_layers * n_heads] bool


def pair_table(base: list[TaskResult], sparse: list[TaskResult]) -> pd.DataFrame:
    by_task = {r.task: r for r in sparse}
    rows = [pair_row(b, by_task[b.task]) for b in base if b.task in by_task]
    return _table(rows, PAIR_COLUMNS, PREFIX_COLUMNS)


def overlap_table(results: list[TaskResult]) -> pd.DataFrame:
    """Which edges and heads the tasks of one model share (every pair of tasks)."""
    rows = []
    for a, b in itertools.combinations(results, 2):
        ha, hb = _heads(a), _heads(b)
        rows.append({"model": a.model, "task_a": a.task, "task_b": b.task, "edges_a": a.n_edges,
                     "edges_b": b.n_edges, "shared_edges": int((a.minimal.in_graph & b.minimal.in_graph).sum()),
                     "edge_jaccard": jaccard(a.minimal.in_graph, b.minimal.in_graph),
                     "heads_a": int(ha.sum()), "heads_b": int(hb.sum()), "shared_heads": int((ha & hb).sum()),
                     "head_jaccard": jaccard(ha, hb)})
    return pd.DataFrame(rows, columns=OVERLAP_COLUMNS)


def write_table(df: pd.DataFrame, path_stem: Path) -> None:
    """``stem.csv`` and ``stem.md``, both written atomically."""
    write_text(path_stem.with_suffix(".csv"), df.to_csv(index=False))
    write_text(path_stem.with_suffix(".md"), df.to_markdown(index=False, floatfmt=".3g") + "\n")


def save_result(r: TaskResult, folder: Path) -> None:
    """``circuits/<model>__<task>.json`` (and ``__position.json``), then ``summaries/<model>__<task>.json``: the
    summary, which carries the result's key, is written last, so a run stopped in between leaves no summary
    that points at a missing or older circuit."""
    stem = f"{r.model}__{r.task}"
    r.minimal.save(folder / "circuits" / f"{stem}.json")
    if r.position is not None:
        r.position.minimal.save(folder / "circuits" / f"{stem}__position.json")
    write_json(folder / "summaries" / f"{stem}.json", r.summary())


def check_results_folder(out: str | Path, resume: bool = False, force: bool = False,
                         what: str = "the results folder (out)") -> Path:
    """The results folder, refused when it already holds a study (a finished one's ``run.json``, or the saved
    results of a stopped one) unless ``resume`` (reuse what was saved under the same key, compute the rest) or
    ``force`` (compute everything again and write over it) says what to do with it."""
    path = check_writable_dir(out, what)
    if resume and force:
        raise CircuitkitError("--resume reuses the saved results and --force computes them all again; pass one")
    saved = list((path / "summaries").glob("*.json"))  # empty when there is no summaries folder
    if not (resume or force) and ((path / "run.json").exists() or saved):
        held = "a finished study (run.json)" if (path / "run.json").exists() else f"{len(saved)} saved results"
        raise CircuitkitError(f"{path} already holds {held}; pass --resume to reuse every circuit saved there under "
                              "the same settings, weights and prompts and compute the rest, --force to compute "
                              "everything again and write over it, or --out to write elsewhere (in Python: "
                              "resume=True or force=True)")
    return path


def load_result(folder: Path, model: str, task: str, key: dict) -> TaskResult | None:
    """The result :func:`save_result` wrote for (``model``, ``task``) into ``folder`` if it was made under ``key``
    (:func:`~circuitkit.evaluation.study.result_key`); None when there is none, it was made under another key, or
    its files do not load (it is then computed again and written over)."""
    stem = f"{model}__{task}"
    path = folder / "summaries" / f"{stem}.json"
    if not path.is_file():
        return None
    try:
        summary = read_json(path)
        if not isinstance(summary, dict) or summary.get("key") != json.loads(json.dumps(key)):
            return None
        minimal = Graph.load(folder / "circuits" / f"{stem}.json")
        position = (PositionGraph.load(folder / "circuits" / f"{stem}__position.json")
                    if "position" in summary else None)
        r = TaskResult.from_saved(summary, minimal, position)
    except (CircuitkitError, KeyError, TypeError, ValueError):
        return None
    return r if (r.model, r.task) == (model, task) else None


def study_pair(base: str, sparse: str, tasks: Sequence[str], cfg: StudyConfig, out: Path | None = None,
               progress: bool = False, reuse: bool = False) -> tuple[list[TaskResult], list[TaskResult]]:
    """:func:`~circuitkit.evaluation.study.analyse` every task in the base and in the sparse model.

    Both models are loaded first; each result is saved into ``out`` (``circuits/`` and
    ``summaries/``, see :func:`save_result`) as soon as it is done. With ``reuse``, a result already
    saved in ``out`` under the same key (same settings, weights and prompts; :func:`load_result`) is
    read instead of computed. Returns the base and the sparse results, in the order of ``tasks``.
    """
    if reuse and out is None:
        raise CircuitkitError("reuse needs the folder the results were saved in (out)")
    models = {role: load_model(name) for role, name in (("base", base), ("sparse", sparse))}
    check_comparable(models["base"].cfg, models["sparse"].cfg, base, sparse)
    for task in tasks:  # an unknown task is an error before either analysis runs
        task_for_model(task, models["base"])
    results: dict[str, list[TaskResult]] = {"base": [], "sparse": []}
    with tqdm(total=2 * len(tasks), desc=f"{Path(base).name} vs {Path(sparse).name}", disable=not progress,
              dynamic_ncols=True) as bar:
        for role, name in (("base", base), ("sparse", sparse)):
            model, label = models[role], Path(name).name
            model_fp = model_fingerprint(model)  # once per model: it hashes every weight
            for task in tasks:
                bar.set_postfix_str(f"{label} / {task}")
                t = time.time()
                ds = task_for_model(task, model).dataset(cfg.n, seed=cfg.seed)
                key = result_key(model_fp, ds, cfg)
                r = load_result(out, label, ds.task, key) if reuse else None  # saved under ds.task
                saved = r is not None
                if r is None:
                    r = analyse(model, label, ds, cfg, key=key)
                    if out is not None:
                        save_result(r, out)
                results[role].append(r)
                bar.update(1)
                if progress:
                    at = "" if r.position is None else f" position_edges={r.position.n_edges}"
                    when = "saved, reused" if saved else f"{time.time() - t:.1f}s"
                    bar.write(f"  {label:24s} {task:13s} edges={r.n_edges:4d} heads={r.minimal.n_heads:2d} "
                              f"f={r.f_minimal:.3f} completeness={r.completeness:.3f}{at} ({when})")
    return results["base"], results["sparse"]
