"""Two-digit addition in the paper's teaser format: ``36+28=00064``.

One token per character; the sum is written as five zero-padded digits, and the model
is trained to produce all five after ``=``. Carry classes: ``none`` (no carry),
``single`` (a carry out of exactly one digit column), ``double`` (out of both columns),
e.g. ``53+21=00074``, ``36+28=00064``, ``43+59=00102``.

A fixed fraction of the 10,000 operand pairs is held out of training
(``holdout_fraction``); ``dataset(..., split="heldout")`` draws only from those.
"""

from __future__ import annotations

import torch

from circuitkit import CircuitkitError
from circuitkit.tasks.base import Metric, Task, TaskDataset, check_n, register_task
from circuitkit.tasks.vocab import VOCAB

CARRY_CLASSES = ("none", "single", "double")
N_ANSWER = 5
PROMPT_LEN = 7  # <bos> a a + b b =
SEQ_LEN = PROMPT_LEN + N_ANSWER  # 12
# position roles: operand digits A1 A0 and B1 B0 (tens, units), the operators, sum digits S4..S0
POSITION_LABELS = ("bos", "A1", "A0", "+", "B1", "B0", "=") + tuple(f"S{k}" for k in range(N_ANSWER - 1, -1, -1))


def carry_class(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # [n] -> [n] in {0,1,2}
    units = (a % 10 + b % 10) >= 10
    tens = (a // 10 + b // 10 + units.long()) >= 10
    return units.long() + tens.long()


def encode(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # [n], [n] -> [n, 12]
    """Token ids of ``<bos> a1 a0 + b1 b0 = s4 s3 s2 s1 s0``."""
    d0 = VOCAB.id("0")  # digit ids are consecutive
    s = a + b
    cols = [torch.full_like(a, VOCAB.bos_id), d0 + a // 10, d0 + a % 10,
            torch.full_like(a, VOCAB.id("+")), d0 + b // 10, d0 + b % 10,
            torch.full_like(a, VOCAB.id("="))]
    cols += [d0 + (s // 10 ** k) % 10 for k in range(N_ANSWER - 1, -1, -1)]
    return torch.stack(cols, dim=1)


def heldout_mask(holdout_fraction: float, seed: int = 1234) -> torch.Tensor:  # [10000] bool
    """Which operand pairs (index a*100+b) are held out of training: fixed by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(10_000, generator=g)
    mask = torch.zeros(10_000, dtype=torch.bool)
    mask[perm[: round(holdout_fraction * 10_000)]] = True
    return mask


@register_task("addition")
class Addition(Task):
    name = "addition"
    metric = Metric.LOGIT_DIFF

    def __init__(self, carry: str | None = None, holdout_fraction: float = 0.1) -> None:
        if carry is not None and carry not in CARRY_CLASSES:
            raise CircuitkitError(f"carry must be one of {CARRY_CLASSES} or None, got {carry!r}")
        if not 0.0 <= holdout_fraction < 1.0:
            raise CircuitkitError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
        self.carry = carry
        self.holdout = heldout_mask(holdout_fraction)
        pairs = torch.arange(10_000)
        classes = carry_class(pairs // 100, pairs % 100)
        allowed = torch.ones(10_000, dtype=torch.bool)
        if carry is not None:
            allowed &= classes == CARRY_CLASSES.index(carry)
        self._pools = {"train": (allowed & ~self.holdout).nonzero().squeeze(-1),
                       "heldout": (allowed & self.holdout).nonzero().squeeze(-1),
                       "all": allowed.nonzero().squeeze(-1)}

    def _pool(self, split: str) -> torch.Tensor:
        if split not in self._pools:
            raise CircuitkitError(f"split must be one of {list(self._pools)}, got {split!r}")
        pool = self._pools[split]
        if len(pool) == 0:
            raise CircuitkitError(f"no operand pairs in split {split!r} with carry={self.carry!r}")
        return pool

    def _sample(self, n: int, g: torch.Generator, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        pool = self._pool(split)
        idx = pool[torch.randint(len(pool), (n,), generator=g)]
        return idx // 100, idx % 100

    def dataset(self, n: int, seed: int = 0, split: str = "heldout") -> TaskDataset:
        check_n(n)
        g = torch.Generator().manual_seed(seed)
        a, b = self._sample(n, g, split)
        # corrupted: operands resampled (from the same pool) until the sum differs
        ca, cb = self._sample(n, g, split)
        for _ in range(100):
            same = (ca + cb) == (a + b)
            if not same.any():
                break
            ra, rb = self._sample(int(same.sum()), g, split)
            ca[same], cb[same] = ra, rb
        clean, corrupt = encode(a, b), encode(ca, cb)
        answer_pos = torch.arange(PROMPT_LEN - 1, SEQ_LEN - 1).expand(n, -1).clone()
        return TaskDataset(
            task=self.name, clean=clean, corrupt=corrupt, answer_pos=answer_pos,
            correct=clean[:, PROMPT_LEN:], distractors=corrupt[:, PROMPT_LEN:, None],
            metric=self.metric, labels={"a": a, "b": b, "carry": carry_class(a, b)}, position_labels=POSITION_LABELS)

    def exhaustive(self, split: str = "all") -> TaskDataset:
        """Every operand pair of ``split`` once (with a seeded corruption), in order a*100+b."""
        pool = self._pool(split)
        ds = self.dataset(len(pool), seed=0, split=split)
        a, b = pool // 100, pool % 100
        clean = encode(a, b)
        return TaskDataset(task=self.name, clean=clean, corrupt=ds.corrupt, answer_pos=ds.answer_pos,
                           correct=clean[:, PROMPT_LEN:], distractors=ds.distractors, metric=self.metric,
                           labels={"a": a, "b": b, "carry": carry_class(a, b)}, position_labels=POSITION_LABELS)

    def train_batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self._sample(n, generator, "train")
        tokens = encode(a, b)
        loss_mask = torch.zeros_like(tokens, dtype=torch.bool)
        loss_mask[:, PROMPT_LEN - 1 : SEQ_LEN - 1] = True
        return tokens, loss_mask
