"""``circuitkit bench``: what attribution and sparse training cost, side by side with a peer.

Why: the claims "EAP costs about two forwards and a backward", "our scores equal
auto-circuit's" and "a gated step costs about a plain step" need numbers that anyone can
reproduce with one command. Parts (``--parts``, all by default):

- ``attribution``: ``eap`` and ``eap-ig`` on one batch against the *floor*, the bare model
  (no hooks, default TransformerLens flags) doing the same work: a no-grad forward on the
  corrupted prompts plus a forward and a backward on the clean prompts. The backward of the
  floor goes to the input activations only (what EAP needs); a floor whose backward also
  computes parameter gradients (a training backward) is reported beside it. eap-ig with
  ``m`` steps is compared with ``2 forwards + m × (forward + backward)``, and per step.
  Peak memory: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` in a fresh subprocess per
  measurement, minus the same value after loading the model and a 1-example warm-up
  (tracemalloc does not see torch's allocations).
- ``peer``: auto-circuit 1.0.1's ``mask_gradient_prune_scores`` (``mask_val=0``,
  ``grad_function="logit"``, ``answer_function="avg_diff"``, i.e. EAP) on a copy of the
  same ``HookedTransformer`` and the same clean/corrupted batch; edges are matched by name
  (:func:`peer_edge_name`) and compared (Pearson, top-50 overlap). A plain-autograd
  reference written here (:func:`reference_eap_scores`) is a second, independent check and
  the fallback when the peer cannot be imported.
- ``patching``: exact patching of every edge (time per edge, total).
- ``sparsity``: gated vs plain finetuning step, by ``scripts/bench_sparsity_step.py``.
- ``scaling``: floor, eap, eap-ig and the plain / gated step against sequence length and
  depth (random weights), as a table and ``figures/scaling.png`` / ``.svg``.

Timings are medians of ``--repeats`` runs after ``--warmup`` runs, with the variants of
one part interleaved round by round so background load hits them alike.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from circuitkit import CircuitkitError, __version__

PARTS = ("attribution", "peer", "patching", "sparsity", "scaling")
DEFAULT_MODEL = "toy-multitask"
FALLBACK_ARCH = "toy-4l"
PEER = "auto-circuit"
PEER_VERSION = "1.0.1"
TARGETS = {"eap_vs_floor": 1.5, "eap_ig_vs_floor": 1.5, "peer_time_ratio": 1.0, "peer_pearson": 0.999,
           "peer_top50": 50, "gated_vs_plain": 1.5}
TOP_K = 50
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_sparsity_step.py"


# ---------------------------------------------------------------- configuration

def _ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise CircuitkitError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise CircuitkitError(f"expected positive integers, got {text!r}")
    return vals


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated parts to run (default all: {','.join(PARTS)})")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"zoo name or checkpoint folder (default {DEFAULT_MODEL}; a random {FALLBACK_ARCH} "
                        f"model when it is not there); 'random:ARCH' for a random toy architecture")
    p.add_argument("--task", default="ioi", help="task whose clean/corrupted batch is attributed (default ioi)")
    p.add_argument("--batch", type=int, default=64, help="examples in the attributed batch (default 64)")
    p.add_argument("--ig-steps", type=int, default=5, help="eap-ig steps (default 5)")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (median; default 7)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--patching-repeats", type=int, default=2, help="timed runs of exact patching (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the peak-memory subprocesses")
    p.add_argument("--seq-mults", default="1,2,4", help="scaling: multiples of the task's prompt length")
    p.add_argument("--layers", default="2,4,8,12", help="scaling: layer counts (random weights)")
    p.add_argument("--scaling-arch", default=FALLBACK_ARCH, help="scaling: toy architecture widths")
    p.add_argument("--sparsity-batch", type=int, default=128, help="sparsity step batch (default 128)")
    p.add_argument("--sparsity-steps", type=int, default=30, help="sparsity steps per variant (default 30)")
    p.add_argument("--out", default="benchmarks", help="folder for NAME.json and NAME.md (default benchmarks)")
    p.add_argument("--name", default="bench", help="file stem of the results (default bench)")
    p.add_argument("--figure", default="figures/scaling",
                   help="scaling figure path without suffix; .png and .svg are written (default figures/scaling)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes for a smoke test (batch 4, 1 repeat, no memory, small scaling grid)")


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    parts = [x.strip() for x in str(args.parts).split(",") if x.strip()]
    bad = sorted(set(parts) - set(PARTS))
    if bad or not parts:
        raise CircuitkitError(f"unknown part(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(PARTS)}")
    cfg = dict(parts=parts, model=args.model, task=args.task, batch=args.batch, ig_steps=args.ig_steps,
               repeats=args.repeats, warmup=args.warmup, patching_repeats=args.patching_repeats,
               threads=args.threads, memory=args.memory, seq_mults=_ints(args.seq_mults),
               layers=_ints(args.layers), scaling_arch=args.scaling_arch, sparsity_batch=args.sparsity_batch,
               sparsity_steps=args.sparsity_steps, quick=args.quick)
    if args.quick:
        cfg.update(batch=min(cfg["batch"], 4), repeats=1, warmup=1, patching_repeats=1, memory=False,
                   seq_mults=[1, 2], layers=[1, 2], sparsity_batch=4, sparsity_steps=3, ig_steps=min(cfg["ig_steps"], 2))
    for key in ("batch", "ig_steps", "repeats", "patching_repeats", "threads", "sparsity_batch", "sparsity_steps"):
        if cfg[key] < 1:
            raise CircuitkitError(f"--{key.replace('_', '-')} must be at least 1, got {cfg[key]}")
    if cfg["warmup"] < 0:
        raise CircuitkitError(f"--warmup must be 0 or more, got {cfg['warmup']}")
    return cfg


# ---------------------------------------------------------------- models and data

def _load(model_spec: str):
    """(model, description) for a zoo name / folder, or a random toy model for 'random:ARCH'."""
    from circuitkit.models import build_model, load_model, resolve_path, toy_config

    if model_spec.startswith("random:"):
        arch = model_spec.split(":", 1)[1]
        return build_model(toy_config(arch, seed=0)).eval(), f"{arch} (random weights)"
    try:
        found = resolve_path(model_spec) is not None
    except CircuitkitError:
        found = False
    if not found and model_spec == DEFAULT_MODEL:
        return build_model(toy_config(FALLBACK_ARCH, seed=0)).eval(), \
            f"{FALLBACK_ARCH} (random weights; zoo model {DEFAULT_MODEL} not found)"
    return load_model(model_spec, gates=False), model_spec


def resolve_model_spec(model_spec: str) -> str:
    """The spec a subprocess should load to get the same model as :func:`_load` here."""
    from circuitkit.models import resolve_path

    if model_spec.startswith("random:"):
        return model_spec
    try:
        found = resolve_path(model_spec) is not None
    except CircuitkitError:
        found = False
    return f"random:{FALLBACK_ARCH}" if (not found and model_spec == DEFAULT_MODEL) else model_spec


def _dataset(model, task: str, n: int, seed: int = 0):
    from circuitkit.tasks import get_task, task_for_model

    try:
        return task_for_model(task, model).dataset(n, seed)
    except (CircuitkitError, TypeError, AttributeError):
        return get_task(task).dataset(n, seed)


def tiled(ds, k: int):
    """``ds`` with every prompt repeated ``k`` times along the sequence, answers at the end (scaling)."""
    from dataclasses import replace

    if k == 1:
        return ds
    t = ds.seq_len
    return replace(ds, clean=ds.clean.repeat(1, k), corrupt=ds.corrupt.repeat(1, k),
                   answer_pos=ds.answer_pos + (k - 1) * t)


def _model_summary(model, description: str) -> dict[str, Any]:
    cfg = model.cfg
    return {"name": description, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "d_model": cfg.d_model,
            "d_mlp": cfg.d_mlp, "d_vocab": cfg.d_vocab, "n_ctx": cfg.n_ctx,
            "n_params": int(sum(p.numel() for p in model.parameters()))}


# ---------------------------------------------------------------- timing

def interleaved(fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, dict[str, Any]]:
    """Run every function once per round, ``warmup + repeats`` rounds; medians of the timed rounds (ms)."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if r >= warmup:
                samples[name].append(dt * 1e3)
    return {k: {"median_ms": round(statistics.median(v), 3), "samples_ms": [round(x, 3) for x in v]}
            for k, v in samples.items()}


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else math.nan


