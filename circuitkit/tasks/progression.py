"""Progression: "<bos> 17 19 21 23" → 25, the next year token of an arithmetic progression.

One of the tasks added so that a multitask model's heads have more distinct work (the "more
tasks" lever of the 6-layer zoo, README "A larger graph"): the step is read from the previous
token and the next value computed from it, a previous-token mechanism feeding an MLP lookup.

Format (toy vocabulary, 5 tokens; the terms are two-digit ``YEARS`` tokens)::

    <bos> a a+k a+2k a+3k   → a+4k,   k in {1, 2, 3}, a+4k <= 99

The corrupted prompt keeps ``a`` and takes another step ``k'``, so its answer ``a+4k'`` differs;
that answer is the distractor. ``labels["step"]`` holds ``k``.
"""

from __future__ import annotations

import torch

from circuitkit.tasks.base import Draw, SingleAnswerTask, register_task
from circuitkit.tasks.vocab import VOCAB, YEARS

STEPS = (1, 2, 3)
N_TERMS = 4
SEQ_LEN = N_TERMS + 1  # 5
ANSWER_POS = SEQ_LEN - 1  # 4
POSITION_LABELS = ("0",) + tuple(f"T{i + 1}" for i in range(N_TERMS))

YEAR_IDS = torch.tensor(VOCAB.ids(YEARS))  # [100]: token of year 00..99


def encode(start: torch.Tensor, step: torch.Tensor) -> torch.Tensor:  # [n], [n] -> [n, 5]
    terms = start[:, None] + step[:, None] * torch.arange(N_TERMS)[None, :]  # [n, 4]
    return torch.cat([torch.full((start.shape[0], 1), VOCAB.bos_id), YEAR_IDS[terms]], dim=1)


@register_task("progression")
class Progression(SingleAnswerTask):
    name = "progression"
    answer_pos = ANSWER_POS
    position_labels = POSITION_LABELS

    def draw(self, n: int, generator: torch.Generator) -> Draw:
        steps = torch.tensor(STEPS)
        pick = torch.randint(len(STEPS), (n,), generator=generator)  # [n]
        # the corrupted step: one of the other two, at random
        other = (pick + torch.randint(1, len(STEPS), (n,), generator=generator)) % len(STEPS)
        k, k2 = steps[pick], steps[other]
        # the start leaves room for the answer under either step
        top = 99 - N_TERMS * torch.maximum(k, k2)  # [n]
        start = (torch.rand(n, generator=generator) * (top + 1)).long()
        return Draw(clean=encode(start, k), corrupt=encode(start, k2), answer=YEAR_IDS[start + N_TERMS * k],
                    distractor=YEAR_IDS[start + N_TERMS * k2], labels={"step": k})
