"""Induction: random tokens, then a segment repeated; predict the next repeated token.

Induction heads are the best understood circuit in transformers (previous-token head +
induction head), so this task is the simplest check that circuit discovery recovers a
known mechanism, and that sparse post-training keeps it.

Format (toy vocabulary, 16 tokens): ``<bos> f1..fF r1..rL r1..r(L-1)`` → ``rL``, with the
period ``L`` drawn per prompt from ``MIN_PERIOD..MAX_PERIOD`` and ``F = 16 - 2L`` filler
tokens in front, so every prompt has the same length and the answer position is fixed.
All ``F + L`` tokens of a prompt are distinct ``INDUCTION_SYMBOLS``. Because the period
varies, "copy the token ``L - 1`` back" is not one rule: the model has to find where the
current token occurred before and copy its successor — induction. (A fixed period let the
first zoo model solve the task by position, so its corrupted prompts had no effect.)

The corrupted prompt keeps filler and first segment and shuffles the repeat so that the
token it induces (the one that followed its last token in the first segment) is not ``rL``;
that induced token is the distractor.
"""

from __future__ import annotations

import torch

from circuitkit.tasks.base import Metric, Task, TaskDataset, check_n, register_task
from circuitkit.tasks.sampling import sample_distinct
from circuitkit.tasks.vocab import INDUCTION_SYMBOLS, VOCAB

MIN_PERIOD, MAX_PERIOD = 4, 8
CONTENT_LEN = 2 * MAX_PERIOD  # 16 tokens after <bos> in a training sequence: F + 2L
N_DISTINCT = CONTENT_LEN - MIN_PERIOD  # 12: the most distinct tokens a prompt needs (F + L)
SEQ_LEN = CONTENT_LEN  # 16: <bos> + 15 content tokens (the last repeated token is the answer)
TRAIN_LEN = 1 + CONTENT_LEN  # 17
ANSWER_POS = SEQ_LEN - 1  # 15

SYMBOL_IDS = torch.tensor(VOCAB.ids(INDUCTION_SYMBOLS))  # [n_symbols]


