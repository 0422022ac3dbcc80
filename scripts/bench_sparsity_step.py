"""Cost of a gated sparse-training step vs a plain finetuning step (same model, same batch).

    python scripts/bench_sparsity_step.py [--model toy-addition | --arch toy-4l] [--batch 128]
        [--seq-len 0] [--steps 30] [--threads 1] [--json out.json]

A plain step is forward, masked CE, backward, gradient clipping and an AdamW step. A
gated step does the same through the gate hooks in training mode (binary-concrete noise,
straight-through gates, the soft-density term, the GECO Lagrangian and the per-step
density statistics that ``circuitkit sparsify`` logs), for attention gates only and for
attention + MLP gates. Reports the median step time of each and the ratio gated/plain
(target ≤ 1.5×) as JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from circuitkit.models import build_model, load_model, toy_config
from circuitkit.sparsity import GateConfig, GateMode, attach, detach
from circuitkit.sparsity.objective import Geco, GecoState, sparsity_objective
from circuitkit.tasks import get_task
from circuitkit.training import masked_ce


def make_batch(model, batch: int, seq_len: int):
    g = torch.Generator().manual_seed(0)
    if seq_len <= 0:  # the addition task (12 tokens)
        return get_task("addition").train_batch(batch, g)
    tokens = torch.randint(model.cfg.d_vocab, (batch, seq_len), generator=g)
    return tokens, torch.ones_like(tokens, dtype=torch.bool)


def time_steps(model, tokens, mask, n: int, gated: bool, warmup: int = 3) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    geco = Geco(target=1.0)
    state = GecoState()
    gates = getattr(model, "circuitkit_gates", None)
    noise = torch.Generator()
    times = []
    for i in range(warmup + n):
        t0 = time.perf_counter()
        if gated:
            noise.manual_seed(i)
            gates.noise_generator = noise
            gates.clear_stats()
        logits = model(tokens)
        ce = masked_ce(logits, tokens, mask)
        if gated:
            sp = gates.sparsity()
            loss = geco.lagrangian(sparsity_objective(sp["attn"], sp["mlp"]), ce, state)
            gates.density_report(heads=True)  # what the training loop logs
        else:
            loss = ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if gated:
            state = geco.update(state, float(ce))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a zoo name or checkpoint folder (default: a fresh --arch model)")
    p.add_argument("--arch", default="toy-4l")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=0, help="0: addition prompts (12 tokens); else random tokens")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    def fresh():
        m = load_model(args.model, gates=False) if args.model else build_model(toy_config(args.arch, seed=0))
        m.train()
        return m

    model = fresh()
    tokens, mask = make_batch(model, args.batch, args.seq_len)
    results = {}
    # interleave the variants over rounds so background load hits them alike
    variants = {"plain": None, "attn": GateConfig(attn=True, mlp=False), "attn+mlp": GateConfig(attn=True, mlp=True)}
    samples: dict[str, list[float]] = {k: [] for k in variants}
    rounds = 3
    for _ in range(rounds):
        for name, gc in variants.items():
            m = fresh()
            if gc is not None:
                g = attach(m, gc, GateMode.TRAIN)
                g.collect = True
            samples[name] += time_steps(m, tokens, mask, max(1, args.steps // rounds), gated=gc is not None)
            if gc is not None:
                detach(m)
    plain = statistics.median(samples["plain"])
    for name, ts in samples.items():
        med = statistics.median(ts)
        results[name] = {"median_ms": round(med * 1e3, 3), "ratio": round(med / plain, 3)}
    out = {"model": args.model or args.arch, "batch": args.batch, "seq_len": int(tokens.shape[1]),
           "threads": args.threads, "steps": len(samples["plain"]), "results": results,
           "target_ratio": 1.5, "meets_target": all(r["ratio"] <= 1.5 for r in results.values())}
    print(json.dumps(out, indent=2))
    print()
    print(f"| variant | median step (ms) | ratio vs plain |  ({out['model']}, batch {args.batch}, "
          f"T={out['seq_len']}, {args.threads} thread(s))")
    print("|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['median_ms']:.2f} | {r['ratio']:.2f}× |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
