"""Constrained sparse finetuning: exact resume, NaN handling, data parallel, corpora, CLI errors."""

import json
import os
import socket

import pytest
import torch

from circuitkit import CircuitkitError
from circuitkit.cli import main as cli_main
from circuitkit.models import build_model, save_model, toy_config
from circuitkit.sparsity import load_model
from circuitkit.sparsity import GateMode, get_gates
from circuitkit.sparsity import finetune as ft
from circuitkit.corpus import TextCorpus, chunk_tokens
from circuitkit.sparsity.finetune import SparsifyConfig, finetune
from circuitkit.tasks import get_task


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("base") / "toy"
    save_model(build_model(toy_config("toy-2l", seed=0)), d, {"name": "toy"})
    return d


def cfg_for(tmp, base, **kw):
    raw = dict(name="t", model=str(base), out=str(tmp / "out"), run_dir=str(tmp / "run"), tasks={"addition": 1.0},
               steps=6, batch_size=8, lr=3e-3, warmup=2, eta=0.5, bias_gate=1.0, checkpoint_every=3,
               eval_every=100, eval_n=40, target_n=40, measure_n=20, seed=3)
    raw.update(kw)
    return SparsifyConfig.from_dict(raw)


def log_records(run_dir):
    return [json.loads(l) for l in (run_dir / "log.jsonl").read_text().splitlines()]


def test_finetune_writes_a_loadable_sparse_model_and_logs(tmp_path, base_dir):
    cfg = cfg_for(tmp_path, base_dir, mlp=True, final_hard_steps=2, final_sparsity_weight=0.0)
    card = finetune(cfg, progress=False, command="circuitkit sparsify ...")
    recs = log_records(tmp_path / "run")
    assert [r["step"] for r in recs] == list(range(1, 7))
    r = recs[0]
    for k in ("ce", "target", "lam", "rho", "attn_soft", "attn_hard", "attn_soft_head", "mlp_soft", "mlp_hard"):
        assert k in r
    assert len(r["attn_hard"]) == 2 and len(r["attn_hard_head"][0]) == 4
    assert [x["mode"] for x in recs] == ["train"] * 4 + ["hard_st"] * 2
    assert [x["sparsity_weight"] for x in recs] == [1.0] * 4 + [0.0] * 2
    assert (tmp_path / "run" / "log.csv").read_text().startswith("step,")
    assert card["target_ce"] == pytest.approx(card["base_heldout_ce"] * 1.05)
    assert 0 <= card["kept_edges"] <= 1 and 0 <= card["mlp_active"] <= 1
    assert card["command"] == "circuitkit sparsify ..." and card["base_model"] == str(base_dir)
    model = load_model(tmp_path / "out")
    assert get_gates(model).mode is GateMode.EVAL and get_gates(model).config.mlp


def test_per_task_constraints_and_target_floor(tmp_path, base_dir):
    cfg = cfg_for(tmp_path, base_dir, steps=4, tasks={"addition": 1.0, "ioi": 1.0}, per_task_constraints=True,
                  target_floor=3.9)
    card = finetune(cfg, progress=False)
    base = card["heldout_base"]
    assert set(card["target_ce"]) == {"addition", "ioi"}
    for k, t in card["target_ce"].items():  # max(base CE × 1.05, floor)
        assert t == pytest.approx(max(base[k]["ce"] * 1.05, 3.9), rel=1e-4)
    recs = log_records(tmp_path / "run")
    assert set(recs[-1]["lam_task"]) == {"addition", "ioi"} and set(recs[-1]["ce_task"]) == {"addition", "ioi"}
    # each task's λ moves with its own constraint: up while its EMA CE is above its target, else down
    for r, prev in zip(recs[1:], recs[:-1]):
        for k in ("addition", "ioi"):
            ema, tgt = prev["ema_ce_task"][k], prev["target_task"][k]
            if ema is not None and r["ce_task"][k] is not None and abs(ema - tgt) > 0.2:
                assert (r["lam_task"][k] > prev["lam_task"][k]) == (ema > tgt)


