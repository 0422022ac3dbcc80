"""``circuitkit train``: its flags and glue are those of :mod:`circuitkit.training`, which owns the
train config (``TrainConfig``) they override."""

from circuitkit.training import add_arguments, run_cli  # noqa: F401
