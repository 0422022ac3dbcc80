"""Code tasks (circuitkit/tasks/code.py): dataset invariants on a small tokenizer trained here.

The tokenizer is trained in the test on a few standard-library files (code-lm's own tokenizer
is not in a fresh clone). Each test recomputes what a prompt implies from its decoded text,
independently of how the task built it.
"""

from __future__ import annotations

import re

import pytest
import torch

from circuitkit import CircuitkitError
from circuitkit.corpus import stdlib_root, train_tokenizer
from circuitkit.models import build_model, load_local_tokenizer, set_local_tokenizer, toy_config
from circuitkit.tasks import code_task_names, get_task, task_for_model, toy_task_names

TRAIN_FILES = ["argparse.py", "configparser.py", "textwrap.py"]
HELDOUT_FILES = ["shlex.py", "fnmatch.py"]
TEMPLATE_TASKS = ("code-args", "code-kwargs", "code-return", "code-quote", "code-key")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = stdlib_root()
    # plus string subscripts in both quotes, so that ['  '] ["  "] are merges of this small vocabulary (code-key)
    subscripts = "".join(f"    {a}['{b}'] = {a}[\"{b}\"]\n" for a in ("data", "self", "opts") for b in ("name", "key"))
    trained = train_tokenizer([(root / f).read_text(encoding="utf-8") for f in TRAIN_FILES] + [subscripts * 40],
                              vocab_size=1200)
    # saved and loaded back, as a model's tokenizer is (TransformerLens needs the loaded form's name_or_path)
    folder = tmp_path_factory.mktemp("code-tokenizer")
    trained.save_pretrained(str(folder))
    return load_local_tokenizer(folder)


@pytest.fixture(scope="module")
def heldout():
    root = stdlib_root()
    return [(root / f).read_text(encoding="utf-8") for f in HELDOUT_FILES]


def make(name, tok, heldout, **kw):
    if name == "code-induction":
        kw.setdefault("texts", heldout)
    return get_task(name, tokenizer=tok, **kw)


def text(tok, ids) -> str:
    return tok.decode([int(i) for i in ids if int(i) != tok.bos_token_id])


def test_code_tasks_are_registered_but_not_toy_tasks():
    # a study looping over toy_task_names() would build code tasks without a tokenizer
    assert set(code_task_names()) == {"code-induction", "code-args", "code-kwargs", "code-return", "code-quote", "code-key"}
    assert not set(code_task_names()) & set(toy_task_names())


@pytest.mark.parametrize("name", ["code-induction", *TEMPLATE_TASKS])
def test_equal_lengths_aligned_and_single_token_answers(name, tok, heldout):
    ds = make(name, tok, heldout).dataset(64, seed=0)
    assert ds.clean.shape == ds.corrupt.shape
    # one length for the whole batch: no padding, every prompt's answer at its last position
    assert (ds.clean[:, 1:] != tok.pad_token_id).all() and (ds.corrupt[:, 1:] != tok.pad_token_id).all()
    assert (ds.answer_pos == ds.clean.shape[1] - 1).all()
    assert (ds.clean[:, 0] == tok.bos_token_id).all()
    # answers and distractors are single tokens, and never equal
    assert ds.correct.shape == (64, 1) and (ds.distractors != ds.correct[..., None]).all()
    assert int(ds.correct.max()) < len(tok) and int(ds.distractors.max()) < len(tok)


@pytest.mark.parametrize("name", ["code-induction", *TEMPLATE_TASKS])
def test_seeds_reproduce_and_differ(name, tok, heldout):
    task = make(name, tok, heldout)
    a, b, c = task.dataset(32, seed=3), make(name, tok, heldout).dataset(32, seed=3), task.dataset(32, seed=4)
    assert torch.equal(a.clean, b.clean) and torch.equal(a.corrupt, b.corrupt) and torch.equal(a.correct, b.correct)
    assert not torch.equal(a.clean, c.clean)


def _signature(s: str) -> list[str]:
    return [a.strip() for a in re.search(r"def \w+\(([^)]*)\)", s).group(1).split(",") if a.strip() != "self"]