def test_resume_continues_exactly(tmp_path, base_dir):
    full = cfg_for(tmp_path / "a", base_dir)
    finetune(full, progress=False)
    ref = log_records(tmp_path / "a" / "run")

    part = cfg_for(tmp_path / "b", base_dir)
    state = finetune(part, max_steps=3, progress=False)
    assert state["finished"] is False and not (tmp_path / "b" / "out").exists()
    finetune(part, resume=True, progress=False)
    got = log_records(tmp_path / "b" / "run")
    assert [(r["ce"], r["lam"], r["sparsity"]) for r in got] == [(r["ce"], r["lam"], r["sparsity"]) for r in ref]
    x = get_task("addition").dataset(8, seed=5).clean
    assert torch.equal(load_model(tmp_path / "a" / "out")(x), load_model(tmp_path / "b" / "out")(x))


def test_resume_may_change_the_final_phase_sparsity_weight(tmp_path, base_dir):
    """The zoo's lever on a run whose hard phase relaxed the gates: resume a checkpoint from before
    that phase with another ``final_sparsity_weight``. The continuation equals a run that had the
    new weight from the start (the weight acts only in the final phase), and the log shows it."""
    full = cfg_for(tmp_path / "a", base_dir, final_hard_steps=2, final_sparsity_weight=0.5)
    finetune(full, progress=False)
    ref = log_records(tmp_path / "a" / "run")
    finetune(cfg_for(tmp_path / "b", base_dir, final_hard_steps=2, final_sparsity_weight=0.0), max_steps=3,
             progress=False)
    card = finetune(cfg_for(tmp_path / "b", base_dir, final_hard_steps=2, final_sparsity_weight=0.5), resume=True,
                    progress=False)
    got = log_records(tmp_path / "b" / "run")
    assert [r["sparsity_weight"] for r in got] == [1.0] * 4 + [0.5] * 2
    assert [(r["ce"], r["lam"], r["sparsity"], r["loss"]) for r in got] == \
        [(r["ce"], r["lam"], r["sparsity"], r["loss"]) for r in ref]
    assert card["finetune_config"]["final_sparsity_weight"] == 0.5


def test_uniform_layer_weights_equal_the_attention_weight(tmp_path, base_dir):
    """attn_layer_weights (2, 2) scales every layer's density by 2: the run is bit for bit the run
    with w_attn = 2 (×2 is exact in floating point), so the weights reach the objective and nothing else."""
    finetune(cfg_for(tmp_path / "a", base_dir, w_attn=2.0), progress=False)
    finetune(cfg_for(tmp_path / "b", base_dir, attn_layer_weights=(2.0, 2.0)), progress=False)
    a, b = log_records(tmp_path / "a" / "run"), log_records(tmp_path / "b" / "run")
    assert [(r["ce"], r["lam"], r["sparsity"], r["attn_hard"]) for r in a] == \
        [(r["ce"], r["lam"], r["sparsity"], r["attn_hard"]) for r in b]
    assert "attn_layer_weights" not in a[0] and b[0]["attn_layer_weights"] == [2.0, 2.0]


def test_resume_may_change_the_layer_weights(tmp_path, base_dir):
    """The 6-layer zoo's lever: resume with a heavier weight on one layer. The log carries each step's
    weights, and each step's sparsity term is the weighted mean of the logged per-layer soft densities."""
    finetune(cfg_for(tmp_path, base_dir), max_steps=3, progress=False)
    card = finetune(cfg_for(tmp_path, base_dir, attn_layer_weights=(4.0, 0.5)), resume=True, progress=False)
    recs = log_records(tmp_path / "run")
    assert [r.get("attn_layer_weights") for r in recs] == [None] * 3 + [[4.0, 0.5]] * 3
    for r in recs:
        w = r.get("attn_layer_weights") or [1.0, 1.0]
        assert r["sparsity"] == pytest.approx(sum(wl * d for wl, d in zip(w, r["attn_soft"])) / 2, rel=1e-6)
    assert list(card["finetune_config"]["attn_layer_weights"]) == [4.0, 0.5]


