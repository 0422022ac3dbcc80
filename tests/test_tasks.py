"""Toy tasks: formats, answers, corruptions, determinism, training masks, metrics, errors."""

from __future__ import annotations

import math

import pytest
import torch

from circuitkit import CircuitkitError
from circuitkit.tasks import Metric, TaskDataset, get_task, task_names
from circuitkit.tasks import addition, docstring, greater_than, induction, ioi
from circuitkit.tasks.vocab import DOC_ARGS, INDUCTION_SYMBOLS, NAMES, VOCAB, YEARS

TOY = {"addition": 12, "induction": 16, "ioi": 15, "greater-than": 13, "docstring": 20,
       "max": 8, "progression": 5, "recall": 10}
N = 64


def words(ids) -> list[str]:
    return VOCAB.decode(ids)


def year_value(token_id: int) -> int:
    return int(VOCAB.tokens[token_id])


@pytest.fixture(scope="module")
def datasets() -> dict[str, TaskDataset]:
    return {name: get_task(name).dataset(N, seed=3) for name in TOY}


def test_every_task_is_registered():
    assert set(task_names()) >= set(TOY) | {"ioi-nl", "greater-than-nl", "docstring-nl", "induction-nl"}


# ------------------------------------------------------------------ shared contract

@pytest.mark.parametrize("name", list(TOY))
def test_shapes_positions_and_bos(name, datasets):
    ds = datasets[name]
    assert ds.clean.shape == ds.corrupt.shape == (N, TOY[name])
    assert (ds.clean[:, 0] == VOCAB.bos_id).all() and (ds.corrupt[:, 0] == VOCAB.bos_id).all()
    assert ds.answer_pos.shape == ds.correct.shape and ds.distractors.shape[:2] == ds.correct.shape
    assert int(ds.answer_pos.min()) >= 1 and int(ds.answer_pos.max()) < TOY[name]
    if name == "addition":  # teacher forcing: the prompt holds the answer, scored one position earlier
        assert ds.answer_pos[0].tolist() == [6, 7, 8, 9, 10]
        assert torch.equal(ds.clean.gather(1, ds.answer_pos + 1), ds.correct)
    else:  # a single answer after the prompt's last token
        assert (ds.answer_pos == TOY[name] - 1).all()
    assert int(ds.clean.max()) < len(VOCAB) and int(ds.correct.max()) < len(VOCAB)
    assert ds.metric is get_task(name).metric
    assert not torch.equal(ds.clean, ds.corrupt)


@pytest.mark.parametrize("name", list(TOY))
def test_same_seed_same_data_other_seed_other_data(name):
    task = get_task(name)
    a, b, c = task.dataset(16, seed=7), task.dataset(16, seed=7), task.dataset(16, seed=8)
    for field in ("clean", "corrupt", "correct", "distractors", "answer_pos"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.clean, c.clean)
    t1, m1 = task.train_batch(16, torch.Generator().manual_seed(5))
    t2, m2 = task.train_batch(16, torch.Generator().manual_seed(5))
    t3, _ = task.train_batch(16, torch.Generator().manual_seed(6))
    assert torch.equal(t1, t2) and torch.equal(m1, m2) and not torch.equal(t1, t3)


