"""Cost of a gated sparse-training step vs a plain finetuning step (same model, same batch).

    python scripts/bench_sparsity_step.py [--model toy-addition | --arch toy-4l] [--batch 128]
        [--seq-len 0] [--steps 30] [--threads 1] [--json out.json]

The gated step is the one ``circuitkit sparsify`` runs (``circuitkit.sparsity.finetune.sparse_step``);
see :mod:`circuitkit.bench.steps`. Prints the median step time of each variant and the ratio
gated/plain (target ≤ 1.5×) as JSON and a markdown table.
"""

import sys

from circuitkit.bench.steps import main

if __name__ == "__main__":
    sys.exit(main())
