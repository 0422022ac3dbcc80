"""circuitkit: sparse attention post-training and circuit discovery for hooked transformers.

Architecture, read top to bottom: ``tasks`` (datasets and metrics) → ``models`` (the one
place that builds or loads a model) → ``sparsity`` (gates and constrained finetuning) →
``circuits`` (graph, interventions, attribution, selection) → ``evaluation`` (faithfulness,
comparison) → ``plotting``, with ``cli`` on top.
"""

__version__ = "0.1.0"


class CircuitkitError(ValueError):
    """A user-facing error: the message says what was wrong and how to fix it."""
