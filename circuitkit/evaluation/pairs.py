"""Token-level verification: attribution mass, pair-level faithfulness and the minimal pair circuit.

Why a module of its own: :mod:`circuitkit.circuits.attention_pairs` scores every causal
(layer, head, query, key) pair; this module measures what those scores say about a model and
compares a base model with its sparse one (docs/method.md §10):

- *mass concentration*: the fraction of the total |attribution| captured by the top-k pairs, and
  by the top-k heads (a head's score = Σ of its pairs' |scores|), and the k at which it reaches
  80% and 90% (the paper's figure: base ÷ sparse k, 16.1× for edges and 3.4× for heads on GPT-2);
- *pair faithfulness*: the explained effect ``f = (m(C) − m(∅)) / (m(N) − m(∅))``
  (:func:`~circuitkit.circuits.interventions.explained_effect`, the project's definition) when only
  the top-k pairs are kept and every other pair's pattern entry is 0; ``∅`` = every pair removed;
- the *minimal token-level circuit*: the fewest top-scoring pairs with ``f ≥ threshold``, found
  with the same grid-and-bisection search as the edge-level minimal circuit
  (:func:`~circuitkit.circuits.selection.bisect_top_n`); with the ``minimized`` rule
  (:class:`~circuitkit.circuits.selection.MinimalRule`) that prefix then loses every pair it does
  not need (:func:`minimize_pairs`, the same elimination as the edge level's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from circuitkit import CircuitkitError
from circuitkit.circuits.attention_pairs import PairMethod, PairScores, attribute_pairs, metric_with_pairs
from circuitkit.circuits.interventions import DEFAULT_BATCH_SIZE, explained_effect
from circuitkit.circuits.selection import MinimalRule, bisect_top_n, eliminate, log_sizes
from circuitkit.io import write_json
from circuitkit.sparsity import load_model, model_fingerprint
from circuitkit.tasks import task_for_model
from circuitkit.tasks.base import TaskDataset

MASS_LEVELS = (0.8, 0.9)
# The paper's base ÷ sparse ratios of k at 80% attribution mass on GPT-2 (edges / pairs, heads).
PAPER_MASS_RATIOS = {"pairs": 16.1, "heads": 3.4}


# ---------------------------------------------------------------- attribution mass

@dataclass(frozen=True)
class MassCurve:
    """``fraction[k-1]``: the share of the total |score| held by the ``k`` largest, k = 1..n."""

    unit: str  # "pairs" | "heads"
    fraction: tuple[float, ...]
    total: float

    def k_at(self, level: float) -> int | None:
        """The smallest k whose top-k hold at least ``level`` of the mass (None when the total is 0)."""
        if not 0.0 < level <= 1.0:
            raise CircuitkitError(f"a mass level is a fraction in (0, 1], got {level}")
        if self.total <= 0:
            return None
        # 1e-9 absorbs the rounding of the cumulative sum (the last entry is 1 up to it)
        return next(k for k, v in enumerate(self.fraction, start=1) if v >= level - 1e-9)

    def to_dict(self) -> dict[str, Any]:
        return {"unit": self.unit, "total": self.total, "n": len(self.fraction),
                **{f"k_at_{round(100 * p)}": self.k_at(p) for p in MASS_LEVELS}}


def mass_curve(values: torch.Tensor, unit: str) -> MassCurve:  # values: any shape, non-negative
    """The cumulative share of ``values`` (e.g. |pair scores|) held by the largest k of them."""
    v = values.detach().flatten().double()
    if bool((v < 0).any()) or not bool(torch.isfinite(v).all()):
        raise CircuitkitError("attribution mass needs finite non-negative values (pass |scores|)")
    total = float(v.sum())
    csum = v.sort(descending=True).values.cumsum(0)
    frac = (csum / total) if total > 0 else torch.zeros_like(csum)
    return MassCurve(unit, tuple(frac.tolist()), total)


def pair_mass(scores: PairScores) -> MassCurve:
    """Mass over the causal pairs (|score| of each)."""
    return mass_curve(scores.scores[scores.spec.causal].abs(), "pairs")


def head_mass(scores: PairScores) -> MassCurve:
    """Mass over the heads, a head's score being Σ |pair score| over its pairs."""
    return mass_curve(scores.head_scores, "heads")


def mass_ratio(base: MassCurve, sparse: MassCurve, level: float) -> float:
    """base ÷ sparse k at ``level`` of the mass (nan when either has no mass)."""
    kb, ks = base.k_at(level), sparse.k_at(level)
    return float("nan") if kb is None or ks is None else kb / ks


