"""The peer: auto-circuit 1.0.1 run on a copy of the same ``HookedTransformer``.

Owns the compatibility shim that lets auto-circuit 1.0.1 import beside TransformerLens 3.x
(:func:`alias_kv_cache`, a patch of TransformerLens's module table), the edge-name mapping
between the two libraries, and :class:`PeerRunner`.
"""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
import sys
import types
from functools import partial

import torch
import transformer_lens
from tqdm.auto import tqdm

from circuitkit import CircuitkitError
from circuitkit.bench.config import PEER, PEER_VERSION


class PeerUnavailable(RuntimeError):
    """auto-circuit cannot run here; the message says exactly why."""


def alias_kv_cache() -> None:
    """Make auto-circuit 1.0.1 importable beside TransformerLens 3.9.

    auto-circuit imports ``transformer_lens.past_key_value_caching.HookedTransformerKeyValueCache``
    and ``transformer_lens.HookedTransformerKeyValueCache``; TransformerLens 3.9 has the class
    as ``transformer_lens.cache.key_value_cache.TransformerLensKeyValueCache``. Existing names are
    left alone.
    """
    try:
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    except ImportError as e:
        raise PeerUnavailable(f"transformer_lens {_version('transformer-lens')} has no "
                              f"transformer_lens.cache.key_value_cache.TransformerLensKeyValueCache ({e})") from None
    name = "transformer_lens.past_key_value_caching"
    try:
        importlib.import_module(name)
    except ImportError:
        mod = types.ModuleType(name)
        mod.__doc__ = "alias made by circuitkit.bench.peer for auto-circuit"
        mod.HookedTransformerKeyValueCache = TransformerLensKeyValueCache
        sys.modules[name] = mod
        transformer_lens.past_key_value_caching = mod
    mod = sys.modules[name]
    if not hasattr(mod, "HookedTransformerKeyValueCache"):
        mod.HookedTransformerKeyValueCache = TransformerLensKeyValueCache
    if not hasattr(transformer_lens, "HookedTransformerKeyValueCache"):
        transformer_lens.HookedTransformerKeyValueCache = TransformerLensKeyValueCache


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def import_peer() -> types.SimpleNamespace:
    """The auto-circuit functions the bench uses; raises :class:`PeerUnavailable` with the reason."""
    version = _version(PEER)
    if version is None:
        raise PeerUnavailable(f"{PEER} is not installed (pip install 'circuitkit[bench]', i.e. "
                              f"{PEER}=={PEER_VERSION} attrs)")
    if version != PEER_VERSION:
        raise PeerUnavailable(f"{PEER} {version} is installed; the bench is written for {PEER_VERSION}")
    alias_kv_cache()
    try:
        from auto_circuit.data import PromptDataLoader, PromptDataset
        from auto_circuit.prune_algos import mask_gradient
        from auto_circuit.utils.graph_utils import patchable_model
    except Exception as e:  # any import-time failure is a reason the peer cannot run
        raise PeerUnavailable(f"importing {PEER} {version} failed: {type(e).__name__}: {e}") from None
    mask_gradient.tqdm = partial(tqdm, disable=True)  # keep the bench output clean
    return types.SimpleNamespace(PromptDataLoader=PromptDataLoader, PromptDataset=PromptDataset,
                                 patchable_model=patchable_model,
                                 mask_gradient_prune_scores=mask_gradient.mask_gradient_prune_scores)


def peer_node_name(name: str, dest: bool = False) -> str:
    """auto-circuit node name -> circuitkit's: ``Resid Start``→``input``, ``A1.2``→``a1.h2``,
    ``MLP 3``→``m3``, ``Resid End``→``logits``, ``A2.0.Q``→``a2.h0<q>`` (receivers)."""
    if name == "Resid Start" and not dest:
        return "input"
    if name == "Resid End" and dest:
        return "logits"
    if name.startswith("MLP "):
        return f"m{int(name[4:])}"
    if name.startswith("A"):
        parts = name[1:].split(".")
        if len(parts) == 2 and not dest:
            return f"a{int(parts[0])}.h{int(parts[1])}"
        if len(parts) == 3 and dest and parts[2] in ("Q", "K", "V"):
            return f"a{int(parts[0])}.h{int(parts[1])}<{parts[2].lower()}>"
    raise CircuitkitError(f"cannot map auto-circuit {'receiver' if dest else 'sender'} {name!r} to a circuitkit "
                          "node (expected factorized=True, separate_qkv=True names)")


def peer_edge_name(src: str, dest: str) -> str:
    """auto-circuit edge (sender name, receiver name) -> circuitkit edge name."""
    return f"{peer_node_name(src)}->{peer_node_name(dest, dest=True)}"


def check_peer_task(ds) -> None:
    """auto-circuit's ``avg_diff`` scores the last position, mean over the answer and the wrong answers."""
    last = ds.seq_len - 1
    if ds.answer_pos.shape[1] != 1 or bool((ds.answer_pos != last).any()):
        raise PeerUnavailable(f"task {ds.task!r} scores positions other than the last one; auto-circuit's "
                              "slice_output='last_seq' scores only the last position")
    if ds.distractors.shape[-1] != 1:
        raise PeerUnavailable(f"task {ds.task!r} has {ds.distractors.shape[-1]} distractors per answer: circuitkit "
                              "takes the max over them, auto-circuit's avg_diff the mean")
    if ds.metric.value != "logit_diff":
        raise PeerUnavailable(f"task {ds.task!r} uses metric {ds.metric.value}; the comparison needs logit_diff")


class PeerRunner:
    """auto-circuit's EAP (``mask_gradient_prune_scores`` at mask 0) on a copy of ``model``.

    The copy gets the flags auto-circuit asserts (attention results, split q/k/v inputs,
    ``hook_mlp_in``) and frozen parameters, as in auto-circuit's own model loading, and is wrapped
    by ``patchable_model(factorized=True, separate_qkv=True, slice_output="last_seq")``.
    """

    def __init__(self, model, ds):
        check_peer_task(ds)
        self.ac = import_peer()
        m = copy.deepcopy(model)
        m.set_use_attn_result(True)
        m.set_use_split_qkv_input(True)
        m.set_use_hook_mlp_in(True)
        for p in m.parameters():
            p.requires_grad_(False)
        m.eval()
        self.model = self.ac.patchable_model(m, factorized=True, slice_output="last_seq", separate_qkv=True,
                                             device=torch.device("cpu"))
        pds = self.ac.PromptDataset(ds.clean, ds.corrupt, ds.correct, ds.distractors[:, :, 0])
        self.loader = self.ac.PromptDataLoader(pds, seq_len=None, diverge_idx=0, batch_size=len(ds), shuffle=False)

    @property
    def n_edges(self) -> int:
        return len(self.model.edges)

    def scores(self):
        return self.ac.mask_gradient_prune_scores(self.model, self.loader, None, grad_function="logit",
                                                  answer_function="avg_diff", mask_val=0.0)

    def edge_scores(self, prune_scores) -> dict[str, float]:
        """circuitkit edge name -> the peer's score in circuitkit's convention.

        The peer's loss is ``-mean(logit diff)`` and its mask gradient is
        ``(a_corrupt - a_clean)·∂loss/∂input``, so circuitkit's score is minus the peer's.
        """
        return {peer_edge_name(e.src.name, e.dest.name): -float(e.prune_score(prune_scores)) for e in self.model.edges}
