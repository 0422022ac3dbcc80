"""The bench's records: the environment it ran in, the markdown table, the JSON and markdown files."""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from circuitkit import __version__
from circuitkit.bench.config import PEER, TARGETS
from circuitkit.bench.peer import _version
from circuitkit.bench.scaling import SCALING_SERIES
from circuitkit.bench.timing import CLOCK
from circuitkit.io import write_json, write_text


def environment() -> dict[str, Any]:
    return {"circuitkit": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformer_lens": _version("transformer-lens"), PEER: _version(PEER),
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "clock": CLOCK[0].value, "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "loadavg_start": _loadavg(),
            **_git_state()}


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _git_state() -> dict[str, Any]:
    """The source commit and the uncommitted files under circuitkit/ (the code being measured)."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "circuitkit", "scripts"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": head or None, "uncommitted": [ln[3:] for ln in dirty]} if head else {}


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
             f"at the end; times on the {env.get('clock', 'wall')} clock."]
    if env.get("git_commit"):
        dirty = [f for f in env.get("uncommitted", []) if f.startswith("circuitkit/circuits") or f.startswith("circuitkit/bench/")]
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
        tg = {**TARGETS, **a.get("targets", {})}  # what the run was judged by (runs before 2026-12-07: TARGETS)

        def mm(kind):
            v = mem.get(kind)
            return "–" if not v else (v.get("error", "?") if "error" in v else f"{v['delta_mib']:.1f}")
        lines += ["", f"### Attribution cost vs floor (batch {a['batch']}, {a['seq_len']} tokens)", "",
                  "| what | median (ms) | ratio | target | peak mem Δ (MiB) |", "|---|---|---|---|---|",
                  f"| floor: fwd (no grad) + fwd/bwd to inputs | {_f(a['floor_ms'])} | 1.00× | | {mm('floor')} |",
                  f"| floor with parameter gradients | {_f(a['floor_params_ms'])} | "
                  f"{_f(a['floor_params_ms'] / a['floor_ms'])}× | | {mm('floor_params')} |",
                  f"| eap | {_f(t['eap'])} | {_f(r['eap_vs_floor'])}× (vs floor w/ param grads "
                  f"{_f(r['eap_vs_floor_params'])}×) | "
                  f"≤ {tg['eap_vs_floor']}×{_mark(a['meets_target']['eap_vs_floor'])} | {mm('eap')} |",
                  f"| eap-ig, {a['ig_steps']} steps | {_f(t['eap-ig'])} | {_f(r['eap_ig_vs_floor'])}× of "
                  f"2 fwd + {a['ig_steps']}×(fwd+bwd) = {_f(a['ig_floor_ms'])} ms | "
                  f"≤ {tg['eap_ig_vs_floor']}×{_mark(a['meets_target']['eap_ig_vs_floor'])} | {mm('eap-ig')} |",
                  f"| eap-ig per step | {_f(t['eap-ig'] / a['ig_steps'])} | {_f(r['eap_ig_per_step_vs_floor'])}× "
                  f"of the eap floor | | |",
                  "", f"Components: no-grad forward {_f(t['forward_nograd'])} ms, forward + backward to inputs "
                      f"{_f(t['fwd_bwd_inputs'])} ms, forward + backward with parameter gradients "
                      f"{_f(t['fwd_bwd_params'])} ms."]
        if "flops" in a:
            fl = a["flops"]
            lines += ["", "Work (floating-point operations of the matrix products, torch's FlopCounterMode): "
                          f"floor {fl['floor'] / 1e9:.3g} G, eap {fl['eap'] / 1e9:.3g} G = {_f(fl['eap_vs_floor'])}× "
                          f"the floor's (the time ratio eap would have if its extra products ran at the floor's "
                          f"rate; measured {_f(r['eap_vs_floor'])}×), eap-ig {fl['eap-ig'] / 1e9:.3g} G = "
                          f"{_f(fl['eap_ig_vs_floor'])}× its floor's ({fl['ig_floor'] / 1e9:.3g} G; measured "
                          f"{_f(r['eap_ig_vs_floor'])}×)."]
        if mem:
            mr = mem.get("ratio_vs_floor", {})
            ok = a["meets_target"].get("memory_vs_floor")
            lines += ["", f"Peak memory growth ÷ the floor's: eap {_f(mr.get('eap'))}×, eap-ig {_f(mr.get('eap-ig'))}×, "
                          f"floor with parameter gradients {_f(mr.get('floor_params'))}× (target ≤ "
                          f"{tg['memory_vs_floor']}×{_mark(ok)}); whole-process peaks (model and libraries "
                          f"included): " + ", ".join(f"{k} {mem[k]['peak_mib']:.0f} MiB" for k in
                                                     ("floor", "floor_params", "eap", "eap-ig") if "peak_mib" in mem.get(k, {}))
                      + ".", "", f"Memory: {mem['method']}."]
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
        for s in parts["sparsity"].get("rows", [parts["sparsity"]]):  # one row per sequence length
            lines += ["", f"### Sparse post-training step ({s['model']}, batch {s['batch']}, {s['seq_len']} tokens, "
                          f"{s['threads']} thread(s), {s['steps']} steps each)", "",
                      "| variant | median step (ms) | ratio vs plain | target | peak mem Δ (MiB) | mem ratio vs plain |",
                      "|---|---|---|---|---|---|"]
            mem = s.get("memory", {})
            for name, r in s["results"].items():
                tgt = "" if name == "plain" else f"≤ 1.5×{_mark(r['ratio'] <= TARGETS['gated_vs_plain'])}"
                v = mem.get(name)
                mv = "–" if not v else (v.get("error", "?") if "error" in v else f"{v['delta_mib']:.1f}")
                mr = mem.get("ratio_vs_plain", {}).get(name)
                lines.append(f"| {name} | {_f(r['median_ms'])} | {_f(r['ratio'])}× | {tgt} | {mv} | "
                             f"{_f(mr) + '×' if mr is not None else '–'} |")
            lines += ["", f"From `{s['command']}`."]
            if mem:
                lines += ["", f"Memory: {mem['method']}."]
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
        if sc.get("shape_points"):
            lines += ["", "Drawn into the figure's ratio panels from committed results at other shapes: " + "; ".join(
                f"{p['series']} {p['ratio']:.2f}× (d_model {p['d_model']}, {p['n_layers']} layers, {p['seq_len']} "
                f"tokens, batch {p['batch']}; {p['source']})" for p in sc["shape_points"]) + "."]
        if sc.get("figure"):
            lines += ["", f"Figure: {', '.join(sc['figure'])}."]
    return "\n".join(lines) + "\n"


def write_results(res: Mapping[str, Any], out_dir: str | os.PathLike, name: str = "bench",
                  command: str | None = None) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out / f"{name}.json", out / f"{name}.md"
    write_json(jpath, _plain({**res, "command": command}))
    write_text(mpath, to_markdown(res, command))
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
    if argv and Path(argv[0]).name.startswith("bench") and argv[0].endswith(".py"):  # scripts/bench*.py
        return " ".join([f"python scripts/{Path(argv[0]).name}", *argv[1:]])
    return "circuitkit bench"
