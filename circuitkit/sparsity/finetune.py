"""``circuitkit sparsify``: sparse post-training of a model under a CE constraint.

Loads a base model (zoo name, checkpoint folder or pretrained name), attaches gates
(:mod:`~circuitkit.sparsity.gates`) in training mode, and finetunes all weights on the
GECO Lagrangian (:mod:`~circuitkit.sparsity.objective`): minimise the expected density of
kept attention edges (and/or active MLP neurons) while the CE stays at
``target = base held-out CE × (1 + tolerance)`` (or an absolute ``target_ce``; a corpus run sets it from
train rows and is judged on held-out CE against ``heldout_tolerance``, by default the same). Data is a
task mixture (toy models, or NL tasks on pretrained models) or a text corpus
(:mod:`circuitkit.corpus`).

Reuses :mod:`circuitkit.training`: the frozen TOML config, ``sample_mixture``,
``masked_ce``, ``heldout``, atomic checkpoints with every RNG state (and the run's kind and
config, checked on resume), ``prepare_run`` (nothing finished is overwritten unless asked),
``StepLog``, ``make_optimizer``. The GECO state (ρ, EMA), the target and the base metrics
travel in the checkpoint's ``extra``; gate noise is drawn from a generator re-seeded from
(seed, step) every step, so ``--resume`` continues exactly.

Data parallel: run the same command under ``torchrun --nproc_per_node=N`` (gloo on CPU,
nccl on GPU). Every rank draws the same global batch and takes its slice (and the same
slice of the gate noise), DDP averages the gradients, the constraint's CE is reduced over
all ranks so λ is identical everywhere, and only rank 0 writes.

A final phase (``final_hard_steps``) can run with deterministic straight-through gates
(forward exactly as in evaluation), so the weights adapt to the gates that will be kept;
``final_sparsity_weight`` scales the sparsity term there (0: recover the CE only, which
keeps the needed edges away from the gate threshold instead of pressing them onto it).
``init_from`` starts the weights from a sparse model made from the same base with the same gates (a
shipped model whose run folder is gone); the targets still come from the base model, and the
optimiser, the schedule and the GECO state start afresh (``rho_init``).
``attn_layer_weights`` weighs each layer's attention density in ``S_attn`` (for a layer the
uniform penalty leaves dense, as the 6-layer toy's layer 0) and ``attn_head_power`` < 1 makes
the term concave in each head's density (whole heads close rather than every head thinning);
like the final weight, a resumed run may change either.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from circuitkit import CircuitkitError
from circuitkit.io import (FRACTION, NON_NEGATIVE, POSITIVE, Range, TomlConfig, write_json,
                           write_text)
from circuitkit.models import SPARSITY_FILE, load_card, load_model, resolve_path
from circuitkit.sparsity.gates import GateConfig, GateMode, attach, check_layer_weights, gate_mode
from circuitkit.sparsity.measure import measure_sparsity
from circuitkit.sparsity.objective import Geco, GecoState, sparsity_objective
from circuitkit.sparsity.storage import read_sparsity_file, save_sparse_model
from circuitkit.training import (RunKind, StepLog, TrainingData, check_mixture, check_same_corpus,
                                 deterministic_algorithms, load_checkpoint, make_optimizer, prepare_run,
                                 save_checkpoint)

CSV_FILE = "log.csv"
DEFAULT_TOLERANCE = 0.05


# ---------------------------------------------------------------- config

@dataclass(frozen=True)
class SparsifyConfig(TomlConfig):
    """What ``circuitkit sparsify`` reads from TOML (and its flags). Unknown keys are an error."""

    name: str
    model: str  # base model: zoo name, checkpoint folder, or pretrained name (gpt2)
    out: str  # the sparse model folder (weights + card + sparsity.json)
    run_dir: str  # checkpoint, log.jsonl, log.csv
    # start from a sparse model's finetuned weights (zoo name or folder) made from `model` with the same gates; the
    # base model still sets the targets. The way to continue a shipped model when its run folder is gone.
    init_from: str | None = None
    tasks: dict[str, float] = field(default_factory=dict)  # task -> mixture weight (or use corpus)
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    corpus: str | None = None  # stdlib[:FOLDER], .txt/.jsonl file or folder, or hf:NAME[:CONFIG]
    corpus_seq_len: int = 128
    corpus_heldout_fraction: float = 0.05
    corpus_seed: int = 0  # the file split of a code corpus (use the base model's)
    corpus_text_field: str = "text"
    corpus_max_tokens: int | None = None
    corpus_repeat_fraction: float = 0.0  # of each batch: a stretch of code repeated (as the base was trained)
    corpus_repeat_min: int = 8
    # gates
    attn: bool = True
    mlp: bool = False
    bias_gate: float = 3.0
    bias_gate_mlp: float = 3.0
    # objective
    w_attn: float = 1.0
    w_mlp: float = 1.0
    tolerance: float | None = None  # target = base CE × (1 + tolerance); default 0.05
    target_ce: float | None = None  # or an absolute target
    # corpus runs: the held-out criterion of the card (meets_target) is base held-out CE × (1 + this);
    # default: the constraint's tolerance (or target_ce). Lets a run hold its train CE tighter than the criterion.
    heldout_tolerance: float | None = None
    # task runs: the card's meets_accuracy (and the CLI's warning) when a task's held-out accuracy falls more than
    # this below the base's. A CE constraint can hold while accuracy goes: greater-than's CE is mostly the entropy of
    # its "any later year" label, so 5% of it is room to lose the years near YY.
    max_accuracy_drop: float = 0.01
    target_floor: float = 0.0  # targets are at least this (a base CE near 0 makes a relative target vanish)
    # one constraint (and λ) per task instead of one on the mixture CE; on a corpus run with repeats, one per part
    # of the batches: plain windows and repeat windows (docs/method.md §8)
    per_task_constraints: bool = False
    eta: float = 0.01
    ema_decay: float = 0.9
    rho_init: float = 0.0
    rho_min: float = -10.0
    rho_max: float = 10.0
    # optimisation
    seed: int = 0
    steps: int = 2000
    final_hard_steps: int = 0  # the last steps use deterministic straight-through gates
    final_sparsity_weight: float = 1.0  # multiplies w_attn, w_mlp in those last steps (0: recover CE only)
    # one weight per layer on its attention density: S_attn = mean over (layer, head) of weight[layer] × density
    # (None: every layer 1). Needs exactly n_layers values.
    attn_layer_weights: tuple[float, ...] | None = None
    # each head's attention density d enters S_attn as d ** attn_head_power: 1 is the paper's term (every kept edge
    # costs the same); below 1 the term is concave, so closing a head whole costs less than thinning every head
    attn_head_power: float = 1.0
    batch_size: int = 128  # global batch (split across data-parallel ranks)
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 100
    min_lr_fraction: float = 0.1
    grad_clip: float = 1.0
    # bookkeeping
    checkpoint_every: int = 500
    eval_every: int = 1000
    eval_n: int = 1000  # held-out examples (per task) for the final metrics
    target_n: int = 2000  # held-out examples (per task) for the base CE that sets the target
    measure_n: int = 2000  # held-out sequences (per task) for the kept-edge fractions
    log_heads: bool = True

    REQUIRED = frozenset({"name", "model", "out", "run_dir"})
    RANGES = {"corpus_seq_len": POSITIVE, "corpus_heldout_fraction": Range(0, 1, lo_open=True, hi_open=True),
              "corpus_seed": NON_NEGATIVE, "corpus_repeat_fraction": FRACTION, "corpus_repeat_min": POSITIVE,
              "corpus_max_tokens": POSITIVE, "w_attn": NON_NEGATIVE, "w_mlp": NON_NEGATIVE,
              "tolerance": NON_NEGATIVE, "heldout_tolerance": NON_NEGATIVE, "target_ce": POSITIVE,
              "max_accuracy_drop": FRACTION,
              "target_floor": NON_NEGATIVE, "eta": NON_NEGATIVE,
              "ema_decay": Range(0, 1, hi_open=True), "seed": NON_NEGATIVE, "steps": POSITIVE,
              "final_hard_steps": NON_NEGATIVE, "final_sparsity_weight": NON_NEGATIVE,
              "attn_head_power": Range(0, 1, lo_open=True), "batch_size": POSITIVE,
              "lr": POSITIVE, "weight_decay": NON_NEGATIVE, "warmup": NON_NEGATIVE, "min_lr_fraction": FRACTION,
              "grad_clip": POSITIVE, "checkpoint_every": POSITIVE, "eval_every": POSITIVE, "eval_n": POSITIVE,
              "target_n": POSITIVE, "measure_n": POSITIVE}

    def check(self, source: str) -> None:
        if not self.tasks and not self.corpus:
            raise CircuitkitError(f"{source}: give the data: tasks (--task addition / --tasks ioi=1,addition=1) "
                                  "or a text corpus (--corpus FILE)")
        if self.tasks and self.corpus:
            raise CircuitkitError(f"{source}: give either tasks or a corpus, not both")
        if self.tasks:
            check_mixture(self.tasks, self.task_options, source)
        if self.corpus and self.per_task_constraints and not 0 < self.corpus_repeat_fraction < 1:
            raise CircuitkitError(f"{source}: per_task_constraints on a corpus run holds one CE constraint on each "
                                  "part of the batches, plain windows and repeat windows; it needs 0 < "
                                  f"corpus_repeat_fraction < 1, got {self.corpus_repeat_fraction}. With one part "
                                  "there is one constraint: drop per_task_constraints")
        if self.tolerance is not None and self.target_ce is not None:
            raise CircuitkitError(f"{source}: give tolerance or target_ce, not both")
        if self.final_hard_steps > self.steps:
            raise CircuitkitError(f"{source}: final_hard_steps must be in [0, steps], got {self.final_hard_steps}")
        if self.rho_min > self.rho_max:
            raise CircuitkitError(f"{source}: rho_min ({self.rho_min}) must not exceed rho_max ({self.rho_max})")
        if not (self.attn or self.mlp):
            raise CircuitkitError(f"{source}: turn on at least one gate family: attn = true and/or mlp = true")
        if self.attn_layer_weights is not None:
            if not self.attn:
                raise CircuitkitError(f"{source}: attn_layer_weights weighs the attention gates; set attn = true "
                                      "or drop attn_layer_weights")
            bad = [w for w in self.attn_layer_weights if w < 0]
            if bad or not self.attn_layer_weights:
                raise CircuitkitError(f"{source}: attn_layer_weights must be one non-negative number per layer, "
                                      f"got {list(self.attn_layer_weights)!r}")

    @property
    def gate_config(self) -> GateConfig:
        return GateConfig(attn=self.attn, mlp=self.mlp, bias_gate=self.bias_gate, bias_gate_mlp=self.bias_gate_mlp)


def _tolerance(cfg: SparsifyConfig) -> float:
    return cfg.tolerance if cfg.tolerance is not None else DEFAULT_TOLERANCE


def constraint_target(cfg: SparsifyConfig, base_ce: float) -> float:
    """The CE one GECO constraint holds: ``max(target_ce or base_ce × (1 + tolerance), target_floor)``."""
    return max(cfg.target_ce if cfg.target_ce is not None else base_ce * (1 + _tolerance(cfg)), cfg.target_floor)


def heldout_target(cfg: SparsifyConfig, base_heldout_ce: float) -> float:
    """A corpus run's held-out criterion: base held-out CE × (1 + heldout_tolerance), by default the
    constraint's own tolerance (or its absolute target_ce)."""
    if cfg.heldout_tolerance is not None:
        return base_heldout_ce * (1 + cfg.heldout_tolerance)
    return cfg.target_ce if cfg.target_ce is not None else base_heldout_ce * (1 + _tolerance(cfg))


