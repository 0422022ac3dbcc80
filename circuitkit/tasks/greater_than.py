"""Greater-than: "The war lasted from the year 17YY to the year 17" → any year after YY.

Hanna et al.'s greater-than circuit in GPT-2 small is one of the paper's two GPT-2
tasks; its answer is a *set* (every year above YY), so it is scored by probability mass
(``PROB_DIFF``: Σ p(years > YY) − Σ p(years ≤ YY)) rather than by one token.

Format (toy vocabulary, 13 tokens; "17" and YY are two-digit ``YEARS`` tokens, as GPT-2
splits "1732" into "17" + "32")::

    <bos> The war lasted from the year 17 YY to the year 17   → a year > YY

YY is uniform in 02..98; ``labels["yy"]`` holds it. The corrupted prompt writes 01 for YY,
so (almost) every year is "greater" there. ``correct`` holds one sampled year above YY
(the training target), ``distractors`` holds YY itself.
"""

from __future__ import annotations

import torch

from circuitkit.tasks.base import Metric, Task, TaskDataset, check_n, register_task
from circuitkit.tasks.vocab import VOCAB, YEARS

TEMPLATE = ["<bos>", "The", "war", "lasted", "from", "the", "year", "17", "[YY]", "to", "the", "year", "17"]
SEQ_LEN = len(TEMPLATE)  # 13
ANSWER_POS = SEQ_LEN - 1  # 12
YY_POS = TEMPLATE.index("[YY]")  # 8
YY_MIN, YY_MAX = 2, 98
CORRUPT_YY = 1
# position roles: the year YY and the final token (where the answer is read); the rest by index
POSITION_LABELS = tuple({YY_POS: "YY", ANSWER_POS: "end"}.get(i, str(i)) for i in range(SEQ_LEN))

YEAR_IDS = torch.tensor(VOCAB.ids(YEARS))  # [100]: token id of year 00..99


def year_sets(yy: torch.Tensor, year_ids: torch.Tensor, d_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[n] years -> (correct_set, distractor_set), each [n, d_vocab] bool.

    ``year_ids[v]`` is the token of year ``v`` (or -1 where a tokenizer has none); the
    correct set holds the years above ``yy``, the distractor set the years up to ``yy``.
    """
    has = year_ids >= 0
    values, ids = torch.arange(len(year_ids))[has], year_ids[has]  # [n_years]
    n = yy.shape[0]
    correct = torch.zeros(n, d_vocab, dtype=torch.bool)
    distract = torch.zeros(n, d_vocab, dtype=torch.bool)
    correct[:, ids] = values[None, :] > yy[:, None]
    distract[:, ids] = values[None, :] <= yy[:, None]
    return correct, distract


def sample_above(yy: torch.Tensor, valid: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A year drawn uniformly from the ``valid`` ([100] bool) years in (yy, 99], per row: [n] -> [n]."""
    allowed = (torch.arange(100)[None, :] > yy[:, None]) & valid[None, :]  # [n, 100]
    scores = torch.rand(allowed.shape, generator=generator).masked_fill(~allowed, -1.0)
    return scores.argmax(-1)


@register_task("greater-than")
class GreaterThan(Task):
    name = "greater-than"
    metric = Metric.PROB_DIFF

    def _encode(self, yy: torch.Tensor) -> torch.Tensor:  # [n] -> [n, 13]
        fixed = {w: VOCAB.id(w) for w in TEMPLATE if w != "[YY]"}
        return torch.stack([YEAR_IDS[yy] if w == "[YY]" else torch.full_like(yy, fixed[w]) for w in TEMPLATE],
                           dim=1)

    def _sample_yy(self, n: int, g: torch.Generator) -> torch.Tensor:  # [n]
        return torch.randint(YY_MIN, YY_MAX + 1, (n,), generator=g)

    def dataset(self, n: int, seed: int = 0) -> TaskDataset:
        check_n(n)
        g = torch.Generator().manual_seed(seed)
        yy = self._sample_yy(n, g)
        clean = self._encode(yy)
        corrupt = self._encode(torch.full_like(yy, CORRUPT_YY))
        correct_set, distractor_set = year_sets(yy, YEAR_IDS, VOCAB.d_vocab)
        label = YEAR_IDS[sample_above(yy, torch.ones(100, dtype=torch.bool), g)]
        return TaskDataset(task=self.name, clean=clean, corrupt=corrupt,
                           answer_pos=torch.full((n, 1), ANSWER_POS, dtype=torch.long),
                           correct=label[:, None], distractors=YEAR_IDS[yy][:, None, None], metric=self.metric,
                           correct_set=correct_set, distractor_set=distractor_set, labels={"yy": yy},
                           position_labels=POSITION_LABELS)

    def train_batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        check_n(n)
        yy = self._sample_yy(n, generator)
        target = YEAR_IDS[sample_above(yy, torch.ones(100, dtype=torch.bool), generator)]
        tokens = torch.cat([self._encode(yy), target[:, None]], dim=1)  # [n, 14]
        loss_mask = torch.zeros_like(tokens, dtype=torch.bool)
        loss_mask[:, ANSWER_POS] = True
        return tokens, loss_mask