# ---------------------------------------------------------------- the floor and our methods

def floor_fns(model, ds) -> dict[str, Callable[[], None]]:
    """The bare model's work: a no-grad forward; forward + backward to the input activations;
    forward + backward with parameter gradients (a training backward)."""
    from circuitkit.circuits.interventions import temporary_hooks

    def forward_nograd():
        with torch.no_grad():
            model(ds.corrupt)

    def fwd_bwd_inputs():
        leaf = []

        def grab(act, hook):
            x = act.detach().requires_grad_(True)
            leaf.append(x)
            return x

        with torch.enable_grad(), temporary_hooks(model, [("blocks.0.hook_resid_pre", grab)]):
            logits = model(ds.clean)
        ds.metric_values(logits).mean().backward(inputs=leaf)

    params = [p for p in model.parameters()]

    def fwd_bwd_params():
        before = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        try:
            with torch.enable_grad():
                logits = model(ds.clean)
                ds.metric_values(logits).mean().backward()
        finally:
            for p, rg in zip(params, before):
                p.grad = None
                p.requires_grad_(rg)

    return {"forward_nograd": forward_nograd, "fwd_bwd_inputs": fwd_bwd_inputs, "fwd_bwd_params": fwd_bwd_params}


def method_fns(model, ds, ig_steps: int) -> dict[str, Callable[[], Any]]:
    from circuitkit.circuits import attribute

    b = len(ds)
    return {"eap": lambda: attribute(model, ds, "eap", batch_size=b),
            "eap-ig": lambda: attribute(model, ds, "eap-ig", batch_size=b, steps=ig_steps)}


def attribution_part(model, ds, cfg: Mapping[str, Any], model_spec: str) -> dict[str, Any]:
    fns = {**floor_fns(model, ds), **method_fns(model, ds, cfg["ig_steps"])}
    t = interleaved(fns, cfg["repeats"], cfg["warmup"])
    med = {k: v["median_ms"] for k, v in t.items()}
    s = cfg["ig_steps"]
    floor = med["forward_nograd"] + med["fwd_bwd_inputs"]
    floor_params = med["forward_nograd"] + med["fwd_bwd_params"]
    ig_floor = 2 * med["forward_nograd"] + s * med["fwd_bwd_inputs"]
    out = {
        "batch": len(ds), "seq_len": ds.seq_len, "ig_steps": s, "times": t,
        "floor_ms": round(floor, 3), "floor_params_ms": round(floor_params, 3), "ig_floor_ms": round(ig_floor, 3),
        "ratios": {
            "eap_vs_floor": _ratio(med["eap"], floor),
            "eap_vs_floor_params": _ratio(med["eap"], floor_params),
            "eap_ig_per_step_vs_floor": _ratio(med["eap-ig"] / s, floor),
            "eap_ig_vs_floor": _ratio(med["eap-ig"], ig_floor),
        },
        "floor_definition": "no-grad forward (corrupted) + forward and backward to the input activations "
                            "(clean), bare model, default TransformerLens flags; floor_params: backward with "
                            "parameter gradients; ig_floor: 2 no-grad forwards + steps x (forward + backward)",
    }
    out["meets_target"] = {"eap_vs_floor": out["ratios"]["eap_vs_floor"] <= TARGETS["eap_vs_floor"],
                           "eap_ig_vs_floor": out["ratios"]["eap_ig_vs_floor"] <= TARGETS["eap_ig_vs_floor"]}
    if cfg["memory"]:
        probes = {kind: memory_probe(kind, model_spec, cfg) for kind in ("floor", "floor_params", "eap", "eap-ig")}
        fallback = any(v.get("method") == "ru_maxrss" for v in probes.values())
        out["memory"] = {"method": MEMORY_METHOD_FALLBACK if fallback else MEMORY_METHOD, **probes}
    return out


# ---------------------------------------------------------------- peak memory (subprocess per measurement)

MEMORY_METHOD = ("peak resident memory growth in a fresh subprocess per measurement: after loading the model and a "
                 "1-example warm-up, freed heap is returned to the OS (malloc_trim) and the kernel's peak RSS is "
                 "reset (/proc/self/clear_refs = 5); value = VmHWM after the run - VmRSS before it, MiB")
