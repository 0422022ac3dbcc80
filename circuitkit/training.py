"""Training models from scratch, and the pieces every training loop here shares.

Two kinds of model: toy models on a weighted mixture of tasks, and language models on a text
corpus (:mod:`circuitkit.corpus`: next-token CE on fixed-length windows, a byte-level BPE
tokenizer trained on the train split and saved with the model, held-out CE on the held-out
files every ``eval_every`` steps).

Owns: the TOML training config, sampling a weighted mixture of tasks into one padded
batch, the masked next-token loss, held-out evaluation (accuracy, metric, CE per task; CE
on corpus rows),
and the checkpoint/resume machinery. A checkpoint holds the model, the optimizer, the
scheduler, every random-number state and the step, and is written atomically, so
``--resume`` continues exactly: the losses after resuming equal those of a run that was
never interrupted. It also records the kind of run (:class:`RunKind`) and its config, so a
resume with another config (anything but the step count and where files go) or of the other
kind of run is refused instead of being recorded as if it had always been so. A run never
overwrites a finished model or a run folder holding a checkpoint unless asked (``--resume``
or ``--force``, :func:`prepare_run`). The sparse post-training loop
(:mod:`circuitkit.sparsity.finetune`) reuses the same pieces.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
import torch.utils.deterministic
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from circuitkit import CircuitkitError
from circuitkit.corpus import (ROW_PARTS, TextCorpus, bigram_ce, code_corpus, is_code_corpus, read_documents,
                               train_tokenizer)
from circuitkit.io import (FRACTION, NON_NEGATIVE, POSITIVE, Range, TomlConfig, check_writable_dir, read_json, torch_save, write_json,
                           write_text)
from circuitkit.models import (CARD_FILE, SPARSITY_FILE, TOKENIZER_FILE, build_model, load_local_tokenizer,
                               load_model, resolve_path, save_model, save_tokenizer, set_local_tokenizer, toy_config)
from circuitkit.tasks import Task, get_task
from circuitkit.tasks.vocab import VOCAB, is_toy

CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "log.jsonl"


# ---------------------------------------------------------------- config

@dataclass(frozen=True)
class TrainConfig(TomlConfig):
    """What ``circuitkit train`` reads from TOML. Unknown keys are an error."""

    name: str
    out: str  # the final model folder (card + safetensors)
    run_dir: str  # checkpoints and the per-step log
    tasks: dict[str, float] = field(default_factory=dict)  # task name -> mixture weight (or a corpus)
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    corpus: str | None = None  # a language model: stdlib, stdlib:FOLDER, .txt/.jsonl files (circuitkit.corpus)
    corpus_seq_len: int = 128  # training window length (tokens, BOS included)
    corpus_heldout_fraction: float = 0.05  # of the files (code corpus) or of the rows (other text)
    corpus_seed: int = 0  # the train/held-out split of the files
    corpus_max_tokens: int | None = None  # cap on the train stream (tests)
    corpus_repeat_fraction: float = 0.0  # of each batch: a stretch of code repeated (TextCorpus.sample)
    corpus_repeat_min: int = 8  # its shortest period (tokens)
    init_from: str | None = None  # a language model trained here to continue (its weights and tokenizer)
    tokenizer_vocab: int = 4096  # byte-level BPE trained on the train split
    arch: str | dict[str, Any] = "toy-4l"
    seed: int = 0
    steps: int = 5000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 200
    min_lr_fraction: float = 0.1
    grad_clip: float = 1.0
    checkpoint_every: int = 500
    eval_every: int = 1000
    eval_n: int = 1000

    REQUIRED = frozenset({"name", "out", "run_dir"})
    RANGES = {"corpus_seq_len": POSITIVE, "corpus_heldout_fraction": Range(0, 1, lo_open=True, hi_open=True),
              "corpus_seed": NON_NEGATIVE, "corpus_max_tokens": POSITIVE, "tokenizer_vocab": POSITIVE,
              "corpus_repeat_fraction": FRACTION, "corpus_repeat_min": POSITIVE,
              "seed": NON_NEGATIVE, "steps": POSITIVE, "batch_size": POSITIVE, "lr": POSITIVE,
              "weight_decay": NON_NEGATIVE, "warmup": NON_NEGATIVE, "min_lr_fraction": FRACTION,
              "grad_clip": POSITIVE, "checkpoint_every": POSITIVE, "eval_every": POSITIVE, "eval_n": POSITIVE}

    def check(self, source: str) -> None:
        if not self.corpus and (self.init_from or self.corpus_repeat_fraction):
            raise CircuitkitError(f"{source}: init_from and corpus_repeat_fraction apply to a language model (give "
                                  "corpus = \"stdlib\"); a toy model trains from scratch on [tasks]")
        if self.corpus:
            if self.tasks or self.task_options:
                raise CircuitkitError(f"{source}: give either [tasks] (a toy model) or corpus (a language model), "
                                      "not both")
            if self.corpus_seq_len < 2:
                raise CircuitkitError(f"{source}: corpus_seq_len must be at least 2, got {self.corpus_seq_len}")
            return
        if not self.tasks:
            raise CircuitkitError(f"{source}: nothing to train on; [tasks] needs at least one task with a positive weight "
                                  "(a toy model on a task mixture), or give corpus = \"stdlib\" (a language model on the "
                                  "standard library's code)")
        check_mixture(self.tasks, self.task_options, source)


def check_mixture(tasks: dict[str, float], options: dict[str, dict[str, Any]], source: str) -> None:
    """A task mixture needs a positive weight per task, and options only for tasks in it."""
    if not tasks or any(w <= 0 for w in tasks.values()):
        raise CircuitkitError(f"{source}: [tasks] needs at least one task with a positive weight, got {tasks}")
    stray = sorted(set(options) - set(tasks))
    if stray:
        raise CircuitkitError(f"{source}: task_options for {stray}, which are not in tasks {sorted(tasks)}")


# ---------------------------------------------------------------- data

def build_tasks(tasks: dict[str, float], options: dict[str, dict[str, Any]] | None = None) -> dict[str, Task]:
    options = options or {}
    return {name: get_task(name, **options.get(name, {})) for name in tasks}


def sample_mixture(tasks: dict[str, Task], weights: dict[str, float], n: int, generator: torch.Generator,
                   pad_id: int = VOCAB.pad_id) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` training sequences from a weighted task mixture, right-padded.

    Returns ``tokens`` [n, pos], ``loss_mask`` [n, pos] (bool) and each row's task, as its
    index in ``tasks`` [n]. Task counts are drawn from ``generator``, as is everything inside
    each task. Rows come grouped by task, in the order of ``tasks``.
    """
    names = list(tasks)
    w = torch.tensor([float(weights[k]) for k in names])
    choice = torch.multinomial(w / w.sum(), n, replacement=True, generator=generator)
    parts, ids = [], []
    for i, name in enumerate(names):
        k = int((choice == i).sum())
        if k:
            parts.append(tasks[name].train_batch(k, generator))
            ids.append(torch.full((k,), i, dtype=torch.long))
    width = max(t.shape[1] for t, _ in parts)
    tokens = torch.cat([F.pad(t, (0, width - t.shape[1]), value=pad_id) for t, _ in parts])
    mask = torch.cat([F.pad(m, (0, width - m.shape[1]), value=False) for _, m in parts])
    return tokens, mask, torch.cat(ids)


