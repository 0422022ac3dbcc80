"""Bad files, bad configs and reruns: every one is a clear CircuitkitError before any work, never a
silent wrong result or lost data (issue 11, items 1-8).

Every model here is a random toy-2l (no zoo weights are read except in the zoo-config checks).
"""

import json
import os
import stat
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from circuitkit import CircuitkitError
from circuitkit.circuits.attribution import attribute
from circuitkit.cli import main as cli_main
from circuitkit.evaluation.study import StudyConfig
from circuitkit.io import _conforms, read_toml, write_json
from circuitkit.models import CARD_FILE, WEIGHTS_FILE, ZOO_DIR, build_model, load_model, save_model, toy_config
from circuitkit.pipeline import Pair, RunConfig
from circuitkit.sparsity.finetune import SparsifyConfig, finetune
from circuitkit.tasks import get_task
from circuitkit.training import CHECKPOINT_FILE, LOG_FILE, TrainConfig, evaluate, heldout, train

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parent.parent
ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # root can write anywhere: permission tests cannot fail


@pytest.fixture
def saved(tmp_path):
    """A saved random toy-2l checkpoint folder whose card says it was trained on addition."""
    d = tmp_path / "toy"
    save_model(build_model(toy_config("toy-2l", seed=0)), d, {"name": "toy", "tasks": {"addition": 1.0}})
    return d


def _edit_card(folder, **config):
    card = json.loads((folder / CARD_FILE).read_text())
    card["config"].update(config)
    (folder / CARD_FILE).write_text(json.dumps(card))


# ---------------------------------------------------------------- 1. strict loading

def test_card_with_fewer_layers_than_its_weights_is_refused(saved):
    _edit_card(saved, n_layers=1)  # the weights hold blocks 0 and 1
    with pytest.raises(CircuitkitError, match=r"model.safetensors does not match the config in .*card.json.*"
                                              r"tensors the config has no place for \(blocks\.1\."):
        load_model(saved)


def test_card_with_more_layers_than_its_weights_is_refused(saved):
    _edit_card(saved, n_layers=3)
    with pytest.raises(CircuitkitError, match=r"does not match the config.*missing \d+ tensors \(blocks\.2\."):
        load_model(saved)


def test_card_with_another_width_is_refused_naming_the_tensor(saved):
    _edit_card(saved, d_mlp=64)  # toy-2l has d_mlp 128
    with pytest.raises(CircuitkitError, match=r"does not match the config.*W_in is \(32, 128\) in the file, "
                                              r"\(32, 64\) by the config"):
        load_model(saved)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_safetensors_names_the_file(saved, damage):
    w = saved / WEIGHTS_FILE
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00not safetensors" * 20)
    with pytest.raises(CircuitkitError, match=rf"{WEIGHTS_FILE} cannot be read as safetensors.*truncated or damaged"):
        load_model(saved)


@pytest.mark.parametrize("text, message", [
    ('{"config": {"n_layers": 2,', r"card.json is not valid JSON"),
    ('["not", "a", "card"]', r"card.json has no 'config' entry"),
    ('{"config": {"n_layers": 2, "nonsense_field": 1}}', r"card.json: 'config' is not a valid model configuration"),
    ('{"config": {"n_layers": 2, "d_model": 32, "n_ctx": 32, "d_head": 8, "act_fn": "gelu", "dtype": "float99"}}',
     r"card.json: unknown dtype 'float99'"),
])
def test_invalid_card_names_the_file(saved, text, message):
    (saved / CARD_FILE).write_text(text)
    with pytest.raises(CircuitkitError, match=message):
        load_model(saved)


def test_intact_checkpoint_still_loads_bit_for_bit(saved):
    """The strict loader must keep loading what save_model writes (the causal-mask buffers included)."""
    model = load_model(saved)
    ref = load_file(str(saved / WEIGHTS_FILE))
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items() if k in ref)


# ---------------------------------------------------------------- 2. non-finite weights, scores and JSON

@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_on_load(saved, value):
    w = saved / WEIGHTS_FILE
    state = load_file(str(w))
    state["blocks.1.attn.W_Q"][0, 0, 0] = value
    save_file(state, str(w))
    with pytest.raises(CircuitkitError, match=r"blocks\.1\.attn\.W_Q holds 1 non-finite value"):
        load_model(saved)


