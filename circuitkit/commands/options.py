"""Flags shared by several commands, derived from the registries so that commands agree.

``--method`` takes the names of :func:`circuitkit.circuits.attribution.method_names`
(methods registered with ``register_method`` included), every typed option some method
declares becomes one flag (``--ig-steps``, ``--tau``, ...), ``--ablation`` takes the values
of :class:`~circuitkit.circuits.interventions.Ablation`, ``--batch-size`` defaults to
:data:`~circuitkit.circuits.interventions.DEFAULT_BATCH_SIZE`.
"""

from __future__ import annotations

import argparse
from typing import Any

from circuitkit import CircuitkitError
from circuitkit.circuits.attribution import all_options, get_method, method_names
from circuitkit.circuits.interventions import DEFAULT_BATCH_SIZE, Ablation

OPTION_PREFIX = "method_option_"  # argparse dest of a method option's flag


def add_method_flags(p: argparse.ArgumentParser, default: str = "eap-ig",
                     aliases: dict[str, list[str]] | None = None) -> None:
    """``--method`` and one flag per method option (``aliases``: extra deprecated flags by option name)."""
    names = method_names()
    p.add_argument("--method", default=default, choices=names, metavar="METHOD",
                   help=f"attribution method: {', '.join(names)} (default {default})")
    for o in all_options():
        takers = [m for m in names if o.name in get_method(m).option_names]
        flags = [o.cli_flag] + list((aliases or {}).get(o.name, []))
        p.add_argument(*flags, dest=OPTION_PREFIX + o.name, type=o.type, default=None,
                       help=f"{o.help} (default {o.default}; for {', '.join(takers)})"
                            + (f"; {', '.join(flags[1:])}: deprecated spelling" if len(flags) > 1 else ""))


def method_options(args: argparse.Namespace, method: str | None = None) -> dict[str, Any]:
    """The options given on the command line for ``method`` (default ``args.method``).

    A flag given for a method that does not take it is an error, not silently dropped.
    """
    m = get_method(method or args.method)
    given = {k[len(OPTION_PREFIX):]: v for k, v in vars(args).items()
             if k.startswith(OPTION_PREFIX) and v is not None}
    flags = {o.name: o.cli_flag for o in all_options()}
    bad = sorted(set(given) - set(m.option_names))
    if bad:
        raise CircuitkitError(f"{', '.join(flags[b] for b in bad)} does not apply to method {m.name!r}, which takes "
                              f"{', '.join(o.cli_flag for o in m.options) or 'no options'}")
    return {**m.defaults(), **given}


def add_ablation_flag(p: argparse.ArgumentParser) -> None:
    values = [a.value for a in Ablation]
    p.add_argument("--ablation", default=Ablation.PATCHING.value, choices=values,
                   help=f"what an ablated edge carries: {', '.join(values)} (default {Ablation.PATCHING.value})")


def add_batch_size_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"examples per forward pass (default {DEFAULT_BATCH_SIZE}); lower it to save memory")


def add_progress_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_resume_flags(p: argparse.ArgumentParser, pair_level: bool = False) -> None:
    """--resume / --force for a command that saves one result per (model, task) into its results folder
    (circuitkit.evaluation.compare.check_results_folder refuses a used folder without one of them)."""
    p.add_argument("--resume", action="store_true",
                   help="the results folder holds results (finished or stopped): reuse each one saved there under the "
                        "same settings, model weights and prompts, compute the rest"
                        + (" (at the attention-pair level: the saved pair scores; its curves and minimal circuit are "
                           "computed again from them)" if pair_level else ""))
    p.add_argument("--force", action="store_true",
                   help="the results folder holds results: compute everything again and write over them")


def positive(args: argparse.Namespace, *names: str) -> None:
    """Refuse a zero or negative count before any work starts."""
    for n in names:
        v = getattr(args, n)
        if v is not None and v <= 0:
            raise CircuitkitError(f"--{n.replace('_', '-')} must be positive, got {v}")


def add_stop_at_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stop-at", type=int, metavar="STEP",
                   help="stop after this global step with a checkpoint, the schedule still spanning --steps; "
                        "continue later with --resume (a long run split across sessions)")


def report_stop(result: dict, steps: int, run_dir) -> bool:
    """Say so when a run stopped before its last step (``--stop-at``); True if it did."""
    if result.get("finished", True):
        return False
    print(f"stopped at step {result['step']} of {steps}; the checkpoint is in {run_dir}: continue with --resume "
          "(the same config and flags, without --stop-at or with a later one)")
    return True
