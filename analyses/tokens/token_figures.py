"""Token-level circuit figures in the paper's teaser layout (issue 13, item 4).

    python analyses/tokens/token_figures.py    # figures/token_circuit_teaser.*, figures/token_circuit_carry_classes.*

For one addition prompt at a time (``36+28=00064``; then one prompt per carry class: ``53+21``
no carry, ``36+28`` single, ``43+59`` double), toy-addition and toy-addition-sparse: exact
attention-pair scores on that prompt alone, and its minimal token-level circuit (the fewest top
pairs that keep f ≥ 0.9, every other pair's pattern entry 0). Only those pairs are drawn, from
the key position at layer l to the query position, coloured by head. The metric is the task's
logit difference at the five answer positions, with the other nine digits as distractors (no
corrupted prompt is needed: a removed pair carries 0). The counts are printed for the README.
"""

from __future__ import annotations

from pathlib import Path

import torch

from circuitkit.circuits.attention_pairs import attribute_pairs
from circuitkit.evaluation.pairs import minimal_pair_circuit
from circuitkit.plotting import token_circuit_figure
from circuitkit.sparsity import load_model
from circuitkit.tasks.addition import CARRY_CLASSES, PROMPT_LEN, SEQ_LEN, carry_class, encode
from circuitkit.tasks.base import Metric, TaskDataset
from circuitkit.tasks.vocab import VOCAB

REPO = Path(__file__).resolve().parents[2]
FIGURES = REPO / "figures"
MODELS = ("toy-addition", "toy-addition-sparse")
CARRY_EXAMPLES = ((53, 21), (36, 28), (43, 59))  # none, single, double


def prompt_dataset(a: int, b: int) -> TaskDataset:
    """``a+b=`` alone: correct = the five sum digits, distractors = the other nine digits at each."""
    clean = encode(torch.tensor([a]), torch.tensor([b]))  # [1, 12]
    correct = clean[:, PROMPT_LEN:]  # [1, 5]
    digits = torch.arange(10) + VOCAB.id("0")
    dis = torch.stack([digits[digits != c] for c in correct[0].tolist()])[None]  # [1, 5, 9]
    return TaskDataset(task="addition", clean=clean, corrupt=clean.clone(),
                       answer_pos=torch.arange(PROMPT_LEN - 1, SEQ_LEN - 1)[None], correct=correct,
                       distractors=dis, metric=Metric.LOGIT_DIFF,
                       labels={"carry": carry_class(torch.tensor([a]), torch.tensor([b]))})


def token_text(tokens) -> list[str]:
    return ["B" if t == "<bos>" else t for t in VOCAB.decode(tokens)]


def row(models, a: int, b: int, label: str):
    ds = prompt_dataset(a, b)
    panels = []
    for name, model in models.items():
        scores = attribute_pairs(model, ds, "exact")
        mc = minimal_pair_circuit(model, scores, ds, 0.9)
        print(f"{label} {name}: {mc.k} pairs, {mc.n_heads} heads, f = {mc.f:.3f} "
              f"(of {scores.spec.n_pairs} causal pairs)", flush=True)
        panels.append((f"{name.replace('toy-addition', 'base').replace('base-sparse', 'sparse')} (f={mc.f:.2f})",
                       scores, mc.keep))
    return (label, token_text(ds.clean[0]), panels)


def main() -> None:
    torch.set_num_threads(1)
    models = {n: load_model(n) for n in MODELS}
    teaser = row(models, 36, 28, "36+28=00064")
    print(token_circuit_figure([teaser], FIGURES / "token_circuit_teaser"))
    rows = []
    for (a, b), cls in zip(CARRY_EXAMPLES, CARRY_CLASSES):
        s = a + b
        rows.append(teaser if (a, b) == (36, 28) else row(models, a, b, f"{a}+{b}={s:05d}"))
        rows[-1] = (f"{rows[-1][0]} ({cls} carry)", *rows[-1][1:])
    print(token_circuit_figure(rows, FIGURES / "token_circuit_carry_classes"))


if __name__ == "__main__":
    main()