def test_resume_may_change_the_head_power(tmp_path, base_dir):
    """attn_head_power set on resume: logged from then on, and each step's sparsity term equals the
    mean over (layer, head) of the logged per-head soft densities to that power."""
    finetune(cfg_for(tmp_path, base_dir), max_steps=3, progress=False)
    card = finetune(cfg_for(tmp_path, base_dir, attn_head_power=0.5), resume=True, progress=False)
    recs = log_records(tmp_path / "run")
    assert [r.get("attn_head_power") for r in recs] == [None] * 3 + [0.5] * 3
    for r in recs:
        p = r.get("attn_head_power", 1.0)
        heads = [d for layer in r["attn_soft_head"] for d in layer]
        assert r["sparsity"] == pytest.approx(sum(d ** p for d in heads) / len(heads), rel=1e-5)
    assert card["finetune_config"]["attn_head_power"] == 0.5


def _weights(model):
    return {k: v for k, v in model.state_dict().items() if "mask" not in k and "IGNORE" not in k}


def test_init_from_starts_from_the_sparse_models_weights_and_survives_resume(tmp_path, base_dir):
    """init_from continues a sparse model whose run folder is gone: the new run starts from its weights (with a
    vanishing learning rate they stay put, and the kept-edge fraction measured again is the same), not from the
    base's; the targets still come from the base, and the card says where it started, also after a resume."""
    first = finetune(cfg_for(tmp_path / "a", base_dir), progress=False)
    src = tmp_path / "a" / "out"
    cfg = cfg_for(tmp_path / "b", base_dir, init_from=str(src), lr=1e-12)
    finetune(cfg, max_steps=3, progress=False)
    card = finetune(cfg, resume=True, progress=False)
    got, want = _weights(load_model(tmp_path / "b" / "out", gates=False)), _weights(load_model(src, gates=False))
    base = _weights(load_model(base_dir))
    assert max(float((got[k] - want[k]).abs().max()) for k in want) < 1e-6
    assert max(float((got[k] - base[k]).abs().max()) for k in base) > 1e-3  # the source run did move the weights
    assert card["kept_edges"] == pytest.approx(first["kept_edges"], abs=1e-9)
    assert card["init_from"] == {"model": str(src), "steps": 6, "kept_edges": first["kept_edges"],
                                 "heldout_ce": first["heldout_ce"]}
    assert card["base_heldout_ce"] == pytest.approx(first["base_heldout_ce"], rel=1e-9)  # targets from the base


def test_init_from_refuses_what_would_mix_two_experiments(tmp_path, base_dir):
    finetune(cfg_for(tmp_path / "a", base_dir), progress=False)
    src = str(tmp_path / "a" / "out")
    other = tmp_path / "other"
    save_model(build_model(toy_config("toy-2l", seed=1)), other, {"name": "other"})
    cases = [(dict(init_from=str(base_dir)), "is not a sparse model"),
             (dict(init_from=src, bias_gate=2.0), "set attn, mlp, bias_gate"),
             (dict(init_from=src, model=str(other)), "was made from"),
             (dict(init_from=str(tmp_path / "nowhere")), "no checkpoint folder")]
    for kw, msg in cases:
        with pytest.raises(CircuitkitError, match=msg):
            finetune(cfg_for(tmp_path / "b", base_dir, **kw), progress=False, force=True)


