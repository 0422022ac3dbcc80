"""circuitkit: sparse attention post-training and circuit discovery for hooked transformers.

Architecture, read top to bottom: ``tasks`` (datasets and metrics) → ``models`` (the one
place that builds or loads a model) → ``sparsity`` (gates and constrained finetuning) →
``circuits`` (graph, interventions, attribution, selection) → ``evaluation`` (faithfulness,
comparison) → ``plotting``, with ``commands`` (and ``cli``, which lists them) on top.
"""

__version__ = "0.1.0"


class CircuitkitError(ValueError):
    """A user-facing error: the message says what was wrong and how to fix it."""


def parse_enum(cls, value, what: str):
    """``value`` as a member of the Enum ``cls`` (a member, or its value in any case).

    Raises :class:`CircuitkitError` naming ``what`` it was meant to be and every choice.
    """
    if isinstance(value, cls):
        return value
    try:
        return cls(str(value).lower())
    except ValueError:
        raise CircuitkitError(f"unknown {what} {value!r}; choose one of "
                              f"{', '.join(m.value for m in cls)}") from None
