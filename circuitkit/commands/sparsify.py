"""``circuitkit sparsify``: its flags and glue are those of :mod:`circuitkit.sparsity.finetune`,
which owns the sparsify config (``SparsifyConfig``) they override."""

from circuitkit.sparsity.finetune import add_arguments, run_cli  # noqa: F401
