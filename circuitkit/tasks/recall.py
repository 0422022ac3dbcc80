"""Recall: "<bos> Mary 3 John 7 Tom 1 Anna 5 John" → 7, the value stored under a name.

One of the tasks added so that a multitask model's heads have more distinct work (the "more
tasks" lever of the 6-layer zoo, README "A larger graph"): associative recall, where a head must
find the earlier occurrence of the query name and move the token *after* it (induction's
mechanism on one token, with names and digits instead of induction's symbols).

Format (toy vocabulary, 10 tokens)::

    <bos> K1 V1 K2 V2 K3 V3 K4 V4 Q   → the V after the K equal to Q

Keys are four distinct ``NAMES``, values four distinct digits, ``Q`` one of the keys. The
corrupted prompt asks for another of the four keys; its answer is the distractor.
``labels["slot"]`` is the index (0..3) of the queried pair.
"""

from __future__ import annotations

import torch

from circuitkit.tasks.base import Draw, SingleAnswerTask, register_task
from circuitkit.tasks.sampling import sample_distinct
from circuitkit.tasks.vocab import DIGITS, NAMES, VOCAB

N_PAIRS = 4
SEQ_LEN = 2 * N_PAIRS + 2  # 10
ANSWER_POS = SEQ_LEN - 1  # 9
POSITION_LABELS = (("0",) + tuple(x for i in range(N_PAIRS) for x in (f"K{i + 1}", f"V{i + 1}"))
                   + ("Q",))

NAME_IDS = torch.tensor(VOCAB.ids(NAMES))  # [16]
DIGIT_IDS = torch.tensor(VOCAB.ids(DIGITS))  # [10]


def encode(keys: torch.Tensor, values: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    # keys, values: [n, 4] token ids; query: [n] token id -> [n, 10]
    n = keys.shape[0]
    pairs = torch.stack([keys, values], dim=-1).reshape(n, 2 * N_PAIRS)  # K1 V1 K2 V2 ...
    return torch.cat([torch.full((n, 1), VOCAB.bos_id), pairs, query[:, None]], dim=1)


@register_task("recall")
class Recall(SingleAnswerTask):
    name = "recall"
    answer_pos = ANSWER_POS
    position_labels = POSITION_LABELS

    def draw(self, n: int, generator: torch.Generator) -> Draw:
        keys = NAME_IDS[sample_distinct(n, N_PAIRS, len(NAME_IDS), generator)]  # [n, 4]
        values = DIGIT_IDS[sample_distinct(n, N_PAIRS, len(DIGIT_IDS), generator)]  # [n, 4]
        slot = torch.randint(N_PAIRS, (n,), generator=generator)  # [n]
        other = (slot + torch.randint(1, N_PAIRS, (n,), generator=generator)) % N_PAIRS  # another slot
        rows = torch.arange(n)
        return Draw(clean=encode(keys, values, keys[rows, slot]), corrupt=encode(keys, values, keys[rows, other]),
                    answer=values[rows, slot], distractor=values[rows, other], labels={"slot": slot})
