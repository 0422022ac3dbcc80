"""The real pretrained path, offline: load_model("gpt2") from a local cache, and the NL tasks on it."""

from __future__ import annotations

import os

import pytest
import torch

import gpt2_offline
from circuitkit import CircuitkitError
from circuitkit.tasks import Metric, get_task, task_for_model
from circuitkit.tasks.nl import GT_TEMPLATE

NL_TASKS = ["ioi", "greater-than", "docstring", "induction"]


@pytest.fixture(scope="module")
def tok(offline_gpt2):
    return offline_gpt2.tokenizer


def text_of(tok, ids) -> str:
    return tok.decode([int(i) for i in ids])


def test_loads_the_small_gpt2_through_from_pretrained(offline_gpt2, offline_gpt2_cache):
    from transformer_lens import HookedTransformer

    from circuitkit.models import is_toy

    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_HOME"] == str(offline_gpt2_cache)
    model = offline_gpt2
    assert isinstance(model, HookedTransformer)
    cfg, want = model.cfg, gpt2_offline.GPT2_CONFIG
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_ctx) == (want["n_layer"], want["n_embd"],
                                                                    want["n_head"], want["n_ctx"])
    assert cfg.d_head * cfg.n_heads == cfg.d_model and cfg.d_mlp == 4 * cfg.d_model
    assert cfg.original_architecture == "GPT2LMHeadModel" and cfg.normalization_type in ("LN", "LNPre")
    assert cfg.d_vocab == len(model.tokenizer) and 300 <= cfg.d_vocab <= gpt2_offline.MAX_VOCAB
    assert not is_toy(model) and model.circuitkit_card == {"pretrained": "gpt2"}
    snapshot = offline_gpt2_cache / "hub" / gpt2_offline.REPO_FOLDER / "snapshots" / gpt2_offline.SNAPSHOT_ID
    assert (snapshot / "model.safetensors").exists() and (snapshot / "tokenizer.json").exists()
    refs = (offline_gpt2_cache / "hub" / gpt2_offline.REPO_FOLDER / "refs" / "main").read_text()
    assert refs == gpt2_offline.SNAPSHOT_ID and len(refs) == 40
    logits = model(torch.tensor([[model.tokenizer.bos_token_id, 5, 6, 7]]))
    assert logits.shape == (1, 4, cfg.d_vocab) and torch.isfinite(logits).all()


def test_the_task_words_are_single_tokens(tok):
    from circuitkit.tasks import nl

    for word in nl.IOI_NAMES + nl.DOC_ARGS + nl.IOI_PLACES + nl.IOI_OBJECTS:
        assert len(tok(" " + word, add_special_tokens=False)["input_ids"]) == 1, word
    pieces = tok.convert_ids_to_tokens(tok(" 1732", add_special_tokens=False)["input_ids"])
    assert pieces == ["Ġ17", "32"]  # GPT-2's own split of a year


@pytest.mark.parametrize("name", NL_TASKS)
def test_nl_task_dataset_and_metric_on_gpt2(name, offline_gpt2):
    task = task_for_model(name, offline_gpt2)
    assert task.name == f"{name}-nl" and task.d_vocab == offline_gpt2.cfg.d_vocab
    ds = task.dataset(12, seed=0)
    bos = offline_gpt2.tokenizer.bos_token_id
    assert ds.clean.shape == ds.corrupt.shape and ds.clean.shape[0] == 12
    assert (ds.clean[:, 0] == bos).all() and (ds.corrupt[:, 0] == bos).all()
    assert ds.clean.shape[1] <= offline_gpt2.cfg.n_ctx
    assert (ds.answer_pos < ds.clean.shape[1]).all() and (ds.answer_pos > 0).all()
    with torch.no_grad():
        clean_logits, corrupt_logits = offline_gpt2(ds.clean), offline_gpt2(ds.corrupt)
    for logits in (clean_logits, corrupt_logits):
        values = ds.metric_values(logits)
        assert values.shape == (12,) and torch.isfinite(values).all()
    kl = Metric.NEG_KL(corrupt_logits, ds, reference=clean_logits)
    assert torch.isfinite(kl).all() and (kl <= 1e-6).all()
    assert ds.accuracy(clean_logits).shape == (12,)

    tokens, mask = task.train_batch(6, torch.Generator().manual_seed(1))
    assert tokens.shape == mask.shape and tokens.shape[1] <= offline_gpt2.cfg.n_ctx
    assert (tokens[:, 0] == bos).all()
    loss = offline_gpt2(tokens, return_type="loss", loss_per_token=True)  # [batch, pos - 1]
    assert torch.isfinite(loss[mask[:, :-1]]).all()

    again = task.dataset(12, seed=0)
    assert torch.equal(again.clean, ds.clean) and torch.equal(again.corrupt, ds.corrupt)
    assert not torch.equal(task.dataset(12, seed=1).clean, ds.clean)


