"""Top-1 accuracy of the code tasks (circuitkit/tasks/code.py) on code-lm and code-lm-sparse.

    python analyses/code/code_tasks_eval.py                      # zoo code-lm (+ code-lm-sparse if shipped)
    python analyses/code/code_tasks_eval.py --base runs/code-lm/checkpoint.pt --config analyses/zoo/code-lm.toml
    python analyses/code/code_tasks_eval.py --variants           # also the easier variants of each task

A task enters the study only at >= 80% top-1 for the base model (``ENTRY_ACCURACY``); the table
says which do. ``--base`` is a zoo name, a model folder, or a training checkpoint (``.pt``,
with ``--config`` for its architecture and tokenizer folder: ``<run_dir>/tokenizer``). Each task
gets ``n`` prompts drawn with ``seed``; the accuracy on the corrupted prompts (no way to know
the answer) is printed beside it as the floor. Prints a markdown table, then JSON.
"""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path

import torch

from circuitkit import CircuitkitError
from circuitkit.models import build_model, load_local_tokenizer, resolve_path, set_local_tokenizer, toy_config
from circuitkit.sparsity import load_model
from circuitkit.tasks import task_for_model

ENTRY_ACCURACY = 0.80
TASKS = [("code-induction", {}), ("code-args", {}), ("code-kwargs", {}), ("code-return", {}), ("code-quote", {}),
         ("code-key", {})]
VARIANTS = [("code-induction", {"length": 10, "prefix": 5}), ("code-induction", {"words_only": True}),
            ("code-args", {"in_order": True}), ("code-kwargs", {"in_order": True}),
            ("code-quote", {"words": 2}), ("code-quote", {"words": 3}), ("code-key", {"words": 2})]


def load_checkpoint(path: Path, config: Path):
    """A partly trained model from a ``circuitkit train`` checkpoint, with its run's tokenizer."""
    cfg = tomllib.loads(config.read_text())
    run_dir = Path(cfg.get("run_dir", path.parent))
    tok = load_local_tokenizer(path.parent / "tokenizer" if (path.parent / "tokenizer").is_dir() else run_dir / "tokenizer")
    model = build_model(toy_config(cfg["arch"], d_vocab=cfg.get("tokenizer_vocab", len(tok))))
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(ckpt["model"])
    set_local_tokenizer(model, tok)
    return model.eval(), f"{path} (step {ckpt.get('step')})"


@torch.no_grad()
def accuracy(model, name: str, options: dict, n: int, seed: int, batch: int = 100) -> dict:
    ds = task_for_model(name, model, **options).dataset(n, seed=seed)
    clean = torch.cat([model(b.clean) for b in ds.batches(batch)])  # [n, pos, d_vocab]
    corrupt = torch.cat([model(b.corrupt) for b in ds.batches(batch)])
    return {"task": name, "options": options, "n": n, "seq_len": ds.seq_len,
            "accuracy": ds.accuracy(clean).float().mean().item(),
            "corrupt_accuracy": ds.accuracy(corrupt).float().mean().item(),
            "logit_diff": ds.metric_values(clean).mean().item(),
            "corrupt_logit_diff": ds.metric_values(corrupt).mean().item()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="code-lm", help="zoo name, model folder or training checkpoint .pt")
    p.add_argument("--config", type=Path, help="the training TOML of a --base checkpoint (architecture)")
    p.add_argument("--sparse", default="code-lm-sparse", help="sparse model; skipped when it does not exist")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", action="store_true", help="also the easier variants of each task")
    p.add_argument("--json", type=Path, help="also write the JSON here")
    args = p.parse_args(argv)

    models = {}
    if args.base.endswith(".pt"):
        if args.config is None:
            raise CircuitkitError("a checkpoint --base needs --config (its training TOML) for the architecture")
        models["base"] = load_checkpoint(Path(args.base), args.config)
    else:
        models["base"] = (load_model(args.base).eval(), args.base)
    if args.sparse and resolve_path(args.sparse) is not None:
        models["sparse"] = (load_model(args.sparse).eval(), args.sparse)
    tasks = TASKS + (VARIANTS if args.variants else [])
    rows = [{"model": kind, "source": src, **accuracy(m, name, opts, args.n, args.seed)}
            for kind, (m, src) in models.items() for name, opts in tasks]
    for r in rows:
        r["enters_study"] = r["model"] == "base" and r["accuracy"] >= ENTRY_ACCURACY
    print("| model | task | options | top-1 | corrupted top-1 | logit diff | enters study (base >= 80%) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "default"
        enters = ("yes" if r["enters_study"] else "no") if r["model"] == "base" else ""
        print(f"| {r['model']} | {r['task']} | {opts} | {r['accuracy']:.1%} | {r['corrupt_accuracy']:.1%} | "
              f"{r['logit_diff']:.2f} | {enters} |")
    out = json.dumps({"models": {k: src for k, (_, src) in models.items()}, "n": args.n, "seed": args.seed,
                      "rows": rows}, indent=1)
    print(out)
    if args.json:
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(out + "\n")
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