# ---------------------------------------------------------------- distributed

@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1


def _setup_dist(device: str) -> _Dist:
    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size())
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        dist.init_process_group(backend)
        return _Dist(dist.get_rank(), dist.get_world_size(), owns_group=True)
    return _Dist()


def _default_device() -> str:
    if torch.cuda.is_available() and os.environ.get("CIRCUITKIT_DEVICE", "") != "cpu":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return "cpu"


# ---------------------------------------------------------------- data source

# ---------------------------------------------------------------- the loop

def _noise_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7919 + 17) % (2 ** 63)


def _csv_from_records(records: list[dict[str, Any]]) -> str:
    rows = []
    for r in records:
        row = {k: v for k, v in r.items() if isinstance(v, (int, float, str)) or v is None}
        for k in ("attn_soft", "attn_hard", "mlp_soft", "mlp_hard"):
            for l, v in enumerate(r.get(k) or []):
                row[f"{k}_l{l}"] = v
        for k in ("attn_soft_head", "attn_hard_head"):
            for l, hs in enumerate(r.get(k) or []):
                for h, v in enumerate(hs):
                    row[f"{k}_l{l}h{h}"] = v
        rows.append(row)
    cols: list[str] = []
    for row in rows:
        cols += [c for c in row if c not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def task_nll(logits: torch.Tensor, tokens: torch.Tensor, loss_mask: torch.Tensor, row_task: torch.Tensor,
             n_tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token CE and the number of scored positions, per task.

    logits [batch, pos, d_vocab]; tokens, loss_mask [batch, pos]; row_task [batch] ->
    (sums [n_tasks] with gradient, counts [n_tasks]). ``sums / counts`` is each task's
    :func:`circuitkit.training.masked_ce`.
    """
    v = logits.shape[-1]
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), tokens[:, 1:].reshape(-1),
                          reduction="none").view(tokens.shape[0], -1)  # [batch, pos-1]
    m = loss_mask[:, :-1].to(nll.dtype)
    per_row, cnt_row = (nll * m).sum(-1), m.sum(-1)
    if n_tasks == 1:
        return per_row.sum().view(1), cnt_row.sum().view(1)
    sums = torch.zeros(n_tasks, dtype=nll.dtype, device=nll.device).index_add(0, row_task, per_row)
    counts = torch.zeros(n_tasks, dtype=nll.dtype, device=nll.device).index_add(0, row_task, cnt_row)
    return sums, counts


@dataclass(frozen=True)
class StepOutput:
    """What one sparse training step measured, reduced over data-parallel ranks."""

    states: list[GecoState]  # the constraints' GECO states after the step
    ce: float  # the task-weighted mixture CE of the global batch
    sparsity: float  # the sparsity objective (global mean)
    ce_task: torch.Tensor  # [n_tasks] float64, each task's masked CE
    present: torch.Tensor  # [n_tasks] bool, tasks with scored positions in the batch
    lams: torch.Tensor  # [n_constraints] float64, the λ this step used
    offset: float  # Σ λ (CE − target): the logged loss is w_scale · sparsity + offset
    packed: torch.Tensor  # [2 n_tasks + 1 + Σ density lengths] float64, the reduced statistics
    flat_keys: list[str]  # the density-report keys packed after the first 2 n_tasks + 1 numbers
    density: dict[str, Any]  # this rank's gate density report


def sparse_step(ddp_model, model, gates, opt, sched, tokens: torch.Tensor, mask: torch.Tensor,
                row_task: torch.Tensor, *, gecos: list[Geco], states: list[GecoState], targets: list[float],
                task_w: torch.Tensor, per_task: bool, w_attn: float, w_mlp: float, w_scale: float = 1.0,
                attn_layer_weights: tuple[float, ...] | None = None, attn_head_power: float = 1.0,
                grad_clip: float = 1.0, log_heads: bool = True, dd: _Dist | None = None, step: int = 0,
                run_dir: str | os.PathLike = "the run folder", lr: float | None = None) -> StepOutput:
    """One step of sparse post-training, the one ``circuitkit sparsify`` runs (and ``circuitkit bench`` times).

    tokens, mask [batch, pos] (this rank's rows); row_task [batch] (task index of each row);
    task_w [n_tasks] mixture weights. Clears the gate statistics, runs ``ddp_model`` on the
    batch, forms the GECO Lagrangian ``w_scale · sparsity + Σ_c λ_c (CE_c − target_c)``
    (CE_c the mixture CE, or ŵ_t·CE_t per task with ``per_task``), backpropagates, clips the
    gradient to ``grad_clip``, steps ``opt`` (and ``sched`` unless None) and updates each
    constraint's GECO state. The gates' mode and noise generator are the caller's to set.
    ``attn_layer_weights`` ([n_layers] or None) weighs each layer's attention density in S_attn;
    ``attn_head_power`` raises each head's density to that power first (:meth:`Gates.sparsity`).
    """
    dd = dd or _Dist()
    n_tasks = task_w.shape[0]
    gates.clear_stats()
    logits = ddp_model(tokens)
    sums, counts = task_nll(logits, tokens, mask, row_task, n_tasks)
    sp = gates.sparsity(attn_layer_weights, attn_head_power)
    s_total = sparsity_objective(sp["attn"], sp["mlp"], w_attn, w_mlp)
    dens = gates.density_report(heads=log_heads)
    # one reduction for everything the constraint and the log need
    flat_keys = sorted(k for k in dens if isinstance(dens[k], list))
    stats = [sums.detach(), counts, s_total.detach()]
    stats += [torch.tensor(_flatten(dens[k])) for k in flat_keys]
    packed = torch.cat([x.reshape(-1).to("cpu", torch.float64) for x in stats])
    if dd.on:
        packed = packed.to(sums.device)  # the training device
        dist.all_reduce(packed)
        packed = packed.cpu()
        packed[2 * n_tasks:] /= dd.world
    sums_g, counts_g = packed[:n_tasks], packed[n_tasks:2 * n_tasks]
    present = counts_g > 0
    ce_task = sums_g / counts_g.clamp(min=1)  # each task's masked CE over the global batch
    w_hat = torch.where(present, task_w / task_w[present].sum(), 0.0)  # [n_tasks]
    ce_g = float((w_hat * ce_task).sum())  # the task-weighted mixture CE
    s_g = float(packed[2 * n_tasks])
    lams = torch.tensor([st.lam for st in states], dtype=torch.float64)
    # CE part of the Lagrangian: Σ_c λ_c (CE_c − target_c), with CE_c the mixture CE (one constraint)
    # or ŵ_t·CE_t (one constraint per task); coef_t multiplies task t's summed NLL
    lam_t = lams.expand(n_tasks) if not per_task else lams
    coef = torch.where(present, lam_t * w_hat / counts_g.clamp(min=1), 0.0)
    values = [ce_g] if not per_task else ce_task.tolist()
    tgt = torch.tensor(targets, dtype=torch.float64)
    offset = float(lams[0] * (ce_g - tgt[0])) if not per_task else float(
        (torch.where(present, lams * w_hat * (ce_task - tgt), 0.0)).sum())
    if not (math.isfinite(ce_g) and math.isfinite(s_g)):
        raise CircuitkitError(
            f"loss became non-finite (CE {ce_g}, sparsity {s_g}) at step {step}; nothing from this step "
            f"was applied and the last good checkpoint in {run_dir} is intact. Lower lr (now {lr}) or "
            "eta and rerun with --resume")
    # this rank's share of it (DDP averages the gradients over ranks); the constant −λ·target is left out
    ce_term = (sums * (coef * dd.world).to(sums.device, sums.dtype)).sum()
    loss = (s_total * w_scale if w_scale != 1.0 else s_total) + ce_term
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if not torch.isfinite(gnorm):
        raise CircuitkitError(
            f"the gradient became non-finite at step {step} (CE {ce_g}); the weights were not updated and "
            f"the last good checkpoint in {run_dir} is intact. Lower lr (now {lr}) and rerun with --resume")
    opt.step()
    if sched is not None:
        sched.step()
    states = [g.update(st, v) if (not per_task or bool(present[i])) else st
              for i, (g, st, v) in enumerate(zip(gecos, states, values))]
    return StepOutput(states, ce_g, s_g, ce_task, present, lams, offset, packed, flat_keys, dens)


def _params_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def finetune(cfg: SparsifyConfig, resume: bool = False, max_steps: int | None = None, progress: bool = True,
             command: str | None = None, device: str | None = None,
             on_batch: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
             force: bool = False) -> dict[str, Any]:
    """Sparsify ``cfg.model``; write the sparse model to ``cfg.out`` and return its card.

    ``max_steps`` stops after that many total steps, leaving a checkpoint (how tests
    interrupt a run); the return value is then the partial state. ``on_batch(step, tokens,
    loss_mask)`` may replace a batch (tests poison one). Under ``torchrun`` (or inside an
    initialised process group) the run is data parallel; only rank 0 writes. A finished model
    in ``cfg.out`` or a checkpoint in ``cfg.run_dir`` is replaced only with ``force``
    (:func:`circuitkit.training.prepare_run`).
    """
    device = device or _default_device()
    dd = _setup_dist(device)
    if cfg.batch_size % dd.world:
        raise CircuitkitError(f"batch_size {cfg.batch_size} must divide evenly over {dd.world} processes")
    try:
        prepare_run(Path(cfg.run_dir), Path(cfg.out), RunKind.SPARSIFY, resume, force, main=dd.main)
        return _finetune(cfg, dd, resume, max_steps, progress, command, device, on_batch)
    finally:
        if dd.owns_group:
            dist.destroy_process_group()


def _same_model(a: str, b: str) -> bool:
    """Whether two model references (zoo names, folders or pretrained names) name the same model."""
    if a == b:
        return True
    pa, pb = resolve_path(a), resolve_path(b)
    return pa is not None and pb is not None and pa.resolve() == pb.resolve()


def load_init_weights(cfg: SparsifyConfig, model, device: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``cfg.init_from``'s finetuned weights (a state dict for ``model``, the base without gates) and what the
    card records of it. Refused, with what to change, unless it is a sparse model made from ``cfg.model``
    with the same architecture and the same gates as ``cfg`` (continuing another base's model, or with other
    gates, would silently mix two experiments). Called before the data load, so a bad one fails at once."""
    src = cfg.init_from
    path = resolve_path(src)
    if path is None or not (path / SPARSITY_FILE).exists():
        raise CircuitkitError(f"init_from = {src!r} is not a sparse model (a zoo name or folder holding "
                              f"{SPARSITY_FILE}, written by circuitkit sparsify); give the sparse model to continue, "
                              "or drop init_from to start from the base model")
    card = load_card(path)
    made_from = card.get("base_model")
    if not made_from or not _same_model(str(made_from), cfg.model):
        raise CircuitkitError(f"init_from = {src!r} was made from {made_from!r}, not from model = {cfg.model!r}; set "
                              f"model = {made_from!r} (its targets must come from the base it was made from)")
    gates, _ = read_sparsity_file(path / SPARSITY_FILE)
    if gates != cfg.gate_config:
        raise CircuitkitError(f"init_from = {src!r} has gates {gates.to_dict()} but this run has "
                              f"{cfg.gate_config.to_dict()}; set attn, mlp, bias_gate and bias_gate_mlp as "
                              f"{src!r} has them")
    init = load_model(path, device=device, gates=False)
    want, have = model.state_dict(), init.state_dict()
    bad = sorted(k for k in want if k not in have or have[k].shape != want[k].shape)
    if bad or set(have) - set(want):
        raise CircuitkitError(f"init_from = {src!r} does not have the architecture of model = {cfg.model!r} "
                              f"(first differing tensor: {(bad or sorted(set(have) - set(want)))[0]})")
    return have, {"model": src, "steps": card.get("steps"), "kept_edges": card.get("kept_edges"),
                  "heldout_ce": card.get("heldout_ce")}


@deterministic_algorithms()  # the same config and seed give the same model
def _finetune(cfg, dd: _Dist, resume, max_steps, progress, command, device, on_batch) -> dict[str, Any]:
    run_dir = Path(cfg.run_dir)
    if dd.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    model = load_model(cfg.model, device=device, gates=False)
    if cfg.attn_layer_weights is not None:  # before the data and the base CEs, which can take minutes
        check_layer_weights(cfg.attn_layer_weights, model.cfg.n_layers, cfg.model)
    init_state, init = load_init_weights(cfg, model, device) if cfg.init_from and not resume else (None, None)
    data = TrainingData(model, cfg.tasks, cfg.task_options, cfg.corpus, seq_len=cfg.corpus_seq_len,
                        heldout_fraction=cfg.corpus_heldout_fraction, text_field=cfg.corpus_text_field,
                        max_tokens=cfg.corpus_max_tokens, seed=cfg.corpus_seed,
                        repeat_fraction=cfg.corpus_repeat_fraction, repeat_min=cfg.corpus_repeat_min,
                        split_parts=bool(cfg.corpus) and cfg.per_task_constraints)
    check_same_corpus(model, data)
    step, base = 0, None
    if not resume:  # the base model's metrics (dense, before the gates) fix the target
        if dd.main:
            base = {"target_set": data.constraint_set(model, cfg.target_n), "eval_set": data.heldout(model, cfg.eval_n)}
        if dd.on:
            box = [base]
            dist.broadcast_object_list(box, src=0)
            base = box[0]
    if init_state is not None:  # after the base metrics, which the dense base's weights set
        model.load_state_dict(init_state)
        del init_state
    gates = attach(model, cfg.gate_config, GateMode.EVAL)
    opt, sched = make_optimizer(model, cfg, cfg.steps)
    data_gen = torch.Generator().manual_seed(cfg.seed + 1)
    torch.manual_seed(cfg.seed + 2)
    noise_gen = torch.Generator(device=device)
    gates.noise_generator = noise_gen
    local_b = cfg.batch_size // dd.world
    gates.noise_rows = (cfg.batch_size, dd.rank * local_b) if dd.on else None
    n_tasks, task_w = len(data.names), data.weights
    per_task = cfg.per_task_constraints
    if resume:
        step, extra = load_checkpoint(run_dir, model, opt, sched, data_gen, kind=RunKind.SPARSIFY, config=cfg)
        if "geco" not in extra or "targets" not in extra:
            raise CircuitkitError(f"{run_dir} holds a checkpoint that was not written by circuitkit sparsify")
        states = [GecoState.from_dict(d) for d in extra["geco"]]
        if "base_ce_constraints" in extra:  # the constraint may change on resume: targets from the stored base CEs
            extra["targets"] = [constraint_target(cfg, float(c)) for c in extra["base_ce_constraints"]]
    else:
        base_ce = float(base["target_set"]["ce"])
        if per_task:
            base_task = [float(base["target_set"]["per_task"][k]["ce"]) for k in data.names]
            targets = [constraint_target(cfg, c) for c in base_task]
        else:
            base_task, targets = [base_ce], [constraint_target(cfg, base_ce)]
        extra = {"wall_time_s": 0.0, "targets": targets, "base_ce": base_ce, "base_ce_constraints": base_task,
                 "base_heldout": base["eval_set"], "base_target_set": base["target_set"]["per_task"]}
        if init is not None:
            extra["init_from"] = init
        states = [GecoState(rho=cfg.rho_init) for _ in targets]
    targets = [float(t) for t in extra["targets"]]
    if len(targets) != (n_tasks if per_task else 1) or len(states) != len(targets):
        raise CircuitkitError(f"the checkpoint in {run_dir} has {len(targets)} constraint(s) but this config needs "
                              f"{n_tasks if per_task else 1} (per_task_constraints changed?)")
    gecos = [Geco(target=t, eta=cfg.eta, ema_decay=cfg.ema_decay, rho_min=cfg.rho_min, rho_max=cfg.rho_max)
             for t in targets]
    cnames = data.names if per_task else ["mixture"]

    ddp_model = model
    if dd.on:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [torch.device(device).index] if str(device).startswith("cuda") else None
        try:  # the buffers (causal masks) are identical on every rank: never sync them per forward
            ddp_model = DDP(model, device_ids=ids, forward_sync_buffers=False)
        except TypeError:  # older torch
            ddp_model = DDP(model, device_ids=ids, broadcast_buffers=False)

    log = StepLog(run_dir, resume_step=step if resume else None) if dd.main else None
    if dd.main:
        write_json(run_dir / "config.json", asdict(cfg))
    stop = min(cfg.steps, max_steps) if max_steps is not None else cfg.steps
    t0, wall0 = time.time(), float(extra.get("wall_time_s", 0.0))
    model.train()
    gates.collect = True
    bar = tqdm(total=cfg.steps, initial=step, desc=cfg.name, disable=not (progress and dd.main), dynamic_ncols=True)
    hard_from = cfg.steps - cfg.final_hard_steps
    try:
        while step < stop:
            final = step >= hard_from
            gates.mode = GateMode.HARD_ST if final else GateMode.TRAIN
            w_scale = cfg.final_sparsity_weight if final else 1.0
            noise_gen.manual_seed(_noise_seed(cfg.seed, step))
            tokens, mask, row_task = data.sample(cfg.batch_size, data_gen)
            if on_batch is not None:
                tokens, mask = on_batch(step, tokens, mask)
            if dd.on:
                rows = slice(dd.rank * local_b, (dd.rank + 1) * local_b)
                tokens, mask, row_task = tokens[rows], mask[rows], row_task[rows]
            tokens, mask, row_task = tokens.to(device), mask.to(device), row_task.to(device)
            out = sparse_step(ddp_model, model, gates, opt, sched, tokens, mask, row_task, gecos=gecos, states=states,
                              targets=targets, task_w=task_w, per_task=per_task, w_attn=cfg.w_attn, w_mlp=cfg.w_mlp,
                              w_scale=w_scale, attn_layer_weights=cfg.attn_layer_weights,
                              attn_head_power=cfg.attn_head_power, grad_clip=cfg.grad_clip, log_heads=cfg.log_heads,
                              dd=dd, step=step,
                              run_dir=run_dir, lr=cfg.lr)
            states, ce_g, s_g, ce_task, present = out.states, out.ce, out.sparsity, out.ce_task, out.present
            lams, offset, packed, flat_keys, dens = out.lams, out.offset, out.packed, out.flat_keys, out.density
            step += 1
            lam = float(lams.max())
            rec: dict[str, Any] = {"step": step, "ce": ce_g, "target": targets[0] if not per_task else None,
                                   "lam": lam, "rho": states[0].rho if not per_task else None,
                                   "ema_ce": states[0].ema if not per_task else None, "sparsity": s_g,
                                   "loss": w_scale * s_g + offset, "lr": sched.get_last_lr()[0],
                                   "mode": gates.mode.value, "sparsity_weight": w_scale}
            if cfg.attn_layer_weights is not None:
                rec["attn_layer_weights"] = list(cfg.attn_layer_weights)
            if cfg.attn_head_power != 1.0:
                rec["attn_head_power"] = cfg.attn_head_power
            if n_tasks > 1:
                rec["ce_task"] = {k: (float(ce_task[i]) if present[i] else None) for i, k in enumerate(data.names)}
            if per_task:
                rec["target_task"] = dict(zip(cnames, targets))
                rec["lam_task"] = dict(zip(cnames, lams.tolist()))
                rec["ema_ce_task"] = {k: st.ema for k, st in zip(cnames, states)}
            off = 2 * n_tasks + 1
            for k in flat_keys:
                n = len(_flatten(dens[k]))
                vals = packed[off:off + n].tolist()
                off += n
                rec[k] = _unflatten(vals, dens[k])
            for fam in ("attn", "mlp"):
                if f"{fam}_soft" in rec:
                    rec[f"{fam}_soft_mean"] = sum(rec[f"{fam}_soft"]) / len(rec[f"{fam}_soft"])
                    rec[f"{fam}_hard_mean"] = sum(rec[f"{fam}_hard"]) / len(rec[f"{fam}_hard"])
            if step % cfg.eval_every == 0 and step < cfg.steps:
                if dd.main:
                    rec["eval"] = _quick_eval(model, data, min(cfg.eval_n, 500), min(cfg.measure_n, 500))
                    model.train()
                if dd.on:
                    dist.barrier()
            if dd.main:
                log.write(rec)
            bar.update(1)
            post = {"ce": f"{ce_g:.4g}", "lam": f"{lam:.3g}"}
            if not per_task:
                post["tgt"] = f"{targets[0]:.4g}"
            if "attn_hard_mean" in rec:
                post["edges"] = f"{rec['attn_hard_mean']:.4f}"
            if "mlp_hard_mean" in rec:
                post["mlp"] = f"{rec['mlp_hard_mean']:.3f}"
            bar.set_postfix(post)
            if step % cfg.checkpoint_every == 0 or step == stop:
                if not _params_finite(model):
                    raise CircuitkitError(f"the weights became non-finite by step {step}; the checkpoint was not "
                                          f"overwritten and the last good one in {run_dir} is intact. Lower lr "
                                          f"(now {cfg.lr}) and rerun with --resume")
                if dd.main:
                    extra = {**extra, "wall_time_s": wall0 + time.time() - t0, "geco": [st.to_dict() for st in states]}
                    save_checkpoint(run_dir, step, model, opt, sched, data_gen, extra, kind=RunKind.SPARSIFY, config=cfg)
                    write_text(run_dir / CSV_FILE, _csv_from_records(log.records()))
                if dd.on:
                    dist.barrier()
    finally:
        bar.close()
        if log is not None:
            log.close()
        gates.collect = False
        gates.mode = GateMode.EVAL
        gates.clear_stats()
    wall = wall0 + time.time() - t0
    if step < cfg.steps:
        return {"step": step, "wall_time_s": wall, "finished": False, "geco": [st.to_dict() for st in states],
                "targets": targets}
    card: dict[str, Any] = {}
    if dd.main:
        card = _final_card(cfg, model, data, extra, states, step, wall, command)
        save_sparse_model(model, cfg.out, card)
    if dd.on:
        dist.barrier()
    return card


def _flatten(x) -> list[float]:
    if isinstance(x, list):
        out: list[float] = []
        for v in x:
            out += _flatten(v)
        return out
    return [float(x)]


def _unflatten(vals: list[float], like):
    it = iter(vals)

    def build(shape):
        if isinstance(shape, list):
            return [build(s) for s in shape]
        return next(it)

    return build(like)


@torch.no_grad()
def _quick_eval(model, data: TrainingData, n: int, n_measure: int) -> dict[str, Any]:
    model.eval()
    with gate_mode(model, GateMode.EVAL, collect=False):
        h = data.heldout(model, n)
    rep = measure_sparsity(model, data.measure_data(n_measure))
    out = {"ce": h["ce"], "kept_edges": rep.kept_edges}
    if rep.mlp_active is not None:
        out["mlp_active"] = rep.mlp_active
    if data.corpus is None:
        out["accuracy"] = {k: v["accuracy"] for k, v in h["per_task"].items()}
    return out


def _final_card(cfg, model, data: TrainingData, extra, states: list[GecoState], step: int, wall: float,
                command) -> dict[str, Any]:
    model.eval()
    with gate_mode(model, GateMode.EVAL, collect=False):
        h = data.heldout(model, cfg.eval_n)
        # on the rows that set the base's target (base_train_ce): plain train rows, or the batches' mixture,
        # and with repeats each part on its own rows
        train_set = data.constraint_set(model, cfg.target_n) if data.corpus is not None else None
    rep = measure_sparsity(model, data.measure_data(cfg.measure_n))
    base = extra["base_heldout"]
    targets = extra["targets"]
    if cfg.per_task_constraints:  # one target and one GECO state per task (per part of a corpus's batches)
        target: Any = dict(zip(data.names, targets))
        geco: Any = {k: {**st.to_dict(), "lam": st.lam} for k, st in zip(data.names, states)}
    else:
        target, geco = targets[0], {**states[0].to_dict(), "lam": states[0].lam}
    if data.corpus is not None:  # the constraints held train-window CE; the criterion is held-out CE
        held_target = heldout_target(cfg, base["ce"])
        meets = bool(h["ce"] <= held_target)
    elif cfg.per_task_constraints:
        meets = all(h["per_task"][k]["ce"] <= t for k, t in target.items())
    else:
        meets = bool(h["ce"] <= targets[0])
    card = {
        "name": cfg.name, "base_model": cfg.model, "init_from": extra.get("init_from"), "command": command,
        "wall_time_s": round(wall, 1),
        "steps": step, "seed": cfg.seed, "tasks": cfg.tasks, "task_options": cfg.task_options, "corpus": cfg.corpus,
        "corpus_hash": data.corpus.manifest["hash"] if data.corpus is not None and data.corpus.manifest else None,
        "target_ce": target, "base_heldout_ce": extra["base_ce"],
        "heldout_ce": h["ce"], "meets_target": meets,
        "heldout": h["per_task"], "heldout_base": base["per_task"],
        "kept_edges": rep.kept_edges if cfg.attn else None,
        "kept_edges_layer": [round(x, 6) for x in rep.kept_edges_layer] if cfg.attn else None,
        "kept_edges_head": [[round(x, 6) for x in r] for r in rep.kept_edges_head] if cfg.attn else None,
        "mlp_active": rep.mlp_active, "mlp_active_layer": rep.mlp_active_layer, "mlp_ever_active": rep.mlp_ever_active,
        "measured_on": {"sequences": rep.n_sequences, "split": "heldout", "seed": 12345},
        "geco": geco,
        "finetune_config": asdict(cfg),
    }
    if data.corpus is not None:
        card.update({"base_train_ce": extra["base_ce"], "base_heldout_ce": base["ce"], "heldout_target_ce": held_target,
                     "heldout_ce_ratio": h["ce"] / base["ce"],
                     "train_ce": train_set["ce"]})
        if data.corpus.repeat_fraction:  # each part's train CE, beside the base's on the same rows
            card["train_ce_parts"] = {k: v["ce"] for k, v in train_set["per_task"].items()}
            if "base_target_set" in extra:  # (not in checkpoints written before it was stored)
                card["base_train_ce_parts"] = {k: v["ce"] for k, v in extra["base_target_set"].items()}
    if data.corpus is None:
        card["accuracy_delta"] = {k: h["per_task"][k]["accuracy"] - base["per_task"][k]["accuracy"]
                                  for k in h["per_task"]}
        card["max_accuracy_drop"] = cfg.max_accuracy_drop
        card["meets_accuracy"] = all(-d <= cfg.max_accuracy_drop for d in card["accuracy_delta"].values())
    return card
