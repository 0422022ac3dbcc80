"""The code corpus and the language-model path on a tiny slice: the file rule and its manifest,
the tokenizer, the bigram baseline, LM training with exact resume, loading with the tokenizer,
and sparse post-training on the same corpus. Seconds, not minutes: a few small files, a 2-layer
model, a few steps."""

import hashlib
import json
import math
import shutil

import pytest
import torch

from circuitkit import CircuitkitError
from circuitkit.corpus import (EOT, FileCorpus, TextCorpus, bigram_ce, code_corpus, select_python_files,
                               stdlib_root, train_tokenizer)
from circuitkit.models import (TOKENIZER_FILE, build_model, load_card, load_model, save_model, set_local_tokenizer,
                               toy_config)
from circuitkit.sparsity import load_model as load_sparse
from circuitkit.sparsity.finetune import SparsifyConfig, finetune
from circuitkit.training import TrainConfig, corpus_ce, train

# Real code to build the tiny corpus from: small standard-library modules.
SOURCES = ["shlex.py", "textwrap.py", "bisect.py", "colorsys.py", "keyword.py", "fnmatch.py", "glob.py",
           "heapq.py", "stat.py", "struct.py"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A folder shaped like a standard library: kept modules, and each kind of thing the rule leaves out."""
    root = tmp_path_factory.mktemp("lib")
    for name in SOURCES:
        shutil.copy(stdlib_root() / name, root / name)
    (root / "pkg").mkdir()
    shutil.copy(stdlib_root() / "json" / "decoder.py", root / "pkg" / "decoder.py")
    for excluded in ("test", "idlelib", "turtledemo", "site-packages", "pkg/tests", "__pycache__"):
        (root / excluded).mkdir(parents=True)
        (root / excluded / "mod.py").write_text("x = 1\n")
    (root / "test_something.py").write_text("assert True\n")
    (root / "latin.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    (root / "notes.txt").write_text("not python\n")
    return root


@pytest.fixture(scope="module")
def tok(tree):
    return train_tokenizer(code_corpus(f"stdlib:{tree}").texts("train"), vocab_size=400)


def lm_cfg(tmp, tree, **kw):
    raw = dict(name="lm", out=str(tmp / "model"), run_dir=str(tmp / "run"), corpus=f"stdlib:{tree}",
               corpus_seq_len=24, corpus_heldout_fraction=0.2, tokenizer_vocab=400,
               arch={"n_layers": 2, "d_model": 32, "n_heads": 4, "d_head": 8, "d_mlp": 64, "n_ctx": 32},
               steps=8, batch_size=4, warmup=2, checkpoint_every=4, eval_every=4, eval_n=8, seed=5)
    raw.update(kw)
    return TrainConfig.from_dict(raw)


# ---------------------------------------------------------------- corpus rule and manifest

def test_rule_keeps_code_and_leaves_out_tests_demos_and_non_utf8(tree):
    kept = {p.relative_to(tree).as_posix() for p in select_python_files(tree)}
    assert kept == set(SOURCES) | {"pkg/decoder.py"}


def test_split_is_by_file_seeded_and_the_hash_names_contents(tree, tmp_path):
    a, b = FileCorpus.build(tree, seed=0, heldout_fraction=0.2), FileCorpus.build(tree, seed=0, heldout_fraction=0.2)
    assert a.hash == b.hash and a.paths("heldout") == b.paths("heldout")
    held, train_ = set(a.paths("heldout")), set(a.paths("train"))
    assert len(held) == round(0.2 * 11) and not held & train_ and len(held | train_) == 11
    other = FileCorpus.build(tree, seed=1, heldout_fraction=0.2)
    assert other.paths("heldout") != a.paths("heldout") and other.hash != a.hash
    # the manifest's hashes are the files' own sha256, computed here independently
    m = a.manifest()
    for f in m["files"]:
        assert f["sha256"] == hashlib.sha256((tree / f["path"]).read_bytes()).hexdigest()
    json.dumps(m)  # plain JSON
    # one changed byte in one file changes the corpus hash and is caught when its text is read
    copy = tmp_path / "lib"
    shutil.copytree(tree, copy)
    before = FileCorpus.build(copy, seed=0, heldout_fraction=0.2)
    path = copy / "bisect.py"
    path.write_text(path.read_text() + "# edited\n")
    assert FileCorpus.build(copy, seed=0, heldout_fraction=0.2).hash != before.hash
    split = "train" if "bisect.py" in before.paths("train") else "heldout"
    with pytest.raises(CircuitkitError, match="changed after the corpus was built"):
        before.texts(split)


def test_bad_corpus_sources_are_clear(tmp_path):
    with pytest.raises(CircuitkitError, match="not a folder"):
        code_corpus(f"stdlib:{tmp_path / 'missing'}")
    (tmp_path / "one.py").write_text("x = 1\n")
    with pytest.raises(CircuitkitError, match="at least 2"):
        code_corpus(f"stdlib:{tmp_path}")


# ---------------------------------------------------------------- tokenizer and baseline

def test_tokenizer_round_trips_code_and_has_one_end_of_text_token(tok, tree):
    text = (tree / "textwrap.py").read_text()[:2000] + "\n\tdef f(α, β):  # ünïcode\n        return α\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.convert_tokens_to_ids(EOT) == 0 == tok.bos_token_id == tok.eos_token_id
    assert EOT not in tok.decode(ids) and len(tok) == 400


def test_a_freshly_trained_tokenizer_goes_on_a_model_and_survives_saving(tree, tmp_path):
    tok = train_tokenizer(code_corpus(f"stdlib:{tree}").texts("train"), vocab_size=400)  # not the shared one:
    model = build_model(toy_config("toy-2l", d_vocab=len(tok)))  # TransformerLens sets model_max_length on it
    set_local_tokenizer(model, tok)  # in memory, never saved: TransformerLens must not look for it on disk
    x = model.to_tokens("def f(x):")
    assert x[0, 0] == 0 and (x[0] == 0).sum() == 1
    save_model(model, tmp_path / "m", {"name": "m"})
    assert torch.equal(load_model(tmp_path / "m").to_tokens("def f(x):"), x)


def test_bigram_ce_matches_a_hand_count():
    train_ = torch.tensor([0, 1, 2, 1, 2, 1, 0, 2])
    held = torch.tensor([1, 2, 0, 1])
    out = bigram_ce(train_, held, d_vocab=3)
    uni = [2 + 1, 3 + 1, 3 + 1]  # add-one unigram counts
    p_uni = [u / sum(uni) for u in uni]
    pairs = list(zip(train_.tolist()[:-1], train_.tolist()[1:]))
    lam = out["lambda"]

    def p(a, b):
        row = sum(1 for x, _ in pairs if x == a)
        big = sum(1 for x, y in pairs if (x, y) == (a, b)) / row if row else 0.0
        return lam * big + (1 - lam) * p_uni[b]

    held_l = held.tolist()
    want = -sum(math.log(p(a, b)) for a, b in zip(held_l[:-1], held_l[1:])) / 3
    assert out["ce"] == pytest.approx(want, rel=1e-9)
    assert out["unigram_ce"] == pytest.approx(-sum(math.log(p_uni[b]) for b in held_l[1:]) / 3, rel=1e-9)


def test_windows_are_contiguous_slices_of_the_train_stream_after_bos(tree, tok):
    c = TextCorpus.from_source(f"stdlib:{tree}", tok, seq_len=16, heldout_fraction=0.2)
    tokens, mask = c.sample(32, torch.Generator().manual_seed(0))
    assert tokens.shape == (32, 16) and bool(mask.all()) and bool((tokens[:, 0] == 0).all())
    stream = c.train_stream.tolist()
    for row in tokens[:, 1:].tolist():
        starts = [i for i in range(len(stream) - 14) if stream[i:i + 15] == row]
        assert starts, "a window is not a slice of the train stream"
    # held-out rows come from the held-out files only
    held = torch.cat([torch.tensor(tok(t, add_special_tokens=False)["input_ids"] + [0])
                      for t in code_corpus(f"stdlib:{tree}", heldout_fraction=0.2).texts("heldout")])
    assert torch.equal(c.heldout[:, 1:].flatten(), held[: c.heldout.shape[0] * 15])


# ---------------------------------------------------------------- training, resume, loading

def test_lm_trains_resumes_exactly_and_loads_with_its_tokenizer(tmp_path, tree):
    full = lm_cfg(tmp_path / "a", tree)
    card = train(full, progress=False)
    part = lm_cfg(tmp_path / "b", tree)
    assert train(part, max_steps=4, progress=False)["finished"] is False
    train(part, resume=True, progress=False)
    log = lambda d: [json.loads(x)["loss"] for x in (d / "run" / "log.jsonl").read_text().splitlines()]  # noqa: E731
    assert log(tmp_path / "b") == log(tmp_path / "a") and len(log(tmp_path / "a")) == 8

    a, b = load_model(tmp_path / "a" / "model"), load_model(tmp_path / "b" / "model")
    assert (tmp_path / "a" / "model" / TOKENIZER_FILE).exists() and a.tokenizer is not None
    x = a.to_tokens("def f(x):\n    return x\n")
    assert x[0, 0] == 0 and torch.equal(a(x), b(x))
    assert a.to_string(x[0, 1:]) == "def f(x):\n    return x\n"

    stored = load_card(tmp_path / "a" / "model")
    fc = code_corpus(f"stdlib:{tree}", heldout_fraction=0.2)
    assert stored["corpus"]["hash"] == fc.hash and stored["corpus"]["heldout_files"] == fc.paths("heldout")
    assert stored["tokens_seen"] == 8 * 4 * 24 and card["heldout_ce"] > 0 and card["train_ce"] > 0
    assert stored["bigram_heldout_ce"] > 0 and stored["tokenizer"] == TOKENIZER_FILE


def test_resume_refuses_a_corpus_that_changed(tmp_path, tree):
    lib = tmp_path / "lib"
    shutil.copytree(tree, lib)
    cfg = lm_cfg(tmp_path, lib, steps=6)
    train(cfg, max_steps=4, progress=False)
    (lib / "extra.py").write_text("def g(y):\n    return y * 2\n" * 20)
    with pytest.raises(CircuitkitError, match="differs from the one this run started on"):
        train(cfg, resume=True, progress=False)


def test_config_needs_tasks_or_a_corpus_not_both(tmp_path, tree):
    with pytest.raises(CircuitkitError, match="nothing to train on; \\[tasks\\] needs at least one task"):
        TrainConfig.from_dict(dict(name="x", out="o", run_dir="r"))
    with pytest.raises(CircuitkitError, match="not both"):
        TrainConfig.from_dict(dict(name="x", out="o", run_dir="r", tasks={"addition": 1.0}, corpus="stdlib"))
    with pytest.raises(CircuitkitError, match="exceeds the model's context"):
        train(lm_cfg(tmp_path, tree, corpus_seq_len=40), progress=False)


def test_sparsify_on_the_corpus_keeps_the_split_and_checks_it(tmp_path, tree):
    train(lm_cfg(tmp_path / "base", tree), progress=False)
    raw = dict(name="s", model=str(tmp_path / "base" / "model"), out=str(tmp_path / "s"), run_dir=str(tmp_path / "sr"),
               corpus=f"stdlib:{tree}", corpus_seq_len=24, corpus_heldout_fraction=0.2, steps=3, batch_size=4,
               warmup=1, checkpoint_every=3, eval_every=100, eval_n=8, target_n=8, measure_n=4, seed=1)
    card = finetune(SparsifyConfig.from_dict(raw), progress=False)
    assert card["corpus_hash"] == code_corpus(f"stdlib:{tree}", heldout_fraction=0.2).hash
    # the constraint holds train-window CE, so its target comes from the base's CE on train rows;
    # the criterion (meets_target) is held-out CE against 1.05 x the base's held-out CE
    base = load_model(tmp_path / "base" / "model")
    rows = TextCorpus.from_source(f"stdlib:{tree}", base.tokenizer, seq_len=24, heldout_fraction=0.2)
    spread = lambda t: t[[round(i * (t.shape[0] - 1) / 7) for i in range(8)]]  # noqa: E731  (8 rows, first to last)
    assert card["target_ce"] == pytest.approx(corpus_ce(base, spread(rows.train)) * 1.05, rel=1e-5)
    assert card["heldout_target_ce"] == pytest.approx(corpus_ce(base, spread(rows.heldout)) * 1.05, rel=1e-5)
    assert card["meets_target"] == (card["heldout_ce"] <= card["heldout_target_ce"])
    sparse = load_sparse(tmp_path / "s")
    assert sparse.tokenizer is not None and sparse.to_str_tokens("def")[0] == EOT
    # another held-out fraction is another split: the CE constraint would be set on files the base trained on
    bad = SparsifyConfig.from_dict({**raw, "corpus_heldout_fraction": 0.4, "out": str(tmp_path / "s2"),
                                    "run_dir": str(tmp_path / "sr2")})
    with pytest.raises(CircuitkitError, match="not the one the base model was trained on"):
        finetune(bad, progress=False)


def test_zoo_lists_a_language_model_by_its_heldout_ce(capsys):
    from circuitkit.cli import main as cli_main

    assert cli_main(["zoo"]) == 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines() if ln.strip()}
    card = load_card("code-lm")  # the shipped language model: no task accuracies, a held-out CE
    assert f"held-out CE={card['heldout_ce']:.4f}" in lines["code-lm"]
    assert "held-out accuracy=" in lines["toy-addition"]


# ---------------------------------------------------------------- repeated stretches and continued training

def _period_of(row: list[int], lo: int, hi: int) -> list[int]:
    """Every period p in [lo, hi] with row[i] == row[i mod p] for all i."""
    return [p for p in range(lo, hi + 1) if all(row[i] == row[i % p] for i in range(len(row)))]


def _is_slice(part: list[int], stream: list[int]) -> bool:
    k = len(part)
    return any(stream[i:i + k] == part for i in range(len(stream) - k + 1))


def test_repeat_windows_repeat_a_real_stretch_and_leave_the_rest_plain(tree, tok):
    c = TextCorpus.from_source(f"stdlib:{tree}", tok, seq_len=24, heldout_fraction=0.2).with_repeats(0.5, 4)
    tokens, mask = c.sample(8, torch.Generator().manual_seed(3))
    stream = c.train_stream.tolist()
    assert tokens.shape == (8, 24) and bool(mask.all()) and bool((tokens[:, 0] == 0).all())
    body = 23
    for row in tokens[:4, 1:].tolist():  # round(0.5 * 8) = 4 repeat windows first
        periods = _period_of(row, 4, body // 2)
        assert periods, f"a repeat window has no period in [4, {body // 2}]: {row}"
        assert _is_slice(row[:periods[0]], stream)
    for row in tokens[4:, 1:].tolist():  # the rest: plain windows, and (almost surely) not periodic
        assert _is_slice(row, stream)
    assert sum(bool(_period_of(r, 4, body // 2)) for r in tokens[4:, 1:].tolist()) <= 1
    # without repeats the draw is the one the runs before this option made (exact resume of old runs)
    plain = TextCorpus.from_source(f"stdlib:{tree}", tok, seq_len=24, heldout_fraction=0.2)
    g = torch.Generator().manual_seed(3)
    start = torch.randint(plain.train_stream.numel() - body + 1, (8,), generator=g)
    want = plain.train_stream[start[:, None] + torch.arange(body)]
    assert torch.equal(plain.sample(8, torch.Generator().manual_seed(3))[0][:, 1:], want)
    # the rows that set a constraint target hold the same share of repeats, fixed by their seed
    rows = c.constraint_rows(8)
    assert torch.equal(rows, c.constraint_rows(8)) and torch.equal(rows[4:], c.rows("train", 8)[4:])
    assert all(_period_of(r, 4, body // 2) for r in rows[:4, 1:].tolist())
    assert torch.equal(plain.constraint_rows(8), plain.rows("train", 8))


def test_repeat_options_are_checked(tree, tok, tmp_path):
    c = TextCorpus.from_source(f"stdlib:{tree}", tok, seq_len=24, heldout_fraction=0.2)
    with pytest.raises(CircuitkitError, match="corpus_repeat_min must be between 1 and half a window \\(11 tokens"):
        c.with_repeats(0.5, 12)
    with pytest.raises(CircuitkitError, match="must be in \\[0, 1\\], got 1.5"):
        c.with_repeats(1.5)
    rows_only = TextCorpus(train=c.train, heldout=c.heldout)
    with pytest.raises(CircuitkitError, match="needs a corpus kept as one stream"):
        rows_only.with_repeats(0.5)
    with pytest.raises(CircuitkitError, match="apply to a language model"):
        TrainConfig.from_dict(dict(name="x", out="o", run_dir="r", tasks={"addition": 1.0}, corpus_repeat_fraction=0.5))
    with pytest.raises(CircuitkitError, match="apply to a language model"):
        TrainConfig.from_dict(dict(name="x", out="o", run_dir="r", tasks={"addition": 1.0}, init_from="code-lm"))
    with pytest.raises(CircuitkitError, match="corpus_repeat_fraction"):
        lm_cfg(tmp_path, tree, corpus_repeat_fraction=2.0)


def test_init_from_continues_a_language_model_with_its_weights_and_tokenizer(tmp_path, tree):
    train(lm_cfg(tmp_path / "base", tree), progress=False)
    base_dir = tmp_path / "base" / "model"
    more = dict(init_from=str(base_dir), corpus_repeat_fraction=0.5, corpus_repeat_min=4, steps=4,
                checkpoint_every=2, lr=1e-9, warmup=0)
    train(lm_cfg(tmp_path / "c", tree, **more), progress=False)
    # the first step's loss is the base model's CE on the first batch (drawn as the loop draws it)
    base = load_model(base_dir)
    data = TextCorpus.from_source(f"stdlib:{tree}", base.tokenizer, seq_len=24, heldout_fraction=0.2).with_repeats(0.5, 4)
    tokens, _ = data.sample(4, torch.Generator().manual_seed(5 + 1))
    first = json.loads((tmp_path / "c" / "run" / "log.jsonl").read_text().splitlines()[0])["loss"]
    assert first == pytest.approx(corpus_ce(base, tokens), rel=1e-4)
    cont = load_model(tmp_path / "c" / "model")
    assert torch.equal(cont.to_tokens("def f(x):"), base.to_tokens("def f(x):"))
    assert (tmp_path / "c" / "run" / "tokenizer" / TOKENIZER_FILE).exists()  # a checkpoint loads without the model
    stored = load_card(tmp_path / "c" / "model")
    assert stored["init_from"]["steps"] == 8 and stored["tokens_seen"] == 4 * 4 * 24
    assert stored["tokens_seen_total"] == (8 + 4) * 4 * 24
    assert stored["train_config"]["corpus_repeat_fraction"] == 0.5
    # interrupted and resumed: the same steps
    part = lm_cfg(tmp_path / "d", tree, **more)
    train(part, max_steps=2, progress=False)
    train(part, resume=True, progress=False)
    log = lambda d: [json.loads(x)["loss"] for x in (d / "run" / "log.jsonl").read_text().splitlines()]  # noqa: E731
    assert log(tmp_path / "d") == log(tmp_path / "c")


def test_init_from_refuses_what_it_cannot_continue(tmp_path, tree):
    train(lm_cfg(tmp_path / "base", tree), progress=False)
    base_dir = str(tmp_path / "base" / "model")
    wide = {"n_layers": 2, "d_model": 48, "n_heads": 4, "d_head": 12, "d_mlp": 64, "n_ctx": 32}
    with pytest.raises(CircuitkitError, match="does not have this config's arch: d_model 32 \\(config: 48\\)"):
        train(lm_cfg(tmp_path / "w", tree, init_from=base_dir, arch=wide), progress=False)
    with pytest.raises(CircuitkitError, match="not the one the base model was trained on"):
        train(lm_cfg(tmp_path / "h", tree, init_from=base_dir, corpus_heldout_fraction=0.4), progress=False)
    with pytest.raises(CircuitkitError, match="is a sparse model"):
        train(lm_cfg(tmp_path / "s", tree, init_from="toy-addition-sparse"), progress=False)
    with pytest.raises(CircuitkitError, match="has no tokenizer of its own"):
        train(lm_cfg(tmp_path / "t", tree, init_from="toy-addition"), progress=False)


def test_sparsify_with_repeats_sets_its_target_on_the_batches_distribution(tmp_path, tree):
    train(lm_cfg(tmp_path / "base", tree), progress=False)
    raw = dict(name="s", model=str(tmp_path / "base" / "model"), out=str(tmp_path / "s"), run_dir=str(tmp_path / "sr"),
               corpus=f"stdlib:{tree}", corpus_seq_len=24, corpus_heldout_fraction=0.2, corpus_repeat_fraction=0.5,
               corpus_repeat_min=4, steps=2, batch_size=4, warmup=1, checkpoint_every=2, eval_every=100, eval_n=8,
               target_n=8, measure_n=4, seed=1)
    card = finetune(SparsifyConfig.from_dict(raw), progress=False)
    base = load_model(tmp_path / "base" / "model")
    c = TextCorpus.from_source(f"stdlib:{tree}", base.tokenizer, seq_len=24, heldout_fraction=0.2)
    plain = corpus_ce(base, c.rows("train", 8))
    mixed = corpus_ce(base, c.with_repeats(0.5, 4).constraint_rows(8))
    assert mixed != pytest.approx(plain, rel=1e-3)  # the repeat rows change what the target is measured on
    assert card["target_ce"] == pytest.approx(mixed * 1.05, rel=1e-5)
    # the card's train CE is measured on the same rows as the base's, so the two compare
    sparse = load_sparse(tmp_path / "s")
    assert card["train_ce"] == pytest.approx(corpus_ce(sparse, c.with_repeats(0.5, 4).constraint_rows(8)), rel=1e-5)
    # the held-out criterion stays on plain held-out windows
    assert card["heldout_target_ce"] == pytest.approx(corpus_ce(base, c.rows("heldout", 8)) * 1.05, rel=1e-5)


def test_per_part_constraints_hold_plain_and_repeat_windows_each_at_their_own_target(tmp_path, tree):
    train(lm_cfg(tmp_path / "base", tree), progress=False)
    raw = dict(name="s", model=str(tmp_path / "base" / "model"), out=str(tmp_path / "s"), run_dir=str(tmp_path / "sr"),
               corpus=f"stdlib:{tree}", corpus_seq_len=24, corpus_heldout_fraction=0.2, corpus_repeat_fraction=0.5,
               corpus_repeat_min=4, per_task_constraints=True, steps=2, batch_size=4, warmup=1, checkpoint_every=2,
               eval_every=100, eval_n=8, target_n=8, measure_n=4, seed=1)
    card = finetune(SparsifyConfig.from_dict(raw), progress=False)
    base = load_model(tmp_path / "base" / "model")
    c = TextCorpus.from_source(f"stdlib:{tree}", base.tokenizer, seq_len=24, heldout_fraction=0.2)
    # of 8 constraint rows the first 4 are repeat windows, the last 4 the plain train rows they were
    plain_rows, repeat_rows = c.rows("train", 8)[4:], c.with_repeats(0.5, 4).constraint_rows(8)[:4]
    assert card["target_ce"] == pytest.approx({"plain": corpus_ce(base, plain_rows) * 1.05,
                                               "repeat": corpus_ce(base, repeat_rows) * 1.05}, rel=1e-5)
    assert set(card["geco"]) == {"plain", "repeat"}
    sparse = load_sparse(tmp_path / "s")
    assert card["train_ce_parts"] == pytest.approx({"plain": corpus_ce(sparse, plain_rows),
                                                    "repeat": corpus_ce(sparse, repeat_rows)}, rel=1e-5)
    assert card["base_train_ce_parts"] == pytest.approx({k: v / 1.05 for k, v in card["target_ce"].items()}, rel=1e-6)
    # the criterion stays held-out CE on plain windows, against one target
    assert card["meets_target"] == (card["heldout_ce"] <= card["heldout_target_ce"])
    log = [json.loads(line) for line in (tmp_path / "sr" / "log.jsonl").read_text().splitlines()]
    assert set(log[-1]["lam_task"]) == {"plain", "repeat"} and set(log[-1]["ce_task"]) == {"plain", "repeat"}
    # the rows of a batch are told apart by part: repeat windows first, as TextCorpus.sample draws them
    assert c.with_repeats(0.5, 4).row_parts(5).tolist() == [1, 1, 0, 0, 0]
    # one part, one constraint: per-part constraints without repeats (or with nothing but repeats) are refused
    for f in (0.0, 1.0):
        with pytest.raises(CircuitkitError, match="per_task_constraints on a corpus run.*drop per_task_constraints"):
            SparsifyConfig.from_dict({**raw, "corpus_repeat_fraction": f})
    # a part with no constraint rows has no target: said before any training, not as a KeyError
    few = {**raw, "target_n": 1, "out": str(tmp_path / "s1"), "run_dir": str(tmp_path / "sr1")}
    with pytest.raises(CircuitkitError, match="1 constraint rows hold no repeat windows.*raise target_n"):
        finetune(SparsifyConfig.from_dict(few), progress=False)
