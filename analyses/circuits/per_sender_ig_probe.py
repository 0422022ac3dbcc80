"""Probe for the agreement criterion: does IG along a *per-sender* noising path track patching better?

    python analyses/circuits/per_sender_ig_probe.py [steps]   # ~1 min per task on 2 threads

eap-ig moves every input together from corrupted to clean; exact patching corrupts one edge
with everything else clean. This probe takes a path in between: for each sender (input, each
head, each MLP) its output alone moves from clean toward corrupted (midpoint rule, ``steps``
points), the rest of the model runs clean, and the score of edge s -> r is
(a_corrupt,s - a_clean,s) · mean ∂m/∂(input of r). Cost: (#senders × steps) forward+backward
passes. It prints top-50 overlap and Pearson against patching on toy-multitask (64 prompts,
seed 0), as tests/test_circuits_agreement.py does. A probe, not a registered method.
"""

import dataclasses
import sys

import torch

from circuitkit import CircuitkitError
from circuitkit.circuits import attribute
from circuitkit.circuits.agreement import compare_scores
from circuitkit.circuits.interventions import graph_hooks_enabled
from circuitkit.models import load_model
from circuitkit.tasks import TOY_TASKS, get_task

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
torch.set_num_threads(2)
model = load_model("toy-multitask")
for p in model.parameters():
    p.requires_grad_(True)
L, H = model.cfg.n_layers, model.cfg.n_heads


def senders():  # (node name, hook, head index or None)
    yield "input", "hook_embed", None
    for l in range(L):
        for h in range(H):
            yield f"a{l}.h{h}", f"blocks.{l}.attn.hook_result", h
        yield f"m{l}", f"blocks.{l}.hook_mlp_out", None


def receivers(sender: str):  # (edge name, receiver hook, head index or None)
    for l in range(L):
        for x in "qkv":
            for h in range(H):
                yield f"{sender}->a{l}.h{h}<{x}>", f"blocks.{l}.hook_{x}_input", h
        yield f"{sender}->m{l}", f"blocks.{l}.hook_mlp_in", None
    yield f"{sender}->logits", f"blocks.{L - 1}.hook_resid_post", None


RECEIVER_HOOKS = sorted({hook for _, hook, _ in receivers("input")})
SENDER_HOOKS = sorted({hook for _, hook, _ in senders()})


def per_sender_scores(ds, spec) -> torch.Tensor:  # -> [n_src, n_dst]
    """Per-sender IG score of every edge; needs per-head q/k/v inputs, hook_mlp_in and hook_result on."""
    with torch.no_grad():
        _, clean = model.run_with_cache(ds.clean, names_filter=lambda n: n in SENDER_HOOKS)
        _, corrupt = model.run_with_cache(ds.corrupt, names_filter=lambda n: n in SENDER_HOOKS)
    scores = torch.zeros(spec.n_src, spec.n_dst)  # [n_src, n_dst]
    for name, hook, head in senders():
        a_clean = clean[hook] if head is None else clean[hook][:, :, head]  # [batch, pos, d_model]
        delta = (corrupt[hook] if head is None else corrupt[hook][:, :, head]) - a_clean
        grads: dict[str, torch.Tensor] = {}
        for k in range(STEPS):
            alpha = (k + 0.5) / STEPS

            def move(x, hook, head=head, alpha=alpha, a_clean=a_clean, delta=delta):
                if head is None:
                    return a_clean + alpha * delta
                x = x.clone()
                x[:, :, head] = a_clean + alpha * delta
                return x

            saved = {}

            def keep(x, hook):
                x.retain_grad()
                saved[hook.name] = x
                return x

            model.zero_grad(set_to_none=True)
            logits = model.run_with_hooks(ds.clean, fwd_hooks=[(hook, move)] + [(r, keep) for r in RECEIVER_HOOKS])
            ds.metric_values(logits).sum().backward()
            for r, x in saved.items():  # no gradient: r only feeds the replaced output (no real edge reads it)
                grads[r] = grads.get(r, 0) + (torch.zeros_like(x) if x.grad is None else x.grad) / STEPS
        for edge, r, h in receivers(name):
            try:
                s, d = spec.parse_edge(edge)
            except CircuitkitError:  # not a real edge (receiver not downstream of the sender)
                continue
            g = grads[r] if h is None else grads[r][:, :, h]
            scores[s, d] = (delta * g).sum() / len(ds)
    return scores


for task in TOY_TASKS:
    ds = get_task(task).dataset(64, seed=0)
    ref = attribute(model, ds, "patching", batch_size=64)
    with graph_hooks_enabled(model):  # per-head q/k/v inputs and hook_mlp_in; restored on exit
        model.set_use_attn_result(True)  # per-head outputs at attn.hook_result
        scores = per_sender_scores(ds, ref.spec)
        model.set_use_attn_result(False)
    a = compare_scores(ref, dataclasses.replace(ref, scores=scores * ref.spec.real), k=50)
    print(f"toy-multitask / {task}: per-sender IG ({STEPS} steps) top-50 overlap {a.top_k_overlap:.2f}, "
          f"Pearson {a.pearson:.3f}", flush=True)