def masked_ce(logits: torch.Tensor, tokens: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions where ``loss_mask`` is true.

    logits [batch, pos, d_vocab]; tokens, loss_mask [batch, pos] -> scalar.
    """
    logp = logits[:, :-1].float().log_softmax(-1)  # [batch, pos-1, d_vocab]
    target = tokens[:, 1:]
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # [batch, pos-1]
    m = loss_mask[:, :-1]
    return (nll * m).sum() / m.sum().clamp(min=1)


def masked_accuracy(logits: torch.Tensor, tokens: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Fraction of sequences whose every masked next token is predicted first. -> scalar."""
    ok = (logits[:, :-1].argmax(-1) == tokens[:, 1:]) | ~loss_mask[:, :-1]
    return ok.all(-1).float().mean()


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: HookedTransformer, tasks: dict[str, Task], n: int = 1000, seed: int = 12345,
             batch_size: int = 500) -> dict[str, dict[str, float]]:
    """Held-out accuracy, mean metric and CE of the correct answers, per task.

    CE is −log p(correct) at the answer positions of the clean prompts, averaged; for a
    set-valued task (greater-than) it is the CE of the sampled label.
    """
    out = {}
    was_training = model.training
    model.eval()
    for name, task in tasks.items():
        ds = task.dataset(n, seed=seed)
        acc, met, ce = [], [], []
        for b in ds.batches(batch_size):
            logits = model(b.clean)  # [batch, pos, d_vocab]
            acc.append(b.accuracy(logits).float())
            met.append(b.metric_values(logits))
            logp = b.answer_logits(logits).float().log_softmax(-1)  # [batch, n_ans, d_vocab]
            ce.append(-logp.gather(-1, b.correct.unsqueeze(-1)).squeeze(-1).mean(-1))
        out[name] = {"accuracy": torch.cat(acc).mean().item(), "metric": torch.cat(met).mean().item(),
                     "ce": torch.cat(ce).mean().item(), "n": len(ds)}
    model.train(was_training)
    return out