@pytest.mark.parametrize("kw, msg", [
    ({"attn_head_power": 0.0}, "attn_head_power must be"),
    ({"attn_head_power": 1.5}, "attn_head_power must be"),
    ({"attn_layer_weights": (1.0, -1.0)}, "one non-negative number per layer"),
    ({"attn_layer_weights": ()}, "one non-negative number per layer"),
    ({"attn_layer_weights": (1.0, 1.0), "attn": False, "mlp": True}, "set attn = true"),
])
def test_bad_layer_weights_are_refused(tmp_path, base_dir, kw, msg):
    with pytest.raises(CircuitkitError, match=msg):
        cfg_for(tmp_path, base_dir, **kw)


def test_layer_weights_of_another_depth_are_refused_before_training(tmp_path, base_dir):
    with pytest.raises(CircuitkitError, match="has 3 values but .* has 2 layers"):
        finetune(cfg_for(tmp_path, base_dir, attn_layer_weights=(1.0, 1.0, 1.0)), progress=False)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_resume_may_change_the_constraint_target(tmp_path, base_dir):
    """A resumed run may tighten (or loosen) its constraint: the targets are recomputed from the base
    CE the checkpoint keeps, the steps before the change keep the old target in the log."""
    finetune(cfg_for(tmp_path, base_dir, tolerance=0.05), max_steps=3, progress=False)
    card = finetune(cfg_for(tmp_path, base_dir, tolerance=0.2), resume=True, progress=False)
    base = card["base_heldout_ce"]  # the constraint's base CE (task runs: held-out prompts)
    targets = [r["target"] for r in log_records(tmp_path / "run")]
    assert targets == pytest.approx([base * 1.05] * 3 + [base * 1.2] * 3, rel=1e-12)
    assert card["target_ce"] == pytest.approx(base * 1.2, rel=1e-12)
    assert card["finetune_config"]["tolerance"] == 0.2


@pytest.mark.parametrize("kw, expected", [
    ({"tolerance": 0.01}, 3.03), ({"tolerance": 0.01, "heldout_tolerance": 0.02}, 3.06),
    ({"target_ce": 2.5}, 2.5), ({"target_ce": 2.5, "heldout_tolerance": 0.02}, 3.06),
    ({}, 3.15)])
def test_heldout_criterion_of_a_corpus_run(tmp_path, base_dir, kw, expected):
    """The card's held-out criterion: its own heldout_tolerance when given, else the constraint's
    tolerance (default 0.05) or absolute target -- a train constraint tighter than the criterion."""
    cfg = cfg_for(tmp_path, base_dir, **kw)
    assert ft.heldout_target(cfg, 3.0) == pytest.approx(expected, rel=1e-12)
    assert ft.constraint_target(cfg, 3.0) == pytest.approx(kw.get("target_ce", 3.0 * (1 + kw.get("tolerance", 0.05))))


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, base_dir, monkeypatch):
    cfg = cfg_for(tmp_path, base_dir, checkpoint_every=2)
    real = ft.task_nll
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        sums, counts = real(*a, **k)
        return (sums * float("nan") if calls["n"] == 4 else sums), counts  # the 4th step's batch is poisoned

    monkeypatch.setattr(ft, "task_nll", poisoned)
    ck = tmp_path / "run" / "checkpoint.pt"
    snapshot = {}

    def spy(step, tokens, mask):
        if step == 3:
            snapshot["bytes"] = ck.read_bytes()  # the step-2 checkpoint, before step 3 is taken
        return tokens, mask

    with pytest.raises(CircuitkitError, match="non-finite.*checkpoint.*intact"):
        finetune(cfg, progress=False, on_batch=spy)
    assert ck.read_bytes() == snapshot["bytes"]
    assert torch.load(ck, weights_only=False)["step"] == 2
    assert not (tmp_path / "out").exists()