def test_ioi_nl_prompts_and_answers(offline_gpt2, tok):
    task = task_for_model("ioi", offline_gpt2)
    ds = task.dataset(40, seed=0)
    assert set(ds.labels["order"].tolist()) == {0, 1} and len(set(ds.labels["template"].tolist())) > 1
    for b in range(40):
        end = int(ds.answer_pos[b, 0]) + 1
        clean, corrupt = ds.clean[b, :end].tolist(), ds.corrupt[b, :end].tolist()
        io, s = int(ds.correct[b, 0]), int(ds.distractors[b, 0, 0])
        assert clean.count(io) == 1 and clean.count(s) == 2  # the answer is the non-repeated name
        assert (clean.index(io) < clean.index(s)) == (ds.labels["order"][b] == 0)  # ABBA: IO comes first
        diff = [i for i, (x, y) in enumerate(zip(clean, corrupt)) if x != y]
        name_slots = [i for i, t in enumerate(clean) if t in (io, s)]
        assert diff == name_slots  # only the three name slots change
        names = {corrupt[i] for i in diff}
        assert len(names) == 3 and io not in names and s not in names
        assert (ds.clean[b, end:] == tok.pad_token_id).all()  # right padding after the answer position
        text = text_of(tok, clean[1:])
        assert text.endswith(" to") and text_of(tok, [io]).startswith(" ")
    fixed = get_task("ioi-nl", tokenizer=tok, template=0, order="abba").dataset(10)
    assert (fixed.answer_pos == fixed.clean.shape[1] - 1).all() and (fixed.labels["order"] == 0).all()
    first = text_of(tok, fixed.clean[0, 1:])
    assert first.startswith("When ") and ", " in first and first.endswith(" gave a " + first.split()[-2] + " to")


def test_greater_than_nl_sets_and_corruption(offline_gpt2, tok):
    task = task_for_model("greater-than", offline_gpt2)
    ds = task.dataset(30, seed=0)
    year_ids = task.year_ids
    assert (year_ids >= 0).all()  # this tokenizer has all 100 two-digit tokens
    for b in range(30):
        yy = int(ds.labels["yy"][b])
        assert 2 <= yy <= 98
        text = text_of(tok, ds.clean[b, 1:])
        noun = text.split()[1]
        assert text == GT_TEMPLATE.format(NOUN=noun, YY=f"{yy:02d}")
        assert text_of(tok, ds.corrupt[b, 1:]) == GT_TEMPLATE.format(NOUN=noun, YY="01")
        assert ds.correct_set[b, year_ids].tolist() == [v > yy for v in range(100)]
        assert ds.distractor_set[b, year_ids].tolist() == [v <= yy for v in range(100)]
        assert int(ds.correct_set[b].sum() + ds.distractor_set[b].sum()) == 100
        assert int(tok.decode([int(ds.correct[b, 0])])) > yy and int(tok.decode([int(ds.distractors[b, 0, 0])])) == yy
        diff = (ds.clean[b] != ds.corrupt[b]).nonzero().squeeze(-1).tolist()
        assert len(diff) <= 1  # only the YY token (none when YY is 01 — never, YY >= 02)
    assert ds.correct_set.shape == (30, offline_gpt2.cfg.d_vocab)


def test_docstring_nl_answer_is_the_third_argument(offline_gpt2, tok):
    ds = task_for_model("docstring", offline_gpt2).dataset(20, seed=0)
    for b in range(20):
        text = text_of(tok, ds.clean[b, 1 : int(ds.answer_pos[b, 0]) + 1])
        assert text.startswith("def ") and text.rstrip().endswith(":param") and "\"\"\"" in text
        args = text[text.index("(") + 1 : text.index(")")].split(", ")
        assert args[0] == "self"
        a, bb, c = args[1:]
        assert tok.decode([int(ds.correct[b, 0])]) == " " + c
        assert [tok.decode([int(x)]) for x in ds.distractors[b, 0]] == [" " + a, " " + bb]
        assert f":param {a}:" in text and f":param {bb}:" in text and f":param {c}" not in text
        clean, corrupt = ds.clean[b].tolist(), ds.corrupt[b].tolist()
        arg_ids = ds.labels["args"][b].tolist()
        rename = {}
        for x, y in zip(clean, corrupt):
            if x in arg_ids:
                assert y not in arg_ids and rename.setdefault(x, y) == y  # renamed, consistently
            else:
                assert x == y  # everything else identical
        assert len(set(rename.values())) == 3 and clean.count(arg_ids[2]) == 1