def heldout(model: HookedTransformer, tasks: dict[str, Task], weights: dict[str, float], n: int = 1000,
            seed: int = 12345) -> dict[str, Any]:
    """:func:`evaluate` per task (``per_task``) and the mixture-weighted CE of the tasks (``ce``)."""
    res = evaluate(model, tasks, n=n, seed=seed)
    total = sum(weights[k] for k in tasks)
    return {"ce": sum(res[k]["ce"] * weights[k] for k in tasks) / total, "per_task": res}


@torch.no_grad()
def corpus_ce(model: HookedTransformer, rows: torch.Tensor,  # [n, seq_len]
              batch_size: int = 16) -> float:
    """Mean next-token CE (nats) over every position of ``rows``."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, rows.shape[0], batch_size):
        b = rows[i:i + batch_size].to(model.cfg.device)
        k = b.shape[0] * (b.shape[1] - 1)
        total += masked_ce(model(b), b, torch.ones_like(b, dtype=torch.bool)).item() * k
        count += k
    model.train(was)
    return total / count


class TrainingData:
    """Training batches and held-out evaluation, from a task mixture or a text corpus.

    The one data source of both loops (``circuitkit train`` and ``circuitkit sparsify``).
    """

    def __init__(self, model: HookedTransformer, tasks: dict[str, float], task_options: dict[str, dict[str, Any]],
                 corpus: str | None = None, *, seq_len: int = 128, heldout_fraction: float = 0.05,
                 text_field: str = "text", max_tokens: int | None = None, seed: int = 0,
                 repeat_fraction: float = 0.0, repeat_min: int = 8, split_parts: bool = False) -> None:
        self.weights_by_task = dict(tasks)
        # a corpus batch with repeat windows as two "tasks", plain and repeat (ROW_PARTS), so that sparse
        # post-training can hold one CE constraint on each part (per_task_constraints)
        self.split_parts = bool(split_parts)
        if self.split_parts and not (corpus and 0 < repeat_fraction < 1):
            raise CircuitkitError("per_task_constraints on a corpus run holds one constraint on each part of the "
                                  "batches (plain windows and repeat windows); it needs 0 < corpus_repeat_fraction "
                                  f"< 1, got {repeat_fraction}. With one part there is one constraint: drop "
                                  "per_task_constraints")
        self.corpus: TextCorpus | None = None
        self.tasks: dict[str, Task] = {}
        if corpus:
            self.corpus = TextCorpus.from_source(corpus, model.tokenizer, seq_len=seq_len,
                                                 heldout_fraction=heldout_fraction, text_field=text_field,
                                                 max_tokens=max_tokens, seed=seed,
                                                 prepend_bos=bool(getattr(model.cfg, "default_prepend_bos", True)))
            if repeat_fraction:
                self.corpus = self.corpus.with_repeats(repeat_fraction, repeat_min)
            if seq_len > model.cfg.n_ctx:
                raise CircuitkitError(f"corpus_seq_len {seq_len} exceeds the model's context {model.cfg.n_ctx}; "
                                      "lower corpus_seq_len or give the model a longer n_ctx")
        else:
            if repeat_fraction:
                raise CircuitkitError("corpus_repeat_fraction applies to a corpus run; a task mixture has no "
                                      "stream to repeat (drop it, or give corpus)")
            self.tasks = build_tasks(tasks, task_options)
        tok = model.tokenizer
        self.pad_id = VOCAB.pad_id if is_toy(model) or tok is None else (
            tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0))

    @property
    def names(self) -> list[str]:
        if self.corpus is None:
            return list(self.tasks)
        return list(ROW_PARTS) if self.split_parts else ["corpus"]

    @property
    def weights(self) -> torch.Tensor:  # [n_tasks]
        if self.corpus is not None:
            if self.split_parts:
                f = self.corpus.repeat_fraction
                return torch.tensor([1.0 - f, f], dtype=torch.float64)
            return torch.ones(1, dtype=torch.float64)
        return torch.tensor([float(self.weights_by_task[k]) for k in self.tasks], dtype=torch.float64)

    def sample(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``tokens``, ``loss_mask`` [n, pos] and each row's task index [n]
        (:func:`sample_mixture`, or corpus windows)."""
        if self.corpus is not None:
            tokens, mask = self.corpus.sample(n, gen)
            return tokens, mask, (self.corpus.row_parts(n) if self.split_parts else torch.zeros(n, dtype=torch.long))
        return sample_mixture(self.tasks, self.weights_by_task, n, gen, pad_id=self.pad_id)

    def heldout(self, model: HookedTransformer, n: int) -> dict[str, Any]:
        """Held-out metrics per task (or the CE of the first ``n`` held-out corpus rows) and the
        mixture-weighted CE (:func:`heldout`)."""
        if self.corpus is not None:
            rows = self.corpus.rows("heldout", n)
            ce = corpus_ce(model, rows)
            return {"ce": ce, "per_task": {"corpus": {"ce": ce, "n": rows.shape[0]}}}
        return heldout(model, self.tasks, self.weights_by_task, n=n, seed=12345)

    def constraint_set(self, model: HookedTransformer, n: int) -> dict[str, Any]:
        """The base model's metrics that set sparse post-training's CE targets, in the form of
        :meth:`heldout`. For tasks: the held-out prompts (fresh prompts of the training
        distribution). For a corpus: ``n`` *train* rows spread evenly over the train files, because the constraint holds the
        CE of training windows, and a model that has overfit scores those well below held-out
        text: a target from held-out CE would leave the constraint slack by the overfitting gap.
        With repeated stretches in the batches (``repeat_fraction``) the same share of the rows are
        repeat windows (:meth:`TextCorpus.constraint_rows`), so the target is the base's CE on what
        the batches hold; ``per_task`` then has the CE of each part (``plain``, ``repeat``) on its own rows."""
        if self.corpus is not None:
            rows = self.corpus.constraint_rows(n)
            ce = corpus_ce(model, rows)
            if not self.corpus.repeat_fraction:
                return {"ce": ce, "per_task": {"corpus": {"ce": ce, "n": rows.shape[0]}}}
            parts = self.corpus.row_parts(rows.shape[0])
            empty = [name for i, name in enumerate(ROW_PARTS) if not bool((parts == i).any())]
            if empty and self.split_parts:
                raise CircuitkitError(f"{n} constraint rows hold no {empty[0]} windows at corpus_repeat_fraction "
                                      f"{self.corpus.repeat_fraction}, so that part has no CE target; raise target_n")
            per = {name: {"ce": corpus_ce(model, rows[parts == i]), "n": int((parts == i).sum())}
                   for i, name in enumerate(ROW_PARTS) if name not in empty}
            return {"ce": ce, "per_task": per}
        return self.heldout(model, n)

    def measure_data(self, n: int):
        if self.corpus is not None:
            return self.corpus.rows("heldout", n)
        return [t.dataset(n, seed=12345) for t in self.tasks.values()]


