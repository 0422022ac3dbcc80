"""CE of the copying pair's models on each part of their training batches and on held-out code, on the same rows.

Sparse post-training of code-lm-copy holds CE on batches of which half are repeat windows (a stretch of the train files
written again and again) and half plain windows. One constraint on the mixture lets a model trade one part for the
other; ``per_task_constraints`` holds each part (docs/method.md §8). This measures every model given on the
constraint rows of the sparse runs (``TextCorpus.constraint_rows``: 400 train rows spread over the train files, the
first half replaced by repeat windows drawn with a fixed seed), split by part, and on the first-to-last spread of 400
held-out rows (the card's held-out CE), and prints a markdown table with each model's ratio to the first's.

    python analyses/zoo/code_lm_copy_parts_ce.py code-lm-copy code-lm-copy-sparse code-lm-copy-sparse-cont \
        code-lm-copy-sparse-parts --out analyses/zoo/code_lm_copy_parts_ce.md
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

from circuitkit.corpus import ROW_PARTS, TextCorpus
from circuitkit.io import write_text
from circuitkit.sparsity import load_model
from circuitkit.training import corpus_ce

REFERENCE_RUN = "analyses/zoo/code-lm-copy-sparse.toml"  # the corpus, split, repeats and target_n of every run here


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="zoo names or folders; the first is the reference (the base)")
    ap.add_argument("--n", type=int, default=400, help="constraint rows and held-out rows (the runs' target_n)")
    ap.add_argument("--out", help="also write the table to this markdown file")
    args = ap.parse_args()
    fc = tomllib.loads(Path(REFERENCE_RUN).read_text())
    rows, corpora = [], {}  # the corpus, tokenized once per distinct tokenizer (these models share one)
    for name in args.models:
        model = load_model(name)
        key = model.tokenizer.backend_tokenizer.to_str()
        if key not in corpora:
            c = TextCorpus.from_source(fc["corpus"], model.tokenizer, seq_len=fc["corpus_seq_len"],
                                       heldout_fraction=fc["corpus_heldout_fraction"], seed=fc["corpus_seed"])
            corpora[key] = c.with_repeats(fc["corpus_repeat_fraction"], fc["corpus_repeat_min"])
        c = corpora[key]
        cons = c.constraint_rows(args.n)
        parts = c.row_parts(cons.shape[0])
        ce = {part: corpus_ce(model, cons[parts == i]) for i, part in enumerate(ROW_PARTS)}
        ce["heldout"] = corpus_ce(model, c.rows("heldout", args.n))
        rows.append((Path(name).name, model.circuitkit_card.get("kept_edges"), ce))
    ref = rows[0][2]
    lines = ["| model | kept edges | plain train rows | repeat windows | held-out |", "|---|---|---|---|---|"]
    for name, kept, ce in rows:
        cell = lambda k: f"{ce[k]:.4f}" + ("" if ce is ref else f" ({ce[k] / ref[k]:.4f} ×)")  # noqa: E731
        lines.append(f"| {name} | {'' if kept is None else f'{100 * kept:.2f}%'} | {cell('plain')} | "
                     f"{cell('repeat')} | {cell('heldout')} |")
    print("\n".join(lines))
    if args.out:  # atomically, as every file circuitkit writes
        write_text(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