MEMORY_METHOD_FALLBACK = ("ru_maxrss growth (resource.getrusage) in a fresh subprocess per measurement, from its "
                          "value after loading the model and a 1-example warm-up, MiB (a lower bound: the peak could "
                          "not be reset here)")


def _status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return None


def _maxrss_mib() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 2**20  # Linux: KiB, macOS: bytes


def _reset_peak() -> bool:
    """Return freed memory to the OS and reset the kernel's peak RSS; False where that is impossible."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return _status_mib("VmHWM") is not None


def memory_probe(kind: str, model_spec: str, cfg: Mapping[str, Any], timeout: float = 300) -> dict[str, Any]:
    """Peak-memory growth of one measurement, in a fresh Python process."""
    spec = {"kind": kind, "model": resolve_model_spec(model_spec), "task": cfg["task"], "batch": cfg["batch"],
            "ig_steps": cfg["ig_steps"], "threads": cfg["threads"]}
    code = "import sys; from circuitkit.bench import _probe_main; _probe_main(sys.argv[1])"
    try:
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1])


def _probe_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    torch.set_num_threads(int(spec["threads"]))
    model, _ = _load(spec["model"])
    ds = _dataset(model, spec["task"], int(spec["batch"]))
    kind = spec["kind"]

    def run_on(d):
        if kind in ("floor", "floor_params"):
            f = floor_fns(model, d)
            f["forward_nograd"]()
            f["fwd_bwd_inputs" if kind == "floor" else "fwd_bwd_params"]()
        elif kind in ("eap", "eap-ig"):
            method_fns(model, d, int(spec["ig_steps"]))[kind]()
        elif kind == "peer":
            runner = PeerRunner(model, d)
            runner.scores()
        else:
            raise SystemExit(f"unknown probe {kind}")

    if kind == "peer":  # the peer's wrapped model copy is part of its setup, not of the measurement
        peer = PeerRunner(model, ds)
        PeerRunner(model, ds[:1]).scores()
        work = peer.scores
    else:
        run_on(ds[:1])
        work = lambda: run_on(ds)  # noqa: E731
    if _reset_peak():
        base = _status_mib("VmRSS")
        work()
        peak, method = _status_mib("VmHWM"), "vmhwm"
    else:
        base = _maxrss_mib()
        work()
        peak, method = _maxrss_mib(), "ru_maxrss"
    print(json.dumps({"baseline_mib": round(base, 1), "peak_mib": round(peak, 1), "delta_mib": round(peak - base, 1),
                      "method": method}))


# ---------------------------------------------------------------- the peer: auto-circuit

class PeerUnavailable(RuntimeError):
    """auto-circuit cannot run here; the message says exactly why."""


def alias_kv_cache() -> None:
    """Make auto-circuit 1.0.1 importable beside TransformerLens 3.9 (docs/method.md §8).

    auto-circuit imports ``transformer_lens.past_key_value_caching.HookedTransformerKeyValueCache``
    and ``transformer_lens.HookedTransformerKeyValueCache``; TransformerLens 3.9 has the class
    as ``transformer_lens.cache.key_value_cache.TransformerLensKeyValueCache``. Existing names are
    left alone.
    """
    import transformer_lens

    try:
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    except ImportError as e:
        raise PeerUnavailable(f"transformer_lens {_version('transformer-lens')} has no "
                              f"transformer_lens.cache.key_value_cache.TransformerLensKeyValueCache ({e})") from None
    name = "transformer_lens.past_key_value_caching"
    try:
        importlib.import_module(name)
    except ImportError:
        mod = types.ModuleType(name)
        mod.__doc__ = "alias made by circuitkit.bench for auto-circuit (docs/method.md §8)"
        mod.HookedTransformerKeyValueCache = TransformerLensKeyValueCache
        sys.modules[name] = mod
        transformer_lens.past_key_value_caching = mod
    mod = sys.modules[name]
    if not hasattr(mod, "HookedTransformerKeyValueCache"):
        mod.HookedTransformerKeyValueCache = TransformerLensKeyValueCache
    if not hasattr(transformer_lens, "HookedTransformerKeyValueCache"):
        transformer_lens.HookedTransformerKeyValueCache = TransformerLensKeyValueCache


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def import_peer() -> types.SimpleNamespace:
    """The auto-circuit functions the bench uses; raises :class:`PeerUnavailable` with the reason."""
    version = _version(PEER)
    if version is None:
        raise PeerUnavailable(f"{PEER} is not installed (pip install 'circuitkit[bench]', i.e. "
                              f"{PEER}=={PEER_VERSION} attrs)")
    if version != PEER_VERSION:
        raise PeerUnavailable(f"{PEER} {version} is installed; the bench is written for {PEER_VERSION}")
    alias_kv_cache()
    try:
        from auto_circuit.data import PromptDataLoader, PromptDataset
        from auto_circuit.prune_algos import mask_gradient
        from auto_circuit.utils.graph_utils import patchable_model
    except Exception as e:  # any import-time failure is a reason the peer cannot run
        raise PeerUnavailable(f"importing {PEER} {version} failed: {type(e).__name__}: {e}") from None
    from functools import partial

    from tqdm.auto import tqdm

    mask_gradient.tqdm = partial(tqdm, disable=True)  # keep the bench output clean
    return types.SimpleNamespace(PromptDataLoader=PromptDataLoader, PromptDataset=PromptDataset,
                                 patchable_model=patchable_model,
                                 mask_gradient_prune_scores=mask_gradient.mask_gradient_prune_scores)


def peer_node_name(name: str, dest: bool = False) -> str:
    """auto-circuit node name -> circuitkit's: ``Resid Start``→``input``, ``A1.2``→``a1.h2``,
    ``MLP 3``→``m3``, ``Resid End``→``logits``, ``A2.0.Q``→``a2.h0<q>`` (receivers)."""
    if name == "Resid Start" and not dest:
        return "input"
    if name == "Resid End" and dest:
        return "logits"
    if name.startswith("MLP "):
        return f"m{int(name[4:])}"
    if name.startswith("A"):
        parts = name[1:].split(".")
        if len(parts) == 2 and not dest:
            return f"a{int(parts[0])}.h{int(parts[1])}"
        if len(parts) == 3 and dest and parts[2] in ("Q", "K", "V"):
            return f"a{int(parts[0])}.h{int(parts[1])}<{parts[2].lower()}>"
    raise CircuitkitError(f"cannot map auto-circuit {'receiver' if dest else 'sender'} {name!r} to a circuitkit "
                          "node (expected factorized=True, separate_qkv=True names)")


def peer_edge_name(src: str, dest: str) -> str:
    """auto-circuit edge (sender name, receiver name) -> circuitkit edge name."""
    return f"{peer_node_name(src)}->{peer_node_name(dest, dest=True)}"


def check_peer_task(ds) -> None:
    """auto-circuit's ``avg_diff`` scores the last position, mean over the answer and the wrong answers."""
    last = ds.seq_len - 1
    if ds.answer_pos.shape[1] != 1 or bool((ds.answer_pos != last).any()):
        raise PeerUnavailable(f"task {ds.task!r} scores positions other than the last one; auto-circuit's "
                              "slice_output='last_seq' scores only the last position")
    if ds.distractors.shape[-1] != 1:
        raise PeerUnavailable(f"task {ds.task!r} has {ds.distractors.shape[-1]} distractors per answer: circuitkit "
                              "takes the max over them, auto-circuit's avg_diff the mean")
    if ds.metric.value != "logit_diff":
        raise PeerUnavailable(f"task {ds.task!r} uses metric {ds.metric.value}; the comparison needs logit_diff")