# ---------------------------------------------------------------- checkpoints

@contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """Torch's deterministic algorithms for a whole training run (it decorates ``train`` and the sparse
    run); the caller's setting after.

    With more than one thread the embedding's backward on CPU (``W_E[tokens]`` in TransformerLens:
    an accumulating ``index_put_``) adds the rows of a repeated token in an order that changes from
    run to run, so two runs of the same config and seed drifted apart (weights 1.6e-5 apart after 5
    steps, 0.02 after 150, at 2 threads); the deterministic path sorts first. Uninitialized memory
    is not filled (torch fills it in this mode unless told not to; every buffer here is written before
    it is read).
    """
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.utils.deterministic.fill_uninitialized_memory = before[2]


def rng_state(data_gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"data": data_gen.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(data_gen: torch.Generator, state: dict[str, torch.Tensor]) -> None:
    data_gen.set_state(state["data"])
    torch.set_rng_state(state["torch"])


class RunKind(Enum):
    """The kind of run a checkpoint belongs to; ``--resume`` continues only the same kind."""

    TRAIN = "train"
    SPARSIFY = "sparsify"

    @property
    def command(self) -> str:
        return f"circuitkit {self.value}"


# Config fields a resume may change: the length of the run, where its files go, and (sparsify) the weights of
# the sparsity term (in the final deterministic phase, per layer) and the constraint's target (recomputed from the
# base CEs the checkpoint keeps) -- each step's weights and target are in the step log, so a run that changed them
# part-way is still readable. name is a label (progress bar, card); max_accuracy_drop only judges the finished model.
RESUMABLE_CHANGES = frozenset({"steps", "name", "out", "run_dir", "final_sparsity_weight", "attn_layer_weights",
                               "attn_head_power", "tolerance", "target_ce", "target_floor", "heldout_tolerance",
                               "max_accuracy_drop"})


def prepare_run(run_dir: Path, out: Path, kind: RunKind, resume: bool, force: bool, main: bool = True) -> None:
    """Check, before any work, that the run may write where it will: ``out`` and ``run_dir`` are
    (or can be made) folders, and nothing finished is overwritten unless asked. Without ``resume``
    a finished model in ``out`` or a checkpoint in ``run_dir`` is refused unless ``force``, which
    deletes that checkpoint (its log is restarted too), so a later ``--resume`` cannot mix runs.
    Only the ``main`` process of a data-parallel run deletes."""
    if resume and force:
        raise CircuitkitError("give --resume or --force, not both")
    check_writable_dir(out, "the output model folder (out)")
    check_writable_dir(run_dir, "the run folder (run_dir)")
    ck = run_dir / CHECKPOINT_FILE
    if resume:
        if not ck.exists():
            raise CircuitkitError(f"--resume: no checkpoint at {ck}; run without --resume to start fresh")
        return
    if force:
        if main:
            ck.unlink(missing_ok=True)
        return
    if (out / CARD_FILE).exists():
        raise CircuitkitError(f"{out} already holds a model; pass --force to replace it, --resume to continue the run "
                              f"that made it (its checkpoint in {run_dir}, e.g. with more --steps), or another --out")
    if ck.exists():
        raise CircuitkitError(f"{run_dir} holds the checkpoint of an earlier run; pass --resume to continue it, "
                              "or --force to start over (the checkpoint and its log are discarded)")


def _plain(obj: Any) -> Any:
    """``obj`` as JSON would read it back (tuples become lists), for comparing configs."""
    return json.loads(json.dumps(obj, default=str))


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, data_gen: torch.Generator, extra: dict[str, Any] | None = None, *,
                    kind: RunKind, config: Any) -> Path:
    """Everything needed to continue exactly, and what run it is, in one atomically written file."""
    path = Path(run_dir) / CHECKPOINT_FILE
    torch_save({"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "rng": rng_state(data_gen), "extra": extra or {}, "kind": kind.value,
                "config": _plain(asdict(config))}, path)
    return path