def test_non_finite_scores_raise_instead_of_selecting_nothing():
    model = build_model(toy_config("toy-2l", seed=0))
    with torch.no_grad():
        model.blocks[0].attn.W_V[0, 0, 0] = float("nan")  # bypasses the loader's check
    with pytest.raises(CircuitkitError, match="eap edge scores are not finite"):
        attribute(model, get_task("addition").dataset(4, seed=0), "eap")


def test_write_json_refuses_nan_and_keeps_the_old_file(tmp_path):
    p = tmp_path / "circuit.json"
    write_json(p, {"ok": 1})
    with pytest.raises(CircuitkitError, match=r"circuit.json: \['curve'\]\['f'\]\[1\] is not a finite number"):
        write_json(p, {"curve": {"f": [0.5, float("nan")]}})
    assert json.loads(p.read_text()) == {"ok": 1}
    assert not list(tmp_path.glob(".*.tmp"))


# ---------------------------------------------------------------- 4. the umask

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        save_model(build_model(toy_config("toy-2l", seed=0)), tmp_path / "m")
    finally:
        os.umask(old)
    for f in (tmp_path / "a.json", tmp_path / "m" / CARD_FILE, tmp_path / "m" / WEIGHTS_FILE):
        assert stat.S_IMODE(f.stat().st_mode) == mode, f


# ---------------------------------------------------------------- 3, 5. reruns and resumes

def tiny(tmp_path, **kw):
    raw = dict(name="tiny", out=str(tmp_path / "model"), run_dir=str(tmp_path / "run"), tasks={"addition": 1.0},
               arch="toy-2l", seed=7, steps=4, batch_size=8, checkpoint_every=2, eval_every=100, eval_n=20, warmup=1)
    raw.update(kw)
    return TrainConfig.from_dict(raw)


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / LOG_FILE).read_text().splitlines()]


def test_rerun_into_a_finished_model_is_refused_and_loses_nothing(tmp_path):
    cfg = tiny(tmp_path)
    train(cfg, progress=False)
    log_before = (tmp_path / "run" / LOG_FILE).read_bytes()
    weights_before = (tmp_path / "model" / WEIGHTS_FILE).read_bytes()
    with pytest.raises(CircuitkitError, match=r"already holds a model; pass --force"):
        train(cfg, progress=False)
    assert (tmp_path / "run" / LOG_FILE).read_bytes() == log_before  # the bug: truncated before the refusal
    assert (tmp_path / "model" / WEIGHTS_FILE).read_bytes() == weights_before


def test_run_folder_with_a_checkpoint_needs_resume_or_force(tmp_path):
    cfg = tiny(tmp_path)
    train(cfg, max_steps=2, progress=False)
    with pytest.raises(CircuitkitError, match=r"holds the checkpoint of an earlier run; pass --resume .* or --force"):
        train(cfg, progress=False)
    assert len(losses(tmp_path / "run")) == 2
    card = train(cfg, progress=False, force=True)  # starts over: 4 fresh steps, one log
    assert card["steps"] == 4 and len(losses(tmp_path / "run")) == 4
    with pytest.raises(CircuitkitError, match="not both"):
        train(cfg, progress=False, resume=True, force=True)


def test_force_start_over_equals_a_fresh_run(tmp_path):
    train(tiny(tmp_path / "a"), progress=False)
    cfg = tiny(tmp_path / "b", seed=3)
    train(cfg, max_steps=2, progress=False)  # another run's checkpoint and log are in the way
    cfg = tiny(tmp_path / "b")
    train(cfg, max_steps=2, progress=False, force=True)  # interrupted again...
    train(cfg, resume=True, progress=False)  # ...and resumed: nothing of the seed-3 run may leak in
    assert losses(tmp_path / "b" / "run") == losses(tmp_path / "a" / "run")


def test_train_cli_refuses_then_force_replaces(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'name = "t"\nout = "{tmp_path / "m"}"\nrun_dir = "{tmp_path / "r"}"\narch = "toy-2l"\n'
                   'steps = 2\nbatch_size = 4\neval_n = 10\n[tasks]\naddition = 1.0\n')
    assert cli_main(["train", "--config", str(cfg), "--no-progress"]) == 0
    capsys.readouterr()
    assert cli_main(["train", "--config", str(cfg), "--no-progress"]) == 2
    assert "--force" in capsys.readouterr().err
    assert cli_main(["train", "--config", str(cfg), "--no-progress", "--force"]) == 0


