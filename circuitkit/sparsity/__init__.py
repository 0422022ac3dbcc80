"""Sparse post-training of attention edges and MLP neurons (docs/method.md §1).

- :mod:`~circuitkit.sparsity.gates`: the gates as permanent TransformerLens hooks —
  :class:`GateConfig`, :class:`GateMode`, :func:`attach`, :func:`detach`, :func:`gate_mode`.
- :mod:`~circuitkit.sparsity.storage`: :func:`load_model` (any model, a sparse one with its
  gates attached), :func:`save_sparse_model`, :func:`attach_from_file`, :func:`model_fingerprint`.
- :mod:`~circuitkit.sparsity.objective`: the GECO-style constrained objective.
- :mod:`~circuitkit.sparsity.finetune`: ``circuitkit sparsify`` (single process or torchrun/DDP).
- :mod:`~circuitkit.sparsity.measure`: kept-edge and active-neuron fractions.
- text corpora come from :mod:`circuitkit.corpus` (one owner for every corpus).
"""

from circuitkit.sparsity.gates import (GateConfig, GateMode, Gates, attach, detach, gate_mode, get_gates,
                                       set_mode)
from circuitkit.sparsity.measure import SparsityReport, measure_sparsity
from circuitkit.sparsity.storage import (attach_from_file, load_model, model_fingerprint, read_sparsity_file,
                                        save_sparse_model)

__all__ = ["GateConfig", "GateMode", "Gates", "SparsityReport", "attach", "attach_from_file", "detach", "gate_mode",
           "get_gates", "load_model", "measure_sparsity", "model_fingerprint", "read_sparsity_file", "save_sparse_model",
           "set_mode"]