@pytest.mark.parametrize("name", [n for n in TOY if n != "addition"])
def test_train_batch_mask_points_at_the_answer(name, datasets):
    """For single-answer tasks, the one masked position predicts an answer of the task."""
    task = get_task(name)
    tokens, mask = task.train_batch(N, torch.Generator().manual_seed(0))
    assert tokens.shape == mask.shape and mask.dtype == torch.bool
    assert (tokens[:, 0] == VOCAB.bos_id).all()
    assert not mask[:, -1].any()  # nothing follows the last token
    if name == "induction":
        assert tokens.shape[1] == 17
        for row, m in zip(tokens.tolist(), mask.tolist()):
            content = row[1:]
            period = next(L for L in range(induction.MIN_PERIOD, induction.MAX_PERIOD + 1)
                          if content[16 - L:] == content[16 - 2 * L:16 - L])
            assert len(set(content[: 16 - period])) == 16 - period  # filler + first segment all distinct
            # the loss is on predicting r2..rL of the repeat: positions 1+(16-L) .. 15
            assert [i for i, f in enumerate(m) if f] == list(range(17 - period, 16))
        return
    pos = datasets[name].answer_pos[0, 0].item()
    assert tokens.shape[1] == TOY[name] + 1
    assert mask.sum(1).eq(1).all() and mask[:, pos].all()
    target, prompt = tokens[:, pos + 1], tokens[:, : pos + 1]
    if name == "ioi":
        names = prompt[:, list(ioi.NAME_POSITIONS)]
        assert ((names == target[:, None]).sum(1) == 1).all()  # the non-repeated name
    elif name == "greater-than":
        start = prompt[:, greater_than.YY_POS].tolist()
        assert all(year_value(t) > year_value(y) for t, y in zip(target.tolist(), start))
    elif name == "docstring":
        assert torch.equal(target, prompt[:, 8])
    else:  # max, progression, recall: the answer computed from the prompt's words
        assert [_answer_by_hand(name, words(p)) for p in prompt.tolist()] == words(target.tolist())


def test_addition_train_batch_masks_the_five_sum_digits():
    tokens, mask = get_task("addition").train_batch(32, torch.Generator().manual_seed(0))
    assert mask[0].nonzero().squeeze(-1).tolist() == [6, 7, 8, 9, 10]
    for row in tokens.tolist():
        w = words(row)
        assert int("".join(w[1:3])) + int("".join(w[4:6])) == int("".join(w[7:12]))


# ------------------------------------------------------------------ addition

def _decode_sum(row) -> tuple[int, int, int]:
    w = words(row)
    assert w[0] == "<bos>" and w[3] == "+" and w[6] == "="
    return int(w[1] + w[2]), int(w[4] + w[5]), int("".join(w[7:12]))


def test_addition_answers_are_python_sums(datasets):
    ds = datasets["addition"]
    for row, ans, dis, carry in zip(ds.clean.tolist(), ds.correct.tolist(), ds.distractors.tolist(),
                                   ds.labels["carry"].tolist()):
        a, b, s = _decode_sum(row)
        assert s == a + b and row[7:12] == ans
        assert carry == addition.carry_class(torch.tensor([a]), torch.tensor([b])).item()
    for row in ds.corrupt.tolist():
        a, b, s = _decode_sum(row)
        assert s == a + b
    corrupt_sums = [_decode_sum(r)[2] for r in ds.corrupt.tolist()]
    assert all(c != _decode_sum(r)[2] for c, r in zip(corrupt_sums, ds.clean.tolist()))
    assert torch.equal(ds.distractors[:, :, 0], ds.corrupt[:, 7:])


@pytest.mark.parametrize("a,b,text,carry", [(53, 21, "00074", "none"), (36, 28, "00064", "single"),
                                            (43, 59, "00102", "double")])
def test_addition_carry_classes(a, b, text, carry):
    tokens = addition.encode(torch.tensor([a]), torch.tensor([b]))
    assert "".join(words(tokens[0])[1:]) == f"{a}+{b}={text}"
    assert addition.CARRY_CLASSES[addition.carry_class(torch.tensor([a]), torch.tensor([b])).item()] == carry
    ds = get_task("addition", carry=carry).dataset(40, seed=1, split="all")
    for row in ds.clean.tolist():
        x, y, _ = _decode_sum(row)
        units = x % 10 + y % 10 >= 10
        tens = x // 10 + y // 10 + units >= 10
        assert addition.CARRY_CLASSES[int(units) + int(tens)] == carry


# ------------------------------------------------------------------ induction

