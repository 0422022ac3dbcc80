"""The package's imports run one way down the pipeline: no cycles, none held open by late imports.

Read from the source with ``ast`` (nothing is imported), so the test is fast and names the
modules of any cycle it finds.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "circuitkit"
# Late imports kept on purpose, each for start-up speed, not to dodge a cycle:
# the CLI imports a subcommand's module only when that subcommand runs.
ALLOWED_LATE = {"circuitkit.cli"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py") if "zoo" not in p.relative_to(PKG).parts}


def _imports(path: Path, mods: set[str], top_level: bool) -> set[str]:
    """circuitkit modules imported by ``path`` (at module level, or inside functions only)."""
    tree = ast.parse(path.read_text())
    here = _module_name(path)
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    functions = [f for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
    nodes = tree.body if top_level else [n for f in functions for n in ast.walk(f)]
    for node in nodes:
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = here.split(".") if is_pkg else here.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for name in names:
            if not name.startswith("circuitkit"):
                continue
            # importing a.b.c runs a/__init__, a/b/__init__ and a/b/c; a package that contains
            # the importer is already initialising, so it is no edge
            parts = name.split(".")
            for k in range(1, len(parts) + 1):
                target = ".".join(parts[:k])
                if target in mods and target != here and not here.startswith(target + "."):
                    out.add(target)
    return out


def import_graph() -> nx.DiGraph:
    mods = _modules()
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    for name, path in mods.items():
        g.add_edges_from((name, t) for t in _imports(path, set(mods), top_level=True))
    return g


def test_no_import_cycles():
    cycles = list(nx.simple_cycles(import_graph()))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + c[:1]) for c in cycles[:5])


def test_the_graph_sees_a_cycle_when_there_is_one():
    # the check itself: an edge back up the pipeline (models importing sparsity) closes a cycle
    g = import_graph()
    assert nx.has_path(g, "circuitkit.sparsity.storage", "circuitkit.models")
    g.add_edge("circuitkit.models", "circuitkit.sparsity")
    assert list(nx.simple_cycles(g))


def test_no_late_imports_of_circuitkit_modules():
    """A function-level ``from circuitkit.x import y`` would hide a cycle from the graph above."""
    mods = _modules()
    late = {name: sorted(_imports(path, set(mods), top_level=False) - {"circuitkit"})
            for name, path in mods.items() if name not in ALLOWED_LATE}
    late = {k: v for k, v in late.items() if v}
    assert not late, f"function-level imports of circuitkit modules: {late}"


def test_modules_import_one_by_one_in_pipeline_order():
    """Each module imported first in a fresh interpreter, in an order that follows the graph."""
    # circuitkit.__main__ runs the command line when imported: it is the one module left out
    order = [m for m in reversed(list(nx.topological_sort(import_graph()))) if m != "circuitkit.__main__"]
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    r = subprocess.run([sys.executable, "-c", code, *order], cwd=ROOT, capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