def test_infinite_lr_never_checkpoints_bad_weights(tmp_path, base_dir, monkeypatch):
    # the config refuses lr = inf; give the optimizer one behind its back to test the loop's own guard
    real = ft.make_optimizer

    def inf_lr(*a, **k):
        opt, sched = real(*a, **k)
        for g in opt.param_groups:
            g["lr"] = float("inf")
        sched.base_lrs = [float("inf")] * len(sched.base_lrs)
        return opt, sched

    monkeypatch.setattr(ft, "make_optimizer", inf_lr)
    cfg = cfg_for(tmp_path, base_dir, checkpoint_every=1)
    with pytest.raises(CircuitkitError, match="non-finite"):
        finetune(cfg, progress=False)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, cfg_dict):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        finetune(SparsifyConfig.from_dict(cfg_dict), progress=False, device="cpu")
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_matches_single_process(tmp_path, base_dir):
    import torch.multiprocessing as mp

    kw = dict(steps=4, batch_size=8, checkpoint_every=4, mlp=True, tasks={"addition": 1.0, "induction": 2.0})
    single = cfg_for(tmp_path / "single", base_dir, **kw)
    finetune(single, progress=False, device="cpu")
    ddp = cfg_for(tmp_path / "ddp", base_dir, **kw)
    mp.start_processes(_ddp_worker, args=(2, _free_port(), ddp.__dict__), nprocs=2, join=True, start_method="fork")
    a, b = log_records(tmp_path / "single" / "run"), log_records(tmp_path / "ddp" / "run")
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        assert rb["ce"] == pytest.approx(ra["ce"], rel=1e-4, abs=1e-6)
        assert rb["lam"] == pytest.approx(ra["lam"], rel=1e-5)
        assert rb["sparsity"] == pytest.approx(ra["sparsity"], rel=1e-4)
        assert rb["attn_hard"] == pytest.approx(ra["attn_hard"], abs=1e-6)
    x = get_task("addition").dataset(8, seed=5).clean
    la, lb = load_model(tmp_path / "single" / "out")(x), load_model(tmp_path / "ddp" / "out")(x)
    assert torch.allclose(la, lb, atol=1e-4)


def test_task_weighted_ce_matches_masked_ce_per_task():
    from circuitkit.training import masked_ce

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 6, 11, generator=g)
    tokens = torch.randint(0, 11, (5, 6), generator=g)
    mask = torch.rand(5, 6, generator=g) > 0.4
    row_task = torch.tensor([0, 1, 0, 1, 1])
    sums, counts = ft.task_nll(logits, tokens, mask, row_task, 2)
    for t in range(2):
        sel = row_task == t
        assert (sums[t] / counts[t]).item() == pytest.approx(masked_ce(logits[sel], tokens[sel], mask[sel]).item(),
                                                             rel=1e-5)
    s1, c1 = ft.task_nll(logits, tokens, mask, torch.zeros(5, dtype=torch.long), 1)
    assert (s1 / c1).item() == pytest.approx(masked_ce(logits, tokens, mask).item(), rel=1e-5)


def test_chunking():
    rows = chunk_tokens(list(range(10)), 4)
    assert rows.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    rows = chunk_tokens(list(range(10)), 4, bos_id=99)
    assert rows.tolist() == [[99, 0, 1, 2], [99, 3, 4, 5], [99, 6, 7, 8]]
    with pytest.raises(CircuitkitError, match="fewer than one sequence"):
        chunk_tokens([1, 2], 4)


