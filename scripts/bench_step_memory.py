"""Peak memory of one training step: plain vs gated (attention; attention + MLP), issue 15.

Each variant in a fresh Python process (:func:`circuitkit.bench.memory.step_memory_probe`): build
the model, one warm-up step (so AdamW's state is part of the baseline), then the peak memory
growth of one more step (the bench's memory method, see :mod:`circuitkit.bench.memory`), and the
ratio of each growth to the plain step's. ``circuitkit bench --parts sparsity`` reports the same
beside its timings; this script measures memory only.

    python scripts/bench_step_memory.py [--arch JSON|NAME] [--batch 1] [--seq-lens 256,1024]
        [--threads 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys

from circuitkit.bench.memory import method_text, ratios_vs, step_memory_probe
from circuitkit.bench.steps import VARIANTS
from circuitkit.io import write_json

ARCH = '{"n_layers": 2, "d_model": 768, "n_heads": 12, "d_head": 64, "d_mlp": 3072, "n_ctx": 1024}'


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default=ARCH, help="model shape (default: 2 layers at GPT-2 width)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-lens", default="256,1024")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    rows = []
    for t in (int(x) for x in args.seq_lens.split(",")):
        probes = {name: step_memory_probe(name, {"arch": args.arch}, args.batch, t, args.threads) for name in VARIANTS}
        rows.append({"seq_len": t, "batch": args.batch, **probes, "ratio_vs_plain": ratios_vs(probes, "plain"),
                     "method": method_text(probes)})
        print(f"T={t}: " + ", ".join(f"{k} {v.get('delta_mib', v.get('error'))} MiB" for k, v in probes.items())
              + " | ratio vs plain " + ", ".join(f"{k} {r}" for k, r in rows[-1]["ratio_vs_plain"].items()), flush=True)
    out = {"arch": args.arch, "threads": args.threads, "rows": rows,
           "command": "python scripts/bench_step_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(json.dumps(out, indent=2))
    if args.json:
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
