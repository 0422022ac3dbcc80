"""Training toy models from scratch, and the pieces every training loop here shares.

Owns: the TOML training config, sampling a weighted mixture of tasks into one padded
batch, the masked next-token loss, held-out evaluation (accuracy, metric, CE per task),
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
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from circuitkit import CircuitkitError
from circuitkit.io import (FRACTION, NON_NEGATIVE, POSITIVE, TomlConfig, check_writable_dir, torch_save, write_json,
                           write_text)
from circuitkit.models import CARD_FILE, build_model, save_model, toy_config
from circuitkit.tasks import Task, get_task
from circuitkit.tasks.vocab import VOCAB

CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "log.jsonl"


# ---------------------------------------------------------------- config

@dataclass(frozen=True)
class TrainConfig(TomlConfig):
    """What ``circuitkit train`` reads from TOML. Unknown keys are an error."""

    name: str
    out: str  # the final model folder (card + safetensors)
    run_dir: str  # checkpoints and the per-step log
    tasks: dict[str, float]  # task name -> mixture weight
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict)
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

    REQUIRED = frozenset({"name", "out", "run_dir", "tasks"})
    RANGES = {"seed": NON_NEGATIVE, "steps": POSITIVE, "batch_size": POSITIVE, "lr": POSITIVE,
              "weight_decay": NON_NEGATIVE, "warmup": NON_NEGATIVE, "min_lr_fraction": FRACTION,
              "grad_clip": POSITIVE, "checkpoint_every": POSITIVE, "eval_every": POSITIVE, "eval_n": POSITIVE}

    def check(self, source: str) -> None:
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


# ---------------------------------------------------------------- checkpoints

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


# Config fields a resume may change: the length of the run and where its files go.
RESUMABLE_CHANGES = frozenset({"steps", "out", "run_dir"})


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
                                  "a resumed run may change only steps (and out/run_dir). Restore those settings, "
                                  "or start over with --force")
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

def train(cfg: TrainConfig, resume: bool = False, max_steps: int | None = None, progress: bool = True,
          command: str | None = None, force: bool = False) -> dict[str, Any]:
    """Train ``cfg`` from scratch (or resume), write the final model to ``cfg.out``.

    ``max_steps`` stops early after that many total steps (leaving a checkpoint), which
    is how tests interrupt a run. Returns the card written (or the partial state). A
    finished model in ``cfg.out`` or a checkpoint in ``cfg.run_dir`` is replaced only with
    ``force`` (see :func:`prepare_run`).
    """
    run_dir = Path(cfg.run_dir)
    prepare_run(run_dir, Path(cfg.out), RunKind.TRAIN, resume, force)
    run_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(toy_config(cfg.arch, seed=cfg.seed))
    tasks = build_tasks(cfg.tasks, cfg.task_options)
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
            tokens, mask, _ = sample_mixture(tasks, cfg.tasks, cfg.batch_size, data_gen)
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
            acc = masked_accuracy(logits.detach(), tokens, mask).item()
            rec = {"step": step, "loss": loss.item(), "accuracy": acc, "lr": sched.get_last_lr()[0]}
            if step % cfg.eval_every == 0 or step == cfg.steps:
                rec["eval"] = evaluate(model, tasks, n=min(cfg.eval_n, 500))
                model.train()
            log.write(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", acc=f"{acc:.3f}")
            if step % cfg.checkpoint_every == 0 or step == stop:
                extra = {"wall_time_s": wall0 + time.time() - t0}
                save_checkpoint(run_dir, step, model, opt, sched, data_gen, extra, kind=RunKind.TRAIN, config=cfg)
    finally:
        bar.close()
        log.close()
    wall = wall0 + time.time() - t0
    if step < cfg.steps:
        return {"step": step, "wall_time_s": wall, "finished": False}
    metrics = evaluate(model, tasks, n=cfg.eval_n, seed=12345)
    card = {"name": cfg.name, "arch": cfg.arch, "tasks": cfg.tasks, "task_options": cfg.task_options,
            "seed": cfg.seed, "steps": step, "batch_size": cfg.batch_size, "wall_time_s": round(wall, 1),
            "heldout": metrics, "command": command, "train_config": asdict(cfg)}
    save_model(model, cfg.out, card)
    return card
