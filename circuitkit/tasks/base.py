"""What a task is: clean/corrupted prompts, answers, and the metric that scores them.

Every task (toy or natural-language) produces a :class:`TaskDataset` for circuit work and
evaluation, and training sequences with a loss mask for training from scratch. The
dataset is the contract between tasks and everything downstream (training, sparsity,
circuits, evaluation): downstream code never looks inside a task.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Callable, ClassVar, Iterator

import torch

from circuitkit import CircuitkitError
from circuitkit.io import tensor_digest


class Metric(Enum):
    """How a task scores the model's logits; call it as ``metric(logits, ds) -> [batch]``.

    - ``LOGIT_DIFF``: mean over answer positions of logit(correct) − max over distractors.
    - ``PROB_DIFF``: Σ p(correct set) − Σ p(distractor set) at the answer position
      (greater-than: years after YY vs years up to YY).
    - ``NEG_KL``: −KL(p_reference ‖ p) averaged over answer positions; needs ``reference``
      (the full model's logits on the clean prompts). 0 for the full model.
    """

    LOGIT_DIFF = "logit_diff"
    PROB_DIFF = "prob_diff"
    NEG_KL = "neg_kl"

    def __call__(self, logits: torch.Tensor, ds: "TaskDataset",
                 reference: torch.Tensor | None = None) -> torch.Tensor:  # -> [batch]
        # logits: [batch, pos, d_vocab]
        ans = ds.answer_logits(logits)  # [batch, n_ans, d_vocab]
        if self is Metric.LOGIT_DIFF:
            correct = ans.gather(-1, ds.correct.unsqueeze(-1)).squeeze(-1)  # [batch, n_ans]
            dis = ans.gather(-1, ds.distractors)  # [batch, n_ans, n_dis]
            return (correct - dis.max(-1).values).mean(-1)
        if self is Metric.PROB_DIFF:
            if ds.correct_set is None or ds.distractor_set is None:
                raise CircuitkitError("PROB_DIFF needs correct_set and distractor_set on the dataset")
            probs = ans.float().softmax(-1)  # [batch, n_ans, d_vocab]
            good = (probs * ds.correct_set[:, None, : probs.shape[-1]]).sum(-1)
            bad = (probs * ds.distractor_set[:, None, : probs.shape[-1]]).sum(-1)
            return (good - bad).mean(-1)
        if self is Metric.NEG_KL:
            if reference is None:
                raise CircuitkitError("the KL metric needs reference logits: pass the full model's "
                                      "clean logits as `reference=`")
            ref = ds.answer_logits(reference).float().log_softmax(-1)
            cur = ans.float().log_softmax(-1)
            kl = (ref.exp() * (ref - cur)).sum(-1)  # [batch, n_ans]
            return -kl.mean(-1)
        raise AssertionError(self)


@dataclass(frozen=True)
class TaskDataset:
    """Clean and corrupted prompts of one task, with their answers.

    ``answer_pos[b, k]`` is a position whose next-token logits are scored; the model should
    put ``correct[b, k]`` first there, and ``distractors[b, k, :]`` are the competing tokens
    (the corrupted prompt's answer, the other name, ...). Clean and corrupted prompts have
    the same shape, position by position.
    """

    task: str
    clean: torch.Tensor  # [batch, pos]
    corrupt: torch.Tensor  # [batch, pos]
    answer_pos: torch.Tensor  # [batch, n_ans]
    correct: torch.Tensor  # [batch, n_ans]
    distractors: torch.Tensor  # [batch, n_ans, n_dis]
    metric: Metric = Metric.LOGIT_DIFF
    correct_set: torch.Tensor | None = None  # [batch, d_vocab] bool, for set-valued answers
    distractor_set: torch.Tensor | None = None  # [batch, d_vocab] bool
    labels: dict[str, torch.Tensor] = field(default_factory=dict)  # per-example extras, [batch, ...]
    # one name per token position, shared by every prompt (a task whose template fixes the roles,
    # e.g. addition's "A1" ... "=" ... "S0"); position-resolved graphs name positions by it.
    # A position without a role is named by its index ("3"); None: every position by index.
    position_labels: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.clean.shape != self.corrupt.shape:
            raise CircuitkitError(
                f"task {self.task!r}: clean prompts have shape {tuple(self.clean.shape)} but corrupted "
                f"prompts have {tuple(self.corrupt.shape)}; corrupted prompts must have the same token "
                "length as the clean ones, position by position (resample them to match)")
        if self.clean.ndim != 2:
            raise CircuitkitError(f"task {self.task!r}: prompts must be [batch, pos], got {tuple(self.clean.shape)}")
        b = self.clean.shape[0]
        if self.correct.numel() == 0 or self.answer_pos.numel() == 0:
            raise CircuitkitError(f"task {self.task!r}: no answers given; every prompt needs at least "
                                  "one answer position and a correct token")
        if self.answer_pos.shape != self.correct.shape or self.answer_pos.shape[0] != b:
            raise CircuitkitError(
                f"task {self.task!r}: answer_pos {tuple(self.answer_pos.shape)} and correct "
                f"{tuple(self.correct.shape)} must both be [batch={b}, n_answers]")
        if self.distractors.shape[:2] != self.correct.shape or self.distractors.ndim != 3:
            raise CircuitkitError(
                f"task {self.task!r}: distractors must be [batch, n_answers, n_distractors], got "
                f"{tuple(self.distractors.shape)}")
        t = self.clean.shape[1]
        if self.position_labels is not None:
            labels = tuple(self.position_labels)
            if len(labels) != t or not all(isinstance(x, str) and x for x in labels) or len(set(labels)) != t:
                raise CircuitkitError(f"task {self.task!r}: position_labels must be {t} distinct non-empty strings "
                                      f"(one per token position), got {labels!r}")
            object.__setattr__(self, "position_labels", labels)
        if int(self.answer_pos.min()) < 0 or int(self.answer_pos.max()) >= t:
            raise CircuitkitError(f"task {self.task!r}: answer positions must lie in [0, {t})")

    def __len__(self) -> int:
        return self.clean.shape[0]

    @property
    def seq_len(self) -> int:
        return self.clean.shape[1]

    def __getitem__(self, idx) -> "TaskDataset":
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        pick = lambda x: None if x is None else x[idx]  # noqa: E731
        return replace(
            self, clean=self.clean[idx], corrupt=self.corrupt[idx], answer_pos=self.answer_pos[idx],
            correct=self.correct[idx], distractors=self.distractors[idx],
            correct_set=pick(self.correct_set), distractor_set=pick(self.distractor_set),
            labels={k: v[idx] for k, v in self.labels.items()})

    def fingerprint(self) -> str:
        """16 hex digits of sha256 over everything that decides what the metric sees: the task's name, metric and
        position labels, and every tensor (prompts, answers, answer sets, labels), by value, shape and dtype. Two
        datasets with one fingerprint are the same prompts scored the same way."""
        tensors = {"clean": self.clean, "corrupt": self.corrupt, "answer_pos": self.answer_pos,
                   "correct": self.correct, "distractors": self.distractors, "correct_set": self.correct_set,
                   "distractor_set": self.distractor_set, **{f"labels.{k}": v for k, v in sorted(self.labels.items())}}
        return tensor_digest(tensors.items(), f"{self.task}|{self.metric.name}|{self.position_labels!r}")

    def scored_from(self, start: int) -> "TaskDataset":
        """The same examples seen from token position ``start`` on: prompts [batch, pos - start] and
        answer positions shifted by ``start``, so that logits computed only at positions ``start..``
        [batch, pos - start, d_vocab] are scored exactly as the full logits are. ``start`` must not
        pass the first answer position (nothing before it is read by the metric)."""
        if not 0 <= start <= int(self.answer_pos.min()):
            raise CircuitkitError(f"task {self.task!r}: scoring from position {start} would drop answer position "
                                  f"{int(self.answer_pos.min())}; start at most at the first answer position")
        if start == 0:
            return self
        return replace(self, clean=self.clean[:, start:], corrupt=self.corrupt[:, start:],
                       answer_pos=self.answer_pos - start,
                       position_labels=None if self.position_labels is None else self.position_labels[start:])

    def batches(self, batch_size: int) -> Iterator["TaskDataset"]:
        if batch_size <= 0:
            raise CircuitkitError(f"batch_size must be positive, got {batch_size}")
        for i in range(0, len(self), batch_size):
            yield self[i : i + batch_size]

    def to(self, device: torch.device | str) -> "TaskDataset":
        mv = lambda x: None if x is None else x.to(device)  # noqa: E731
        return replace(
            self, clean=mv(self.clean), corrupt=mv(self.corrupt), answer_pos=mv(self.answer_pos),
            correct=mv(self.correct), distractors=mv(self.distractors), correct_set=mv(self.correct_set),
            distractor_set=mv(self.distractor_set), labels={k: mv(v) for k, v in self.labels.items()})

    def where(self, mask: torch.Tensor) -> "TaskDataset":
        """The examples where ``mask`` ([batch] bool) is true, e.g. one carry class."""
        return self[mask.nonzero().squeeze(-1)]

    def answer_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[batch, pos, d_vocab] -> [batch, n_ans, d_vocab] at the answer positions."""
        if logits.shape[:2] != self.clean.shape:
            raise CircuitkitError(
                f"logits of shape {tuple(logits.shape)} do not match prompts {tuple(self.clean.shape)}")
        idx = self.answer_pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1])
        return logits.gather(1, idx)

    def metric_values(self, logits: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        """Per-example metric, [batch]."""
        return self.metric(logits, self, reference)

    def accuracy(self, logits: torch.Tensor) -> torch.Tensor:  # -> [batch] bool
        """An example is right when every answer position puts a correct token first."""
        top = self.answer_logits(logits).argmax(-1)  # [batch, n_ans]
        if self.correct_set is not None:
            return self.correct_set.gather(1, top).all(-1)
        return (top == self.correct).all(-1)


class Task(ABC):
    """A task: a seeded generator of :class:`TaskDataset` and of training sequences."""

    name: ClassVar[str]
    metric: ClassVar[Metric] = Metric.LOGIT_DIFF

    @abstractmethod
    def dataset(self, n: int, seed: int = 0) -> TaskDataset:
        """``n`` clean/corrupted examples; the same ``seed`` gives the same examples."""

    @abstractmethod
    def train_batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Training sequences ``tokens`` [n, pos] and ``loss_mask`` [n, pos] (bool).

        ``loss_mask[b, t]`` is true where the logits at ``t`` are trained to predict
        ``tokens[b, t + 1]``. Draws all randomness from ``generator`` so a resumed run
        that restores the generator state continues exactly.
        """


@dataclass(frozen=True)
class Draw:
    """What a :class:`SingleAnswerTask` draws for ``n`` examples: prompts, answer and distractor tokens, labels."""

    clean: torch.Tensor  # [n, pos]
    corrupt: torch.Tensor  # [n, pos]
    answer: torch.Tensor  # [n]: the token that should follow the clean prompt
    distractor: torch.Tensor  # [n] or [n, n_dis]: the competing tokens (the corrupted prompt's answer, the subject, ...)
    labels: dict[str, torch.Tensor] = field(default_factory=dict)  # per-example extras, [n, ...]


class SingleAnswerTask(Task):
    """A task whose answer is the one token after the prompt's last position, scored by logit difference.

    A subclass draws examples (:meth:`draw`) and names its positions; the dataset and the training rows (the prompt
    with its answer appended, the loss on the last prompt position) are built here, the same way for every such task.
    """

    answer_pos: ClassVar[int]  # the prompt's last position, where the answer is read
    position_labels: ClassVar[tuple[str, ...] | None] = None

    @abstractmethod
    def draw(self, n: int, generator: torch.Generator) -> Draw:
        """``n`` examples, all randomness from ``generator``."""

    def dataset(self, n: int, seed: int = 0) -> TaskDataset:
        check_n(n)
        d = self.draw(n, torch.Generator().manual_seed(seed))
        distractors = d.distractor.reshape(n, 1, -1)  # [n, 1 answer, n_dis]
        return TaskDataset(task=self.name, clean=d.clean, corrupt=d.corrupt,
                           answer_pos=torch.full((n, 1), self.answer_pos, dtype=torch.long),
                           correct=d.answer[:, None], distractors=distractors, metric=self.metric,
                           labels=dict(d.labels), position_labels=self.position_labels)

    def train_batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        check_n(n)
        d = self.draw(n, generator)
        tokens = torch.cat([d.clean, d.answer[:, None]], dim=1)  # [n, pos + 1]
        loss_mask = torch.zeros_like(tokens, dtype=torch.bool)
        loss_mask[:, self.answer_pos] = True
        return tokens, loss_mask


def check_n(n: int, what: str = "n") -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise CircuitkitError(f"{what} must be a positive number of examples, got {n!r}")
    return n


TaskFactory = Callable[..., Task]
_REGISTRY: dict[str, TaskFactory] = {}


def register_task(name: str) -> Callable[[TaskFactory], TaskFactory]:
    def deco(factory: TaskFactory) -> TaskFactory:
        if name in _REGISTRY:
            raise RuntimeError(f"task {name!r} registered twice")
        _REGISTRY[name] = factory
        return factory
    return deco


def task_names() -> list[str]:
    return sorted(_REGISTRY)


def get_task(name: str, **options) -> Task:
    """The task registered as ``name``, built with ``options`` (e.g. ``carry="double"``)."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise CircuitkitError(
            f"unknown task {name!r}; known tasks: {', '.join(task_names())}") from None
    try:
        return factory(**options)
    except TypeError as e:
        raise CircuitkitError(f"bad options for task {name!r}: {e}") from None