# ---------------------------------------------------------------- pair faithfulness

@dataclass(frozen=True)
class PairCurve:
    """Explained effect when only the top-k pairs are kept, for each k in ``sizes``."""

    sizes: tuple[int, ...]
    f: tuple[float, ...]
    m_full: float
    m_empty: float

    def to_dict(self) -> dict[str, Any]:
        return {"sizes": list(self.sizes), "f": list(self.f), "m_full": self.m_full, "m_empty": self.m_empty}


def _masks(scores: PairScores, sizes: Sequence[int]) -> torch.Tensor:  # [len(sizes), layer, head, query, key]
    order = scores.order()  # [n_pairs, 4], best first
    out = torch.zeros(len(sizes), *scores.spec.shape, dtype=torch.bool)
    for i, k in enumerate(sizes):
        best = order[:k]
        out[i, best[:, 0], best[:, 1], best[:, 2], best[:, 3]] = True
    return out


def _check(scores: PairScores, ds: TaskDataset) -> None:
    if scores.spec.seq_len != ds.seq_len or scores.task != ds.task:
        raise CircuitkitError(f"these pair scores are for task {scores.task!r} at {scores.spec.seq_len} tokens, "
                              f"not {ds.task!r} at {ds.seq_len}; score the same dataset you evaluate on")


def pair_effects(model, scores: PairScores, ds: TaskDataset, sizes: Sequence[int],
                 known: tuple[float, float] | None = None, batch_size: int = DEFAULT_BATCH_SIZE
                 ) -> tuple[float, float, list[float]]:
    """m(N), m(∅) and f of the top-k pairs for each k in ``sizes`` (``known``: m(N), m(∅) already measured)."""
    _check(scores, ds)
    sizes = [int(k) for k in sizes]
    keep = _masks(scores, sizes)
    if known is None:
        full = torch.ones(1, *scores.spec.shape, dtype=torch.bool)
        keep = torch.cat([full, ~full, keep])
    m = metric_with_pairs(model, ds, keep, batch_size).mean(1)  # [copies]
    if known is None:
        m_full, m_empty, m = float(m[0]), float(m[1]), m[2:]
        if abs(m_full - m_empty) < 1e-9:
            raise CircuitkitError(f"task {ds.task!r}: the model scores the same with every attention pair removed "
                                  f"({m_empty:.4g}) as with none, so no effect can be explained")
    else:
        m_full, m_empty = known
    return m_full, m_empty, explained_effect(m, m_full, m_empty).tolist()


def pair_curve(model, scores: PairScores, ds: TaskDataset, sizes: Sequence[int] | None = None,
               batch_size: int = DEFAULT_BATCH_SIZE) -> PairCurve:
    """f of the top-k pairs for each k in ``sizes`` (default: log-spaced up to every causal pair)."""
    sizes = list(sizes) if sizes is not None else log_sizes(scores.spec.n_pairs)
    m_full, m_empty, f = pair_effects(model, scores, ds, sizes, batch_size=batch_size)
    return PairCurve(tuple(int(k) for k in sizes), tuple(f), m_full, m_empty)


@dataclass(frozen=True)
class MinimalPairs:
    """The minimal token-level circuit: the fewest top-scoring pairs with f ≥ threshold (``prefix_k``
    None), or that prefix of ``prefix_k`` pairs minimized (:func:`minimize_pairs`). ``k``: the pairs kept."""

    k: int
    f: float
    reached: bool
    threshold: float
    keep: torch.Tensor  # [layer, head, query, key] bool
    prefix_k: int | None = None

    @property
    def n_heads(self) -> int:
        return int(self.keep.any(-1).any(-1).sum())

    def pairs(self, scores: PairScores) -> list[dict[str, Any]]:
        """The kept pairs, best |score| first."""
        return scores.top_pairs(None, within=self.keep)


def minimal_pair_circuit(model, scores: PairScores, ds: TaskDataset, threshold: float = 0.9,
                         curve: PairCurve | None = None, batch_size: int = DEFAULT_BATCH_SIZE) -> MinimalPairs:
    """Smallest top-k pair set with f ≥ ``threshold``: the first grid size of the curve that reaches it,
    refined by bisection; every causal pair when none does."""
    if not 0.0 < threshold <= 1.0:
        raise CircuitkitError(f"threshold must be in (0, 1], got {threshold}")
    curve = curve or pair_curve(model, scores, ds, batch_size=batch_size)
    known = (curve.m_full, curve.m_empty)

    def effect(k: int) -> float:
        return pair_effects(model, scores, ds, [k], known, batch_size)[2][0]

    k, f, reached = bisect_top_n(curve.sizes, curve.f, threshold, effect)
    if not reached:
        k = scores.spec.n_pairs
    return MinimalPairs(k, f, reached, threshold, scores.top_k_mask(k))


