"""``circuitkit pairs``: attention-pair attribution of one task in one model, written to a folder.

Writes ``pairs.safetensors`` (the score tensor ``[layer, head, query, key]``, readable with
:meth:`circuitkit.circuits.attention_pairs.PairScores.load`) and ``summary.json`` (the
attribution-mass k at 80% / 90% for pairs and heads, the best pairs, and with ``--minimal``
the pair-level faithfulness curve and the minimal token-level circuit). Files are written
atomically; existing ones are replaced only with ``--force``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from circuitkit import CircuitkitError
from circuitkit.circuits.attention_pairs import PairMethod, PairScores, attribute_pairs
from circuitkit.circuits.discover import untrained_task_warning
from circuitkit.commands.options import add_batch_size_flag, add_progress_flag, positive
from circuitkit.evaluation.pairs import (head_mass, minimal_pair_circuit, minimize_pairs, pair_curve, pair_key,
                                        pair_mass)
from circuitkit.io import check_writable_dir, write_json
from circuitkit.sparsity import load_model, model_fingerprint
from circuitkit.tasks import task_for_model
from circuitkit.tasks.base import TaskDataset

SCORES_FILE, SUMMARY_FILE = "pairs.safetensors", "summary.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="zoo name, checkpoint folder, or pretrained name (gpt2)")
    parser.add_argument("--task", required=True, help="task name, e.g. addition, ioi, greater-than")
    methods = [m.value for m in PairMethod]
    parser.add_argument("--method", default=None, choices=methods,
                        help="; ".join(m.summary for m in PairMethod) + f" (default {PairMethod.EXACT.value}; with "
                        "--scores, the method they were computed with)")
    parser.add_argument("--n", type=int, default=64, help="number of task examples (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    add_batch_size_flag(parser)
    parser.add_argument("--minimal", action="store_true",
                        help="also measure the pair-level faithfulness curve and the minimal token-level circuit")
    parser.add_argument("--threshold", type=float, default=0.9,
                        help="explained effect the minimal circuit must reach (default 0.9; with --minimal)")
    parser.add_argument("--minimize", action="store_true",
                        help="with --minimal: then drop every pair the circuit does not need, until each pair left is "
                             "needed (one forward pass per pair tried)")
    parser.add_argument("--scores", default=None,
                        help="rank by pair scores already computed for this model and task (a pairs.safetensors of "
                             "circuitkit pairs, or pairs/<model>__<task>.safetensors of a study) instead of scoring "
                             "again; --n and --seed must be the ones they were computed with")
    parser.add_argument("--top", type=int, default=20, help="best pairs listed in summary.json (default 20)")
    parser.add_argument("--out", default=None, help="output folder (default pairs/<model>-<task>-<method>)")
    parser.add_argument("--force", action="store_true", help="replace pairs.safetensors / summary.json in --out")
    add_progress_flag(parser)


def given_scores(scores: PairScores, path: str, ds: TaskDataset, seed: int, key: dict | None = None) -> PairScores:
    """``scores`` (read from ``path``), checked to be for ``ds``: its task, prompt length, number of prompts and seed;
    and, when the file carries the key it was made under (:func:`~circuitkit.evaluation.pairs.pair_key`, files of
    this version on), for this model's weights and gates and these very prompts."""
    have = (scores.task, scores.spec.seq_len, scores.n_examples, scores.metadata.get("seed", seed))
    want = (ds.task, ds.seq_len, len(ds), seed)
    if have != want:
        raise CircuitkitError(f"{path} holds pair scores of task {have[0]!r} ({have[1]} tokens) on {have[2]} prompts "
                              f"with seed {have[3]}, not {want[0]!r} ({want[1]} tokens) on {want[2]} with seed "
                              f"{want[3]}: pass --task {have[0]} --n {have[2]} --seed {have[3]}, or score again "
                              "without --scores")
    saved = scores.metadata.get("key")
    if key is not None and isinstance(saved, dict):
        if saved.get("model") != key["model"]:
            raise CircuitkitError(f"{path} holds pair scores of another model ({scores.metadata.get('model', '?')}, "
                                  f"fingerprint {saved.get('model')}; this one's is {key['model']}): scores rank only "
                                  "the model they were computed on; pass that --model, or score again without --scores")
        if saved.get("dataset") != key["dataset"]:
            raise CircuitkitError(f"{path} holds pair scores of other prompts of task {ds.task!r} (the task's prompts "
                                  "changed since they were scored); score again without --scores")
    return scores


