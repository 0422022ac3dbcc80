"""Training toy models from scratch, and the pieces every training loop here shares.

Owns: the TOML training config, sampling a weighted mixture of tasks into one padded
batch, the masked next-token loss, held-out evaluation (accuracy, metric, CE per task),
and the checkpoint/resume machinery. A checkpoint holds the model, the optimizer, the
scheduler, every random-number state and the step, and is written atomically, so
``--resume`` continues exactly: the losses after resuming equal those of a run that was
never interrupted. The sparse post-training loop (:mod:`circuitkit.sparsity.finetune`)
reuses the same pieces.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from circuitkit import CircuitkitError
from circuitkit.io import TomlConfig, check_keys, torch_save, write_json
from circuitkit.models import build_model, save_model, toy_config
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

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "TrainConfig":
        check_keys(raw, set(cls.__dataclass_fields__), {"name", "out", "run_dir", "tasks"}, source)
        cfg = cls(**raw)
        if not cfg.tasks or any(w <= 0 for w in cfg.tasks.values()):
            raise CircuitkitError(f"{source}: [tasks] needs at least one task with a positive weight")
        for k in ("steps", "batch_size", "checkpoint_every", "eval_n"):
            if getattr(cfg, k) <= 0:
                raise CircuitkitError(f"{source}: {k} must be positive")
        return cfg


# ---------------------------------------------------------------- data

def build_tasks(tasks: dict[str, float], options: dict[str, dict[str, Any]] | None = None) -> dict[str, Task]:
    options = options or {}
    return {name: get_task(name, **options.get(name, {})) for name in tasks}


def sample_mixture(tasks: dict[str, Task], weights: dict[str, float], n: int,
                   generator: torch.Generator, pad_id: int = VOCAB.pad_id) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` training sequences from a weighted task mixture, right-padded.

    Returns ``tokens`` [n, pos] and ``loss_mask`` [n, pos] (bool). Task counts are drawn
    from ``generator``, as is everything inside each task.
    """
    names = list(tasks)
    w = torch.tensor([float(weights[k]) for k in names])
    choice = torch.multinomial(w / w.sum(), n, replacement=True, generator=generator)
    parts = []
    for i, name in enumerate(names):
        k = int((choice == i).sum())
        if k:
            parts.append(tasks[name].train_batch(k, generator))
    width = max(t.shape[1] for t, _ in parts)
    tokens = torch.cat([F.pad(t, (0, width - t.shape[1]), value=pad_id) for t, _ in parts])
    mask = torch.cat([F.pad(m, (0, width - m.shape[1]), value=False) for _, m in parts])
    return tokens, mask


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


def heldout_ce(model: HookedTransformer, tasks: dict[str, Task], weights: dict[str, float] | None = None,
               n: int = 1000, seed: int = 12345) -> float:
    """The mixture-weighted held-out CE (see :func:`evaluate`)."""
    res = evaluate(model, tasks, n=n, seed=seed)
    weights = weights or {k: 1.0 for k in tasks}
    total = sum(weights[k] for k in tasks)
    return sum(res[k]["ce"] * weights[k] for k in tasks) / total


# ---------------------------------------------------------------- checkpoints

def rng_state(data_gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"data": data_gen.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(data_gen: torch.Generator, state: dict[str, torch.Tensor]) -> None:
    data_gen.set_state(state["data"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, data_gen: torch.Generator, extra: dict[str, Any] | None = None) -> Path:
    """Everything needed to continue exactly, in one atomically written file."""
    path = Path(run_dir) / CHECKPOINT_FILE
    torch_save({"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "rng": rng_state(data_gen), "extra": extra or {}}, path)
    return path


def load_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, data_gen: torch.Generator) -> tuple[int, dict[str, Any]]:
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.exists():
        raise CircuitkitError(f"--resume: no checkpoint at {path}; run without --resume to start fresh")
    try:
        ck = torch.load(path, weights_only=False)
    except Exception as e:  # a corrupt file: say so rather than show a pickle trace
        raise CircuitkitError(f"could not read checkpoint {path}: {e}; delete it to start fresh") from None
    model.load_state_dict(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    if scheduler is not None and ck["scheduler"] is not None:
        scheduler.load_state_dict(ck["scheduler"])
    set_rng_state(data_gen, ck["rng"])
    return ck["step"], ck["extra"]


class StepLog:
    """Per-step JSON lines next to the checkpoint; on resume, lines past the checkpoint are dropped."""

    def __init__(self, run_dir: Path, resume_step: int | None = None) -> None:
        self.path = Path(run_dir) / LOG_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln)["step"] <= resume_step]
        self.path.write_text("".join(ln + "\n" for ln in kept))
        self._fh = open(self.path, "a")

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]


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
          command: str | None = None) -> dict[str, Any]:
    """Train ``cfg`` from scratch (or resume), write the final model to ``cfg.out``.

    ``max_steps`` stops early after that many total steps (leaving a checkpoint), which
    is how tests interrupt a run. Returns the card written (or the partial state).
    """
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(toy_config(cfg.arch, seed=cfg.seed))
    tasks = build_tasks(cfg.tasks, cfg.task_options)
    opt, sched = make_optimizer(model, cfg, cfg.steps)
    data_gen = torch.Generator().manual_seed(cfg.seed + 1)
    torch.manual_seed(cfg.seed + 2)
    step, extra = 0, {"wall_time_s": 0.0}
    if resume:
        step, extra = load_checkpoint(run_dir, model, opt, sched, data_gen)
    log = StepLog(run_dir, resume_step=step if resume else None)
    write_json(run_dir / "config.json", asdict(cfg))
    stop = min(cfg.steps, max_steps) if max_steps is not None else cfg.steps
    t0, wall0 = time.time(), extra["wall_time_s"]
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc=cfg.name, disable=not progress, dynamic_ncols=True)
    try:
        while step < stop:
            tokens, mask = sample_mixture(tasks, cfg.tasks, cfg.batch_size, data_gen)
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
                save_checkpoint(run_dir, step, model, opt, sched, data_gen, extra)
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


# ---------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="TOML training config (see analyses/zoo/*.toml)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in run_dir")
    p.add_argument("--steps", type=int, help="override the number of steps")
    p.add_argument("--out", help="override the output model folder")
    p.add_argument("--run-dir", help="override the checkpoint folder")
    p.add_argument("--no-progress", action="store_true")


def run_cli(args: argparse.Namespace) -> int:
    cfg = TrainConfig.from_toml(args.config, steps=args.steps, out=args.out, run_dir=args.run_dir)
    command = "circuitkit " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    card = train(cfg, resume=args.resume, progress=not args.no_progress, command=command)
    print(json.dumps({k: card[k] for k in ("name", "steps", "wall_time_s", "heldout") if k in card}, indent=2))
    return 0
