"""The teaser figure of the code model: token-level attention, code-lm against code-lm-sparse.

    python analyses/code/code_figures.py            # figures/code_teaser_attention.{png,svg}
    python analyses/code/code_figures.py --sparse models/code-lm-sparse   # another sparse model

Rows: a real stretch of **held-out** code (``json/decoder.py`` is one of code-lm's held-out files,
named in its card; the stretch starts at the first ``if nextchar == '}':`` and is ``--tokens``
long) and the first code-quote prompt (seed 0). Each panel is one layer; an arc joins a key
(bottom) to a query (top) when any head attends with weight >= 0.02 (the same figure as
``figures/teaser_attention.png`` for the addition toys). Prints the kept (head, query, key)
pairs of each row beside the causal ones.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from circuitkit import CircuitkitError
from circuitkit.corpus import stdlib_root
from circuitkit.models import resolve_path
from circuitkit.plotting import attention_edges, attention_figure
from circuitkit.sparsity import load_model
from circuitkit.tasks import task_for_model

REPO = Path(__file__).resolve().parents[2]
SNIPPET_FILE = "json/decoder.py"
SNIPPET_START = "\n        if nextchar == '}':"


def snippet_tokens(model, n_tokens: int) -> torch.Tensor:  # -> [pos]
    card = json.loads((resolve_path("code-lm") / "card.json").read_text())
    if SNIPPET_FILE not in card["corpus"]["heldout_files"]:
        raise CircuitkitError(f"{SNIPPET_FILE} is not among code-lm's held-out files; pick one from its card")
    text = (stdlib_root() / SNIPPET_FILE).read_text(encoding="utf-8")
    at = text.index(SNIPPET_START)
    ids = model.tokenizer.encode(text[at:at + 4 * n_tokens], add_special_tokens=False)[: n_tokens - 1]
    return torch.tensor([model.tokenizer.bos_token_id, *ids])


def token_text(tokenizer):
    def text(tokens) -> list[str]:
        out = []
        for t in tokenizer.convert_ids_to_tokens([int(i) for i in tokens]):
            out.append("B" if t == tokenizer.bos_token else t.replace("Ġ", "·").replace("Ċ", "⏎"))
        return out
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparse", default="code-lm-sparse")
    p.add_argument("--tokens", type=int, default=16, help="length of the held-out stretch, BOS included")
    p.add_argument("--out", type=Path, default=REPO / "figures" / "code_teaser_attention")
    args = p.parse_args(argv)
    models = [("base", load_model("code-lm").eval()), ("sparse", load_model(args.sparse).eval())]
    tok = models[0][1].tokenizer
    quote = task_for_model("code-quote", models[0][1]).dataset(1, seed=0).clean[0]
    prompts = [(f"held-out {SNIPPET_FILE}", snippet_tokens(models[0][1], args.tokens)), ("code-quote", quote)]
    print(attention_figure(models, prompts, token_text(tok), args.out))
    for label, tokens in prompts:
        T = len(tokens)
        for name, model in models:
            kept = attention_edges(model, tokens)  # [layers, heads, pos, pos]
            causal = kept.shape[0] * kept.shape[1] * T * (T + 1) // 2
            print(f"{label} / {name}: {int((kept > 0).sum())} of {causal} (head, query, key) pairs with weight >= 0.02")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