def test_induction_answer_is_what_followed_in_the_first_segment(datasets):
    ds = datasets["induction"]
    periods = ds.labels["period"]
    assert set(periods.tolist()) == set(range(induction.MIN_PERIOD, induction.MAX_PERIOD + 1))
    for c, x, ans, dis, L in zip(ds.clean.tolist(), ds.corrupt.tolist(), ds.correct[:, 0].tolist(),
                                 ds.distractors[:, 0, 0].tolist(), periods.tolist()):
        content, n_fill = c[1:], 16 - 2 * L
        seen = content[: n_fill + L]  # filler, then the first segment r1..rL
        assert len(set(seen)) == len(seen) and set(words(seen)) <= set(INDUCTION_SYMBOLS)
        segment = seen[n_fill:]
        assert content[n_fill + L:] == segment[:-1] and ans == segment[-1]
        # corrupted: filler and first segment kept, the repeat a permutation of r1..r(L-1) whose
        # last token induces something other than rL
        assert x[: 1 + n_fill + L] == c[: 1 + n_fill + L] and sorted(x[1 + n_fill + L:]) == sorted(segment[:-1])
        induced = segment[segment.index(x[-1]) + 1]
        assert induced == dis and induced != ans


def test_induction_period_is_not_a_positional_shortcut(datasets):
    """The answer sits at a different distance behind the answer position from prompt to prompt,
    so no single "copy the token k back" rule solves the task (the first zoo model found one)."""
    ds = datasets["induction"]
    for k in range(1, 16):
        assert (ds.clean[:, 16 - k] != ds.correct[:, 0]).float().mean() > 0.5


# ------------------------------------------------------------------ ioi

def test_ioi_answer_is_the_non_repeated_name(datasets):
    ds = datasets["ioi"]
    names = ds.clean[:, list(ioi.NAME_POSITIONS)]  # [n, 3]
    assert ((names == ds.correct).sum(1) == 1).all()
    assert ((names == ds.distractors[:, :, 0]).sum(1) == 2).all()
    assert torch.equal(ds.clean[:, ioi.S_POS], ds.distractors[:, 0, 0])
    order = ds.labels["order"]
    assert set(order.tolist()) == {0, 1}
    assert torch.equal(ds.clean[:, ioi.N1_POS] == ds.correct[:, 0], order == 0)  # ABBA: first name is IO
    for row in ds.clean.tolist():
        w = words(row)
        assert w[:2] == ["<bos>", "When"] and w[3] == "and" and w[5:8] == ["went", "to", "the"]
        assert w[9] == "," and w[11:13] == ["gave", "a"] and w[14] == "to"
        assert {w[2], w[4], w[10]} <= set(NAMES) and w[2] != w[4]


def test_ioi_corruption_changes_only_the_names(datasets):
    ds = datasets["ioi"]
    other = [i for i in range(ioi.SEQ_LEN) if i not in ioi.NAME_POSITIONS]
    assert torch.equal(ds.clean[:, other], ds.corrupt[:, other])
    abc = ds.corrupt[:, list(ioi.NAME_POSITIONS)]
    assert all(len(set(r)) == 3 for r in abc.tolist())
    assert not (abc == ds.correct).any() and not (abc == ds.distractors[:, :, 0]).any()


def test_ioi_order_option():
    assert (get_task("ioi", order="baba").dataset(20).labels["order"] == 1).all()
    ds = get_task("ioi", order="abba").dataset(20)
    assert torch.equal(ds.clean[:, ioi.N1_POS], ds.correct[:, 0])
    with pytest.raises(CircuitkitError, match="order"):
        get_task("ioi", order="aabb")


# ------------------------------------------------------------------ greater-than

def test_greater_than_sets_partition_years_around_yy(datasets):
    ds = datasets["greater-than"]
    year_ids = torch.tensor(VOCAB.ids(YEARS))
    assert ds.correct_set.shape == ds.distractor_set.shape == (N, VOCAB.d_vocab)
    yy = ds.labels["yy"]
    assert int(yy.min()) >= 2 and int(yy.max()) <= 98
    assert torch.equal(ds.clean[:, greater_than.YY_POS], year_ids[yy])
    for b in range(N):
        above = [year_value(i) > yy[b] for i in year_ids.tolist()]
        assert ds.correct_set[b, year_ids].tolist() == above
        assert ds.distractor_set[b, year_ids].tolist() == [not x for x in above]
        assert int(ds.correct_set[b].sum() + ds.distractor_set[b].sum()) == 100  # nothing but years
        assert ds.correct_set[b, ds.correct[b, 0]] and year_value(ds.correct[b, 0].item()) > yy[b]
        assert year_value(ds.distractors[b, 0, 0].item()) == yy[b]
    assert words(ds.clean[0])[:8] == ["<bos>", "The", "war", "lasted", "from", "the", "year", "17"]
    assert words(ds.clean[0])[9:] == ["to", "the", "year", "17"]