def test_args_answer_is_the_attribute_being_assigned(tok, heldout):
    ds = make("code-args", tok, heldout).dataset(64, seed=1)
    slots = set()
    for b in range(len(ds)):
        s = text(tok, ds.clean[b])
        assert s.startswith("class ") and "\n    def __init__(self, " in s and s.endswith(" =")
        args = _signature(s)
        target = re.findall(r"self\.(\w+) =", s)[-1]
        assert tok.decode([int(ds.correct[b, 0])]) == " " + target
        assert sorted(tok.decode([int(d)]) for d in ds.distractors[b, 0]) == sorted(" " + a for a in args if a != target)
        # the two stored names are the other arguments, each stored as itself
        assert sorted(re.findall(r"self\.(\w+) = (\w+)", s)) == sorted((a, a) for a in args if a != target)
        slots.add(args.index(target))
        # corrupted: the same skeleton with three fresh names
        x = text(tok, ds.corrupt[b])
        fresh = _signature(x)
        assert not set(fresh) & set(args)
        for old, new in zip(args, fresh):
            s = re.sub(rf"\b{old}\b", "\0" + new, s)
        assert s.replace("\0", "") == x
    assert slots == {0, 1, 2}  # the answer is not always the same signature slot


def test_args_in_order_variant_keeps_signature_order(tok, heldout):
    ds = make("code-args", tok, heldout, in_order=True).dataset(16, seed=0)
    for b in range(len(ds)):
        s = text(tok, ds.clean[b])
        assert re.findall(r"self\.(\w+) =", s) == _signature(s)


def test_kwargs_answer_is_the_keyword_just_opened(tok, heldout):
    ds = make("code-kwargs", tok, heldout).dataset(32, seed=0)
    for b in range(len(ds)):
        s = text(tok, ds.clean[b])
        kw = re.findall(r"(\w+)=", s)
        assert s.endswith(kw[-1] + "=")
        assert tok.decode([int(ds.correct[b, 0])]) == kw[-1]  # written without a space, as after "="
        assert sorted(kw[:-1]) == sorted(a for a in _signature(s) if a != kw[-1])
        assert {tok.decode([int(d)]) for d in ds.distractors[b, 0]} == set(kw[:-1])


def test_return_answer_is_the_bound_local(tok, heldout):
    ds = make("code-return", tok, heldout).dataset(32, seed=0)
    for b in range(len(ds)):
        s = text(tok, ds.clean[b])
        local = re.search(r"\n    (\w+) = ", s).group(1)
        assert s.endswith("\n    return") and tok.decode([int(ds.correct[b, 0])]) == " " + local
        assert sorted(tok.decode([int(d)]) for d in ds.distractors[b, 0]) == sorted(" " + a for a in _signature(s))
        assert local not in _signature(s)


# what each string task's line looks like, how the string opens (per quote) and closes
STRING_TASKS = {
    "code-quote": (r"    (\w+) = (['\"])(\w+(?: \w+)*)", {"'": " '", '"': ' "'}, {"'": "'", '"': '"'}),
    "code-key": (r"        (\w+)\[(['\"])(\w+(?: \w+)*)", {"'": "['", '"': '["'}, {"'": "']", '"': '"]'}),
}


@pytest.mark.parametrize("name,words", [("code-quote", 1), ("code-quote", 3), ("code-key", 2)])
def test_string_closes_with_the_quote_that_opened_it(name, words, tok, heldout):
    pattern, opener, closer = STRING_TASKS[name]
    ds = make(name, tok, heldout, words=words).dataset(64, seed=0)
    labels = ds.position_labels
    assert labels is not None and len(labels) == ds.seq_len and labels[0] == "bos"
    at = labels.index("open quote")
    assert labels[at + 1:] == (("word",) if words == 1 else tuple(f"word{i + 1}" for i in range(words)))
    seen = set()
    for b in range(len(ds)):
        s, x = text(tok, ds.clean[b]), text(tok, ds.corrupt[b])
        m = re.fullmatch(pattern, s)
        assert m is not None and len(m.group(3).split()) == words and m.group(1) not in m.group(3).split()
        q = m.group(2)
        other = "'" if q == '"' else '"'
        seen.add(q)
        assert tok.decode([int(ds.correct[b, 0])]) == closer[q]
        assert tok.decode([int(ds.distractors[b, 0, 0])]) == closer[other]
        # the corruption swaps the opening quote and nothing else: one token, at the labelled position
        assert x == s.replace(opener[q], opener[other], 1)
        differ = (ds.clean[b] != ds.corrupt[b]).nonzero()[:, 0].tolist()
        assert differ == [at] and tok.decode([int(ds.clean[b, at])]) == opener[q]
    assert seen == {"'", '"'}
    with pytest.raises(CircuitkitError, match="1 to 3"):
        make(name, tok, heldout, words=0)