def minimize_pairs(model, scores: PairScores, ds: TaskDataset, minimal: MinimalPairs, known: tuple[float, float],
                   batch_size: int = DEFAULT_BATCH_SIZE) -> MinimalPairs:
    """``minimal`` with every pair it does not need dropped, lowest |score| first
    (:func:`~circuitkit.circuits.selection.eliminate`): f ≥ its threshold still, and dropping any one pair
    left gives f < threshold. ``known`` = (m(N), m(∅)) measured on ``ds`` (the pair curve's)."""
    _check(scores, ds)
    if not minimal.reached:
        raise CircuitkitError("the minimal pair circuit did not reach its threshold; there is nothing to minimize")
    m_full, m_empty = known

    def effects(masks: list[torch.Tensor]) -> list[float]:
        m = metric_with_pairs(model, ds, torch.stack(masks), batch_size).mean(1)  # [len(masks)]
        return explained_effect(m, m_full, m_empty).tolist()

    order = scores.order()  # [n_pairs, 4], best first
    order = order[minimal.keep[tuple(order.T)]].flip(0)  # the circuit's pairs, lowest |score| first
    keep, f, _ = eliminate(minimal.keep, order, effects, minimal.threshold, minimal.f)
    return MinimalPairs(int(keep.sum()), f, True, minimal.threshold, keep, prefix_k=minimal.k)


# ---------------------------------------------------------------- one model, base vs sparse

@dataclass(frozen=True)
class PairResult:
    """Everything the token-level tables and figures need about one model on one task."""

    model: str
    scores: PairScores
    pair_mass: MassCurve
    head_mass: MassCurve
    curve: PairCurve
    minimal: MinimalPairs

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "task": self.scores.task, "method": self.scores.method,
                "n_examples": self.scores.n_examples, "pair_mass": self.pair_mass.to_dict(),
                "head_mass": self.head_mass.to_dict(), "curve": self.curve.to_dict(),
                "minimal_pairs": self.minimal.k, "minimal_f": self.minimal.f, "minimal_reached": self.minimal.reached,
                "minimal_heads": self.minimal.n_heads, "prefix_pairs": self.minimal.prefix_k}


def analyse_pairs(model, model_name: str, ds: TaskDataset, method: PairMethod | str = PairMethod.EXACT,
                  threshold: float = 0.9, batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False,
                  rank_by: PairScores | None = None,
                  minimal_rule: MinimalRule | str = MinimalRule.PREFIX) -> PairResult:
    """Score the pairs with ``method``, then the mass curves, the pair curve and the minimal circuit
    (chosen by ``minimal_rule``).

    ``rank_by``: scores already computed for ``ds`` (skips the attribution)."""
    rule = MinimalRule.parse(minimal_rule)
    scores = rank_by if rank_by is not None else attribute_pairs(model, ds, method, batch_size, progress)
    scores = scores.with_metadata(model=model_name)
    curve = pair_curve(model, scores, ds, batch_size=batch_size)
    minimal = minimal_pair_circuit(model, scores, ds, threshold, curve, batch_size)
    if rule is MinimalRule.MINIMIZED and minimal.reached:
        minimal = minimize_pairs(model, scores, ds, minimal, (curve.m_full, curve.m_empty), batch_size)
    return PairResult(model_name, scores, pair_mass(scores), head_mass(scores), curve, minimal)


def _ratio(a: float | int | None, b: float | int | None) -> float:
    if a is None or b is None or (isinstance(a, float) and math.isnan(a)):
        return float("nan")
    return float("inf") if b == 0 else a / b


