"""The parts of a bench run and the run itself: attribution vs floor, the peer, exact patching,
the sparse training step, scaling — each returning plain data."""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Mapping, Sequence

import torch

from circuitkit.bench.config import (PEER, PEER_VERSION, TARGETS, _dataset, _load, _model_summary, resolve_model_spec,
                                     targets_for)
from circuitkit.bench.memory import memory_probe, method_text, ratios_vs, step_memory_probe
from circuitkit.bench.peer import PeerRunner, PeerUnavailable
from circuitkit.bench.reference import agreement, reference_eap_scores
from circuitkit.bench.report import _loadavg, environment
from circuitkit.bench.scaling import ShapePoint, plot_scaling, scaling_part, shape_points, shape_points_record
from circuitkit.bench.steps import VARIANTS, measure_steps
from circuitkit.bench.timing import _ratio, count_flops, floor_fns, interleaved, method_fns
from circuitkit import CircuitkitError
from circuitkit.circuits import attribute
from circuitkit.circuits.graph import GraphSpec
from circuitkit.io import read_json


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
    fl = count_flops({k: fns[k] for k in ("forward_nograd", "fwd_bwd_inputs", "eap", "eap-ig")})
    fl_floor = fl["forward_nograd"] + fl["fwd_bwd_inputs"]
    fl_ig_floor = 2 * fl["forward_nograd"] + s * fl["fwd_bwd_inputs"]
    out["flops"] = {**fl, "floor": fl_floor, "ig_floor": fl_ig_floor,
                    "eap_vs_floor": _ratio(fl["eap"], fl_floor), "eap_ig_vs_floor": _ratio(fl["eap-ig"], fl_ig_floor),
                    "method": "torch.utils.flop_counter.FlopCounterMode, one call each: matrix products only"}
    targets = targets_for(model_spec)
    out["targets"] = {k: targets[k] for k in ("eap_vs_floor", "eap_ig_vs_floor", "memory_vs_floor")}
    out["meets_target"] = {"eap_vs_floor": out["ratios"]["eap_vs_floor"] <= targets["eap_vs_floor"],
                           "eap_ig_vs_floor": out["ratios"]["eap_ig_vs_floor"] <= targets["eap_ig_vs_floor"]}
    if cfg["memory"]:
        probes = {kind: memory_probe(kind, model_spec, cfg) for kind in ("floor", "floor_params", "eap", "eap-ig")}
        ratios = ratios_vs(probes, "floor")
        out["memory"] = {"method": method_text(probes), **probes, "ratio_vs_floor": ratios}
        out["meets_target"]["memory_vs_floor"] = all(ratios[k] is not None and ratios[k] <= targets["memory_vs_floor"]
                                                     for k in ("eap", "eap-ig"))
    return out


