"""``circuitkit bench``: what attribution and sparse training cost, side by side with a peer.

Why: the claims "EAP costs about two forwards and a backward", "our scores equal
auto-circuit's" and "a gated step costs about a plain step" need numbers that anyone can
reproduce with one command. Parts (``--parts``, all by default):

- ``attribution``: ``eap`` and ``eap-ig`` on one batch against the *floor*, the bare model
  (no hooks, default TransformerLens flags) doing the same work: a no-grad forward on the
  corrupted prompts plus a forward and a backward on the clean prompts. The backward of the
  floor goes to the input activations only (what EAP needs); a floor whose backward also
  computes parameter gradients (a training backward) is reported beside it. eap-ig with
  ``m`` steps is compared with ``2 forwards + m × (forward + backward)``, and per step.
  Peak memory (:mod:`.memory`): a fresh subprocess per measurement, the growth of the peak
  resident set over the one after loading the model and a 1-example warm-up (CUDA:
  ``torch.cuda.max_memory_allocated``), and each growth's ratio to the floor's (target ≤ 1.5×).
- ``peer``: auto-circuit 1.0.1's ``mask_gradient_prune_scores`` (``mask_val=0``,
  ``grad_function="logit"``, ``answer_function="avg_diff"``, i.e. EAP) on a copy of the
  same ``HookedTransformer`` and the same clean/corrupted batch; edges are matched by name
  (:func:`~circuitkit.bench.peer.peer_edge_name`) and compared (Pearson, top-50 overlap). A plain-autograd
  reference (:func:`~circuitkit.bench.reference.reference_eap_scores`) is a second, independent check and
  the fallback when the peer cannot be imported.
- ``patching``: exact patching of every edge (time per edge, total).
- ``sparsity``: gated vs plain finetuning step; the gated step is the training loop's own
  :func:`circuitkit.sparsity.finetune.sparse_step` (``scripts/bench_sparsity_step.py``); with
  memory, each variant's peak growth over one step after a warm-up step, and its ratio to the
  plain step's (``scripts/bench_step_memory.py`` measures only that).
- ``scaling``: floor, eap, eap-ig and the plain / gated step against sequence length and
  depth (random weights), as a table and ``figures/scaling.png`` / ``.svg``; ``--scaling-with``
  draws committed results at other shapes (a GPT-2-small-shape attribution run, the long-context
  gated-step rows) into the figure's ratio panels, and ``--replot`` redraws the figure from a
  committed result without measuring (:func:`~circuitkit.bench.parts.replot_scaling`).

Timings are medians of ``--repeats`` runs after ``--warmup`` runs, with the variants of
one part interleaved round by round so background load hits them alike.

Modules: :mod:`.config` (settings, model and batch), :mod:`.timing` (interleaved medians,
the floor, our methods), :mod:`.memory` (peak-memory subprocesses), :mod:`.peer` (the
auto-circuit adapter), :mod:`.reference` (the plain-autograd EAP, agreement),
:mod:`.steps` (training-step cost), :mod:`.scaling`, :mod:`.parts` (the parts and
:func:`run_bench`), :mod:`.report` (environment, markdown, files). The flags are in
:mod:`circuitkit.commands.bench`.
"""

from __future__ import annotations

from circuitkit.bench.config import PARTS, TARGETS, config_from_args, resolve_model_spec, tiled
from circuitkit.bench.parts import attribution_part, patching_part, peer_part, replot_scaling, run_bench
from circuitkit.bench.peer import PeerRunner, PeerUnavailable, import_peer, peer_edge_name, peer_node_name
from circuitkit.bench.reference import agreement, reference_eap_scores
from circuitkit.bench.report import to_markdown, write_results

__all__ = ["PARTS", "TARGETS", "PeerRunner", "PeerUnavailable", "agreement", "attribution_part", "config_from_args",
           "import_peer", "patching_part", "peer_edge_name", "peer_node_name", "peer_part", "reference_eap_scores",
           "replot_scaling", "resolve_model_spec", "run_bench", "tiled", "to_markdown", "write_results"]
