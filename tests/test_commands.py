"""The command line: one parser built from the registries, fast help, and how a run ends."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from circuitkit import CircuitkitError
from circuitkit.circuits import PositionGraph, attribute, attribute_positions
from circuitkit.circuits import attribution as attr
from circuitkit.circuits.attribution import Option, method_names, register_method
from circuitkit.circuits.graph import Graph, GraphSpec
from circuitkit.circuits.interventions import DEFAULT_BATCH_SIZE, Ablation
from circuitkit.cli import COMMANDS, build_parser, main
from circuitkit.models import build_model, save_model, toy_config
from circuitkit.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
OWN_FLAGS = list(COMMANDS)  # every command, train and sparsify included


def _sub(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def _flags(name: str) -> dict[str, argparse.Action]:
    p = _sub(build_parser([name]), name)
    return {a.option_strings[0] if a.option_strings else a.dest: a for a in p._actions if a.dest != "help"}


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cmd") / "toy"
    save_model(build_model(toy_config("toy-2l", seed=4)), d)
    return d


@pytest.fixture
def scaled_method():
    """A method defined outside the package: every real edge scores ``scale`` × its row-major rank."""
    def edge_fn(model, ds, *, ablation, batch_size, progress, scale: float = 1.0):
        spec = GraphSpec.from_model(model)
        out = torch.zeros(spec.n_src, spec.n_dst)  # [n_src, n_dst]
        out[spec.real] = scale * torch.arange(1, int(spec.real.sum()) + 1, dtype=torch.float32)
        return out

    def position_fn(model, ds, *, ablation, batch_size, progress, scale: float = 1.0):  # [pos, n_src, n_dst]
        at = torch.arange(1, ds.seq_len + 1, dtype=torch.float32)[:, None, None]
        return edge_fn(model, ds, ablation=ablation, batch_size=batch_size, progress=progress, scale=scale) * at

    m = register_method("test-scaled", "test: scale x rank", edge_fn,
                        options=(Option("scale", float, 1.0, "multiplier of every score"),), position_fn=position_fn)
    yield m
    attr._REGISTRY.pop("test-scaled")


def test_help_imports_neither_torch_nor_transformer_lens():
    code = ("import sys, io, contextlib\nfrom circuitkit.cli import main\nbuf = io.StringIO()\n"
            "try:\n    with contextlib.redirect_stdout(buf):\n        main(['--help'])\n"
            "except SystemExit as e:\n    rc = e.code\n"
            "print(rc, 'discover' in buf.getvalue(), 'torch' in sys.modules, 'transformer_lens' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.stdout.split() == ["0", "True", "False", "False"], r.stderr[-1000:]


@pytest.mark.parametrize("name", OWN_FLAGS)
def test_every_flag_has_help(name):
    missing = [f for f, a in _flags(name).items() if not (a.help or "").strip()]
    assert not missing, f"circuitkit {name}: flags without help: {missing}"


def test_method_ablation_and_batch_flags_come_from_the_registries():
    for name in ("discover", "compare"):
        flags = _flags(name)
        assert list(flags["--method"].choices) == method_names()
        assert list(flags["--ablation"].choices) == [a.value for a in Ablation]
        assert flags["--batch-size"].default == DEFAULT_BATCH_SIZE
        for o in attr.all_options():  # one flag per method option, with its type
            assert flags[o.cli_flag].type is o.type
    # one name for the integration steps everywhere; discover keeps --steps as a deprecated spelling
    assert "--ig-steps" in _flags("bench")
    p = build_parser(["discover"])
    a = p.parse_args(["discover", "--model", "m", "--task", "t", "--steps", "3"])
    b = p.parse_args(["discover", "--model", "m", "--task", "t", "--ig-steps", "3"])
    assert a.method_option_steps == b.method_option_steps == 3


def test_compare_refuses_an_unknown_method(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--base", "a", "--sparse", "b", "--tasks", "ioi", "--method", "eap-gi"])
    assert "invalid choice: 'eap-gi'" in capsys.readouterr().err


def test_a_method_registered_outside_the_package_is_reachable(scaled_method, toy_dir, tmp_path, capsys):
    model = build_model(toy_config("toy-2l", seed=4))
    ds = get_task("addition").dataset(4, seed=0)
    g = attribute(model, ds, "test-scaled", scale=2.0)
    spec = g.spec
    expected = 2.0 * torch.arange(1, spec.n_real_edges + 1, dtype=torch.float32)
    assert torch.equal(g.scores[spec.real], expected) and g.metadata["scale"] == 2.0
    with pytest.raises(CircuitkitError, match="scale.*must be float"):
        attribute(model, ds, "test-scaled", scale="big")

    out = tmp_path / "c"
    rc = main(["discover", "--model", str(toy_dir), "--task", "addition", "--method", "test-scaled", "--scale", "3",
               "--edges", "7", "--n", "8", "--no-progress", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    c = Graph.load(out / "circuit.json")
    assert torch.equal(c.scores[spec.real], 3.0 * torch.arange(1, spec.n_real_edges + 1, dtype=torch.float32))
    assert c.metadata["method"] == "test-scaled" and c.metadata["scale"] == 3.0
    # the top 7 by |score| are the last 7 real edges (before dangling ones go)
    assert c.metadata["requested_edges"] == 7
    # an option given to a method that does not take it is refused before any work
    rc = main(["discover", "--model", str(toy_dir), "--task", "addition", "--method", "eap", "--scale", "3",
               "--out", str(tmp_path / "d")])
    assert rc == 2 and "--scale does not apply to method 'eap'" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
    # the one registry carries the position level too: attribute_positions and discover --level position
    assert "test-scaled" in attr.POSITION_METHODS and attr.get_method("test-scaled").levels == attr.LEVELS
    pg = attribute_positions(model, ds, "test-scaled", scale=2.0)
    assert torch.equal(pg.scores[:, spec.real], expected * torch.arange(1, ds.seq_len + 1.0)[:, None])
    rc = main(["discover", "--model", str(toy_dir), "--task", "addition", "--method", "test-scaled", "--scale", "3",
               "--level", "position", "--edges", "5", "--n", "4", "--no-progress", "--out", str(tmp_path / "p")])
    assert rc == 0, capsys.readouterr().err
    assert PositionGraph.load(tmp_path / "p" / "circuit.json").metadata["scale"] == 3.0


def test_a_method_without_a_position_variant_is_refused_at_that_level(scaled_method):
    """acdc scores components only; the error lists the position-level methods, one registered outside included."""
    model = build_model(toy_config("toy-2l", seed=4))
    ds = get_task("addition").dataset(2, seed=0)
    assert attr.get_method("acdc").levels == ("component",) and "acdc" not in attr.POSITION_METHODS
    assert list(attr.POSITION_METHODS) == ["patching", "eap", "eap-ig", "test-scaled"]
    with pytest.raises(CircuitkitError, match="'acdc' has no position-level variant; position-level methods: "
                                              "patching, eap, eap-ig, test-scaled"):
        attribute_positions(model, ds, "acdc")
    with pytest.raises(KeyError):
        attr.POSITION_METHODS["acdc"]


def test_register_method_refuses_clashes(scaled_method):
    def fn(model, ds, **_):
        return torch.zeros(1)

    with pytest.raises(CircuitkitError, match="already registered"):
        register_method("test-scaled", "again", fn)
    with pytest.raises(CircuitkitError, match="clashes"):
        register_method("test-other", "x", fn, options=(Option("scale", int, 2, "another scale"),))
    with pytest.raises(CircuitkitError, match="taken by attribute"):
        register_method("test-other", "x", fn, options=(Option("batch_size", int, 2, "no"),))
    assert "test-other" not in method_names()


def test_two_identical_discover_runs_write_identical_circuit_files(toy_dir, tmp_path):
    for k in "ab":
        assert main(["discover", "--model", str(toy_dir), "--task", "addition", "--method", "eap", "--edges", "20",
                     "--n", "8", "--no-progress", "--out", str(tmp_path / k)]) == 0
    a, b = (tmp_path / k / "circuit.json" for k in "ab")
    assert a.read_bytes() == b.read_bytes()
    assert "seconds" not in a.read_text()
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["attribution_seconds"] >= 0


def test_interrupt_says_whether_the_command_can_resume(monkeypatch, capsys):
    import circuitkit.commands.train
    import circuitkit.commands.zoo

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(circuitkit.commands.zoo, "run_cli", interrupted)
    monkeypatch.setattr(circuitkit.commands.train, "run_cli", interrupted)
    assert main(["zoo"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" not in err
    assert main(["train", "--config", "x.toml"]) == 130
    assert "--resume" in capsys.readouterr().err


def test_a_closed_pipe_ends_quietly():
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first write, as with `circuitkit zoo | head -0`
    try:
        p = subprocess.run([sys.executable, "-m", "circuitkit", "zoo"], stdout=w, stderr=subprocess.PIPE, text=True,
                           cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    finally:
        os.close(w)
    assert p.returncode == 141 and "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr


def test_report_links_only_the_figures_of_studied_models(tmp_path):
    from circuitkit.pipeline import REPO, RunConfig, report

    if not (REPO / "figures" / "teaser_attention.png").exists():
        pytest.skip("needs the repository's figures/")
    table = pd.DataFrame({"task": []})
    shipped = report(RunConfig(), table, {}, [], tmp_path / "a", 1.0)
    assert "teaser_attention" in shipped and "sparsity_vs_capability" in shipped
    mlp = RunConfig.from_dict({"pairs": [{"base": "toy-addition", "sparse": "toy-addition-sparse-mlp",
                                          "tasks": ["addition"]}]})
    other = report(mlp, table, {}, [], tmp_path / "b", 1.0)
    assert "teaser_attention" not in other and "sparsity_vs_capability" not in other
    with pytest.raises(CircuitkitError, match="path and models"):
        RunConfig.from_dict({"sparsity_figures": ["figures/teaser_attention.png"]})


def test_compare_runs_the_shared_loop_and_checks_its_options(toy_dir, tmp_path, capsys):
    sparse = tmp_path / "other"
    save_model(build_model(toy_config("toy-2l", seed=5)), sparse)
    out = tmp_path / "cmp"
    assert main(["compare", "--base", str(toy_dir), "--sparse", str(sparse), "--tasks", "addition", "--method", "eap",
                 "--n", "8", "--batch-size", "8", "--no-progress", "--out", str(out)]) == 0
    table = pd.read_csv(out / "base_vs_sparse.csv")
    assert list(table["task"]) == ["addition"]
    assert (out / "circuits" / "toy__addition.json").exists() and (out / "summaries" / "other__addition.json").exists()
    capsys.readouterr()
    assert main(["compare", "--base", str(toy_dir), "--sparse", str(sparse), "--tasks", "addition", "--method", "acdc",
                 "--tau", "0.5", "--out", str(tmp_path / "no")]) == 2
    assert "cannot pass tau" in capsys.readouterr().err and not (tmp_path / "no").exists()


def test_default_toml_is_the_default_study():
    """``analyses/run/default.toml`` says it is what ``circuitkit run`` runs with no --config: a pair or setting
    changed in one place and not the other would make the README's numbers come from another study."""
    from circuitkit.io import read_toml
    from circuitkit.pipeline import REPO, RunConfig

    path = REPO / "analyses" / "run" / "default.toml"
    if not path.exists():
        pytest.skip("needs the repository's analyses/")
    committed, built_in = RunConfig.from_dict(read_toml(path), source=str(path)), RunConfig()
    assert committed.pairs == built_in.pairs and committed.study == built_in.study and committed.out == built_in.out