def load_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, data_gen: torch.Generator, *, kind: RunKind,
                    config: Any) -> tuple[int, dict[str, Any]]:
    """Restore the state saved by :func:`save_checkpoint`; returns ``(step, extra)``.

    Refused when the checkpoint is of another kind of run, or when ``config`` differs from the
    one it was written with in anything but :data:`RESUMABLE_CHANGES`.
    """
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.exists():
        raise CircuitkitError(f"--resume: no checkpoint at {path}; run without --resume to start fresh")
    try:
        ck = torch.load(path, weights_only=False)
    except Exception as e:  # a corrupt file: say so rather than show a pickle trace
        raise CircuitkitError(f"could not read checkpoint {path}: {e}; delete it to start fresh") from None
    saved_kind = ck.get("kind") or (RunKind.SPARSIFY.value if "geco" in ck.get("extra", {}) else RunKind.TRAIN.value)
    if saved_kind != kind.value:
        raise CircuitkitError(f"{path} is the checkpoint of a `{RunKind(saved_kind).command}` run; resume it with "
                              f"`{RunKind(saved_kind).command} --resume`, or give {kind.command} another run_dir")
    if "config" in ck:
        saved, now = ck["config"], _plain(asdict(config))
        changed = sorted(k for k in set(saved) | set(now)
                         if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
        if changed:
            diff = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
            raise CircuitkitError(f"--resume: the config differs from the one {path} was written with ({diff}); "
                                  f"a resumed run may change only {', '.join(sorted(RESUMABLE_CHANGES))}. "
                                  "Restore those settings, or start over with --force")
    try:
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
    except (RuntimeError, ValueError) as e:
        raise CircuitkitError(f"{path} does not fit this model: {str(e).splitlines()[0]}") from None
    if scheduler is not None and ck["scheduler"] is not None:
        scheduler.load_state_dict(ck["scheduler"])
    set_rng_state(data_gen, ck["rng"])
    return ck["step"], ck["extra"]


def _read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a log.jsonl; a torn last line (a run killed mid-write) is dropped."""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    out = []
    for i, ln in enumerate(lines):
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # killed mid-write; a step's line is written before its checkpoint, so it is past the last one
            raise CircuitkitError(f"{path}: line {i + 1} is not JSON and not the last line; the log is damaged "
                                  "(restore it, or start over with --force)") from None
    return out


def read_run_log(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The step records of the run in ``run_dir`` (its ``log.jsonl``), for reading a run that is
    finished, stopped or still going; a torn last line is dropped."""
    path = Path(run_dir) / LOG_FILE
    if not path.is_file():
        raise CircuitkitError(f"no step log at {path}: give the run folder of a `circuitkit train` or "
                              "`circuitkit sparsify` run (its run_dir), which holds log.jsonl")
    records = _read_log(path)
    if not records:
        raise CircuitkitError(f"{path} has no steps yet; wait for the run's first step")
    return records


class StepLog:
    """Per-step JSON lines next to the checkpoint; on resume, lines past the checkpoint are dropped."""

    def __init__(self, run_dir: Path, resume_step: int | None = None) -> None:
        self.path = Path(run_dir) / LOG_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.exists():
            kept = [r for r in _read_log(self.path) if r["step"] <= resume_step]
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._fh = open(self.path, "a")

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

    def records(self) -> list[dict[str, Any]]:
        return _read_log(self.path)


def lr_lambda(warmup: int, total: int, min_fraction: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return min_fraction + (1 - min_fraction) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, total_steps: int):
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup, total_steps, cfg.min_lr_fraction))
    return opt, sched