class PeerRunner:
    """auto-circuit's EAP (``mask_gradient_prune_scores`` at mask 0) on a copy of ``model``.

    The copy gets the flags auto-circuit asserts (attention results, split q/k/v inputs,
    ``hook_mlp_in``) and frozen parameters, as in auto-circuit's own model loading, and is wrapped
    by ``patchable_model(factorized=True, separate_qkv=True, slice_output="last_seq")``.
    """

    def __init__(self, model, ds):
        check_peer_task(ds)
        self.ac = import_peer()
        m = copy.deepcopy(model)
        m.set_use_attn_result(True)
        m.set_use_split_qkv_input(True)
        m.set_use_hook_mlp_in(True)
        for p in m.parameters():
            p.requires_grad_(False)
        m.eval()
        self.model = self.ac.patchable_model(m, factorized=True, slice_output="last_seq", separate_qkv=True,
                                             device=torch.device("cpu"))
        pds = self.ac.PromptDataset(ds.clean, ds.corrupt, ds.correct, ds.distractors[:, :, 0])
        self.loader = self.ac.PromptDataLoader(pds, seq_len=None, diverge_idx=0, batch_size=len(ds), shuffle=False)

    @property
    def n_edges(self) -> int:
        return len(self.model.edges)

    def scores(self):
        return self.ac.mask_gradient_prune_scores(self.model, self.loader, None, grad_function="logit",
                                                  answer_function="avg_diff", mask_val=0.0)

    def edge_scores(self, prune_scores) -> dict[str, float]:
        """circuitkit edge name -> the peer's score in circuitkit's convention.

        The peer's loss is ``-mean(logit diff)`` and its mask gradient is
        ``(a_corrupt - a_clean)·∂loss/∂input``, so circuitkit's score is minus the peer's.
        """
        return {peer_edge_name(e.src.name, e.dest.name): -float(e.prune_score(prune_scores)) for e in self.model.edges}


# ---------------------------------------------------------------- an independent plain-autograd reference

def reference_eap_scores(model, ds) -> dict[str, float]:
    """EAP written directly: cache sender outputs on both prompts, keep the gradients of every
    receiver input, and sum ``(a_corrupt - a_clean) · grad`` edge by edge (names built here)."""
    m = copy.deepcopy(model)
    m.set_use_attn_result(True)
    m.set_use_split_qkv_input(True)
    m.set_use_hook_mlp_in(True)
    L, H = m.cfg.n_layers, m.cfg.n_heads
    senders: list[tuple[str, str, int | None]] = [("input", "blocks.0.hook_resid_pre", None)]
    for layer in range(L):
        senders += [(f"a{layer}.h{h}", f"blocks.{layer}.attn.hook_result", h) for h in range(H)]
        senders.append((f"m{layer}", f"blocks.{layer}.hook_mlp_out", None))
    sender_hooks = sorted({hk for _, hk, _ in senders})
    with torch.no_grad():
        _, corrupt = m.run_with_cache(ds.corrupt, names_filter=lambda n: n in sender_hooks)
    acts: dict[str, torch.Tensor] = {}

    def keep(act, hook):
        act.retain_grad()
        acts[hook.name] = act

    receivers = []
    for layer in range(L):
        receivers += [(f"a{layer}.h{h}<{c}>", f"blocks.{layer}.hook_{c}_input", h, layer)
                      for c in "qkv" for h in range(H)]
        receivers.append((f"m{layer}", f"blocks.{layer}.hook_mlp_in", None, layer))
    receivers.append(("logits", f"blocks.{L - 1}.hook_resid_post", None, L))
    hooks = [(n, keep) for n in sorted(set(sender_hooks) | {r[1] for r in receivers})]
    with torch.enable_grad():
        logits = m.run_with_hooks(ds.clean, fwd_hooks=hooks)
        ds.metric_values(logits).mean().backward()

    def sender_diff(hook: str, head: int | None) -> torch.Tensor:
        d = corrupt[hook] - acts[hook].detach()
        return d if head is None else d[:, :, head]

    out = {}
    for rname, rhook, rhead, rlayer in receivers:
        grad = acts[rhook].grad
        grad = grad if rhead is None else grad[:, :, rhead]
        for sname, shook, shead in senders:
            s_layer = -1 if sname == "input" else int(sname[1:].split(".")[0])
            before = s_layer < rlayer or (s_layer == rlayer and sname.startswith("a") and rname.startswith("m")
                                          and not m.cfg.parallel_attn_mlp)
            if before:
                out[f"{sname}->{rname}"] = float((sender_diff(shook, shead) * grad).sum())
    return out


