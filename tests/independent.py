"""Computations the tests check circuitkit against, written with TransformerLens alone (a plain
helper module beside conftest.py, imported by the test files that need it)."""

from __future__ import annotations

import torch


def sender_cache(model, tokens):
    """Sender outputs [batch, pos, n_src, d_model] via run_with_cache (independent of circuitkit)."""
    model.set_use_attn_result(True)
    try:
        _, cache = model.run_with_cache(tokens)
    finally:
        model.set_use_attn_result(False)
    parts = [cache["blocks.0.hook_resid_pre"][:, :, None]]
    for layer in range(model.cfg.n_layers):
        parts.append(cache[f"blocks.{layer}.attn.hook_result"])
        if not model.cfg.attn_only:
            parts.append(cache[f"blocks.{layer}.hook_mlp_out"][:, :, None])
    return torch.cat(parts, 2)