def test_induction_repeats_real_held_out_code(tok, heldout):
    task = make("code-induction", tok, heldout, length=12, prefix=6)
    ds = task.dataset(64, seed=0)
    L, k = 12, 6
    assert ds.clean.shape[1] == 1 + L + k
    source = "\n".join(heldout)
    for b in range(len(ds)):
        first, repeat = ds.clean[b, 1 : 1 + L], ds.clean[b, 1 + L :]
        assert torch.equal(repeat, first[:k]) and int(ds.correct[b, 0]) == int(first[k])
        assert text(tok, first) in source  # a real stretch of the held-out files, from a line start
        assert text(tok, first[:1]).strip() == "" and "\n" in text(tok, first[:1])
        # the induction is unambiguous: the last prompt token occurs once in the first stretch
        assert int((first == ds.clean[b, -1]).sum()) == 1
        # corrupted: same repeat, another first stretch with nothing to induce from
        other = ds.corrupt[b, 1 : 1 + L]
        assert torch.equal(ds.corrupt[b, 1 + L :], repeat) and not torch.equal(other, first)
        assert int(ds.clean[b, -1]) not in other.tolist() and int(ds.correct[b, 0]) not in other.tolist()
        assert int(ds.distractors[b, 0, 0]) == int(other[k])


def test_induction_words_only_keeps_identifier_answers(tok, heldout):
    ds = make("code-induction", tok, heldout, words_only=True).dataset(32, seed=0)
    assert all(any(c.isalpha() for c in tok.decode([int(a)])) for a in ds.correct[:, 0])


@pytest.mark.parametrize("name", ["code-induction", *TEMPLATE_TASKS])
def test_train_batch_writes_the_answer_after_the_masked_position(name, tok, heldout):
    task = make(name, tok, heldout)
    tokens, mask = task.train_batch(8, torch.Generator().manual_seed(0))
    assert mask.sum(-1).tolist() == [1] * 8
    at = mask.nonzero()[:, 1]
    ds_like = task.dataset(8, seed=0)  # same layout: the masked position is the prompt's last token
    assert (at == ds_like.answer_pos[:, 0]).all()
    assert tokens.shape[1] == ds_like.clean.shape[1] + 1


def test_metric_and_accuracy_run_on_a_model_with_the_tokenizer(tok, heldout):
    model = build_model(toy_config({"n_layers": 1, "d_model": 32, "n_heads": 2, "d_head": 16, "d_mlp": 64,
                                    "n_ctx": 64, "act_fn": "gelu"}, d_vocab=len(tok)))
    set_local_tokenizer(model, tok)
    for name in TEMPLATE_TASKS:
        task = task_for_model(name, model)
        assert task.name == name and task.tokenizer is model.tokenizer
        ds = task.dataset(8, seed=0)
        logits = model(ds.clean)  # [batch, pos, d_vocab]
        assert ds.metric_values(logits).shape == (8,) and ds.accuracy(logits).shape == (8,)
    ds = task_for_model("code-induction", model, texts=heldout).dataset(4, seed=0)
    # a logit set by hand on the answer makes the example right and the logit difference positive
    logits = torch.zeros(4, ds.seq_len, len(tok))
    logits[torch.arange(4), ds.answer_pos[:, 0], ds.correct[:, 0]] = 5.0
    assert ds.accuracy(logits).all() and torch.allclose(ds.metric_values(logits), torch.full((4,), 5.0))


def test_errors_say_what_is_wrong(tok, heldout):
    with pytest.raises(CircuitkitError, match="tokenizer=model.tokenizer"):
        get_task("code-args")
    bytes_only = train_tokenizer(["x = 1\n"], vocab_size=300)  # no merges: no identifier is one token
    for name in TEMPLATE_TASKS:
        with pytest.raises(CircuitkitError, match="as one token"):
            get_task(name, tokenizer=bytes_only)
    with pytest.raises(CircuitkitError, match="'zzyzxq' is not one token"):
        get_task("code-args", tokenizer=tok, names=["name", "value", "key", "text", "line", "zzyzxq"])
    with pytest.raises(CircuitkitError, match="not Python identifiers"):
        get_task("code-args", tokenizer=tok, names=["two words", "name"])
    with pytest.raises(CircuitkitError, match="need at least 2"):
        get_task("code-induction", tokenizer=tok, texts=["x = 1\n"])
    with pytest.raises(CircuitkitError, match="2 <= prefix < length"):
        get_task("code-induction", tokenizer=tok, texts=heldout, length=8, prefix=8)
    toy = build_model(toy_config("toy-2l"))
    with pytest.raises(CircuitkitError, match="is a code task"):
        task_for_model("code-args", toy)
    with pytest.raises(CircuitkitError, match="unknown code task"):
        task_for_model("code-nothing", toy)
