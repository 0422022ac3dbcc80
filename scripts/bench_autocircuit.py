"""circuitkit eap side by side with auto-circuit 1.0.1 at GPT-2-small shape (issue 15).

Times auto-circuit's ``mask_gradient_prune_scores`` (EAP: mask 0, logit gradient, avg_diff) and
circuitkit's ``eap`` on the same random-weight GPT-2-small-shape model (12 layers, 12 heads,
d_model 768, d_mlp 3072, toy vocabulary) and the same ioi batch, interleaved round by round, and
compares their 32,491 edge scores (Pearson, Spearman, top-50 overlap): the bench's ``peer`` part
(:func:`circuitkit.bench.parts.peer_part`) on that model. Writes ``benchmarks/NAME.{json,md}``.

auto-circuit pulls in its own tqdm fork and is kept out of the main environment: run it from a
separate virtual environment that has circuitkit's dependencies, auto-circuit and the same torch
and TransformerLens versions, with this checkout on PYTHONPATH. One pip command installs all of
it, auto-circuit's declared dependencies included (kaleido 0.2.1, tracr-pypi 1.0.0 with jax and
dm-haiku, word2word, plotly, blobfile, vscode-tqdm; TransformerLens brings transformers and
wandb); torch is pinned in it so that pip keeps the CPU build (``pip install --dry-run`` from an empty
environment: torch 2.13.0+cpu, no CUDA packages)::

    python -m venv /work/venv-ac
    /work/venv-ac/bin/pip install torch==2.13.0 auto-circuit==1.0.1 "transformer-lens==3.9.*" attrs pandas \\
        networkx matplotlib safetensors jaxtyping tabulate einops
    nice -n 10 env OMP_NUM_THREADS=1 PYTHONPATH=$PWD /work/venv-ac/bin/python scripts/bench_autocircuit.py \\
        [--batch 8] [--repeats 3] [--clock cpu] [--no-memory] [--name autocircuit-gpt2-small-shape]

Any later pip command in that environment should pin ``torch==2.13.0`` too.
"""

import argparse
import sys

from circuitkit.bench.peer import PeerUnavailable, import_peer
from circuitkit.cli import main


def run(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:gpt2-small-shape")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clock", choices=["wall", "cpu"], default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocess of the peer")
    p.add_argument("--name", default="autocircuit-gpt2-small-shape")
    args = p.parse_args(argv)
    try:
        import_peer()
    except PeerUnavailable as e:
        print(f"bench_autocircuit.py: {e}. Set up the separate environment described in this script's "
              "docstring and run it with that environment's python.", file=sys.stderr)
        return 2
    flags = ["bench", "--model", args.model, "--parts", "peer", "--batch", str(args.batch), "--repeats",
             str(args.repeats), "--clock", args.clock, "--threads", str(args.threads), "--out", "benchmarks",
             "--name", args.name] + (["--no-memory"] if args.no_memory else [])
    return main(flags)


if __name__ == "__main__":
    sys.exit(run())
