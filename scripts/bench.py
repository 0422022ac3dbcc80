"""Thin wrapper: ``python scripts/bench.py [options]`` is ``circuitkit bench [options]``.

See ``circuitkit bench --help`` and :mod:`circuitkit.bench`.
"""

import sys

from circuitkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