def test_text_corpus_from_files(tmp_path, offline_gpt2, offline_gpt2_corpus):
    tok = offline_gpt2.tokenizer
    txt = tmp_path / "c.txt"
    txt.write_text("\n".join(offline_gpt2_corpus[:60]))
    c = TextCorpus.from_source(str(txt), tok, seq_len=16, heldout_fraction=0.1)
    stream = tok(txt.read_text(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    body = 16 - 1 if tok.bos_token_id is not None else 16
    n = len(stream) // body
    assert c.train.shape[0] + c.heldout.shape[0] == n and c.train.shape[1] == 16
    flat = torch.cat([c.train, c.heldout])[:, 1:].reshape(-1) if tok.bos_token_id is not None else None
    assert flat.tolist() == stream[: n * body]
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t}) for t in offline_gpt2_corpus[:30]) + "\n")
    cj = TextCorpus.from_source(str(jl), tok, seq_len=16)
    assert cj.train.shape[1] == 16 and cj.heldout.shape[0] >= 1
    tokens, mask = cj.sample(5, torch.Generator().manual_seed(0))
    assert tokens.shape == (5, 16) and mask.all()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "x"}\n')
    with pytest.raises(CircuitkitError, match="string 'text' field"):
        TextCorpus.from_source(str(bad), tok)
    with pytest.raises(CircuitkitError, match="does not exist"):
        TextCorpus.from_source(str(tmp_path / "missing.txt"), tok)
    with pytest.raises(CircuitkitError, match="could not load Hugging Face dataset"):
        TextCorpus.from_source("hf:surely-not-a-dataset-circuitkit", tok)


def test_sparsify_gpt2_on_a_text_corpus(tmp_path, offline_gpt2_cache, offline_gpt2_corpus):
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n".join(offline_gpt2_corpus[:200]))
    cfg = SparsifyConfig.from_dict(dict(name="g", model="gpt2", out=str(tmp_path / "out"),
                                        run_dir=str(tmp_path / "run"), corpus=str(txt), corpus_seq_len=32,
                                        steps=3, batch_size=4, warmup=1, checkpoint_every=3, eval_n=4,
                                        target_n=4, measure_n=4))
    card = finetune(cfg, progress=False)
    assert card["corpus"] == str(txt) and 0 < card["kept_edges"] <= 1 and card["base_heldout_ce"] > 0
    model = load_model(tmp_path / "out")
    assert get_gates(model) is not None and model.tokenizer is not None


def run_cli(args, capsys):
    code = cli_main(["sparsify", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--task", "nonsense"], "unknown task"),
    (["--task", "addition", "--tolerance", "-0.1"], "tolerance must be >= 0"),
    (["--corpus", "/nonexistent/corpus.txt"], "does not exist"),
    (["--task", "addition", "--steps", "0"], "steps must be positive, got 0"),
    (["--task", "addition", "--lr", "inf"], "lr must be a number, got inf"),
    (["--tasks", "addition=x"], "bad weight"),
    (["--task", "addition", "--attn-layer-weights", "1,1,1"], "has 3 values but"),
    (["--task", "addition", "--init-from", "/nonexistent/sparse-model"], "no checkpoint folder"),
])
def test_cli_bad_input(tmp_path, base_dir, capsys, extra, message):
    code, err = run_cli(["--model", str(base_dir), "--out", str(tmp_path / "o"), "--run-dir",
                         str(tmp_path / "r"), "--no-progress", *extra], capsys)
    assert code == 2 and message in err


def test_cli_layer_weights_flag(tmp_path, base_dir, capsys):
    with pytest.raises(SystemExit) as e:  # argparse's own usage error, naming the flag
        cli_main(["sparsify", "--model", str(base_dir), "--out", str(tmp_path / "o"), "--attn-layer-weights", "1,x"])
    assert e.value.code == 2
    assert "--attn-layer-weights: '1,x': write comma-separated numbers" in capsys.readouterr().err
    assert cli_main(["sparsify", "--model", str(base_dir), "--out", str(tmp_path / "o"), "--run-dir",
                     str(tmp_path / "r"), "--task", "addition", "--steps", "2", "--batch-size", "4",
                     "--attn-layer-weights", "3,0.5", "--no-progress"]) == 0
    assert [r["attn_layer_weights"] for r in log_records(tmp_path / "r")] == [[3.0, 0.5]] * 2


