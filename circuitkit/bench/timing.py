"""Timing: interleaved medians, and the work being timed — the bare model's floor and our methods.

Owns how a time is taken (every variant once per round, medians of the timed rounds, so
background load hits all variants alike), how the work is counted (floating-point operations of
the matrix products, :func:`count_flops`: the part of a time ratio that no implementation can
remove), and the functions each part times.
"""

from __future__ import annotations

import enum
import math
import statistics
import time
from typing import Any, Callable, Mapping

import torch
from torch.utils.flop_counter import FlopCounterMode

from circuitkit.circuits import attribute
from circuitkit.circuits.interventions import temporary_hooks


class Clock(enum.Enum):
    """What a time is: wall time, or the CPU time of this process (user + system), which a machine
    shared with other jobs inflates far less (with 1 thread it is the work itself)."""

    WALL = "wall"
    CPU = "cpu"

    def now(self) -> float:
        return time.perf_counter() if self is Clock.WALL else time.process_time()


CLOCK = [Clock.WALL]  # the clock of this run; circuitkit bench --clock sets it


def now() -> float:
    """Seconds on the run's clock (:data:`CLOCK`)."""
    return CLOCK[0].now()


def interleaved(fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, dict[str, Any]]:
    """Run every function once per round, ``warmup + repeats`` rounds; medians of the timed rounds (ms)."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            t0 = now()
            fn()
            dt = now() - t0
            if r >= warmup:
                samples[name].append(dt * 1e3)
    return {k: {"median_ms": round(statistics.median(v), 3), "samples_ms": [round(x, 3) for x in v]}
            for k, v in samples.items()}


def count_flops(fns: Mapping[str, Callable[[], Any]]) -> dict[str, int]:
    """Floating-point operations of one call of each function, as torch's ``FlopCounterMode`` counts
    them: matrix products (mm, addmm, bmm, einsum's products, attention), the work that dominates a
    transformer; elementwise operations are not counted."""
    out = {}
    for name, fn in fns.items():
        with FlopCounterMode(display=False) as counter:
            fn()
        out[name] = int(counter.get_total_flops())
    return out


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else math.nan


def floor_fns(model, ds) -> dict[str, Callable[[], None]]:
    """The bare model's work: a no-grad forward; forward + backward to the input activations;
    forward + backward with parameter gradients (a training backward)."""
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
    b = len(ds)
    return {"eap": lambda: attribute(model, ds, "eap", batch_size=b),
            "eap-ig": lambda: attribute(model, ds, "eap-ig", batch_size=b, steps=ig_steps)}
