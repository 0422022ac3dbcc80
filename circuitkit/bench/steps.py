"""Cost of a gated sparse-training step vs a plain finetuning step (same model, same batch).

The gated step is :func:`circuitkit.sparsity.finetune.sparse_step`, the very function the
``circuitkit sparsify`` loop runs: gate hooks in training mode (binary-concrete noise,
straight-through gates), the soft-density term, the GECO Lagrangian, the density
statistics the loop logs, backward, gradient clipping, AdamW. The plain step is forward,
masked CE, backward, clipping and AdamW. Both with the loop's defaults
(:class:`~circuitkit.sparsity.finetune.SparsifyConfig`). ``scripts/bench_sparsity_step.py``
is :func:`main`; the bench's ``sparsity`` part (:func:`circuitkit.bench.parts.sparsity_part`) runs
:func:`measure_steps`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any, Callable, Mapping, Sequence

import torch

from circuitkit.bench.config import TARGETS, build_shape
from circuitkit.bench.timing import CLOCK, Clock, now
from circuitkit.io import write_json
from circuitkit.models import load_model
from circuitkit.sparsity import GateConfig, GateMode, attach, detach, get_gates
from circuitkit.sparsity.finetune import SparsifyConfig, sparse_step
from circuitkit.sparsity.objective import Geco, GecoState
from circuitkit.tasks import get_task
from circuitkit.training import masked_ce


TARGET_RATIO = TARGETS["gated_vs_plain"]
BENCH_LR = 1e-5  # small: the weights barely move over the timed steps
VARIANTS = {"plain": None, "attn": GateConfig(attn=True, mlp=False), "attn+mlp": GateConfig(attn=True, mlp=True)}


def make_batch(model, batch: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:  # tokens, mask [batch, pos]
    g = torch.Generator().manual_seed(0)
    if seq_len <= 0:  # the addition task (12 tokens)
        return get_task("addition").train_batch(batch, g)
    tokens = torch.randint(model.cfg.d_vocab, (batch, seq_len), generator=g)
    return tokens, torch.ones_like(tokens, dtype=torch.bool)


def plain_step(model, opt, tokens: torch.Tensor, mask: torch.Tensor,  # [batch, pos] each
               grad_clip: float = SparsifyConfig.grad_clip) -> None:
    ce = masked_ce(model(tokens), tokens, mask)
    opt.zero_grad(set_to_none=True)
    ce.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()


def step_runner(model, tokens: torch.Tensor, mask: torch.Tensor,  # [batch, pos] each
                gated: bool) -> Callable[[int], None]:
    """``run(i)`` does training step ``i`` (one AdamW optimizer kept across calls); ``gated``: the
    model's gates (attached in training mode) through :func:`sparse_step`, one mixture constraint,
    gate noise seeded with ``i``."""
    opt = torch.optim.AdamW(model.parameters(), lr=BENCH_LR, weight_decay=0.0)
    gates = get_gates(model) if gated else None
    geco, states = [Geco(target=1.0)], [GecoState()]
    row_task = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)  # [batch]: one task
    task_w = torch.ones(1, dtype=torch.float64)  # [n_tasks]
    noise = torch.Generator(device=tokens.device)

    def run(i: int) -> None:
        nonlocal states
        if gated:
            noise.manual_seed(i)
            gates.noise_generator = noise
            states = sparse_step(model, model, gates, opt, None, tokens, mask, row_task, gecos=geco, states=states,
                                 targets=[1.0], task_w=task_w, per_task=False, w_attn=SparsifyConfig.w_attn,
                                 w_mlp=SparsifyConfig.w_mlp, grad_clip=SparsifyConfig.grad_clip,
                                 log_heads=SparsifyConfig.log_heads, step=i, lr=BENCH_LR).states
        else:
            plain_step(model, opt, tokens, mask)

    return run


def time_steps(model, tokens: torch.Tensor, mask: torch.Tensor,  # [batch, pos] each
               n: int, gated: bool, warmup: int = 3) -> list[float]:
    """Seconds of each of ``n`` steps of :func:`step_runner` after ``warmup`` untimed ones."""
    run = step_runner(model, tokens, mask, gated)
    times = []
    for i in range(warmup + n):
        t0 = now()
        run(i)
        if i >= warmup:
            times.append(now() - t0)
    return times


def measure_steps(model: str | None = None, arch: str = "toy-4l", batch: int = 128, seq_len: int = 0,
                  steps: int = 30, threads: int = 1, rounds: int = 3) -> dict[str, Any]:
    """Median step time of each variant (plain, attention gates, attention + MLP gates) and its
    ratio to plain, the variants interleaved over ``rounds`` rounds on fresh copies of the model."""
    torch.set_num_threads(threads)

    def fresh():
        m = load_model(model, gates=False) if model else build_shape(arch)
        m.train()
        return m

    tokens, mask = make_batch(fresh(), batch, seq_len)
    samples: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for _ in range(rounds):
        for name, gc in VARIANTS.items():
            m = fresh()
            if gc is not None:
                attach(m, gc, GateMode.TRAIN).collect = True
            samples[name] += time_steps(m, tokens, mask, max(1, steps // rounds), gated=gc is not None)
            if gc is not None:
                detach(m)
    plain = statistics.median(samples["plain"])
    results = {}
    for name, ts in samples.items():
        med = statistics.median(ts)
        results[name] = {"median_ms": round(med * 1e3, 3), "ratio": round(med / plain, 3)}
    return {"model": model or arch, "batch": batch, "seq_len": int(tokens.shape[1]), "threads": threads,
            "steps": len(samples["plain"]), "results": results, "target_ratio": TARGET_RATIO,
            "meets_target": all(r["ratio"] <= TARGET_RATIO for r in results.values())}


def step_variants(model_factory: Callable[[], Any], batch: int, seq_len: int) -> dict[str, tuple]:
    """A plain and a gated (attention gates, training mode) model with a random-token batch each (scaling)."""
    variants = {}
    for name, gc in (("plain_step", None), ("gated_step", VARIANTS["attn"])):
        m = model_factory()
        m.train()
        tokens, mask = make_batch(m, batch, seq_len)
        if gc is not None:
            attach(m, gc, GateMode.TRAIN).collect = True
        variants[name] = (m, tokens, mask, gc is not None)
    return variants


def time_step_variants(setups: Sequence[Mapping[str, tuple]], repeats: int, warmup: int,
                       rounds: int = 3) -> list[dict[str, float]]:
    """Median step time (ms) of every variant of every setup; all of them alternate over ``rounds``
    rounds (each call: ``warmup`` untimed steps first)."""
    samples = [{k: [] for k in v} for v in setups]
    per_round = max(1, -(-repeats // rounds))
    for _ in range(rounds):
        for variants, out in zip(setups, samples):
            for name, (m, tokens, mask, gated) in variants.items():
                out[name] += time_steps(m, tokens, mask, per_round, gated=gated, warmup=warmup)
    return [{k: round(statistics.median(v) * 1e3, 3) for k, v in out.items()} for out in samples]


def main(argv: list[str] | None = None) -> int:
    """``python scripts/bench_sparsity_step.py``: JSON and a markdown table on stdout (``--json``: a file too)."""
    p = argparse.ArgumentParser(prog="bench_sparsity_step.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a zoo name or checkpoint folder (default: a fresh --arch model)")
    p.add_argument("--arch", default="toy-4l", help="shape when no --model is given: a toy architecture, "
                   "gpt2-small-shape or a JSON object of HookedTransformerConfig fields (default toy-4l)")
    p.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--seq-len", type=int, default=0, help="0: addition prompts (12 tokens); else random tokens")
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant (default 30)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--clock", choices=[c.value for c in Clock], default="wall",
                   help="wall time, or this process's CPU time (user + system; for a machine shared with other "
                        "jobs); default wall")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    CLOCK[0] = Clock(args.clock)
    out = measure_steps(args.model, args.arch, args.batch, args.seq_len, args.steps, args.threads)
    out["clock"] = args.clock
    print(json.dumps(out, indent=2))
    print()
    print(f"| variant | median step (ms) | ratio vs plain |  ({out['model']}, batch {args.batch}, "
          f"T={out['seq_len']}, {args.threads} thread(s))")
    print("|---|---|---|")
    for name, r in out["results"].items():
        print(f"| {name} | {r['median_ms']:.2f} | {r['ratio']:.2f}× |")
    if args.json:
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
