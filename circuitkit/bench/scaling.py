"""Scaling: floor, eap, eap-ig and the plain / gated training step against sequence length and depth.

Random-weight toy models of one architecture's widths; every point is set up first and all
measurements are interleaved round by round. Also the log-log slopes and the figure.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from circuitkit import CircuitkitError
from circuitkit.bench.config import tiled
from circuitkit.bench.steps import step_variants, time_step_variants
from circuitkit.bench.timing import _ratio, floor_fns, interleaved, method_fns
from circuitkit.models import TOY_CONFIGS, build_model, toy_config


def scaling_points(cfg: Mapping[str, Any]) -> list[tuple[int, int]]:
    """(n_layers, seq multiple): sequence sweep at 4 layers (or the middle layer count), then depth sweep."""
    base_layers = 4 if 4 in cfg["layers"] else cfg["layers"][len(cfg["layers"]) // 2]
    pts = [(base_layers, k) for k in cfg["seq_mults"]]
    pts += [(n, 1) for n in cfg["layers"] if (n, 1) not in pts]
    return pts


def scaling_part(cfg: Mapping[str, Any], base_ds) -> dict[str, Any]:
    """Every (layers, length) point is set up first; then all points' measurements are interleaved
    round by round, so a change of background load hits every point alike."""
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
        step_setups.append(step_variants(factory, len(ds), t_len))
        sizes.append((len(ds), t_len))
    t = interleaved(fns, cfg["repeats"], cfg["warmup"])
    steps_all = time_step_variants(step_setups, cfg["repeats"], max(cfg["warmup"], 1))
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