# ---------------------------------------------------------------- the loop

TOKENIZER_DIR = "tokenizer"  # in run_dir: the tokenizer a language-model run trained, reused on --resume
CORPUS_FILE = "corpus.json"  # in run_dir: the corpus manifest, checked on --resume


def _new_model(cfg: TrainConfig, run_dir: Path, resume: bool) -> HookedTransformer:
    """The untrained model: a toy on the task vocabulary, or a language model whose vocabulary
    is a BPE tokenizer trained on the corpus's train split (kept in ``run_dir`` for resumes)."""
    if not cfg.corpus:
        return build_model(toy_config(cfg.arch, seed=cfg.seed))
    if cfg.init_from:
        model = _init_model(cfg)
        save_tokenizer(model.tokenizer, run_dir / TOKENIZER_DIR)  # the run's tokenizer, as a run from scratch keeps it
        return model
    tok_dir = run_dir / TOKENIZER_DIR
    if not (resume and tok_dir.exists()):
        if is_code_corpus(cfg.corpus):
            texts = code_corpus(cfg.corpus, seed=cfg.corpus_seed,
                                heldout_fraction=cfg.corpus_heldout_fraction).texts("train")
        else:  # other text is split by rows after tokenising; the tokenizer sees all of it (documented)
            texts = read_documents(cfg.corpus)
        save_tokenizer(train_tokenizer(texts, cfg.tokenizer_vocab), tok_dir)
    tok = load_local_tokenizer(tok_dir)
    model = build_model(toy_config(cfg.arch, seed=cfg.seed, d_vocab=len(tok)))
    set_local_tokenizer(model, tok)
    return model


ARCH_KEYS = ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "n_ctx")


def _init_model(cfg: TrainConfig) -> HookedTransformer:
    """``cfg.init_from``'s weights and tokenizer: a language model trained here, trained further. Refused,
    with what to change, unless it is a dense model with its own tokenizer and ``cfg.arch``'s shape."""
    path = resolve_path(cfg.init_from)
    if path is None:
        raise CircuitkitError(f"init_from = {cfg.init_from!r} is not a model folder or zoo name; give a language "
                              "model trained by circuitkit train (its folder holds card.json and tokenizer.json)")
    if (path / SPARSITY_FILE).exists():
        raise CircuitkitError(f"init_from = {cfg.init_from!r} is a sparse model; circuitkit train continues a dense "
                              "language model (continue a sparse one with circuitkit sparsify and its init_from)")
    model = load_model(path)
    if model.circuitkit_card.get("tokenizer") != TOKENIZER_FILE:
        raise CircuitkitError(f"init_from = {cfg.init_from!r} has no tokenizer of its own ({TOKENIZER_FILE}); "
                              "circuitkit train continues a language model trained here on a corpus")
    want = toy_config(cfg.arch, d_vocab=model.cfg.d_vocab)
    diff = [f"{k} {getattr(model.cfg, k)} (config: {getattr(want, k)})" for k in ARCH_KEYS
            if getattr(model.cfg, k) != getattr(want, k)]
    if diff:
        raise CircuitkitError(f"init_from = {cfg.init_from!r} does not have this config's arch: {', '.join(diff)}; "
                              "set arch to the model's shape")
    model.train()
    return model


