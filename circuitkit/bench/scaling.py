"""Scaling: floor, eap, eap-ig and the plain / gated training step against sequence length and depth.

Random-weight toy models of one architecture's widths; every point is set up first and all
measurements are interleaved round by round. Also the log-log slopes and the figure, whose lower
row draws each cost as a ratio to its floor (eap, eap-ig) or to the plain step (gated step), so
that committed measurements at other widths (:class:`ShapePoint`, read by :func:`shape_points`
from a ``circuitkit bench`` result or ``scripts/bench_gate_blocks.py``'s JSON) can share its axes.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from matplotlib.ticker import FuncFormatter, LogLocator

from circuitkit import CircuitkitError
from circuitkit.bench.config import shape_fields, tiled
from circuitkit.bench.steps import step_variants, time_step_variants
from circuitkit.bench.timing import _ratio, floor_fns, interleaved, method_fns
from circuitkit.io import read_json
from circuitkit.models import TOY_CONFIGS, build_model, toy_config
from circuitkit.plotting import plt, save


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


RATIO_SERIES = (("eap_vs_floor", "eap ÷ floor"), ("eap_ig_vs_floor", "eap-ig ÷ its floor"),
                ("gated_vs_plain", "gated step ÷ plain step"))

GATED_NOW = "gated (fused, now)"  # scripts/bench_gate_blocks.py's name for the gated step as shipped


@dataclass(frozen=True)
class ShapePoint:
    """One committed cost ratio measured at another shape than the scaling sweep's (e.g. GPT-2 width),
    drawn as a marker into the scaling figure's ratio panels."""

    series: str  # a RATIO_SERIES key
    ratio: float
    n_layers: int
    seq_len: int
    batch: int
    d_model: int
    source: str  # the JSON file it was read from

    def axis(self, depth_seq_len: int) -> str:
        """The panel it belongs to: the depth panel when it has the depth sweep's sequence length,
        else the sequence-length panel."""
        return "n_layers" if self.seq_len == depth_seq_len else "seq_len"

    @property
    def label(self) -> str:
        return f"d_model {self.d_model}, {self.n_layers} layers, batch {self.batch}"


def _get(doc: Any, keys: Sequence[str | int], path: str) -> Any:
    for k in keys:
        try:
            doc = doc[k]
        except (KeyError, IndexError, TypeError):
            raise CircuitkitError(f"{path}: no {'/'.join(str(x) for x in keys)} in it; give a circuitkit bench "
                                  "result with an attribution part or scripts/bench_gate_blocks.py's --json "
                                  "output") from None
    return doc


def shape_points(path: str | os.PathLike) -> list[ShapePoint]:
    """The cost ratios in one committed result file: a ``circuitkit bench`` result's attribution part
    (eap ÷ floor and eap-ig ÷ its floor, from the median times) or ``scripts/bench_gate_blocks.py``'s
    rows (the gated step as shipped ÷ the plain step, per sequence length)."""
    src = str(path)
    doc = read_json(path)
    if not isinstance(doc, dict):
        raise CircuitkitError(f"{src}: expected a JSON object (a circuitkit bench result or "
                              "scripts/bench_gate_blocks.py's output)")
    if doc.get("format") == "circuitkit.bench":
        att = _get(doc, ["parts", "attribution"], src)
        t = _get(att, ["times"], src)
        model = _get(doc, ["model"], src)
        floor = _get(t, ["forward_nograd", "median_ms"], src) + _get(t, ["fwd_bwd_inputs", "median_ms"], src)
        common = dict(n_layers=int(_get(model, ["n_layers"], src)), seq_len=int(_get(att, ["seq_len"], src)),
                      batch=int(_get(att, ["batch"], src)), d_model=int(_get(model, ["d_model"], src)), source=src)
        return [ShapePoint("eap_vs_floor", _get(t, ["eap", "median_ms"], src) / floor, **common),
                ShapePoint("eap_ig_vs_floor", _get(t, ["eap-ig", "median_ms"], src) / _get(att, ["ig_floor_ms"], src),
                           **common)]
    fields = shape_fields(str(_get(doc, ["arch"], src)))
    pts = []
    for i, row in enumerate(_get(doc, ["rows"], src)):
        res = _get(row, ["results"], src)
        pts.append(ShapePoint("gated_vs_plain", _get(res, [GATED_NOW, "median_ms"], src)
                              / _get(res, ["plain", "median_ms"], src), n_layers=int(fields["n_layers"]),
                              seq_len=int(_get(row, ["seq_len"], src)), batch=int(_get(row, ["batch"], src)),
                              d_model=int(fields["d_model"]), source=src))
    return pts


def _sweeps(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, list[Mapping[str, Any]]]]:
    """(axis, x label, rows sorted along it) for the sequence sweep and the depth sweep."""
    base_layers = rows[0]["n_layers"]
    return [("seq_len", f"sequence length ({base_layers} layers)",
             sorted([r for r in rows if r["n_layers"] == base_layers], key=lambda r: r["seq_len"])),
            ("n_layers", f"layers (sequence length {depth_seq_len(rows)})",
             sorted([r for r in rows if r["seq_mult"] == 1], key=lambda r: r["n_layers"]))]


def depth_seq_len(rows: Sequence[Mapping[str, Any]]) -> int:
    """The sequence length of the depth sweep (the task's prompt length)."""
    return rows[0]["seq_len"] // rows[0]["seq_mult"]