def agreement(ours: Mapping[str, float], theirs: Mapping[str, float], k: int = TOP_K) -> dict[str, Any]:
    """Pearson correlation, top-k overlap (by |score|) and differences over the shared edge names."""
    names = sorted(set(ours) & set(theirs))
    a = torch.tensor([ours[n] for n in names], dtype=torch.float64)
    b = torch.tensor([theirs[n] for n in names], dtype=torch.float64)
    pearson = float(torch.corrcoef(torch.stack([a, b]))[0, 1]) if len(names) > 1 else math.nan
    k = min(k, len(names))
    top_a = {names[i] for i in a.abs().topk(k).indices.tolist()}
    top_b = {names[i] for i in b.abs().topk(k).indices.tolist()}
    scale = float(a.abs().max()) or 1.0
    # normalised: each score vector divided by its max |score| (insensitive to the batch reduction)
    na, nb = a / (a.abs().max() or 1.0), b / (b.abs().max() or 1.0)
    return {"n_shared": len(names), "only_ours": len(set(ours) - set(theirs)),
            "only_theirs": len(set(theirs) - set(ours)), "pearson": round(pearson, 7),
            "spearman": round(_spearman(a, b), 7),
            "top_k": k, "top_overlap": len(top_a & top_b),
            "max_abs_diff": float((a - b).abs().max()) if names else math.nan,
            "max_rel_diff": float((a - b).abs().max()) / scale if names else math.nan,
            "max_abs_diff_normalised": float((na - nb).abs().max()) if names else math.nan,
            "sum_ratio": float(b.sum() / a.sum()) if float(a.sum()) else math.nan}


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    if len(a) < 2:
        return math.nan
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def peer_part(model, ds, cfg: Mapping[str, Any], model_spec: str) -> dict[str, Any]:
    from circuitkit.circuits import attribute
    from circuitkit.circuits.graph import GraphSpec

    spec = GraphSpec.from_model(model)
    ours_graph = attribute(model, ds, "eap", batch_size=len(ds))
    ours = {e.name: e.score for e in ours_graph.edges(in_graph_only=False)}
    out: dict[str, Any] = {"peer": f"{PEER} {PEER_VERSION}", "n_edges_ours": spec.n_real_edges,
                           "batch": len(ds), "seq_len": ds.seq_len}
    t0 = time.perf_counter()
    ref = reference_eap_scores(model, ds)
    out["reference"] = {"what": "plain autograd EAP written in circuitkit.bench (run_with_cache + retain_grad)",
                        "time_ms": round((time.perf_counter() - t0) * 1e3, 3), **agreement(ours, ref)}
    try:
        runner = PeerRunner(model, ds)
    except PeerUnavailable as e:
        out.update(available=False, reason=str(e))
        return out
    prune = runner.scores()
    theirs = runner.edge_scores(prune)
    out.update(available=True, n_edges_peer=runner.n_edges,
               settings="patchable_model(factorized=True, separate_qkv=True, slice_output='last_seq'); "
                        "mask_gradient_prune_scores(grad_function='logit', answer_function='avg_diff', "
                        "mask_val=0.0), ablation RESAMPLE (corrupted prompts), parameters frozen",
               mapping="Resid Start->input, A{l}.{h}->a{l}.h{h}, MLP {l}->m{l}, A{l}.{h}.Q/K/V->a{l}.h{h}<q/k/v>, "
                       "Resid End->logits; score = -(peer mask gradient) (its loss is -mean logit diff); "
                       "both average over the batch (one batch)",
               agreement=agreement(ours, theirs))
    b = len(ds)
    t = interleaved({"ours_eap": lambda: attribute(model, ds, "eap", batch_size=b), "peer": runner.scores},
                    cfg["repeats"], cfg["warmup"])
    out["times"] = t
    out["time_ratio"] = _ratio(t["ours_eap"]["median_ms"], t["peer"]["median_ms"])
    a = out["agreement"]
    out["meets_target"] = {"time_ratio": out["time_ratio"] <= TARGETS["peer_time_ratio"],
                           "pearson": a["pearson"] >= TARGETS["peer_pearson"],
                           "top50": a["top_overlap"] == a["top_k"]}
    if cfg["memory"]:
        out["memory"] = {"peer": memory_probe("peer", model_spec, cfg)}
    return out


# ---------------------------------------------------------------- exact patching

def patching_part(model, ds, cfg: Mapping[str, Any], eap_graph=None) -> dict[str, Any]:
    from circuitkit.circuits import attribute
    from circuitkit.circuits.graph import GraphSpec

    spec = GraphSpec.from_model(model)
    result = {}

    def run():
        result["graph"] = attribute(model, ds, "patching", batch_size=len(ds))

    t = interleaved({"patching": run}, cfg["patching_repeats"], min(cfg["warmup"], 1))
    total = t["patching"]["median_ms"]
    out = {"batch": len(ds), "seq_len": ds.seq_len, "n_edges": spec.n_real_edges, "times": t,
           "total_ms": total, "per_edge_ms": round(total / spec.n_real_edges, 4)}
    if eap_graph is not None:
        real = spec.real
        out["eap_vs_patching"] = agreement(
            {n: float(s) for n, s in zip(eap_graph.edge_names(False), eap_graph.scores[real].tolist())},
            {n: float(s) for n, s in zip(result["graph"].edge_names(False), result["graph"].scores[real].tolist())})
    return out


# ---------------------------------------------------------------- sparse post-training (scripts/bench_sparsity_step.py)