def test_stop_at_splits_a_run_that_resume_finishes_exactly(tmp_path, capsys):
    """``--stop-at`` ends a run early with a checkpoint and no model (the schedule still spans
    ``steps``), ``--resume`` finishes it, and the split run's losses are the uninterrupted run's;
    a non-positive step is refused."""
    def config(folder):
        cfg = tmp_path / f"{folder}.toml"
        cfg.write_text(f'name = "t"\nout = "{tmp_path / folder / "m"}"\nrun_dir = "{tmp_path / folder / "r"}"\n'
                       'arch = "toy-2l"\nsteps = 4\nbatch_size = 4\neval_n = 10\ncheckpoint_every = 100\n'
                       '[tasks]\naddition = 1.0\n')
        return str(cfg)
    assert cli_main(["train", "--config", config("whole"), "--no-progress"]) == 0
    assert cli_main(["train", "--config", config("split"), "--no-progress", "--stop-at", "3"]) == 0
    assert "stopped at step 3 of 4" in capsys.readouterr().out
    assert not (tmp_path / "split" / "m" / WEIGHTS_FILE).exists() and len(losses(tmp_path / "split" / "r")) == 3
    assert cli_main(["train", "--config", config("split"), "--no-progress", "--resume"]) == 0
    assert (tmp_path / "split" / "m" / WEIGHTS_FILE).exists()
    assert losses(tmp_path / "split" / "r") == losses(tmp_path / "whole" / "r")
    capsys.readouterr()
    assert cli_main(["train", "--config", config("zero"), "--no-progress", "--stop-at", "0"]) == 2
    assert "--stop-at must be positive, got 0" in capsys.readouterr().err


def test_torn_last_log_line_is_skipped_on_resume(tmp_path):
    train(tiny(tmp_path / "a"), progress=False)
    cfg = tiny(tmp_path / "b")
    train(cfg, max_steps=2, progress=False)
    with open(tmp_path / "b" / "run" / LOG_FILE, "a") as fh:
        fh.write('{"step": 3, "loss": 2.0')  # killed mid-write
    train(cfg, resume=True, progress=False)
    assert losses(tmp_path / "b" / "run") == losses(tmp_path / "a" / "run")


def test_damaged_log_line_in_the_middle_is_an_error(tmp_path):
    cfg = tiny(tmp_path)
    train(cfg, max_steps=2, progress=False)
    log = tmp_path / "run" / LOG_FILE
    lines = log.read_text().splitlines()
    log.write_text("\n".join(["{torn", *lines]) + "\n")
    with pytest.raises(CircuitkitError, match=r"line 1 is not JSON and not the last line"):
        train(cfg, resume=True, progress=False)


@pytest.mark.parametrize("change", [{"lr": 2e-3}, {"seed": 8}, {"batch_size": 16}, {"arch": "toy-4l"},
                                   {"tasks": {"addition": 1.0, "ioi": 1.0}}])
def test_resume_with_a_changed_config_is_refused(tmp_path, change):
    train(tiny(tmp_path), max_steps=2, progress=False)
    key = next(iter(change))
    allowed = ("attn_head_power, attn_layer_weights, final_sparsity_weight, heldout_tolerance, max_accuracy_drop, "
               "name, out, run_dir, steps, target_ce, target_floor, tolerance")
    with pytest.raises(CircuitkitError, match=rf"config differs .*{key}: .* -> .*may change only {allowed}"):
        train(tiny(tmp_path, **change), resume=True, progress=False)


def test_resume_may_change_the_step_count(tmp_path):
    cfg = tiny(tmp_path / "b", steps=4)
    train(cfg, progress=False)
    card = train(tiny(tmp_path / "b", steps=6), resume=True, progress=False)
    assert card["steps"] == 6 and len(losses(tmp_path / "b" / "run")) == 6
    assert [json.loads(x)["step"] for x in (tmp_path / "b" / "run" / LOG_FILE).read_text().splitlines()] == \
        list(range(1, 7))


def test_resume_may_rename_the_run(tmp_path):
    """A continuation shipped under its own name (the zoo's ``-long`` levers): the name is a label,
    so a resumed run may change it, and the card carries the new one."""
    train(tiny(tmp_path, steps=2), progress=False)
    card = train(tiny(tmp_path, steps=3, name="renamed", out=str(tmp_path / "out-renamed")), resume=True,
                 progress=False)
    assert card["name"] == "renamed" and card["steps"] == 3 and len(losses(tmp_path / "run")) == 3


