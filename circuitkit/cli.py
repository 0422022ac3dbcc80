"""The ``circuitkit`` command: the list of subcommands, the parser, and how a run ends.

Why: one place for the command line. Each subcommand's flags and glue live in
:mod:`circuitkit.commands` (``add_arguments(parser)`` and ``run_cli(args) -> int``); this
file names them and imports a subcommand's module only when that subcommand is asked for,
so ``circuitkit --help`` never pays for torch or TransformerLens. Errors that circuitkit
raises for bad input (:class:`circuitkit.CircuitkitError`) are printed as one message,
without a traceback; an interrupt says whether the command can resume; a closed pipe
(``circuitkit zoo | head``) ends quietly.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass
from typing import Iterable

from circuitkit import CircuitkitError, __version__


@dataclass(frozen=True)
class Command:
    module: str  # holds add_arguments(parser) and run_cli(args)
    help: str
    resumable: bool = False  # has --resume: an interrupt keeps the checkpoints written so far


COMMANDS: dict[str, Command] = {
    "train": Command("circuitkit.commands.train", "train a toy model from scratch from a TOML config", True),
    "sparsify": Command("circuitkit.commands.sparsify", "sparse post-training of attention edges / MLP neurons",
                        True),
    "discover": Command("circuitkit.commands.discover", "find a task's circuit with an attribution method"),
    "pairs": Command("circuitkit.commands.pairs",
                     "attention-pair attribution: a score for every (layer, head, query, key) pair of a task"),
    "compare": Command("circuitkit.commands.compare", "verify and compare base vs sparse circuits"),
    "run": Command("circuitkit.commands.run",
                   "the whole study on the shipped zoo: discover, verify, compare, report"),
    "bench": Command("circuitkit.commands.bench",
                     "benchmarks: attribution cost, peers, sparse training cost, scaling"),
    "curves": Command("circuitkit.commands.curves",
                      "a sparse run's course from its log: kept edges, CE, and the held-out trade-off"),
    "zoo": Command("circuitkit.commands.zoo", "list the shipped models and their cards"),
}


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser; ``commands`` get their full flags (default all), the others only their name and help."""
    full = set(COMMANDS) if commands is None else set(commands)
    parser = argparse.ArgumentParser(prog="circuitkit", description="Sparse attention post-training and circuit "
                                     "discovery for TransformerLens hooked transformers.")
    parser.add_argument("--version", action="version", version=f"circuitkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        if name in full:
            # late import on purpose: start-up speed, not a cycle (tests/test_imports.py allows it here only)
            module = importlib.import_module(cmd.module)
            module.add_arguments(p)
            p.set_defaults(_module=module)
    return parser


def _command_name(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def _interrupted(name: str) -> str:
    if COMMANDS[name].resumable:
        return (f"circuitkit {name}: interrupted; checkpoints written so far are intact "
                "(rerun the same command with --resume to continue)")
    return (f"circuitkit {name}: interrupted; every file it had finished was written whole (atomically), the rest "
            "not at all; rerun the command to redo it")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = _command_name(argv)
    parser = build_parser([name] if name in COMMANDS else [])
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        rc = int(args._module.run_cli(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below
        return rc
    except CircuitkitError as e:
        print(f"circuitkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(_interrupted(args.command), file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`circuitkit zoo | head`): stop writing, without a traceback at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command ended by a closed pipe


if __name__ == "__main__":
    sys.exit(main())