def check_same_corpus(model: HookedTransformer, data: TrainingData) -> None:
    """A language model trained here is trained further (``init_from``) or post-trained (``circuitkit
    sparsify``) on the corpus it was trained on: the held-out files must be the ones its card names,
    never files it trained on."""
    trained_on = getattr(model, "circuitkit_card", {}).get("corpus", {})
    want = trained_on.get("hash") if isinstance(trained_on, dict) else None
    have = data.corpus.manifest["hash"] if data.corpus is not None and data.corpus.manifest else None
    if want and have and want != have:
        raise CircuitkitError(f"the corpus built here (hash {have[:12]}) is not the one the base model was trained on "
                              f"(hash {want[:12]}, its card's corpus entry): another Python version or changed files, "
                              "or another corpus_seed / corpus_heldout_fraction. Use the same settings as the base "
                              "model's train_config, on a machine with the same standard library")


def _check_corpus(data: TrainingData, run_dir: Path, resume: bool) -> None:
    """Record the corpus manifest; on resume, refuse a corpus that differs from the recorded one."""
    if data.corpus is None or data.corpus.manifest is None:
        return
    path = run_dir / CORPUS_FILE
    now = data.corpus.manifest
    if resume and path.exists():
        was = read_json(path)
        if was.get("hash") != now["hash"]:
            raise CircuitkitError(f"--resume: the corpus built now (hash {now['hash'][:12]}) differs from the one this "
                                  f"run started on ({str(was.get('hash'))[:12]}, {path}): another Python version or "
                                  "changed files. Resume on the machine that started the run, or start over with --force")
        return
    write_json(path, now)


@torch.no_grad()
def _lm_eval(model: HookedTransformer, data: TrainingData, n: int) -> dict[str, float]:
    """Held-out CE and train CE, each on ``n`` rows spread evenly over the split."""
    c = data.corpus
    return {"heldout_ce": corpus_ce(model, c.rows("heldout", n)), "train_ce": corpus_ce(model, c.rows("train", n))}


def _lm_card(cfg: TrainConfig, model: HookedTransformer, data: TrainingData, step: int) -> dict[str, Any]:
    c = data.corpus
    n = min(cfg.eval_n, c.heldout.shape[0])
    ev = _lm_eval(model, data, n)
    held_stream = c.heldout[:, 1:] if c.bos_id is not None else c.heldout
    big = bigram_ce(c.train_stream if c.train_stream is not None else c.train.flatten(), held_stream.flatten(),
                    model.cfg.d_vocab)
    m = c.manifest or {}
    return {"heldout_ce": ev["heldout_ce"], "train_ce": ev["train_ce"], "bigram_heldout_ce": big["ce"],
            "bigram_lambda": big["lambda"], "unigram_heldout_ce": big["unigram_ce"],
            "eval_rows": n, "seq_len": c.seq_len, "tokens_seen": step * cfg.batch_size * c.seq_len,
            "corpus": {"source": cfg.corpus, "hash": m.get("hash"), "python": m.get("python"),
                       "n_files": m.get("n_files"), "bytes": m.get("bytes"),
                       "train_tokens": int(c.train_stream.numel()) if c.train_stream is not None else int(c.train.numel()),
                       "heldout_tokens": int(held_stream.numel()),
                       "heldout_files": [f["path"] for f in m.get("files", []) if f["split"] == "heldout"]},
            "tokenizer_vocab": len(model.tokenizer)}