def test_greater_than_corruption_writes_01():
    ds = get_task("greater-than").dataset(30, seed=2)
    other = [i for i in range(greater_than.SEQ_LEN) if i != greater_than.YY_POS]
    assert torch.equal(ds.clean[:, other], ds.corrupt[:, other])
    assert (ds.corrupt[:, greater_than.YY_POS] == VOCAB.id("01")).all()


# ------------------------------------------------------------------ docstring

def test_docstring_answer_is_the_third_argument(datasets):
    ds = datasets["docstring"]
    for row, ans, dis in zip(ds.clean.tolist(), ds.correct[:, 0].tolist(), ds.distractors[:, 0].tolist()):
        w = words(row)
        assert w[:4] == ["<bos>", "def", w[2], "("] and w[9:12] == [")", ":", '"""']
        a, b, c = w[4], w[6], w[8]
        assert len({a, b, c}) == 3 and {a, b, c} <= set(DOC_ARGS)
        assert words([ans]) == [c] and words(dis) == [a, b]
        assert (w[13], w[14], w[16], w[17], w[19]) == (":param", a, ":param", b, ":param")


def test_docstring_corruption_renames_arguments_consistently(datasets):
    ds = datasets["docstring"]
    arg_pos = list(docstring.ARG_POSITIONS)
    other = [i for i in range(docstring.SEQ_LEN) if i not in arg_pos]
    assert torch.equal(ds.clean[:, other], ds.corrupt[:, other])
    x = ds.corrupt
    assert torch.equal(x[:, 14], x[:, 4]) and torch.equal(x[:, 17], x[:, 6])
    for c, r in zip(ds.clean[:, [4, 6, 8]].tolist(), x[:, [4, 6, 8]].tolist()):
        assert len(set(r)) == 3 and not set(r) & set(c)


# ------------------------------------------------------------------ metrics on hand-built logits

def _tiny_dataset(metric: Metric, **extra) -> TaskDataset:
    clean = torch.tensor([[1, 5, 6], [1, 7, 8]])
    return TaskDataset(task="hand", clean=clean, corrupt=clean.flip(1), answer_pos=torch.tensor([[2], [1]]),
                       correct=torch.tensor([[3], [2]]), distractors=torch.tensor([[[0, 1]], [[4, 4]]]),
                       metric=metric, **extra)


def _logits() -> torch.Tensor:  # [2, 3, 5]
    x = torch.zeros(2, 3, 5)
    x[0, 2] = torch.tensor([1.0, 2.5, 0.0, 4.0, -1.0])
    x[1, 1] = torch.tensor([0.5, 0.0, 3.0, 1.0, 2.0])
    x[1, 2] = torch.tensor([9.0, 9.0, 9.0, 9.0, 9.0])  # not an answer position: must not matter
    return x


def test_logit_diff_by_hand():
    out = _tiny_dataset(Metric.LOGIT_DIFF).metric_values(_logits())
    assert out.tolist() == pytest.approx([4.0 - 2.5, 3.0 - 2.0])


def test_prob_diff_by_hand():
    correct_set = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 1, 1, 0]], dtype=torch.bool)
    distractor_set = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 1]], dtype=torch.bool)
    ds = _tiny_dataset(Metric.PROB_DIFF, correct_set=correct_set, distractor_set=distractor_set)
    rows = [[1.0, 2.5, 0.0, 4.0, -1.0], [0.5, 0.0, 3.0, 1.0, 2.0]]
    want = []
    for row, good in zip(rows, correct_set.tolist()):
        z = sum(math.exp(v) for v in row)
        p = [math.exp(v) / z for v in row]
        want.append(sum(pi for pi, g in zip(p, good) if g) - sum(pi for pi, g in zip(p, good) if not g))
    assert ds.metric_values(_logits()).tolist() == pytest.approx(want, rel=1e-5)