def run_cli(args: argparse.Namespace) -> int:
    positive(args, "n", "batch_size")
    if args.top < 0:
        raise CircuitkitError(f"--top must be non-negative, got {args.top}")
    if not 0.0 < args.threshold <= 1.0:
        raise CircuitkitError(f"--threshold must be in (0, 1], got {args.threshold}")
    if args.minimize and not args.minimal:
        raise CircuitkitError("--minimize minimizes the minimal pair circuit: add --minimal")
    given = PairScores.load(args.scores) if args.scores else None  # a bad file is refused before the model loads
    if given is not None and args.method is not None and args.method != given.method:
        raise CircuitkitError(f"--method {args.method}, but {args.scores} holds {given.method} scores; drop --method "
                              "(the scores' method is used) or score again without --scores")
    method = given.method if given is not None else (args.method or PairMethod.EXACT.value)
    model_name = Path(str(args.model)).name
    out = Path(args.out) if args.out else Path("pairs") / f"{model_name}-{args.task}-{method}"
    check_writable_dir(out, "the output folder (--out)")  # before the computation, not after it
    existing = [p for p in (out / SCORES_FILE, out / SUMMARY_FILE) if p.exists()]
    if existing and not args.force:
        raise CircuitkitError(f"{', '.join(str(p) for p in existing)} already exist; pass --force to replace them "
                              "or choose another --out")
    model = load_model(args.model)
    ds = task_for_model(args.task, model).dataset(args.n, seed=args.seed)
    warning = untrained_task_warning(args.task, model)
    if warning:
        print(warning, file=sys.stderr)
    t0 = time.perf_counter()
    key = pair_key(model_fingerprint(model), ds, method)
    if given is not None:
        scores = given_scores(given, args.scores, ds, args.seed, key)
        seconds = None
    else:
        scores = attribute_pairs(model, ds, method, args.batch_size, progress=not args.no_progress)
        seconds = round(time.perf_counter() - t0, 3)
    scores = scores.with_metadata(model=str(args.model), seed=args.seed, key=key)
    summary = {"model": str(args.model), "task": ds.task, "method": scores.method, "n_examples": len(ds),
               "seed": args.seed, "metric": ds.metric.value, "m_full": scores.m_full,
               "causal_pairs": scores.spec.n_pairs, "nonzero_pairs": int((scores.scores != 0).sum()),
               "pair_mass": pair_mass(scores).to_dict(), "head_mass": head_mass(scores).to_dict(),
               "attribution_seconds": seconds, "top_pairs": scores.top_pairs(args.top)}
    if args.minimal:
        curve = pair_curve(model, scores, ds, batch_size=args.batch_size)
        minimal = minimal_pair_circuit(model, scores, ds, args.threshold, curve, args.batch_size)
        if args.minimize and minimal.reached:
            minimal = minimize_pairs(model, scores, ds, minimal, (curve.m_full, curve.m_empty), args.batch_size)
        summary.update({"curve": curve.to_dict(), "m_empty": curve.m_empty, "threshold": args.threshold,
                        "minimal_pairs": minimal.k, "minimal_f": minimal.f, "minimal_reached": minimal.reached,
                        "minimal_heads": minimal.n_heads, "prefix_pairs": minimal.prefix_k,
                        "minimal_pair_list": minimal.pairs(scores)})
    paths = [scores.save(out / SCORES_FILE), out / SUMMARY_FILE]
    write_json(paths[1], summary)
    keys = ["method", "nonzero_pairs", "pair_mass", "head_mass"] + (["minimal_pairs", "minimal_f"] if args.minimal
                                                                     else [])
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0