@deterministic_algorithms()  # the same config and seed give the same model
def train(cfg: TrainConfig, resume: bool = False, max_steps: int | None = None, progress: bool = True,
          command: str | None = None, force: bool = False) -> dict[str, Any]:
    """Train ``cfg`` from scratch (or resume), write the final model to ``cfg.out``.

    A toy model trains on its task mixture; with ``cfg.corpus`` a language model trains on
    next-token CE over corpus windows, with its tokenizer saved beside it. ``max_steps`` stops
    early after that many total steps (leaving a checkpoint), which is how tests interrupt a
    run. Returns the card written (or the partial state). A finished model in ``cfg.out`` or a
    checkpoint in ``cfg.run_dir`` is replaced only with ``force`` (see :func:`prepare_run`).
    """
    run_dir = Path(cfg.run_dir)
    prepare_run(run_dir, Path(cfg.out), RunKind.TRAIN, resume, force)
    run_dir.mkdir(parents=True, exist_ok=True)
    model = _new_model(cfg, run_dir, resume)
    data = TrainingData(model, cfg.tasks, cfg.task_options, cfg.corpus, seq_len=cfg.corpus_seq_len,
                        heldout_fraction=cfg.corpus_heldout_fraction, max_tokens=cfg.corpus_max_tokens,
                        seed=cfg.corpus_seed, repeat_fraction=cfg.corpus_repeat_fraction,
                        repeat_min=cfg.corpus_repeat_min)
    if cfg.init_from:
        check_same_corpus(model, data)
    _check_corpus(data, run_dir, resume)
    lm = data.corpus is not None
    opt, sched = make_optimizer(model, cfg, cfg.steps)
    data_gen = torch.Generator().manual_seed(cfg.seed + 1)
    torch.manual_seed(cfg.seed + 2)
    step, extra = 0, {"wall_time_s": 0.0}
    if resume:
        step, extra = load_checkpoint(run_dir, model, opt, sched, data_gen, kind=RunKind.TRAIN, config=cfg)
    log = StepLog(run_dir, resume_step=step if resume else None)
    write_json(run_dir / "config.json", asdict(cfg))
    stop = min(cfg.steps, max_steps) if max_steps is not None else cfg.steps
    t0, wall0 = time.time(), extra["wall_time_s"]
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc=cfg.name, disable=not progress, dynamic_ncols=True)
    try:
        while step < stop:
            tokens, mask, _ = data.sample(cfg.batch_size, data_gen)
            logits = model(tokens)
            loss = masked_ce(logits, tokens, mask)
            if not torch.isfinite(loss):
                raise CircuitkitError(f"loss became {loss.item()} at step {step}; the last good checkpoint in "
                                      f"{run_dir} is intact. Lower lr (now {cfg.lr}) and rerun with --resume")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            rec = {"step": step, "loss": loss.item(), "lr": sched.get_last_lr()[0]}
            if not lm:
                rec["accuracy"] = masked_accuracy(logits.detach(), tokens, mask).item()
            if step % cfg.eval_every == 0 or step == cfg.steps:
                rec["eval"] = (_lm_eval(model, data, min(cfg.eval_n, 200)) if lm
                               else evaluate(model, data.tasks, n=min(cfg.eval_n, 500)))
                model.train()
            log.write(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", **({} if lm else {"acc": f"{rec['accuracy']:.3f}"}),
                            **({"heldout": f"{rec['eval']['heldout_ce']:.3f}"} if lm and "eval" in rec else {}))
            if step % cfg.checkpoint_every == 0 or step == stop:
                extra = {"wall_time_s": wall0 + time.time() - t0}
                save_checkpoint(run_dir, step, model, opt, sched, data_gen, extra, kind=RunKind.TRAIN, config=cfg)
    finally:
        bar.close()
        log.close()
    wall = wall0 + time.time() - t0
    if step < cfg.steps:
        return {"step": step, "wall_time_s": wall, "finished": False}
    card = {"name": cfg.name, "arch": cfg.arch, "tasks": cfg.tasks, "task_options": cfg.task_options,
            "seed": cfg.seed, "steps": step, "batch_size": cfg.batch_size, "wall_time_s": round(wall, 1),
            "command": command, "train_config": asdict(cfg)}
    if lm:
        card.update(_lm_card(cfg, model, data, step))
        if cfg.init_from:
            was = model.circuitkit_card  # the card init_from's model was loaded with
            card["init_from"] = {k: was.get(k) for k in ("name", "steps", "tokens_seen", "heldout_ce", "train_ce",
                                                         "wall_time_s")}
            card["tokens_seen_total"] = card["tokens_seen"] + int(was.get("tokens_seen") or 0)
    else:
        card["heldout"] = evaluate(model, data.tasks, n=cfg.eval_n, seed=12345)
    save_model(model, cfg.out, card)
    return card