def test_neg_kl_by_hand():
    ds = _tiny_dataset(Metric.NEG_KL)
    ref = _logits()
    cur = torch.zeros_like(ref)  # uniform at every position
    want = []
    for row in ([1.0, 2.5, 0.0, 4.0, -1.0], [0.5, 0.0, 3.0, 1.0, 2.0]):
        z = sum(math.exp(v) for v in row)
        p = [math.exp(v) / z for v in row]
        want.append(-sum(pi * (math.log(pi) - math.log(1 / 5)) for pi in p))
    assert ds.metric_values(cur, reference=ref).tolist() == pytest.approx(want, rel=1e-5)
    assert ds.metric_values(ref, reference=ref).abs().max() < 1e-6
    with pytest.raises(CircuitkitError, match="reference"):
        ds.metric_values(cur)


def test_toy_metrics_run_on_a_toy_model(datasets):
    from circuitkit.models import build_model, toy_config
    from circuitkit.tasks import task_for_model

    model = build_model(toy_config("toy-2l"))
    for name in TOY:
        task = task_for_model(name, model)
        assert task.name == name
        ds = datasets[name][:8]
        with torch.no_grad():
            logits = model(ds.clean)
        values = ds.metric_values(logits)
        assert values.shape == (8,) and torch.isfinite(values).all()


# ------------------------------------------------------------------ errors

def test_unknown_task_name():
    with pytest.raises(CircuitkitError, match="unknown task 'additon'.*known tasks: addition"):
        get_task("additon")


@pytest.mark.parametrize("name", list(TOY))
@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_bad_n(name, n):
    task = get_task(name)
    with pytest.raises(CircuitkitError, match="positive number of examples"):
        task.dataset(n)
    if name != "addition":
        with pytest.raises(CircuitkitError, match="positive number of examples"):
            task.train_batch(n, torch.Generator())


def test_dataset_rejects_length_mismatch_and_missing_answers():
    clean = torch.ones(2, 5, dtype=torch.long)
    ok = dict(answer_pos=torch.tensor([[4], [4]]), correct=torch.tensor([[1], [1]]),
              distractors=torch.tensor([[[2]], [[2]]]))
    with pytest.raises(CircuitkitError, match="same token length"):
        TaskDataset(task="t", clean=clean, corrupt=torch.ones(2, 6, dtype=torch.long), **ok)
    with pytest.raises(CircuitkitError, match="no answers"):
        TaskDataset(task="t", clean=clean, corrupt=clean, answer_pos=torch.zeros(2, 0, dtype=torch.long),
                    correct=torch.zeros(2, 0, dtype=torch.long), distractors=torch.zeros(2, 0, 1, dtype=torch.long))
    with pytest.raises(CircuitkitError, match="answer positions"):
        TaskDataset(task="t", clean=clean, corrupt=clean, **{**ok, "answer_pos": torch.tensor([[5], [4]])})


def test_nl_tasks_need_a_tokenizer():
    for name in ("ioi-nl", "greater-than-nl", "docstring-nl", "induction-nl"):
        with pytest.raises(CircuitkitError, match="tokenizer=model.tokenizer"):
            get_task(name)


@pytest.mark.parametrize("pool", [20, 50_000])  # the sorting path and the rejection path
def test_sample_distinct_rows_are_distinct_and_avoid_exclusions(pool):
    from circuitkit.tasks.sampling import sample_distinct

    g = torch.Generator().manual_seed(0)
    exclude = torch.stack([torch.arange(5), torch.arange(5, 10)], dim=1)  # [5, 2]
    out = sample_distinct(5, 6, pool, g, exclude=exclude)
    assert out.shape == (5, 6) and int(out.min()) >= 0 and int(out.max()) < pool
    for row, ex in zip(out.tolist(), exclude.tolist()):
        assert len(set(row)) == 6 and not set(row) & set(ex)
    with pytest.raises(CircuitkitError, match="distinct"):
        sample_distinct(2, 19, 20, g, exclude=exclude[:2])