def test_resume_of_the_other_kind_of_run_is_refused(tmp_path, saved):
    cfg = tiny(tmp_path)
    train(cfg, max_steps=2, progress=False)
    sp = SparsifyConfig.from_dict(dict(name="s", model=str(saved), out=str(tmp_path / "sout"), run_dir=cfg.run_dir,
                                       tasks={"addition": 1.0}, steps=2, batch_size=4, eval_n=10, target_n=10,
                                       measure_n=10))
    with pytest.raises(CircuitkitError, match=r"checkpoint of a `circuitkit train` run; resume it with "
                                              r"`circuitkit train --resume`"):
        finetune(sp, resume=True, progress=False, device="cpu")
    ck = Path(cfg.run_dir) / CHECKPOINT_FILE
    state = torch.load(ck, weights_only=False)
    state["kind"] = "sparsify"
    torch.save(state, ck)
    with pytest.raises(CircuitkitError, match=r"`circuitkit sparsify` run; resume it with `circuitkit sparsify"):
        train(cfg, resume=True, progress=False)


# ---------------------------------------------------------------- 6. --out checked before any work

def _no_work(*a, **k):
    raise AssertionError("the computation ran although --out cannot be written")


def test_outputs_that_are_files_are_refused_before_computing(tmp_path, saved, capsys, monkeypatch):
    import circuitkit.commands.discover as discover_cmd
    import circuitkit.evaluation.compare as compare_mod
    import circuitkit.pipeline as pipeline_mod

    f = tmp_path / "a-file"
    f.write_text("x")
    monkeypatch.setattr(discover_cmd, "discover", _no_work)
    monkeypatch.setattr(compare_mod, "analyse", _no_work)  # the loop compare and run share (study_pair)
    for argv in (["discover", "--model", str(saved), "--task", "addition", "--out", str(f)],
                 ["discover", "--model", str(saved), "--task", "addition", "--out", str(f / "below")],
                 ["compare", "--base", str(saved), "--sparse", str(saved), "--tasks", "addition", "--out", str(f)]):
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "is an existing file" in err or "is a file, not a folder" in err, err
    cfg = RunConfig.from_dict({"out": str(f), "pairs": [{"base": str(saved), "sparse": str(saved),
                                                         "tasks": ["addition"]}]})
    with pytest.raises(CircuitkitError, match="results folder .* is an existing file"):
        pipeline_mod.run(cfg, progress=False)
    with pytest.raises(CircuitkitError, match=r"output model folder \(out\) .* is an existing file"):
        train(tiny(tmp_path, out=str(f)), progress=False)
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