def _sparsity_script():
    if not SCRIPT.exists():
        raise CircuitkitError(f"{SCRIPT} is missing; the sparsity part reuses it (run from a source checkout)")
    spec = importlib.util.spec_from_file_location("circuitkit_bench_sparsity_step", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def sparsity_part(cfg: Mapping[str, Any], model_spec: str) -> dict[str, Any]:
    """scripts/bench_sparsity_step.py's own measurement (its ``main``), output captured."""
    script = _sparsity_script()
    spec = resolve_model_spec(model_spec)
    which = ["--arch", spec.split(":", 1)[1]] if spec.startswith("random:") else ["--model", spec]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sparsity.json"
        argv = [*which, "--batch", str(cfg["sparsity_batch"]), "--steps", str(cfg["sparsity_steps"]),
                "--threads", str(cfg["threads"]), "--json", str(path)]
        with contextlib.redirect_stdout(io.StringIO()):
            rc = script.main(argv)
        if rc:
            raise CircuitkitError(f"scripts/bench_sparsity_step.py exited with {rc}")
        out = json.loads(path.read_text())
    out["command"] = "python scripts/bench_sparsity_step.py " + " ".join(argv[:-2])
    return out


# ---------------------------------------------------------------- scaling

def _step_variants(model_factory: Callable[[], Any], batch: int, seq_len: int) -> dict[str, tuple]:
    """A plain and a gated (attention gates, training mode) model with a random-token batch each,
    set up as scripts/bench_sparsity_step.py does."""
    from circuitkit.sparsity import GateConfig, GateMode, attach

    script = _sparsity_script()
    variants = {}
    for name, gc in (("plain_step", None), ("gated_step", GateConfig(attn=True, mlp=False))):
        m = model_factory()
        m.train()
        tokens, mask = script.make_batch(m, batch, seq_len)
        if gc is not None:
            attach(m, gc, GateMode.TRAIN).collect = True
        variants[name] = (m, tokens, mask, gc is not None)
    return variants


def _time_step_variants(setups: Sequence[Mapping[str, tuple]], repeats: int, warmup: int,
                        rounds: int = 3) -> list[dict[str, float]]:
    """Median step time (ms) of every variant of every setup, via the script's ``time_steps``;
    all of them alternate over ``rounds`` rounds (each call: ``warmup`` untimed steps first)."""
    script = _sparsity_script()
    samples = [{k: [] for k in v} for v in setups]
    per_round = max(1, -(-repeats // rounds))
    for _ in range(rounds):
        for variants, out in zip(setups, samples):
            for name, (m, tokens, mask, gated) in variants.items():
                out[name] += script.time_steps(m, tokens, mask, per_round, gated=gated, warmup=warmup)
    return [{k: round(statistics.median(v) * 1e3, 3) for k, v in out.items()} for out in samples]


def scaling_points(cfg: Mapping[str, Any]) -> list[tuple[int, int]]:
    """(n_layers, seq multiple): sequence sweep at 4 layers (or the middle layer count), then depth sweep."""
    base_layers = 4 if 4 in cfg["layers"] else cfg["layers"][len(cfg["layers"]) // 2]
    pts = [(base_layers, k) for k in cfg["seq_mults"]]
    pts += [(n, 1) for n in cfg["layers"] if (n, 1) not in pts]
    return pts


def scaling_part(cfg: Mapping[str, Any], base_ds) -> dict[str, Any]:
    """Every (layers, length) point is set up first; then all points' measurements are interleaved
    round by round, so a change of background load hits every point alike."""
    from circuitkit.models import TOY_CONFIGS, build_model, toy_config

    arch = cfg["scaling_arch"]
    if arch not in TOY_CONFIGS:
        raise CircuitkitError(f"unknown --scaling-arch {arch!r}; choose one of {sorted(TOY_CONFIGS)}")
    points = scaling_points(cfg)
    fns: dict[str, Callable[[], Any]] = {}
    step_setups = []
    sizes = []
    for i, (n_layers, k) in enumerate(points):
        ds = tiled(base_ds, k)
        t_len = ds.seq_len

        def factory(n_layers=n_layers, t_len=t_len):
            return build_model(toy_config(arch, seed=0, n_layers=n_layers,
                                          n_ctx=max(TOY_CONFIGS[arch]["n_ctx"], t_len))).eval()

        model = factory()
        point_fns = {**floor_fns(model, ds), **method_fns(model, ds, cfg["ig_steps"])}
        point_fns.pop("fwd_bwd_params")
        fns.update({f"{i}/{name}": fn for name, fn in point_fns.items()})
        step_setups.append(_step_variants(factory, len(ds), t_len))
        sizes.append((len(ds), t_len))
    t = interleaved(fns, cfg["repeats"], cfg["warmup"])
    steps_all = _time_step_variants(step_setups, cfg["repeats"], max(cfg["warmup"], 1))
    rows = []
    for i, ((n_layers, k), (b, t_len), steps) in enumerate(zip(points, sizes, steps_all)):
        med = {name.split("/", 1)[1]: v["median_ms"] for name, v in t.items() if name.startswith(f"{i}/")}
        floor = med["forward_nograd"] + med["fwd_bwd_inputs"]
        rows.append({"n_layers": n_layers, "seq_mult": k, "seq_len": t_len, "batch": b,
                     "floor_ms": round(floor, 3), "eap_ms": med["eap"], "eap_ig_ms": med["eap-ig"], **{
                         f"{n}_ms": v for n, v in steps.items()},
                     "eap_vs_floor": _ratio(med["eap"], floor),
                     "eap_ig_vs_floor": _ratio(med["eap-ig"], 2 * med["forward_nograd"]
                                               + cfg["ig_steps"] * med["fwd_bwd_inputs"]),
                     "gated_vs_plain": _ratio(steps["gated_step"], steps["plain_step"])})
    return {"arch": arch, "ig_steps": cfg["ig_steps"], "rows": rows, "slopes": _slopes(rows)}


SCALING_SERIES = (("floor_ms", "floor (2 fwd + 1 bwd)"), ("eap_ms", "eap"), ("eap_ig_ms", "eap-ig"),
                  ("plain_step_ms", "plain step"), ("gated_step_ms", "gated step (attn)"))


def _slopes(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Log-log slopes (time ∝ x^slope) along the sequence sweep and the depth sweep."""
    out: dict[str, dict[str, float]] = {}
    if not rows:
        return out
    base_layers = rows[0]["n_layers"]
    sweeps = {"seq_len": [r for r in rows if r["n_layers"] == base_layers],
              "n_layers": [r for r in rows if r["seq_mult"] == 1]}
    for axis, rs in sweeps.items():
        rs = sorted(rs, key=lambda r: r[axis])
        if len({r[axis] for r in rs}) < 2:
            continue
        x = torch.tensor([math.log(r[axis]) for r in rs], dtype=torch.float64)
        out[axis] = {}
        for key, _ in SCALING_SERIES:
            y = torch.tensor([math.log(max(r[key], 1e-9)) for r in rs], dtype=torch.float64)
            xc = x - x.mean()
            out[axis][key] = round(float((xc * (y - y.mean())).sum() / (xc * xc).sum()), 3)
    return out


def plot_scaling(scaling: Mapping[str, Any], path_stem: str | os.PathLike) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    rows = scaling["rows"]
    base_layers = rows[0]["n_layers"]
    sweeps = [("seq_len", f"sequence length ({base_layers} layers)",
               sorted([r for r in rows if r["n_layers"] == base_layers], key=lambda r: r["seq_len"])),
              ("n_layers", f"layers (sequence length {rows[0]['seq_len'] // rows[0]['seq_mult']})",
               sorted([r for r in rows if r["seq_mult"] == 1], key=lambda r: r["n_layers"]))]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), constrained_layout=True)
    for ax, (axis, label, rs) in zip(axes, sweeps):
        xs = [r[axis] for r in rs]
        for key, name in SCALING_SERIES:
            slope = scaling["slopes"].get(axis, {}).get(key)
            ax.plot(xs, [r[key] for r in rs], marker="o",
                    label=name + (f" (slope {slope:.2f})" if slope is not None else ""))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
        ax.minorticks_off()
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel(label)
        ax.set_ylabel("median time (ms)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"circuitkit cost scaling ({scaling['arch']} widths, random weights, batch {rows[0]['batch']}, "
                 f"eap-ig {scaling['ig_steps']} steps)", fontsize=10)
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "svg"):
        p = stem.with_name(stem.name + "." + ext)
        fig.savefig(p, dpi=130 if ext == "png" else None)
        paths.append(str(p))
    plt.close(fig)
    return paths


# ---------------------------------------------------------------- the whole run

def environment() -> dict[str, Any]:
    return {"circuitkit": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformer_lens": _version("transformer-lens"), PEER: _version(PEER),
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "loadavg_start": _loadavg(),
            **_git_state()}


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _git_state() -> dict[str, Any]:
    """The source commit and the uncommitted files under circuitkit/ (the code being measured)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "circuitkit", "scripts"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": head or None, "uncommitted": [ln[3:] for ln in dirty]} if head else {}


def run_bench(cfg: Mapping[str, Any], log: Callable[[str], None] = lambda s: None,
              figure: str | os.PathLike | None = "figures/scaling") -> dict[str, Any]:
    """Run the chosen parts; returns the results as plain data (what the JSON holds)."""
    t_start = time.perf_counter()
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    model, description = _load(cfg["model"])
    ds = _dataset(model, cfg["task"], cfg["batch"])
    res: dict[str, Any] = {"format": "circuitkit.bench", "version": 1, "environment": environment(),
                           "config": dict(cfg), "model": _model_summary(model, description), "task": ds.task,
                           "targets": TARGETS, "parts": {}, "part_wall_s": {}}
    for part in cfg["parts"]:
        log(f"bench: {part} ...")
        t0 = time.perf_counter()
        if part == "attribution":
            out = attribution_part(model, ds, cfg, cfg["model"])
        elif part == "peer":
            out = peer_part(model, ds, cfg, cfg["model"])
        elif part == "patching":
            from circuitkit.circuits import attribute

            out = patching_part(model, ds, cfg, attribute(model, ds, "eap", batch_size=len(ds)))
        elif part == "sparsity":
            out = sparsity_part(cfg, cfg["model"])
        else:
            out = scaling_part(cfg, ds)
            if figure is not None:
                out["figure"] = plot_scaling(out, figure)
        res["parts"][part] = out
        res["part_wall_s"][part] = round(time.perf_counter() - t0, 1)
        log(f"bench: {part} done in {res['part_wall_s'][part]:.1f} s")
    res["wall_s"] = round(time.perf_counter() - t_start, 1)
    res["environment"]["loadavg_end"] = _loadavg()
    return res


# ---------------------------------------------------------------- markdown

def _f(x: Any, nd: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _load_str(v: Sequence[float] | None) -> str:
    return "/".join(f"{x:.2f}" for x in v) if v else "?"


def _mark(ok: bool | None) -> str:
    return "" if ok is None else (" ✓" if ok else " ✗")


def to_markdown(res: Mapping[str, Any], command: str | None = None) -> str:
    env, m, parts = res["environment"], res["model"], res["parts"]
    lines = [f"## circuitkit bench — {m['name']}", "",
             f"{m['n_layers']} layers × {m['n_heads']} heads, d_model {m['d_model']}, task `{res['task']}`; "
             f"torch {env['torch']}, transformer-lens {env['transformer_lens']}, {env['torch_threads']} thread(s) "
             f"on {env['cpu_count']} CPU(s); {env['date_utc']}; whole run {res['wall_s']:.0f} s; load average "
             f"(1/5/15 min) {_load_str(env.get('loadavg_start'))} at the start, {_load_str(env.get('loadavg_end'))} "
             f"at the end."]
    if env.get("git_commit"):
        dirty = [f for f in env.get("uncommitted", []) if f.startswith("circuitkit/circuits") or f == "circuitkit/bench.py"]
        lines += ["", f"Source: commit {env['git_commit']}" + (f" plus uncommitted {', '.join(dirty)}" if dirty else "")
                  + "."]
    if command:
        lines += ["", f"Command: `{command}`"]
    cfg = res["config"]
    lines += ["", f"Medians of {cfg['repeats']} runs after {cfg['warmup']} warm-up, variants interleaved."]
    if "attribution" in parts:
        a = parts["attribution"]
        t = {k: v["median_ms"] for k, v in a["times"].items()}
        r = a["ratios"]
        mem = a.get("memory", {})

        def mm(kind):
            v = mem.get(kind)
            return "–" if not v else (v.get("error", "?") if "error" in v else f"{v['delta_mib']:.1f}")
        lines += ["", f"### Attribution cost vs floor (batch {a['batch']}, {a['seq_len']} tokens)", "",
                  "| what | median (ms) | ratio | target | peak mem Δ (MiB) |", "|---|---|---|---|---|",
                  f"| floor: fwd (no grad) + fwd/bwd to inputs | {_f(a['floor_ms'])} | 1.00× | | {mm('floor')} |",
                  f"| floor with parameter gradients | {_f(a['floor_params_ms'])} | "
                  f"{_f(a['floor_params_ms'] / a['floor_ms'])}× | | {mm('floor_params')} |",
                  f"| eap | {_f(t['eap'])} | {_f(r['eap_vs_floor'])}× (vs floor w/ param grads "
                  f"{_f(r['eap_vs_floor_params'])}×) | ≤ 1.5×{_mark(a['meets_target']['eap_vs_floor'])} | {mm('eap')} |",
                  f"| eap-ig, {a['ig_steps']} steps | {_f(t['eap-ig'])} | {_f(r['eap_ig_vs_floor'])}× of "
                  f"2 fwd + {a['ig_steps']}×(fwd+bwd) = {_f(a['ig_floor_ms'])} ms | "
                  f"≤ 1.5×{_mark(a['meets_target']['eap_ig_vs_floor'])} | {mm('eap-ig')} |",
                  f"| eap-ig per step | {_f(t['eap-ig'] / a['ig_steps'])} | {_f(r['eap_ig_per_step_vs_floor'])}× "
                  f"of the eap floor | | |",
                  "", f"Components: no-grad forward {_f(t['forward_nograd'])} ms, forward + backward to inputs "
                      f"{_f(t['fwd_bwd_inputs'])} ms, forward + backward with parameter gradients "
                      f"{_f(t['fwd_bwd_params'])} ms."]
        if mem:
            lines += ["", f"Memory: {mem['method']}."]
    if "peer" in parts:
        p = parts["peer"]
        ref = p["reference"]
        lines += ["", f"### Side by side with {p['peer']} (same model, same batch of {p['batch']})", ""]
        if p.get("available"):
            ag = p["agreement"]
            tm = {k: v["median_ms"] for k, v in p["times"].items()}
            pm = p.get("memory", {}).get("peer")
            pm_s = "" if not pm else (f"; peer peak mem Δ {pm['delta_mib']:.1f} MiB" if "delta_mib" in pm
                                      else f"; peer memory: {pm.get('error')}")
            lines += ["| | circuitkit eap | auto-circuit | ratio (ours/peer) | target |", "|---|---|---|---|---|",
                      f"| time (ms) | {_f(tm['ours_eap'])} | {_f(tm['peer'])} | {_f(p['time_ratio'])}× | "
                      f"≤ 1.0×{_mark(p['meets_target']['time_ratio'])} |",
                      f"| edges | {p['n_edges_ours']} | {p['n_edges_peer']} | {ag['n_shared']} matched | |", "",
                      "| agreement over matched edges | vs auto-circuit | vs plain-autograd reference |",
                      "|---|---|---|",
                      f"| Pearson | {ag['pearson']:.7f}{_mark(p['meets_target']['pearson'])} | {ref['pearson']:.7f} |",
                      f"| Spearman | {ag['spearman']:.7f} | {ref['spearman']:.7f} |",
                      f"| top-{ag['top_k']} overlap (by abs score) | {ag['top_overlap']}/{ag['top_k']}"
                      f"{_mark(p['meets_target']['top50'])} | {ref['top_overlap']}/{ref['top_k']} |",
                      f"| max abs diff / max abs score | {ag['max_rel_diff']:.2e} | {ref['max_rel_diff']:.2e} |",
                      f"| Σ scores, theirs / ours (batch reduction) | {ag['sum_ratio']:.6f} | {ref['sum_ratio']:.6f} |",
                      "", f"Peer settings: {p['settings']}. Edge mapping: {p['mapping']}{pm_s}."]
        else:
            lines += [f"The peer could not run: {p['reason']}", "",
                      f"Second implementation instead (plain-autograd reference): Pearson {ref['pearson']:.7f}, "
                      f"top-{ref['top_k']} overlap {ref['top_overlap']}/{ref['top_k']}, "
                      f"max abs diff / max abs score {ref['max_rel_diff']:.2e}."]
    if "patching" in parts:
        p = parts["patching"]
        lines += ["", f"### Exact patching (batch {p['batch']}, {p['seq_len']} tokens)", "",
                  "| edges | total (ms) | per edge (ms) |", "|---|---|---|",
                  f"| {p['n_edges']} | {_f(p['total_ms'], 1)} | {_f(p['per_edge_ms'], 3)} |"]
        if "eap_vs_patching" in p:
            e = p["eap_vs_patching"]
            lines += ["", f"eap vs exact patching on this batch: Pearson {e['pearson']:.4f}, "
                          f"top-{e['top_k']} overlap {e['top_overlap']}/{e['top_k']}."]
    if "sparsity" in parts:
        s = parts["sparsity"]
        lines += ["", f"### Sparse post-training step ({s['model']}, batch {s['batch']}, {s['seq_len']} tokens, "
                      f"{s['threads']} thread(s), {s['steps']} steps each)", "",
                  "| variant | median step (ms) | ratio vs plain | target |", "|---|---|---|---|"]
        for name, r in s["results"].items():
            tgt = "" if name == "plain" else f"≤ 1.5×{_mark(r['ratio'] <= TARGETS['gated_vs_plain'])}"
            lines.append(f"| {name} | {_f(r['median_ms'])} | {_f(r['ratio'])}× | {tgt} |")
        lines += ["", f"From `{s['command']}`."]
    if "scaling" in parts:
        sc = parts["scaling"]
        lines += ["", f"### Scaling ({sc['arch']} widths, random weights, eap-ig {sc['ig_steps']} steps)", "",
                  "| layers | tokens | floor (ms) | eap (ms) | eap-ig (ms) | plain step (ms) | gated step (ms) "
                  "| eap/floor | eap-ig/ig floor | gated/plain |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sc["rows"]:
            lines.append(f"| {r['n_layers']} | {r['seq_len']} | {_f(r['floor_ms'])} | {_f(r['eap_ms'])} | "
                         f"{_f(r['eap_ig_ms'])} | {_f(r['plain_step_ms'])} | {_f(r['gated_step_ms'])} | "
                         f"{_f(r['eap_vs_floor'])}× | {_f(r['eap_ig_vs_floor'])}× | {_f(r['gated_vs_plain'])}× |")
        for axis, sl in sc["slopes"].items():
            lines += ["", f"Log-log slope vs {axis.replace('_', ' ')}: " + ", ".join(
                f"{name} {sl[key]:.2f}" for key, name in SCALING_SERIES if key in sl) + "."]
        if sc.get("figure"):
            lines += ["", f"Figure: {', '.join(sc['figure'])}."]
    return "\n".join(lines) + "\n"


def write_results(res: Mapping[str, Any], out_dir: str | os.PathLike, name: str = "bench",
                  command: str | None = None) -> tuple[Path, Path]:
    from circuitkit.io import write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out / f"{name}.json", out / f"{name}.md"
    write_json(jpath, _plain({**res, "command": command}))
    mpath.write_text(to_markdown(res, command))
    return jpath, mpath


def _plain(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    return x


def _command_line() -> str:
    argv = sys.argv
    if len(argv) > 1 and argv[1] == "bench":
        return " ".join(["circuitkit", *argv[1:]])
    if argv and Path(argv[0]).name == "bench.py":
        return " ".join(["python scripts/bench.py", *argv[1:]])
    return "circuitkit bench"


def run_cli(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    command = _command_line()
    res = run_bench(cfg, log=lambda s: print(s, file=sys.stderr, flush=True),
                    figure=args.figure if "scaling" in cfg["parts"] else None)
    jpath, mpath = write_results(res, args.out, args.name, command.strip())
    print(mpath.read_text())
    print(f"wrote {jpath} and {mpath}")
    return 0
