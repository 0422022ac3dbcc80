"""Max: "<bos> 3 7 2 9 1 6 =" → 9, the largest of six distinct digits.

One of the tasks added so that a multitask model's heads have more distinct work (the "more
tasks" lever of the 6-layer zoo, README "A larger graph"): the answer is a comparison across
every operand position, which neither copying (induction, ioi) nor addition's fixed digit
alignment does.

Format (toy vocabulary, 8 tokens)::

    <bos> D1 D2 D3 D4 D5 D6 =   → max(D1..D6)

The six digits are distinct, so the answer is one token. The corrupted prompt writes the
smallest digit in place of the largest, so its answer is the clean prompt's second largest
digit, which is also the distractor. ``labels["max_pos"]`` is the position of the largest digit.
"""

from __future__ import annotations

import torch

from circuitkit.tasks.base import Draw, SingleAnswerTask, register_task
from circuitkit.tasks.sampling import sample_distinct
from circuitkit.tasks.vocab import DIGITS, VOCAB

N_DIGITS = 6
SEQ_LEN = N_DIGITS + 2  # 8: <bos>, six digits, "="
ANSWER_POS = SEQ_LEN - 1  # 7
POSITION_LABELS = ("0",) + tuple(f"D{i + 1}" for i in range(N_DIGITS)) + ("=",)

DIGIT_IDS = torch.tensor(VOCAB.ids(DIGITS))  # [10]: token of digit 0..9


def encode(digits: torch.Tensor) -> torch.Tensor:  # [n, 6] digit values -> [n, 8] tokens
    n = digits.shape[0]
    return torch.cat([torch.full((n, 1), VOCAB.bos_id), DIGIT_IDS[digits],
                      torch.full((n, 1), VOCAB.id("="))], dim=1)


@register_task("max")
class MaxDigit(SingleAnswerTask):
    name = "max"
    answer_pos = ANSWER_POS
    position_labels = POSITION_LABELS

    def draw(self, n: int, generator: torch.Generator) -> Draw:
        digits = sample_distinct(n, N_DIGITS, 10, generator)  # [n, 6] distinct values, random order
        ordered = digits.sort(-1, descending=True)
        top, second = ordered.values[:, 0], ordered.values[:, 1]  # [n]
        max_pos = ordered.indices[:, 0]  # [n]
        corrupt = digits.clone()
        corrupt[torch.arange(n), max_pos] = digits.min(-1).values
        return Draw(clean=encode(digits), corrupt=encode(corrupt), answer=DIGIT_IDS[top], distractor=DIGIT_IDS[second],
                    labels={"max_pos": max_pos + 1})
