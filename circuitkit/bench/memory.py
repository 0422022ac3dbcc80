"""Peak-memory probes: one fresh Python process per measurement.

Owns the probe protocol: the child loads the model, warms up on one example, returns freed
heap to the OS and resets the kernel's peak RSS, runs the measurement and prints its peak
growth as JSON (``ru_maxrss`` where the peak cannot be reset).
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any, Mapping

import torch

from circuitkit.bench.config import _dataset, _load, resolve_model_spec
from circuitkit.bench.peer import PeerRunner
from circuitkit.bench.timing import floor_fns, method_fns


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
    code = "import sys; from circuitkit.bench.memory import _probe_main; _probe_main(sys.argv[1])"
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
