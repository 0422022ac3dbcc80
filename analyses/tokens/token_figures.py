"""Token-level circuit figures in the paper's teaser layout (issue 13, item 4).

    python analyses/tokens/token_figures.py    # figures/token_circuit_teaser.*, figures/token_circuit_carry_classes.*

For one addition prompt at a time (``36+28=00064``; then one prompt per carry class: ``53+21``
no carry, ``36+28`` single, ``43+59`` double), toy-addition and toy-addition-sparse: exact
attention-pair scores on that prompt alone, and its minimal token-level circuit (the fewest top
pairs that keep f ≥ 0.9, every other pair's pattern entry 0). Only those pairs are drawn, from
the key position at layer l to the query position, coloured by head. The metric is the task's
logit difference at the five answer positions, with the other nine digits as distractors (no
corrupted prompt is needed: a removed pair carries 0).

Beside them, the position edges of the same prompt's minimal position-level circuit (eap-ig
scores of every edge at every token position, fewest top edges with f ≥ 0.9, patching
ablation). An edge ablation needs a corrupted input: the clean prompt is repeated with
``N_CORRUPT`` corrupted prompts (operands drawn at random, seed 0, with another sum; the metric's
distractors are the corrupted sum's digits, as in the addition task), and f is over those copies.
The counts are printed for the README.
"""

from __future__ import annotations

from pathlib import Path

import torch

from circuitkit.circuits.attention_pairs import attribute_pairs
from circuitkit.circuits.positions import attribute_positions
from circuitkit.evaluation.faithfulness import minimal_circuit
from circuitkit.evaluation.pairs import minimal_pair_circuit
from circuitkit.plotting import token_circuit_figure
from circuitkit.sparsity import load_model
from circuitkit.tasks import get_task
from circuitkit.tasks.addition import CARRY_CLASSES, PROMPT_LEN, SEQ_LEN, carry_class, encode
from circuitkit.tasks.base import Metric, TaskDataset
from circuitkit.tasks.vocab import VOCAB

REPO = Path(__file__).resolve().parents[2]
FIGURES = REPO / "figures"
MODELS = ("toy-addition", "toy-addition-sparse")
CARRY_EXAMPLES = ((53, 21), (36, 28), (43, 59))  # none, single, double
N_CORRUPT = 32  # corrupted prompts per clean prompt for the position edges


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


def corrupted_dataset(a: int, b: int, n: int = N_CORRUPT, seed: int = 0) -> TaskDataset:
    """``a+b=`` repeated ``n`` times against ``n`` corrupted prompts (random operands, another sum)."""
    g = torch.Generator().manual_seed(seed)
    ca, cb = torch.randint(100, (n,), generator=g), torch.randint(100, (n,), generator=g)
    same = (ca + cb) == a + b
    cb[same] = (cb[same] + 1) % 100  # another sum
    clean = encode(torch.full((n,), a), torch.full((n,), b))  # [n, 12]
    corrupt = encode(ca, cb)
    return TaskDataset(task="addition", clean=clean, corrupt=corrupt,
                       answer_pos=torch.arange(PROMPT_LEN - 1, SEQ_LEN - 1).expand(n, -1), correct=clean[:, PROMPT_LEN:],
                       distractors=corrupt[:, PROMPT_LEN:, None], metric=Metric.LOGIT_DIFF,
                       labels={"carry": carry_class(torch.full((n,), a), torch.full((n,), b))},
                       position_labels=get_task("addition").dataset(1).position_labels)


def position_circuit(model, a: int, b: int):
    """The minimal position-level circuit of ``a+b=`` (eap-ig, f ≥ 0.9 over the corrupted copies)."""
    ds = corrupted_dataset(a, b)
    scored = attribute_positions(model, ds, "eap-ig")
    return minimal_circuit(model, scored, ds, 0.9)


def token_text(tokens) -> list[str]:
    return ["B" if t == "<bos>" else t for t in VOCAB.decode(tokens)]


def row(models, a: int, b: int, label: str):
    ds = prompt_dataset(a, b)
    panels, edge_panels = [], []
    for name, model in models.items():
        short = name.replace('toy-addition', 'base').replace('base-sparse', 'sparse')
        scores = attribute_pairs(model, ds, "exact")
        mc = minimal_pair_circuit(model, scores, ds, 0.9)
        print(f"{label} {name}: {mc.k} pairs, {mc.n_heads} heads, f = {mc.f:.3f} "
              f"(of {scores.spec.n_pairs} causal pairs)", flush=True)
        panels.append((f"{short} pairs (f={mc.f:.2f})", scores, mc.keep))
        pc = position_circuit(model, a, b)
        print(f"{label} {name}: {pc.n_edges} position edges, {pc.n_heads} heads, f = {pc.f:.3f} "
              f"(of {pc.graph.n_real_edges} position edges)", flush=True)
        edge_panels.append((f"{short} position edges (f={pc.f:.2f})", pc.graph))
    return (label, token_text(ds.clean[0]), panels + edge_panels)


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
