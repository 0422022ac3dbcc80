"""Before/after of the block-by-block training-mode gate and of its fusion with the attention
pattern multiply (issue 15), side by side in one run.

Times, interleaved round by round on fresh copies of one model: the plain finetuning step, the
gated step (attention gates, training mode, :func:`circuitkit.sparsity.finetune.sparse_step`) as
shipped ("fused, now": the gate made block by block inside one autograd function with the pattern
multiply and one blocked backward pass), the same step with the blocked gate and a separate autograd
multiply ("blocked, unfused"), and with the gate computed as first written (the noise's integers, the
gate, every intermediate of the straight-through backward and the hard-density statistic full-size
[batch, head, q, k] tensors, "whole-tensor, before"). The two older variants are
:mod:`circuitkit.bench.gate_reference`, which ``tests/test_sparsity_gate_blocks.py`` shows gives the
same bits. Each row also times one layer's gate alone (the two gate hooks around a softmax and the
backward, minus the same without the gate), which the whole step's spread does not blur.

    python scripts/bench_gate_blocks.py [--seq-lens 256,1024] [--steps 6] [--clock cpu] [--json FILE]

Default model: 2 layers at GPT-2 width (d_model 768, 12 heads, d_mlp 3072), batch 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys

import torch

from circuitkit.bench.config import build_shape
from circuitkit.bench.gate_reference import unfused_gate, whole_tensor_gate
from circuitkit.bench.scaling import GATED_NOW
from circuitkit.bench.steps import VARIANTS, make_batch, step_runner
from circuitkit.bench.timing import CLOCK, Clock, now
from circuitkit.io import write_json
from circuitkit.sparsity import GateMode, attach

ARCH = '{"n_layers": 2, "d_model": 768, "n_heads": 12, "d_head": 64, "d_mlp": 3072, "n_ctx": 1024}'


VARIANTS_GATE = {"plain": (False, contextlib.nullcontext), GATED_NOW: (True, contextlib.nullcontext),
                 "gated (blocked, unfused)": (True, unfused_gate),
                 "gated (whole-tensor, before)": (True, whole_tensor_gate)}


def measure_gate_only(arch: str, batch: int, seq_len: int, rounds: int = 7) -> dict:
    """One attention layer's gate alone: the two gate hooks around softmax, and the backward of a
    loss on the gated pattern and the soft density, minus the same without the gate (median ms per
    variant, interleaved; free of the matmuls' run-to-run spread that dominates a whole step)."""
    m = build_shape(arch)
    gates = attach(m, VARIANTS["attn"], GateMode.TRAIN)
    gates.collect = True
    h = m.cfg.n_heads
    g = torch.Generator().manual_seed(0)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    base = torch.randn((batch, h, seq_len, seq_len), generator=g).masked_fill(~causal, float("-inf"))
    w = torch.randn(base.shape, generator=g)  # [batch, head, q, k]
    hook = m.hook_dict["blocks.0.attn.hook_pattern"]

    def layer(gated: bool) -> None:
        scores = base.clone().requires_grad_(True)
        if gated:
            gates.noise_generator = torch.Generator().manual_seed(1)
            gates._attn_scores_hook(scores, hook, layer=0)
        p = torch.softmax(scores, -1)
        p = torch.where(torch.isnan(p), torch.zeros_like(p), p)  # as TransformerLens does
        loss = ((gates._attn_pattern_hook(p, hook, layer=0) if gated else p) * w).sum()
        (loss + gates.sparsity()["attn"] if gated else loss).backward()

    samples: dict[str, list[float]] = {k: [] for k in VARIANTS_GATE}
    for _ in range(rounds):
        for name, (gated, ctx) in VARIANTS_GATE.items():
            with ctx():
                layer(gated)  # warm-up
                t0 = now()
                layer(gated)
                samples[name].append(now() - t0)
    plain = statistics.median(samples["plain"])
    return {k: {"median_ms": round(statistics.median(v) * 1e3, 1),
                "gate_ms": round((statistics.median(v) - plain) * 1e3, 1)} for k, v in samples.items()}


def measure(arch: str, batch: int, seq_len: int, steps: int, rounds: int = 3) -> dict:
    variants = VARIANTS_GATE
    samples: dict[str, list[float]] = {k: [] for k in variants}
    per_round = max(1, steps // rounds)
    for _ in range(rounds):
        for name, (gated, ctx) in variants.items():
            m = build_shape(arch)
            m.train()
            if gated:
                attach(m, VARIANTS["attn"], GateMode.TRAIN).collect = True
            tokens, mask = make_batch(m, batch, seq_len)
            with ctx():
                run = step_runner(m, tokens, mask, gated)
                run(0)  # warm-up
                for i in range(per_round):
                    t0 = now()
                    run(i + 1)
                    samples[name].append(now() - t0)
    plain = statistics.median(samples["plain"])
    return {"seq_len": seq_len, "batch": batch, "steps": len(samples["plain"]),
            "results": {k: {"median_ms": round(statistics.median(v) * 1e3, 1),
                            "ratio_vs_plain": round(statistics.median(v) / plain, 3),
                            "samples_ms": [round(x * 1e3, 1) for x in v]} for k, v in samples.items()},
            "one_layer_gate_only": measure_gate_only(arch, batch, seq_len)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default=ARCH, help="model shape (default: 2 layers at GPT-2 width)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-lens", default="256,1024")
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant, over 3 rounds (default 6)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=[c.value for c in Clock], default="cpu")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    CLOCK[0] = Clock(args.clock)
    rows = [measure(args.arch, args.batch, int(t), args.steps) for t in args.seq_lens.split(",")]
    out = {"arch": args.arch, "threads": args.threads, "clock": args.clock, "rows": rows,
           "command": "python scripts/bench_gate_blocks.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(json.dumps(out, indent=2))
    for r in rows:
        print(f"\nT={r['seq_len']}, batch {r['batch']}, {r['steps']} steps each ({args.clock} clock)")
        for k, v in r["results"].items():
            gate = r["one_layer_gate_only"][k]["gate_ms"]
            print(f"| {k} | {v['median_ms']:.0f} ms | {v['ratio_vs_plain']:.2f}× "
                  f"| one layer's gate alone {gate:.1f} ms |")
    if args.json:
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
