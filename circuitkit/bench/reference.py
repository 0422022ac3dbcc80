"""A second, independent EAP: plain autograd (``run_with_cache`` + ``retain_grad``), names built here.

Why: the bench checks circuitkit's eap against auto-circuit, and against this reference when
the peer cannot run; :func:`agreement` is how two score tables are compared.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Mapping

import torch

from circuitkit.bench.config import TOP_K


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