def test_induction_nl_layout(offline_gpt2, tok):
    ds = task_for_model("induction", offline_gpt2).dataset(10, seed=0)
    assert ds.clean.shape == (10, 16)
    special = set(tok.all_special_ids)
    assert not any(t in special for t in ds.clean[:, 1:].flatten().tolist())
    for c, ans, dis, L in zip(ds.clean.tolist(), ds.correct[:, 0].tolist(), ds.distractors[:, 0, 0].tolist(),
                              ds.labels["period"].tolist()):
        content, n_fill = c[1:], 16 - 2 * L
        assert len(set(content[: n_fill + L])) == n_fill + L
        assert content[n_fill + L:] == content[n_fill:n_fill + L - 1] and ans == content[n_fill + L - 1] != dis
    assert torch.equal(ds.corrupt[:, :9], ds.clean[:, :9])


# ------------------------------------------------------------------ errors

def test_task_for_model_errors(offline_gpt2):
    with pytest.raises(CircuitkitError, match="exists only for toy-vocabulary models"):
        task_for_model("addition", offline_gpt2)
    with pytest.raises(CircuitkitError, match="unknown task"):
        task_for_model("sorting", offline_gpt2)
    assert task_for_model("ioi-nl", offline_gpt2).name == "ioi-nl"


def test_a_name_the_tokenizer_splits_is_an_error_naming_it(tok):
    with pytest.raises(CircuitkitError) as err:
        get_task("ioi-nl", tokenizer=tok, names=["Mary", "John", "Alice", "Bob", "Tom", "Bartholomew"])
    msg = str(err.value)
    assert "'Bartholomew'" in msg and "not one token" in msg and tok.name_or_path in msg
    pieces = tok.convert_ids_to_tokens(tok(" Bartholomew", add_special_tokens=False)["input_ids"])
    assert len(pieces) > 1 and str(pieces) in msg
    with pytest.raises(CircuitkitError, match="'Zyqxwv' is not one token"):
        get_task("docstring-nl", tokenizer=tok, args=["x", "y", "size", "name", "path", "Zyqxwv"])


def test_a_tokenizer_that_splits_every_name_is_refused():
    from transformers import GPT2Tokenizer
    from tokenizers.pre_tokenizers import ByteLevel

    bytes_only = GPT2Tokenizer(vocab={c: i for i, c in enumerate(["<|endoftext|>"] + ByteLevel.alphabet())},
                               merges=[])
    with pytest.raises(CircuitkitError, match=r"keeps only 0 of \d+ names.*needs at least 5.*names=\["):
        get_task("ioi-nl", tokenizer=bytes_only)
    with pytest.raises(CircuitkitError, match="' 17'"):
        get_task("greater-than-nl", tokenizer=bytes_only)
    with pytest.raises(CircuitkitError, match="argument names"):
        get_task("docstring-nl", tokenizer=bytes_only)
    ds = get_task("induction-nl", tokenizer=bytes_only).dataset(4)  # any tokens will do
    assert ds.clean.shape == (4, 16)


def test_clean_corrupt_length_mismatch_is_an_error(tok):
    task = get_task("ioi-nl", tokenizer=tok)
    with pytest.raises(CircuitkitError, match="same token length"):
        task.assemble([[1, 2, 3]], [[1, 2]], [("clean text", "corrupt text")])


def test_bad_options(tok):
    with pytest.raises(CircuitkitError, match="template must be an index"):
        get_task("ioi-nl", tokenizer=tok, template=99)
    with pytest.raises(CircuitkitError, match="positive number"):
        get_task("greater-than-nl", tokenizer=tok).dataset(0)
    with pytest.raises(CircuitkitError, match="vocabulary"):
        get_task("ioi-nl", tokenizer=tok, d_vocab=10)


def test_fresh_copy_is_private(offline_gpt2, fresh_offline_gpt2):
    assert fresh_offline_gpt2 is not offline_gpt2
    before = offline_gpt2.W_E.detach().clone()
    with torch.no_grad():
        fresh_offline_gpt2.W_E.add_(1.0)
    assert torch.equal(offline_gpt2.W_E, before)
    assert torch.allclose(fresh_offline_gpt2.W_E, before + 1.0)
