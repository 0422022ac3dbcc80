"""Sparse post-training of attention edges and MLP neurons (docs/method.md §1).

- :mod:`~circuitkit.sparsity.gates`: the gates as permanent TransformerLens hooks —
  :class:`GateConfig`, :class:`GateMode`, :func:`attach`, :func:`detach`, :func:`gate_mode`.
- :mod:`~circuitkit.sparsity.storage`: :func:`save_sparse_model`, :func:`attach_from_file`
  (what :func:`circuitkit.models.load_model` calls for a folder with ``sparsity.json``).
- :mod:`~circuitkit.sparsity.objective`: the GECO-style constrained objective.
- :mod:`~circuitkit.sparsity.finetune`: ``circuitkit sparsify`` (single process or torchrun/DDP).
- :mod:`~circuitkit.sparsity.measure`: kept-edge and active-neuron fractions.
- :mod:`~circuitkit.sparsity.corpus`: text corpora chunked for pretrained LMs.
"""

from circuitkit.sparsity.gates import (GateConfig, GateMode, Gates, attach, detach, gate_mode, get_gates,
                                       set_mode)
from circuitkit.sparsity.storage import attach_from_file, read_sparsity_file, save_sparse_model

__all__ = ["GateConfig", "GateMode", "Gates", "attach", "attach_from_file", "detach", "gate_mode", "get_gates",
           "measure_sparsity", "read_sparsity_file", "save_sparse_model", "set_mode"]


def __getattr__(name):  # measure pulls in tasks; import it lazily
    if name == "measure_sparsity":
        from circuitkit.sparsity.measure import measure_sparsity

        return measure_sparsity
    raise AttributeError(name)