def test_cli_config_unknown_keys_and_corpus_needs_tokenizer(tmp_path, base_dir, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'name = "x"\nmodel = "{base_dir}"\nout = "o"\nrun_dir = "r"\nstepz = 3\n[tasks]\naddition = 1\n')
    code, err = run_cli(["--config", str(cfg)], capsys)
    assert code == 2 and "unknown keys ['stepz']" in err
    txt = tmp_path / "t.txt"
    txt.write_text("some text " * 50)
    code, err = run_cli(["--model", str(base_dir), "--out", str(tmp_path / "o"), "--corpus", str(txt)], capsys)
    assert code == 2 and "needs a model with a tokenizer" in err


def test_cli_runs_with_config_and_flag_overrides(tmp_path, base_dir, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'name = "x"\nmodel = "{base_dir}"\nout = "{tmp_path / "o"}"\nrun_dir = "{tmp_path / "r"}"\n'
                   f'steps = 50\nbatch_size = 8\neval_n = 20\ntarget_n = 20\nmeasure_n = 10\ntolerance = 0.1\n'
                   f'[tasks]\naddition = 1\n')
    code = cli_main(["sparsify", "--config", str(cfg), "--steps", "2", "--target-ce", "3.5", "--no-progress"])
    assert code == 0
    card = json.loads((tmp_path / "o" / "card.json").read_text())
    assert card["steps"] == 2 and card["target_ce"] == 3.5 and card["finetune_config"]["tolerance"] is None
    assert card["command"].startswith("circuitkit ")


def test_cli_stop_at_leaves_a_checkpoint_that_resume_finishes(tmp_path, base_dir, capsys):
    args = ["--model", str(base_dir), "--task", "addition", "--out", str(tmp_path / "o"), "--run-dir",
            str(tmp_path / "r"), "--steps", "3", "--batch-size", "8", "--no-progress"]
    assert cli_main(["sparsify", *args, "--stop-at", "2"]) == 0
    assert "stopped at step 2 of 3" in capsys.readouterr().out and not (tmp_path / "o" / "card.json").exists()
    assert cli_main(["sparsify", *args, "--resume"]) == 0
    assert json.loads((tmp_path / "o" / "card.json").read_text())["steps"] == 3


def test_cli_warns_when_the_model_misses_its_ce_target(tmp_path, base_dir, capsys):
    """A random model cannot reach CE 1e-6 in 2 steps: the model is saved, and stderr says so and how to fix it."""
    code, err = run_cli(["--model", str(base_dir), "--task", "addition", "--out", str(tmp_path / "o"), "--run-dir",
                         str(tmp_path / "r"), "--steps", "2", "--target-ce", "1e-6", "--batch-size", "8",
                         "--no-progress"], capsys)
    card = json.loads((tmp_path / "o" / "card.json").read_text())
    assert code == 0 and card["meets_target"] is False
    assert "misses its CE target" in err and "target 1e-06" in err and "final_sparsity_weight" in err


def test_cli_warns_when_a_task_loses_accuracy(tmp_path, capsys):
    """A trained model (toy-addition, 100% held-out) finetuned 3 steps at a learning rate that wrecks it: the card's
    meets_accuracy is False, its accuracy_delta is the held-out accuracies' difference, and stderr names the task and
    the loss. The same card judged with max_accuracy_drop = 1 (any loss allowed) meets it."""
    args = ["--model", "toy-addition", "--task", "addition", "--steps", "3", "--lr", "0.05", "--batch-size", "8",
            "--no-progress", "--bias-gate", "1"]
    code, err = run_cli([*args, "--out", str(tmp_path / "o"), "--run-dir", str(tmp_path / "r")], capsys)
    card = json.loads((tmp_path / "o" / "card.json").read_text())
    drop = card["heldout_base"]["addition"]["accuracy"] - card["heldout"]["addition"]["accuracy"]
    assert code == 0 and drop > 0.01 and card["max_accuracy_drop"] == 0.01 and card["meets_accuracy"] is False
    assert card["accuracy_delta"]["addition"] == pytest.approx(-drop, abs=1e-12)
    assert "loses more than 1 points of held-out accuracy on addition" in err and f"({round(100 * drop, 2):g} " in err
    cfg = SparsifyConfig.from_dict(dict(name="t", model="toy-addition", out=str(tmp_path / "o2"),
                                        run_dir=str(tmp_path / "r2"), tasks={"addition": 1.0}, steps=3, lr=0.05,
                                        batch_size=8, bias_gate=1.0, max_accuracy_drop=1.0))
    assert finetune(cfg, progress=False)["meets_accuracy"] is True
    with pytest.raises(CircuitkitError, match="max_accuracy_drop"):
        SparsifyConfig.from_dict({**dict(name="t", model="m", out="o", run_dir="r", tasks={"addition": 1.0}),
                                  "max_accuracy_drop": 1.5})