@pytest.mark.skipif(ROOT, reason="root may write into any folder")
def test_output_in_a_read_only_folder_is_refused_before_computing(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(CircuitkitError, match="cannot be written: no write permission"):
            train(tiny(tmp_path, out=str(ro / "model")), progress=False)
    finally:
        ro.chmod(0o700)


# ---------------------------------------------------------------- 7. every config field is type-checked

BASE = {
    TrainConfig: dict(name="t", out="o", run_dir="r", tasks={"addition": 1.0}),
    SparsifyConfig: dict(name="t", model="m", out="o", run_dir="r", tasks={"addition": 1.0}),
    StudyConfig: {},
    Pair: dict(base="a", sparse="b", tasks=["addition"]),
}


@pytest.mark.parametrize("cls, key, value, message", [
    (TrainConfig, "steps", "60", "steps must be an integer, got '60'"),
    (TrainConfig, "lr", "fast", "lr must be a number, got 'fast'"),
    (TrainConfig, "eval_every", 0, "eval_every must be positive, got 0"),
    (TrainConfig, "steps", 6.0, "steps must be an integer"),
    (TrainConfig, "steps", True, "steps must be an integer"),
    (TrainConfig, "tasks", "addition", "tasks must be a table"),
    (TrainConfig, "tasks", {"addition": "1"}, "tasks must be a table whose values are a number"),
    (TrainConfig, "min_lr_fraction", 1.5, r"min_lr_fraction must be in \[0, 1\]"),
    (TrainConfig, "lr", float("nan"), "lr must be a number, got nan"),
    (TrainConfig, "task_options", {"ioi": {}}, r"task_options for \['ioi'\], which are not in tasks"),
    (SparsifyConfig, "attn", "no", "attn must be true or false, got 'no'"),
    (SparsifyConfig, "mlp", 1, "mlp must be true or false"),
    (SparsifyConfig, "ema_decay", 1.0, r"ema_decay must be in \[0, 1\)"),
    (SparsifyConfig, "corpus_max_tokens", 0, "corpus_max_tokens must be positive"),
    (SparsifyConfig, "target_ce", "0.1", "target_ce must be a number or none"),
    (SparsifyConfig, "log_heads", "yes", "log_heads must be true or false"),
    (StudyConfig, "threshold", 2, r"threshold must be in \(0, 1\]"),
    (StudyConfig, "n", "200", "n must be an integer"),
    (Pair, "tasks", "addition", "tasks must be a list whose items are a string, got 'addition'"),
    (Pair, "tasks", [], "tasks is empty"),
])
def test_config_field_errors(cls, key, value, message):
    with pytest.raises(CircuitkitError, match=f"^x.toml: {message}"):
        cls.from_dict({**BASE[cls], key: value}, source="x.toml")


@pytest.mark.parametrize("cls", list(BASE))
def test_every_field_of_every_config_is_checked(cls):
    """For each field, a value of a wrong type is refused, naming the field (through from_dict and
    through the constructor): a config class or field that escapes the check fails here."""
    candidates = ["60", 60, 6.5, True, ["x"], {"a": {"b": 1}}]
    hints = __import__("typing").get_type_hints(cls)
    for f in fields(cls):
        bad = next(v for v in candidates if not _conforms(v, hints[f.name]))
        with pytest.raises(CircuitkitError, match=rf"^x.toml: {f.name} must be"):
            cls.from_dict({**BASE[cls], f.name: bad}, source="x.toml")
        with pytest.raises(CircuitkitError, match=rf"{f.name} must be"):
            cls(**{**BASE[cls], f.name: bad})


def test_run_config_tasks_as_a_string_is_an_error_not_letters(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text('[[pairs]]\nbase = "a"\nsparse = "b"\ntasks = "addition"\n')
    with pytest.raises(CircuitkitError, match=r"run.toml \[\[pairs\]\] #1: tasks must be a list"):
        RunConfig.from_toml(p)
    p.write_text('figures = "no"\n')
    with pytest.raises(CircuitkitError, match="figures must be true or false"):
        RunConfig.from_toml(p)
    p.write_text('[study]\nig_steps = 0\n')
    with pytest.raises(CircuitkitError, match=r"\[study\]: ig_steps must be positive"):
        RunConfig.from_toml(p)
    p.write_text('[[pairs]]\nbase = "a"\nsparse = "b"\ntasks = ["addition", "ioi"]\n')
    assert RunConfig.from_toml(p).pairs[0].tasks == ("addition", "ioi")


def test_sparsify_cli_bool_from_toml(tmp_path, saved, capsys):
    p = tmp_path / "s.toml"
    p.write_text(f'name = "s"\nmodel = "{saved}"\nout = "o"\nrun_dir = "r"\nattn = "no"\n[tasks]\naddition = 1\n')
    assert cli_main(["sparsify", "--config", str(p)]) == 2
    assert "attn must be true or false, got 'no'" in capsys.readouterr().err


def test_config_path_that_is_a_folder_or_binary(tmp_path):
    with pytest.raises(CircuitkitError, match="is a folder"):
        read_toml(tmp_path)
    b = tmp_path / "model.safetensors"
    b.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CircuitkitError, match="is not a text file"):
        TrainConfig.from_toml(b)


@pytest.mark.skipif(ROOT, reason="root may read any file")
def test_unreadable_config(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('name = "x"\n')
    p.chmod(0)
    try:
        with pytest.raises(CircuitkitError, match="cannot read config"):
            read_toml(p)
    finally:
        p.chmod(0o600)


# ---------------------------------------------------------------- 3. the zoo configs write outside the package

@pytest.mark.parametrize("path", sorted((REPO / "analyses" / "zoo").glob("*.toml")), ids=lambda p: p.stem)
def test_zoo_configs_write_outside_the_package(path):
    raw = tomllib.loads(path.read_text())
    out = (REPO / raw["out"]).resolve()
    assert not out.is_relative_to((REPO / "circuitkit").resolve()), out
    text = path.read_text()
    assert f"--config analyses/zoo/{path.name}" in text and f"--out circuitkit/zoo/{path.stem} --force" in text


def test_retrain_rebuilds_the_shipped_copies_explicitly(monkeypatch):
    import circuitkit.pipeline as pipeline_mod

    calls = []  # the names retrain calls: a stand-in never trains, so the shipped zoo is never touched
    monkeypatch.setattr(pipeline_mod, "train", lambda cfg, **k: calls.append((cfg.out, k["force"], k["command"])))
    monkeypatch.setattr(pipeline_mod, "finetune", lambda cfg, **k: calls.append((cfg.out, k["force"], k["command"])))
    pipeline_mod.retrain(RunConfig(), progress=False)
    assert [Path(o) for o, _, _ in calls] == [ZOO_DIR / Path(r).stem for r in RunConfig().retrain]
    assert all(force and "--out circuitkit/zoo/" in cmd for _, force, cmd in calls)


# ---------------------------------------------------------------- 8. meaningless requests

def test_zoo_unknown_name_is_an_error(capsys):
    assert cli_main(["zoo", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "no zoo model 'nosuch'" in err and "toy-addition" in err


def test_compare_with_no_tasks_is_an_error(tmp_path, saved, capsys):
    assert cli_main(["compare", "--base", str(saved), "--sparse", str(saved), "--tasks", ",",
                     "--out", str(tmp_path / "c")]) == 2
    assert "names no task" in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_compare_models_of_different_shapes_before_any_analysis(tmp_path, saved, capsys, monkeypatch):
    import circuitkit.evaluation.compare as compare_mod
    import circuitkit.pipeline as pipeline_mod

    other = tmp_path / "wide"
    save_model(build_model(toy_config("toy-4l", seed=0)), other, {"name": "wide"})
    monkeypatch.setattr(compare_mod, "analyse", _no_work)  # the loop compare and run share (study_pair)
    assert cli_main(["compare", "--base", str(saved), "--sparse", str(other), "--tasks", "addition",
                     "--out", str(tmp_path / "c")]) == 2
    assert "circuit graphs differ (n_layers 2 vs 4" in capsys.readouterr().err
    cfg = RunConfig.from_dict({"out": str(tmp_path / "r"), "pairs": [{"base": str(saved), "sparse": str(other),
                                                                      "tasks": ["addition"]}]})
    with pytest.raises(CircuitkitError, match="circuit graphs differ"):
        pipeline_mod.run(cfg, progress=False)


def test_discover_warns_for_a_task_the_model_was_not_trained_on(tmp_path, saved, capsys):
    argv = ["discover", "--model", str(saved), "--method", "eap", "--n", "4", "--edges", "5", "--no-progress"]
    assert cli_main([*argv, "--task", "ioi", "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "toy was not trained on 'ioi' (its card lists addition)" in err
    assert cli_main([*argv, "--task", "addition", "--out", str(tmp_path / "b")]) == 0
    assert "not trained on" not in capsys.readouterr().err


# ---------------------------------------------------------------- 14. one held-out CE

def test_heldout_ce_is_the_weighted_mean_of_the_per_task_ce():
    model = build_model(toy_config("toy-2l", seed=0))
    tasks = {"addition": get_task("addition"), "ioi": get_task("ioi")}
    h = heldout(model, tasks, {"addition": 1.0, "ioi": 3.0}, n=16)
    per = evaluate(model, tasks, n=16)
    assert h["ce"] == pytest.approx((per["addition"]["ce"] + 3 * per["ioi"]["ce"]) / 4)
    assert per["addition"]["ce"] != pytest.approx(per["ioi"]["ce"])  # else the weights would not matter


def test_a_name_found_only_under_models_says_to_give_its_path(tmp_path, monkeypatch):
    """A zoo config writes models/NAME; naming it as if it were shipped points at the folder, not at the hub."""
    monkeypatch.chdir(tmp_path)
    save_model(build_model(toy_config("toy-4l", n_layers=1)), tmp_path / "models" / "my-lm")
    with pytest.raises(CircuitkitError, match="models/my-lm holds a model of that name .*give its path, 'models/my-lm'"):
        load_model("my-lm")
    assert load_model("models/my-lm").cfg.n_layers == 1
    with pytest.raises(CircuitkitError, match="could not load pretrained model 'other-lm'"):
        load_model("other-lm")  # no such folder: the hub's message, as before