def sample_prompts(pool: torch.Tensor, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``N_DISTINCT`` distinct ids of ``pool`` per row ([n, 12]) and a period per row ([n]).

    Shared by the toy task and its natural-language twin, which draws from a real tokenizer.
    """
    distinct = pool[sample_distinct(n, N_DISTINCT, len(pool), generator)]  # [n, 12]
    period = torch.randint(MIN_PERIOD, MAX_PERIOD + 1, (n,), generator=generator)  # [n]
    return distinct, period


def _content_index(period: torch.Tensor) -> torch.Tensor:  # [n] -> [n, 16]
    """Index into the distinct tokens for each content position: ``j`` before the repeat, ``j - L`` in it."""
    j = torch.arange(CONTENT_LEN)[None, :]  # [1, 16]
    L = period[:, None]  # [n, 1]
    return torch.where(j < CONTENT_LEN - L, j, j - L)


def shuffled_repeat(period: torch.Tensor, generator: torch.Generator) -> torch.Tensor:  # [n] -> [n, 7]
    """Per row a permutation of ``0..L-2`` (indices into ``r1..r(L-1)``) in the first ``L - 1``
    columns whose last entry is not ``L - 2``; columns from ``L - 1`` on are padding.

    The corrupted prompt's last token ``r_{p+1}`` induces ``r_{p+2}``, which differs from ``rL``
    exactly when ``p`` is not the index of ``r(L-1)``.
    """
    n, k = period.shape[0], MAX_PERIOD - 1
    shown = period - 1  # [n]: repeated tokens visible in the prompt
    cols = torch.arange(k)[None, :]  # [1, 7]
    perm = torch.empty(n, k, dtype=torch.long)
    todo = torch.ones(n, dtype=torch.bool)
    for _ in range(1000):
        m = int(todo.sum())
        keys = torch.rand(m, k, generator=generator).masked_fill(cols >= shown[todo, None], 2.0)
        perm[todo] = keys.argsort(-1)
        last = perm.gather(1, (shown - 1)[:, None])[:, 0]  # [n]
        todo = last == shown - 1
        if not todo.any():
            return perm
    raise AssertionError("unreachable: each draw fails with probability at most 1/3")


def build(distinct: torch.Tensor, period: torch.Tensor, bos_id: int | None,
          generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Clean/corrupted prompts, answers and distractors from ``distinct`` [n, 12] token ids and
    ``period`` [n]. The natural-language twin passes ``bos_id=None`` when its tokenizer has no
    ``<bos>``; the layout is otherwise the same.
    """
    n = distinct.shape[0]
    bos = _bos_column(n, bos_id)  # [n, 1] or [n, 0]
    idx = _content_index(period)  # [n, 16]
    clean = torch.cat([bos, distinct.gather(1, idx[:, :-1])], dim=1)  # [n, 16]
    correct = distinct.gather(1, idx[:, -1:])  # [n, 1]: rL
    perm = shuffled_repeat(period, generator)  # [n, 7]
    j = torch.arange(CONTENT_LEN - 1)[None, :]  # [1, 15] prompt content positions
    start = (CONTENT_LEN - period)[:, None]  # [n, 1] first repeated position (= F + L)
    filler = start - period[:, None]  # [n, 1] = F
    in_repeat = j >= start
    shuffled = filler + perm.gather(1, (j - start).clamp(0, MAX_PERIOD - 2))  # [n, 15]
    corrupt_idx = torch.where(in_repeat, shuffled, idx[:, :-1])
    corrupt = torch.cat([bos, distinct.gather(1, corrupt_idx)], dim=1)  # [n, 16]
    induced = distinct.gather(1, corrupt_idx[:, -1:] + 1)  # [n, 1]: what followed the last token
    return dict(clean=clean, corrupt=corrupt, correct=correct, distractors=induced[:, :, None],
                answer_pos=torch.full((n, 1), clean.shape[1] - 1, dtype=torch.long), perm=perm, period=period)


def train_sequences(distinct: torch.Tensor, period: torch.Tensor,
                    bos_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``<bos> f1..fF r1..rL r1..rL`` [n, 17], the loss on predicting the repeated ``r2..rL``."""
    n = distinct.shape[0]
    bos = _bos_column(n, bos_id)
    tokens = torch.cat([bos, distinct.gather(1, _content_index(period))], dim=1)  # [n, 17]
    pos = torch.arange(tokens.shape[1])[None, :] - bos.shape[1]  # content position of each token
    start = (CONTENT_LEN - period)[:, None]  # the first repeated token r1
    loss_mask = (pos >= start) & (pos < CONTENT_LEN - 1)  # logits there predict r2..rL
    return tokens, loss_mask


def _bos_column(n: int, bos_id: int | None) -> torch.Tensor:  # [n, 1], or [n, 0] without a bos token
    return torch.full((n, 0 if bos_id is None else 1), 0 if bos_id is None else bos_id, dtype=torch.long)


def dataset_from_pool(task: str, pool: torch.Tensor, bos_id: int | None, n: int, seed: int) -> TaskDataset:
    """The induction dataset over the token ids ``pool`` [n_pool] (toy symbols or a tokenizer's)."""
    check_n(n)
    g = torch.Generator().manual_seed(seed)
    parts = build(*sample_prompts(pool, n, g), bos_id, g)
    return TaskDataset(task=task, clean=parts["clean"], corrupt=parts["corrupt"], answer_pos=parts["answer_pos"],
                       correct=parts["correct"], distractors=parts["distractors"], metric=Metric.LOGIT_DIFF,
                       labels={"corrupt_order": parts["perm"], "period": parts["period"]})


def train_batch_from_pool(pool: torch.Tensor, bos_id: int | None, n: int,
                          generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    check_n(n)
    return train_sequences(*sample_prompts(pool, n, generator), bos_id)


@register_task("induction")
class Induction(Task):
    name = "induction"
    metric = Metric.LOGIT_DIFF

    def dataset(self, n: int, seed: int = 0) -> TaskDataset:
        return dataset_from_pool(self.name, SYMBOL_IDS, VOCAB.bos_id, n, seed)

    def train_batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return train_batch_from_pool(SYMBOL_IDS, VOCAB.bos_id, n, generator)
