"""Peak-memory probes: one fresh Python process per measurement.

Owns the probe protocol: the child loads the model, warms up (one example for attribution,
one training step for the step probes, so optimizer state and first-call buffers are part of
the baseline), then :func:`peak_meter` measures the peak growth of the measured work, which
the child prints as JSON. On CPU torch keeps no peak statistics (``max_memory_allocated``
is CUDA's) and tracemalloc does not see its allocations, so the meter returns freed heap to
the OS and resets the kernel's peak RSS (``VmHWM``; ``ru_maxrss`` where that cannot be reset,
a lower bound); on CUDA it uses ``torch.cuda.max_memory_allocated``. Ratios are of these
growths, e.g. eap's over the floor's (:func:`ratios_vs`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch

from circuitkit.bench.config import _dataset, _load, build_shape, resolve_model_spec
from circuitkit.bench.peer import PeerRunner
from circuitkit.bench.steps import VARIANTS, make_batch, step_runner
from circuitkit.bench.timing import floor_fns, method_fns
from circuitkit.models import load_model
from circuitkit.sparsity import GateMode, attach


MEMORY_METHOD = ("peak resident memory growth in a fresh subprocess per measurement: after loading the model and a "
                 "1-example warm-up, freed heap is returned to the OS (malloc_trim) and the kernel's peak RSS is "
                 "reset (/proc/self/clear_refs = 5); value = VmHWM after the run - VmRSS before it, MiB")
MEMORY_METHOD_CUDA = ("torch.cuda.max_memory_allocated growth in a fresh subprocess per measurement, after loading the "
                      "model and a warm-up, with the peak statistics reset (torch.cuda.reset_peak_memory_stats), MiB")
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


def method_text(probes: Mapping[str, Mapping[str, Any]]) -> str:
    """How the values of ``probes`` were measured, in words (the least exact method among them)."""
    methods = {v.get("method") for v in probes.values()}
    if "ru_maxrss" in methods:
        return MEMORY_METHOD_FALLBACK
    return MEMORY_METHOD_CUDA if methods == {"cuda"} else MEMORY_METHOD


@contextmanager
def peak_meter(device: torch.device | str = "cpu") -> Iterator[dict[str, Any]]:
    """Peak memory growth of the enclosed block: the yielded dict gets ``baseline_mib``,
    ``peak_mib``, ``delta_mib`` (peak − baseline) and ``method`` on exit. CPU: the process's
    resident set (see the module docstring); CUDA: the device's allocated memory."""
    device = torch.device(device)
    out: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) / 2**20
        yield out
        torch.cuda.synchronize(device)
        peak, method = torch.cuda.max_memory_allocated(device) / 2**20, "cuda"
    elif _reset_peak():
        base = _status_mib("VmRSS")
        yield out
        peak, method = _status_mib("VmHWM"), "vmhwm"
    else:
        base = _maxrss_mib()
        yield out
        peak, method = _maxrss_mib(), "ru_maxrss"
    out.update(baseline_mib=round(base, 1), peak_mib=round(peak, 1), delta_mib=round(peak - base, 1), method=method)


def ratios_vs(probes: Mapping[str, Mapping[str, Any]], base: str) -> dict[str, float | None]:
    """Each probe's peak growth divided by ``base``'s (None where either failed or the base grew by 0)."""
    b = probes.get(base, {}).get("delta_mib")
    return {k: (round(v["delta_mib"] / b, 3) if b and "delta_mib" in v else None) for k, v in probes.items()}


def memory_probe(kind: str, model_spec: str, cfg: Mapping[str, Any], timeout: float = 300) -> dict[str, Any]:
    """Peak-memory growth of one attribution measurement (floor, floor_params, eap, eap-ig, peer),
    in a fresh Python process."""
    return run_probe({"kind": kind, "model": resolve_model_spec(model_spec), "task": cfg["task"],
                      "batch": cfg["batch"], "ig_steps": cfg["ig_steps"], "threads": cfg["threads"]}, timeout)


def step_memory_probe(variant: str, which: Mapping[str, str], batch: int, seq_len: int, threads: int,
                      timeout: float = 600) -> dict[str, Any]:
    """Peak-memory growth of one training step of ``variant`` (a key of
    :data:`circuitkit.bench.steps.VARIANTS`) after one warm-up step, in a fresh Python process;
    ``which``: ``{"model": spec}`` or ``{"arch": shape}`` as :func:`~circuitkit.bench.steps.measure_steps` takes."""
    return run_probe({"kind": "step", "variant": variant, **which, "batch": batch, "seq_len": seq_len,
                      "threads": threads}, timeout)


def run_probe(spec: Mapping[str, Any], timeout: float = 300) -> dict[str, Any]:
    """Run :func:`_probe_main` on ``spec`` in a fresh Python process; its JSON, or ``{"error": why}``."""
    code = "import sys; from circuitkit.bench.memory import _probe_main; _probe_main(sys.argv[1])"
    try:
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(dict(spec))], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1])


def _step_work(spec: Mapping[str, Any]):
    m = load_model(spec["model"], gates=False) if spec.get("model") else build_shape(spec["arch"])
    m.train()
    gc = VARIANTS[spec["variant"]]
    if gc is not None:
        attach(m, gc, GateMode.TRAIN).collect = True
    tokens, mask = make_batch(m, int(spec["batch"]), int(spec["seq_len"]))
    run = step_runner(m, tokens, mask, gated=gc is not None)
    run(0)  # warm-up: optimizer state, first-call buffers
    return lambda: run(1)


def _probe_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    torch.set_num_threads(int(spec["threads"]))
    kind = spec["kind"]
    if kind == "alloc":  # a known allocation (tests): a tensor of spec["mib"] MiB, every page written,
        torch.ones(int(spec.get("warmup_mib", 0)) * 2**18).sum()  # after a freed one of warmup_mib MiB
        work = lambda: torch.ones(int(spec["mib"]) * 2**18).sum()  # noqa: E731
    elif kind == "step":
        work = _step_work(spec)
    else:
        work = _attribution_work(spec)
    with peak_meter("cpu") as mem:
        work()
    print(json.dumps(mem))


def _attribution_work(spec: Mapping[str, Any]):
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
        else:
            raise SystemExit(f"unknown probe {kind}")

    if kind == "peer":  # the peer's wrapped model copy is part of its setup, not of the measurement
        peer = PeerRunner(model, ds)
        PeerRunner(model, ds[:1]).scores()
        return peer.scores
    run_on(ds[:1])
    return lambda: run_on(ds)
