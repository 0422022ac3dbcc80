"""Induction: a random sequence, then the same sequence again; predict the next repeat.

Induction heads are the best understood circuit in transformers (previous-token head +
induction head), so this task is the simplest check that circuit discovery recovers a
known mechanism, and that sparse post-training keeps it.

Format (toy vocabulary, 16 tokens): ``<bos> r1 .. r8 r1 .. r7`` → ``r8``, with
``r1..r8`` eight distinct ``INDUCTION_SYMBOLS``. The corrupted prompt keeps the first
half and shuffles the second half so that the token it induces (the one that followed
its last token in the first half) is not ``r8``; that induced token is the distractor.
"""

from __future__ import annotations

import torch

from circuitkit.tasks.base import Metric, Task, TaskDataset, check_n, register_task
from circuitkit.tasks.sampling import sample_distinct
from circuitkit.tasks.vocab import INDUCTION_SYMBOLS, VOCAB

N_SYMBOLS = 8
SEQ_LEN = 1 + N_SYMBOLS + N_SYMBOLS - 1  # 16: <bos>, first half, second half without r8
TRAIN_LEN = 1 + 2 * N_SYMBOLS  # 17
ANSWER_POS = SEQ_LEN - 1  # 15

SYMBOL_IDS = torch.tensor(VOCAB.ids(INDUCTION_SYMBOLS))  # [n_symbols]


def shuffled_second_half(n: int, generator: torch.Generator) -> torch.Tensor:  # -> [n, 7]
    """Permutations of ``0..6`` (indices into ``r1..r7``) whose last entry is not 6.

    The prompt's last token ``r_{p+1}`` induces ``r_{p+2}``; it differs from ``r8`` exactly
    when the last index ``p`` is not the one of ``r7``.
    """
    k = N_SYMBOLS - 1
    perm = torch.rand(n, k, generator=generator).argsort(-1)  # [n, 7]
    for _ in range(1000):
        bad = perm[:, -1] == k - 1
        if not bad.any():
            return perm
        perm[bad] = torch.rand(int(bad.sum()), k, generator=generator).argsort(-1)
    raise AssertionError("unreachable: each draw fails with probability 1/7")


def build(first_half: torch.Tensor, bos_id: int | None, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Clean/corrupted prompts, answers and distractors from ``first_half`` [n, 8] token ids.

    Shared by the toy task and its natural-language twin (which draws tokens from a real
    tokenizer's vocabulary and has no ``<bos>`` when the tokenizer has none): same layout.
    """
    n = first_half.shape[0]
    bos = _bos_column(n, bos_id)  # [n, 1] or [n, 0]
    clean = torch.cat([bos, first_half, first_half[:, :-1]], dim=1)  # [n, 16]
    perm = shuffled_second_half(n, generator)  # [n, 7]
    corrupt = torch.cat([bos, first_half, first_half.gather(1, perm)], dim=1)  # [n, 16]
    induced = first_half.gather(1, perm[:, -1:] + 1)  # [n, 1]: what followed the last token
    return dict(clean=clean, corrupt=corrupt, correct=first_half[:, -1:], distractors=induced[:, :, None],
                answer_pos=torch.full((n, 1), clean.shape[1] - 1, dtype=torch.long), perm=perm)


def train_sequences(first_half: torch.Tensor, bos_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``<bos> r1..r8 r1..r8`` [n, 17] with the loss on predicting the repeated ``r2..r8``."""
    n = first_half.shape[0]
    bos = _bos_column(n, bos_id)
    tokens = torch.cat([bos, first_half, first_half], dim=1)  # [n, 17]
    loss_mask = torch.zeros_like(tokens, dtype=torch.bool)
    start = bos.shape[1] + N_SYMBOLS  # the first repeated token r1 (position 9 with <bos>)
    loss_mask[:, start : tokens.shape[1] - 1] = True  # logits at 9..15 predict tokens 10..16 = r2..r8
    return tokens, loss_mask


def _bos_column(n: int, bos_id: int | None) -> torch.Tensor:  # [n, 1], or [n, 0] without a bos token
    return torch.full((n, 0 if bos_id is None else 1), 0 if bos_id is None else bos_id, dtype=torch.long)


@register_task("induction")
class Induction(Task):
    name = "induction"
    metric = Metric.LOGIT_DIFF

    def _first_half(self, n: int, g: torch.Generator) -> torch.Tensor:  # [n, 8]
        return SYMBOL_IDS[sample_distinct(n, N_SYMBOLS, len(SYMBOL_IDS), g)]

    def dataset(self, n: int, seed: int = 0) -> TaskDataset:
        check_n(n)
        g = torch.Generator().manual_seed(seed)
        parts = build(self._first_half(n, g), VOCAB.bos_id, g)
        return TaskDataset(task=self.name, clean=parts["clean"], corrupt=parts["corrupt"],
                           answer_pos=parts["answer_pos"], correct=parts["correct"],
                           distractors=parts["distractors"], metric=self.metric,
                           labels={"corrupt_order": parts["perm"]})

    def train_batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        check_n(n)
        return train_sequences(self._first_half(n, generator), VOCAB.bos_id)