def test_scored_from_scores_the_tail_of_the_logits_like_the_whole():
    """``scored_from(s)`` is the view that exact patching scores its cut logits with: the answer
    logits of positions s.. equal those of the whole prompt; starting past an answer is refused."""
    ds = get_task("ioi").dataset(6, seed=2)
    first = int(ds.answer_pos.min())
    logits = torch.randn(len(ds), ds.seq_len, 50, generator=torch.Generator().manual_seed(0))
    tail = ds.scored_from(first)
    assert tail.seq_len == ds.seq_len - first and len(tail) == len(ds)
    assert torch.equal(tail.answer_logits(logits[:, first:]), ds.answer_logits(logits))
    assert ds.scored_from(0) is ds
    with pytest.raises(CircuitkitError, match="would drop answer position"):
        ds.scored_from(first + 1)


# ------------------------------------------------------------------ the three tasks of the "more tasks" lever

def _answer_by_hand(name: str, w: list[str]) -> str:
    """The answer of a max / progression / recall prompt, read from its words alone."""
    if name == "max":
        assert w[-1] == "=" and len(set(w[1:-1])) == 6
        return str(max(int(d) for d in w[1:-1]))
    if name == "progression":
        terms = [int(t) for t in w[1:]]
        step = terms[1] - terms[0]
        assert step in (1, 2, 3) and all(b - a == step for a, b in zip(terms, terms[1:]))
        return f"{terms[-1] + step:02d}"
    if name == "recall":
        keys, values = w[1:-1:2], w[2:-1:2]
        assert len(set(keys)) == len(keys) == 4 and set(keys) <= set(NAMES) and w[-1] in keys
        return values[keys.index(w[-1])]
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["max", "progression", "recall"])
def test_more_tasks_answers_and_corruptions_by_hand(name, datasets):
    """The clean answer is the prompt's answer computed by hand; the distractor is the corrupted prompt's answer,
    never the clean one; clean and corrupted prompts differ where the task says they do."""
    ds = datasets[name]
    clean, corrupt = [words(r) for r in ds.clean.tolist()], [words(r) for r in ds.corrupt.tolist()]
    assert [_answer_by_hand(name, w) for w in clean] == words(ds.correct[:, 0].tolist())
    assert words(ds.distractors[:, 0, 0].tolist()) == [
        # the corrupted max prompt repeats its smallest digit, so only its largest is read
        str(max(int(d) for d in w[1:-1])) if name == "max" else _answer_by_hand(name, w) for w in corrupt]
    assert (ds.correct[:, 0] != ds.distractors[:, 0, 0]).all()
    changed = (ds.clean != ds.corrupt)  # [n, pos]
    if name == "max":  # one digit changed: the largest, to the smallest
        assert changed.sum(1).eq(1).all()
        pos = changed.float().argmax(1)
        assert torch.equal(pos, ds.labels["max_pos"])
        assert [w[p] for w, p in zip(clean, pos.tolist())] == words(ds.correct[:, 0].tolist())
    elif name == "progression":  # the same first term, another step
        assert not changed[:, :2].any() and changed[:, 2:].all()
    else:  # recall: only the query differs
        assert not changed[:, :-1].any() and changed[:, -1].all()


def test_more_tasks_cover_their_answer_range():
    """Every digit 5..9 is some prompt's max; every step and many starts occur; every recall slot is queried."""
    m = get_task("max").dataset(2000, seed=0)
    assert set(words(m.correct[:, 0].tolist())) == {"5", "6", "7", "8", "9"}
    p = get_task("progression").dataset(2000, seed=0)
    assert set(p.labels["step"].tolist()) == {1, 2, 3}
    starts = {int(w) for w in words(p.clean[:, 1].tolist())}
    assert min(starts) == 0 and max(starts) >= 85
    r = get_task("recall").dataset(2000, seed=0)
    assert set(r.labels["slot"].tolist()) == {0, 1, 2, 3}