def pair_row(base: PairResult, sparse: PairResult) -> dict[str, Any]:
    """One row of the token-level base-vs-sparse table."""
    row: dict[str, Any] = {"base_model": base.model, "sparse_model": sparse.model, "task": base.scores.task,
                           "method": base.scores.method, "n_prompts": base.scores.n_examples,
                           "causal_pairs": base.scores.spec.n_pairs}
    for unit, b, s in (("pairs", base.pair_mass, sparse.pair_mass), ("heads", base.head_mass, sparse.head_mass)):
        for p in MASS_LEVELS:
            tag = round(100 * p)
            row[f"base_{unit}_{tag}"], row[f"sparse_{unit}_{tag}"] = b.k_at(p), s.k_at(p)
            row[f"{unit}_ratio_{tag}"] = mass_ratio(b, s, p)
    row.update({"base_minimal_pairs": base.minimal.k, "sparse_minimal_pairs": sparse.minimal.k,
                "minimal_pair_ratio": _ratio(base.minimal.k, sparse.minimal.k),
                "base_minimal_f": base.minimal.f, "sparse_minimal_f": sparse.minimal.f,
                "base_reached": base.minimal.reached, "sparse_reached": sparse.minimal.reached,
                "base_minimal_heads": base.minimal.n_heads, "sparse_minimal_heads": sparse.minimal.n_heads})
    if base.minimal.prefix_k is not None or sparse.minimal.prefix_k is not None:  # the "minimized" rule
        row.update({"base_prefix_pairs": base.minimal.prefix_k, "sparse_prefix_pairs": sparse.minimal.prefix_k})
    return row


__all__ = ["MASS_LEVELS", "MassCurve", "MinimalPairs", "PAPER_MASS_RATIOS", "PairCurve", "PairResult", "analyse_pairs",
           "head_mass", "mass_curve", "mass_ratio", "minimal_pair_circuit", "minimize_pairs", "pair_curve",
           "pair_effects", "pair_key", "pair_mass", "pair_row", "save_pair_result", "saved_scores",
           "study_pair_tokens"]


def pair_key(model_fp: str, ds: TaskDataset, method: PairMethod | str) -> dict[str, Any]:
    """What a model's pair scores on ``ds`` depend on, as plain JSON data: the method, the model's fingerprint
    ``model_fp`` (weights and gates, :func:`circuitkit.sparsity.model_fingerprint`) and the prompts' (the component
    level's counterpart is :func:`circuitkit.evaluation.study.result_key`)."""
    return {"method": PairMethod.parse(method).value, "model": model_fp, "dataset": ds.fingerprint()}


def saved_scores(path: Path, key: dict[str, Any]) -> PairScores | None:
    """The pair scores saved at ``path`` when they were made under ``key`` (:func:`pair_key`), else None (none
    saved, another key, or a file that does not load)."""
    if not path.is_file():
        return None
    try:
        scores = PairScores.load(path)
    except CircuitkitError:
        return None
    return scores if scores.metadata.get("key") == key else None


def save_pair_result(r: PairResult, folder: Path, seed: int) -> None:
    """``<model>__<task>.safetensors`` (the scores, with the seed and key in their metadata, to rank by again without
    scoring: ``circuitkit pairs --scores``, ``--resume``) and ``<model>__<task>.json`` (the curves) in ``folder``."""
    stem = folder / f"{r.model}__{r.scores.task}"
    r.scores.with_metadata(seed=seed).save(stem.with_suffix(".safetensors"))
    write_json(stem.with_suffix(".json"), r.to_dict())


def study_pair_tokens(base: str, sparse: str, tasks: Sequence[str], method: PairMethod | str, n: int, seed: int,
                      threshold: float = 0.9, batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False,
                      minimal_rule: MinimalRule | str = MinimalRule.PREFIX, folder: Path | None = None,
                      reuse: bool = False) -> list[tuple[PairResult, PairResult]]:
    """:func:`analyse_pairs` for every task in the base and in the sparse model (the token-level
    counterpart of :func:`circuitkit.evaluation.compare.study_pair`). Each result's scores carry their
    :func:`pair_key` in their metadata and are saved into ``folder`` as soon as they are done
    (:func:`save_pair_result`); with ``reuse``, scores saved there under the same key are ranked by
    instead of scored again (the curves and the minimal circuit are computed from them)."""
    if reuse and folder is None:
        raise CircuitkitError("reuse needs the folder the pair scores were saved in")
    models = {name: load_model(name) for name in (base, sparse)}
    fingerprints = {name: model_fingerprint(m) for name, m in models.items()}  # once per model
    out = []
    for task in tasks:
        ds = task_for_model(task, models[base]).dataset(n, seed=seed)
        both = []
        for name in (base, sparse):
            label, key = Path(name).name, pair_key(fingerprints[name], ds, method)
            saved = saved_scores(folder / f"{label}__{ds.task}.safetensors", key) if reuse else None
            r = analyse_pairs(models[name], label, ds, method, threshold, batch_size, progress, rank_by=saved,
                              minimal_rule=minimal_rule)
            r = replace(r, scores=r.scores.with_metadata(key=key))
            if folder is not None:
                save_pair_result(r, folder, seed)
            both.append(r)
        out.append((both[0], both[1]))
    return out