def test_curves_lists_the_runs_evaluations_and_its_card(tmp_path, base_dir, capsys):
    """`circuitkit curves`: the table's rows are the log's in-run evaluations (read here from the
    JSON lines) and the finished card's own point, each judged against the card's bound."""
    cfg = cfg_for(tmp_path, base_dir, eval_every=2, target_ce=3.5)  # a bound the first evaluation misses
    card = finetune(cfg, progress=False)
    evals = [(r["step"], r["eval"]) for r in log_records(tmp_path / "run") if "eval" in r]
    assert [s for s, _ in evals] == [2, 4]  # every eval_every steps before the last
    table, stem = tmp_path / "t.md", tmp_path / "fig" / "c"
    assert cli_main(["curves", str(tmp_path / "run"), "--labels", "mine", "--out", str(stem),
                     "--table", str(table)]) == 0
    assert (tmp_path / "fig" / "c.png").stat().st_size > 0 and (tmp_path / "fig" / "c.svg").exists()
    lines = table.read_text().splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(head, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]
    want = [(s, e["ce"], 100 * e["kept_edges"], e["accuracy"]["addition"], "log") for s, e in evals]
    want.append((6, card["heldout_ce"], 100 * card["kept_edges"], card["heldout"]["addition"]["accuracy"], "card"))
    assert [(int(r["step"]), float(r["heldout_ce"]), float(r["kept_edges_pct"]), float(r["acc_addition"]),
             r["source"]) for r in rows] == \
        [(s, pytest.approx(c, rel=1e-3), pytest.approx(k, rel=1e-3), pytest.approx(a, abs=1e-3), src)
         for s, c, k, a, src in want]
    assert [r["within_bound"] for r in rows] == ["yes" if w[1] <= 3.5 else "no" for w in want]
    assert {r["within_bound"] for r in rows} == {"yes", "no"}
    assert all(r["run"] == "mine" for r in rows) and table.read_text() in capsys.readouterr().out + "\n"
    # --since keeps only the later steps
    assert cli_main(["curves", str(tmp_path / "run"), "--since", "3", "--out", str(stem), "--table",
                     str(table)]) == 0
    assert [int(ln.split("|")[2]) for ln in table.read_text().splitlines()[2:]] == [4, 6]


def test_curves_bad_input(tmp_path, base_dir, capsys):
    def err(*args):
        assert cli_main(["curves", *map(str, args)]) == 2
        return capsys.readouterr().err

    assert "no step log at" in err(tmp_path / "nothing") and "run_dir" in err(tmp_path / "nothing")
    finetune(cfg_for(tmp_path, base_dir, steps=2), progress=False)
    assert "gives 2 labels for 1 runs" in err(tmp_path / "run", "--labels", "a,b")
    assert "no steps after --since 5; its log ends at step 2" in err(tmp_path / "run", "--since", "5")
    train_log = tmp_path / "train"
    train_log.mkdir()
    (train_log / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    assert "not a sparse run with attention gates" in err(train_log)
