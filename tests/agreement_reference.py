"""Stored exact-patching scores for ``tests/test_circuits_agreement.py``, checked live.

The agreement criterion needs exact patching on 1,024 prompts per case (six cases), which was most
of the suite's time. The test now computes exact patching live on the first ``LIVE`` prompts only
and takes the mean over the other prompts from ``tests/data/agreement_patching.safetensors``,
written by this module's ``main`` with the same code. The stored part is trusted only when

- the model's weights and the dataset's tokens hash to the values it was made from (otherwise the
  test computes every prompt live: slow, still correct), and
- the live scores of the first ``LIVE`` prompts equal the stored ones (otherwise exact patching has
  changed since the file was made, and the test fails and says how to refresh it).

Refresh (about 1 minute per case on 2 cores)::

    python tests/agreement_reference.py
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from circuitkit.circuits import Graph, attribute

PATH = Path(__file__).parent / "data" / "agreement_patching.safetensors"
LIVE = 256  # prompts whose exact patching runs in the test itself
BATCH = 256
REFRESH = "python tests/agreement_reference.py"


def model_hash(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def dataset_hash(ds) -> str:
    h = hashlib.sha256()
    for t in (ds.clean, ds.corrupt, ds.answer_pos, ds.correct, ds.distractors):
        h.update(t.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _key(case: str) -> tuple[str, str]:
    return f"{case}/live", f"{case}/rest"


def _stored(case: str, model, ds) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(live-part mean [n_src, n_dst], rest mean [n_src, n_dst]) if the file holds this exact case."""
    if not PATH.exists():
        return None
    with safe_open(PATH, framework="pt") as f:
        meta = json.loads(f.metadata().get("cases", "{}")).get(case)
        if meta != {"model": model_hash(model), "dataset": dataset_hash(ds), "n": len(ds), "live": LIVE}:
            return None
        live, rest = _key(case)
        return f.get_tensor(live), f.get_tensor(rest)


def patching_graph(case: str, model, ds) -> Graph:
    """Exact patching over all of ``ds`` (the mean of every prompt's score), the first ``LIVE``
    prompts computed now and the rest from the stored file when it holds this case."""
    live = attribute(model, ds[:LIVE], "patching", batch_size=BATCH)
    stored = _stored(case, model, ds)
    if stored is None:  # another model or other prompts: everything live
        rest = attribute(model, ds[LIVE:], "patching", batch_size=BATCH).scores
    else:
        head, rest = stored
        scale = float(head.abs().max())
        gap = float((live.scores - head).abs().max())
        assert gap <= 1e-5 * scale, (
            f"{case}: exact patching on the first {LIVE} prompts differs from the stored scores by {gap:.3g} "
            f"(largest |score| {scale:.3g}): exact patching has changed since {PATH.name} was made. If the "
            f"change is intended (and tests/test_circuits_core.py's patching tests pass), refresh it: {REFRESH}")
    n = len(ds)
    return live.with_scores((live.scores * LIVE + rest * (n - LIVE)) / n)


def main(cases) -> int:
    """Recompute and store every case: ``cases`` yields (case id, model, dataset)."""
    tensors, meta = {}, {}
    for case, model, ds in cases:
        live_key, rest_key = _key(case)
        tensors[live_key] = attribute(model, ds[:LIVE], "patching", batch_size=BATCH).scores.contiguous()
        tensors[rest_key] = attribute(model, ds[LIVE:], "patching", batch_size=BATCH).scores.contiguous()
        meta[case] = {"model": model_hash(model), "dataset": dataset_hash(ds), "n": len(ds), "live": LIVE}
        print(f"{case}: stored", flush=True)
    PATH.parent.mkdir(parents=True, exist_ok=True)
    tmp = PATH.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"cases": json.dumps(meta, sort_keys=True)})
    tmp.replace(PATH)
    print(f"wrote {PATH}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    from test_circuits_agreement import agreement_cases  # the test's own cases and prompts

    raise SystemExit(main(agreement_cases()))
