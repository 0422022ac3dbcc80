"""The ``circuitkit`` command. Each subcommand lives in the module that owns the work.

A subcommand module exposes ``add_arguments(parser)`` and ``run_cli(args) -> int``; this
file only lists them, so adding a subcommand never touches another module. Errors that
circuitkit raises for bad input (:class:`circuitkit.CircuitkitError`) are printed as one
message, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from circuitkit import CircuitkitError

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("circuitkit.training", "train a toy model from scratch from a TOML config"),
    "sparsify": ("circuitkit.sparsity.finetune", "sparse post-training of attention edges / MLP neurons"),
    "discover": ("circuitkit.circuits.discover", "find a task's circuit with an attribution method"),
    "compare": ("circuitkit.evaluation.compare", "verify and compare base vs sparse circuits"),
    "run": ("circuitkit.pipeline", "the whole study on the shipped zoo: discover, verify, compare, report"),
    "bench": ("circuitkit.bench", "benchmarks: attribution cost, peers, sparse training cost, scaling"),
    "zoo": ("circuitkit.zoo_cli", "list the shipped models and their cards"),
}


def build_parser(available_only: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="circuitkit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if available_only and e.name == module_name:
                continue  # not built yet
            raise
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args._module.run_cli(args) or 0)
    except CircuitkitError as e:
        print(f"circuitkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"circuitkit {args.command}: interrupted; checkpoints written so far are intact "
              "(rerun with --resume to continue)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
