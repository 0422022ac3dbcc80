"""Figures of the sparse post-training stage (issue: sparse post-training, item 7).

    python analyses/sparsity/figures.py teaser   # figures/teaser_attention.*, figures/carry_classes_attention.*
    python analyses/sparsity/figures.py sweep    # figures/sparsity_vs_capability.* (+ its JSON)

``teaser`` draws token-level attention edges per layer, base vs sparse, for ``36+28=00064``
and for the three carry classes. ``sweep`` finetunes toy-addition at several CE targets
(each run resumable: a finished run is read back from its card) and plots the kept-edge
fraction against accuracy and CE.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from circuitkit.io import write_json
from circuitkit.sparsity import load_model
from circuitkit.plotting import attention_edges, attention_figure, plt, save
from circuitkit.tasks.addition import encode
from circuitkit.tasks.vocab import VOCAB

REPO = Path(__file__).resolve().parents[2]
FIGURES = REPO / "figures"
SPARSE_CONFIG = REPO / "analyses/zoo/toy-addition-sparse.toml"
SWEEP_TARGETS = (0.3, 0.1, 0.03, 0.01, 0.003)  # absolute held-out CE targets, nats per answer digit
SWEEP_STEPS = 1500


def addition_tokens(a: int, b: int) -> torch.Tensor:  # [pos]
    return encode(torch.tensor([a]), torch.tensor([b]))[0]


def token_text(tokens) -> list[str]:
    return ["B" if t == "<bos>" else t for t in VOCAB.decode(tokens)]


def teaser() -> None:
    models = [("base", load_model("toy-addition")), ("sparse", load_model("toy-addition-sparse"))]
    tokens = addition_tokens(36, 28)
    print(attention_figure(models, [("36+28=00064", tokens)], token_text, FIGURES / "teaser_attention"))
    for name, model in models:  # the count quoted in the README: query-key pairs drawn (weight >= 0.02)
        kept = attention_edges(model, tokens)  # [layers, heads, pos, pos]
        n_causal = kept.shape[0] * kept.shape[1] * len(tokens) * (len(tokens) + 1) // 2
        print(f"{name}: {int((kept > 0).sum())} of {n_causal} query-key pairs with weight >= 0.02 on 36+28=00064")
    prompts = [(f"{a}+{b} ({c})", addition_tokens(a, b))
               for a, b, c in ((53, 21, "no carry"), (36, 28, "single carry"), (43, 59, "double carry"))]
    print(attention_figure(models, prompts, token_text, FIGURES / "carry_classes_attention"))


def sweep(steps: int = SWEEP_STEPS) -> None:
    from circuitkit.sparsity.finetune import SparsifyConfig, finetune

    base_cfg = SparsifyConfig.from_toml(SPARSE_CONFIG)
    rows = []
    for target in SWEEP_TARGETS:
        tag = f"target-{target:g}"
        cfg = replace(base_cfg, name=f"toy-addition-sweep-{tag}", out=f"runs/sweep/{tag}/model",
                      run_dir=f"runs/sweep/{tag}/run", target_ce=target, tolerance=None, steps=steps,
                      # keep the shipped recipe's proportions: its last 30% of steps use hard gates
                      final_hard_steps=round(steps * base_cfg.final_hard_steps / base_cfg.steps))
        card_path = REPO / cfg.out / "card.json"
        if card_path.exists():
            card = json.loads(card_path.read_text())
        else:
            resume = (REPO / cfg.run_dir / "checkpoint.pt").exists()
            card = finetune(cfg, resume=resume, progress=False,
                            command=f"python analyses/sparsity/figures.py sweep  # {tag}")
        rows.append({"target_ce": target, "kept_edges": card["kept_edges"], "heldout_ce": card["heldout_ce"],
                     "accuracy": card["heldout"]["addition"]["accuracy"], "steps": card["steps"]})
        print(rows[-1], flush=True)
    write_json(FIGURES / "sparsity_vs_capability.json", rows)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.2))
    x = [100 * r["kept_edges"] for r in rows]
    a1.plot(x, [100 * r["accuracy"] for r in rows], "-o")
    a1.set_xlabel("kept attention edges (% of causal)")
    a1.set_ylabel("exact-match accuracy (%)")
    a2.plot(x, [r["heldout_ce"] for r in rows], "-o", color="#dd8452")
    a2.set_yscale("log")
    a2.set_xlabel("kept attention edges (% of causal)")
    a2.set_ylabel("held-out CE (nats)")
    for r, xi in zip(rows, x):
        a2.annotate(f"target {r['target_ce']:g}", (xi, r["heldout_ce"]), fontsize=7)
    fig.suptitle("toy-addition: sparsity vs capability across CE targets", fontsize=10)
    fig.tight_layout()
    print(save(fig, FIGURES / "sparsity_vs_capability"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["teaser", "sweep"])
    p.add_argument("--steps", type=int, default=SWEEP_STEPS)
    args = p.parse_args(argv)
    teaser() if args.what == "teaser" else sweep(args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
