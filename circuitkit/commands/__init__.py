"""The subcommands of ``circuitkit``, one module each: its flags (``add_arguments``) and its glue
(``run_cli``), on top of the library modules that do the work.

:mod:`circuitkit.cli` lists them and imports one only when it runs; :mod:`.options` holds
the flags several commands share, derived from the registries (attribution methods and
their typed options, ablations) so that the commands cannot disagree.
"""