def peer_part(model, ds, cfg: Mapping[str, Any], model_spec: str) -> dict[str, Any]:
    spec = GraphSpec.from_model(model)
    ours_graph = attribute(model, ds, "eap", batch_size=len(ds))
    ours = {e.name: e.score for e in ours_graph.edges(in_graph_only=False)}
    out: dict[str, Any] = {"peer": f"{PEER} {PEER_VERSION}", "n_edges_ours": spec.n_real_edges,
                           "batch": len(ds), "seq_len": ds.seq_len}
    t0 = time.perf_counter()
    ref = reference_eap_scores(model, ds)
    out["reference"] = {"what": "plain autograd EAP written in circuitkit.bench.reference (run_with_cache + retain_grad)",
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


def patching_part(model, ds, cfg: Mapping[str, Any], eap_graph=None) -> dict[str, Any]:
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


def sparsity_part(cfg: Mapping[str, Any], model_spec: str) -> dict[str, Any]:
    """The bench's ``sparsity`` part: :func:`~circuitkit.bench.steps.measure_steps` on the bench's model (or
    ``sparsity_model``), one row per sequence length; with ``memory``, each variant's peak memory growth
    over one step (:func:`~circuitkit.bench.memory.step_memory_probe`) and its ratio to the plain step's."""
    spec = resolve_model_spec(cfg.get("sparsity_model") or model_spec)
    which = {"arch": spec.split(":", 1)[1]} if spec.startswith("random:") else {"model": spec}
    rows = []
    for seq_len in cfg.get("sparsity_seq_lens") or [0]:
        out = measure_steps(**which, batch=cfg["sparsity_batch"], seq_len=seq_len, steps=cfg["sparsity_steps"],
                            threads=cfg["threads"])
        flags = [f"--{k} '{v}'" if k == "arch" and v.startswith("{") else f"--{k} {v}" for k, v in which.items()]
        flags += [f"--batch {cfg['sparsity_batch']}", f"--seq-len {seq_len}", f"--steps {cfg['sparsity_steps']}",
                  f"--threads {cfg['threads']}"]
        out["command"] = "python scripts/bench_sparsity_step.py " + " ".join(flags)
        if cfg["memory"]:
            probes = {name: step_memory_probe(name, which, cfg["sparsity_batch"], seq_len, cfg["threads"])
                      for name in VARIANTS}
            out["memory"] = {"method": method_text(probes), **probes, "ratio_vs_plain": ratios_vs(probes, "plain")}
        rows.append(out)
    if len(rows) == 1:
        return rows[0]
    return {**rows[0], "rows": rows, "meets_target": all(r["meets_target"] for r in rows)}


def run_bench(cfg: Mapping[str, Any], log: Callable[[str], None] = lambda s: None,
              figure: str | os.PathLike | None = "figures/scaling") -> dict[str, Any]:
    """Run the chosen parts; returns the results as plain data (what the JSON holds)."""
    t_start = time.perf_counter()
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    model, description = _load(cfg["model"])
    ds = _dataset(model, cfg["task"], cfg["batch"])
    points = read_shape_points(cfg.get("scaling_with") or []) if "scaling" in cfg["parts"] else []
    res: dict[str, Any] = {"format": "circuitkit.bench", "version": 1, "environment": environment(),
                           "config": dict(cfg), "model": _model_summary(model, description), "task": ds.task,
                           "targets": targets_for(cfg["model"]), "parts": {}, "part_wall_s": {}}
    for part in cfg["parts"]:
        log(f"bench: {part} ...")
        t0 = time.perf_counter()
        if part == "attribution":
            out = attribution_part(model, ds, cfg, cfg["model"])
        elif part == "peer":
            out = peer_part(model, ds, cfg, cfg["model"])
        elif part == "patching":
            out = patching_part(model, ds, cfg, attribute(model, ds, "eap", batch_size=len(ds)))
        elif part == "sparsity":
            out = sparsity_part(cfg, cfg["model"])
        else:
            out = scaling_part(cfg, ds)
            if points:
                out["shape_points"] = shape_points_record(points)
            if figure is not None:
                out["figure"] = plot_scaling(out, figure, points)
        res["parts"][part] = out
        res["part_wall_s"][part] = round(time.perf_counter() - t0, 1)
        log(f"bench: {part} done in {res['part_wall_s'][part]:.1f} s")
    res["wall_s"] = round(time.perf_counter() - t_start, 1)
    res["environment"]["loadavg_end"] = _loadavg()
    return res


def read_shape_points(paths: Sequence[str | os.PathLike]) -> list[ShapePoint]:
    """The cost ratios of committed results at other shapes (:func:`~circuitkit.bench.scaling.shape_points`),
    file by file, for the scaling figure."""
    return [p for path in paths for p in shape_points(path)]


def replot_scaling(result: str | os.PathLike, figure: str | os.PathLike,
                   with_paths: Sequence[str | os.PathLike] = ()) -> list[str]:
    """Draw the scaling figure from a committed ``circuitkit bench`` result's scaling part and the
    committed results ``with_paths`` at other shapes, measuring nothing."""
    doc = read_json(result)
    scaling = doc.get("parts", {}).get("scaling") if isinstance(doc, dict) else None
    if not isinstance(scaling, dict) or not scaling.get("rows"):
        raise CircuitkitError(f"{result} has no scaling part with rows; give a circuitkit bench result that ran "
                              "the scaling part (e.g. benchmarks/bench.json)")
    return plot_scaling(scaling, figure, read_shape_points(with_paths))