def ratio_panels(scaling: Mapping[str, Any], points: Sequence[ShapePoint] = ()) -> dict[str, list[dict[str, Any]]]:
    """What the figure's ratio panels draw, per axis: the sweep's lines (``kind`` "sweep") and the
    committed points at other shapes (``kind`` "shape", one entry per series and shape)."""
    rows = scaling["rows"]
    names = dict(RATIO_SERIES)
    out: dict[str, list[dict[str, Any]]] = {}
    for axis, _, rs in _sweeps(rows):
        out[axis] = [{"kind": "sweep", "series": key, "label": f"{name} ({scaling['arch']})",
                      "x": [r[axis] for r in rs], "y": [r[key] for r in rs]} for key, name in RATIO_SERIES]
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for p in points:
        axis = p.axis(depth_seq_len(rows))
        g = groups.setdefault((axis, p.series, p.label), {"kind": "shape", "series": p.series, "shape": p.label,
                                                         "label": f"{names[p.series]} ({p.label})", "x": [], "y": []})
        g["x"].append(p.seq_len if axis == "seq_len" else p.n_layers)
        g["y"].append(p.ratio)
    for (axis, _, _), g in groups.items():
        order = sorted(range(len(g["x"])), key=g["x"].__getitem__)
        out[axis].append({**g, "x": [g["x"][i] for i in order], "y": [g["y"][i] for i in order]})
    return out


def _log_axes(ax, xs: Sequence[int], yticks_subs=(1.0, 2.0, 5.0)) -> None:
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(sorted(set(xs)))
    ax.set_xticklabels([str(x) for x in sorted(set(xs))])
    ax.minorticks_off()
    ax.yaxis.set_major_locator(LogLocator(subs=yticks_subs))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.grid(True, which="both", alpha=0.3)


def plot_scaling(scaling: Mapping[str, Any], path_stem: str | os.PathLike,
                 points: Sequence[ShapePoint] = ()) -> list[str]:
    """Upper row: median times along the two sweeps. Lower row: the same costs as ratios, with
    ``points`` (committed measurements at other shapes) as open markers on the panel whose swept
    coordinate they vary (:meth:`ShapePoint.axis`)."""
    rows = scaling["rows"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.2), constrained_layout=True)
    panels = ratio_panels(scaling, points)
    colors = {key: f"C{i}" for i, (key, _) in enumerate(SCALING_SERIES)}
    ratio_color = {"eap_vs_floor": colors["eap_ms"], "eap_ig_vs_floor": colors["eap_ig_ms"],
                   "gated_vs_plain": colors["gated_step_ms"]}
    shape_markers = iter("sD^vP*X")
    marker_of: dict[str, str] = {}
    for col, (axis, label, rs) in enumerate(_sweeps(rows)):
        ax = axes[0, col]
        xs = [r[axis] for r in rs]
        for key, name in SCALING_SERIES:
            slope = scaling["slopes"].get(axis, {}).get(key)
            ax.plot(xs, [r[key] for r in rs], marker="o", color=colors[key],
                    label=name + (f" (slope {slope:.2f})" if slope is not None else ""))
        _log_axes(ax, xs)
        ax.set_xlabel(label)
        ax.set_ylabel("median time (ms)")
        ax.set_title(f"time, {scaling['arch']} widths", fontsize=9)
        ax.legend(fontsize=8)

        ax = axes[1, col]
        all_x, all_y = [], []
        for s in panels[axis]:
            all_x += s["x"]
            all_y += s["y"]
            if s["kind"] == "sweep":
                ax.plot(s["x"], s["y"], marker="o", color=ratio_color[s["series"]], label=s["label"])
            else:
                m = marker_of.setdefault(s["shape"], next(shape_markers, "o"))
                ax.plot(s["x"], s["y"], marker=m, markersize=8, linestyle=":", markerfacecolor="none",
                        markeredgewidth=1.6, color=ratio_color[s["series"]], label=s["label"])
                for x, y in zip(s["x"], s["y"]):
                    ax.annotate(f"{y:.2f}×", (x, y), textcoords="offset points", xytext=(6, 4), fontsize=7)
        ax.axhline(1.0, color="0.4", linewidth=0.8)
        _log_axes(ax, all_x, yticks_subs=(1.0, 1.2, 1.5, 2.0, 3.0, 5.0))
        ax.set_ylim(min(min(all_y), 1.0) / 1.05, max(all_y) * 1.35)  # room for the legend above the data
        ax.set_xlabel(label + ("; open markers: as labelled" if len(panels[axis]) > len(RATIO_SERIES) else ""))
        ax.set_ylabel("cost ÷ its floor (ratio)")
        ax.set_title("cost ratio" + ("; open markers: committed runs at other shapes"
                                     if len(panels[axis]) > len(RATIO_SERIES) else ""), fontsize=9)
        ax.legend(fontsize=7, loc="upper left", framealpha=0.85)
    fig.suptitle(f"circuitkit cost scaling (sweeps: {scaling['arch']} widths, random weights, "
                 f"batch {rows[0]['batch']}, eap-ig {scaling['ig_steps']} steps)", fontsize=10)
    return [str(p) for p in save(fig, Path(path_stem))]


def shape_points_record(points: Sequence[ShapePoint]) -> list[dict[str, Any]]:
    """``points`` as plain data for the result JSON."""
    return [{**asdict(p), "ratio": round(p.ratio, 4)} for p in points]
