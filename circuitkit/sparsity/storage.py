"""A sparse model on disk: the base checkpoint (finetuned weights) plus ``sparsity.json``.

``sparsity.json`` records the :class:`~circuitkit.sparsity.gates.GateConfig`, the gate
mode to restore (``eval``) and which families are on. :func:`load_model` is the loader
every command uses: :func:`circuitkit.models.load_model` for the weights, then
:func:`attach_from_file` when the checkpoint folder holds ``sparsity.json``, so a loaded
sparse model comes back with its gates attached in evaluation mode. It lives here, above
the model layer, so that ``circuitkit.models`` never imports ``circuitkit.sparsity``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer

from circuitkit import CircuitkitError
from circuitkit import models
from circuitkit.io import read_json, tensor_digest, write_json
from circuitkit.sparsity.gates import GateConfig, GateMode, Gates, attach, get_gates

SPARSITY_FORMAT = 1
_KEYS = {"format", "gates", "mode", "families"}


def sparsity_dict(config: GateConfig, mode: GateMode = GateMode.EVAL) -> dict[str, Any]:
    return {"format": SPARSITY_FORMAT, "gates": config.to_dict(), "mode": GateMode.parse(mode).value,
            "families": config.families}


def model_fingerprint(model: HookedTransformer) -> str:
    """16 hex digits of sha256 over the weights (every state-dict tensor, by name) and, when gates are attached,
    their settings and mode: two models with the same fingerprint compute the same function. ``circuitkit run
    --resume`` reuses a saved circuit only for the model it was found on."""
    gates = get_gates(model)
    setting = "" if gates is None else json.dumps(sparsity_dict(gates.config, gates.mode), sort_keys=True)
    return tensor_digest(sorted(model.state_dict().items()), setting)


def read_sparsity_file(path: str | os.PathLike) -> tuple[GateConfig, GateMode]:
    path = Path(path)
    if not path.exists():
        raise CircuitkitError(f"no sparsity file at {path}")
    d = read_json(path)  # a damaged file is a CircuitkitError naming it
    if not isinstance(d, dict) or "gates" not in d:
        raise CircuitkitError(f"{path} has no 'gates' entry; it was not written by circuitkit.sparsity")
    unknown = set(d) - _KEYS
    if unknown:
        raise CircuitkitError(f"{path}: unknown keys {sorted(unknown)}; known keys: {sorted(_KEYS)}")
    if d.get("format", SPARSITY_FORMAT) > SPARSITY_FORMAT:
        raise CircuitkitError(f"{path} has format {d['format']}, newer than this circuitkit understands "
                              f"({SPARSITY_FORMAT}); upgrade circuitkit")
    config = GateConfig.from_dict(d["gates"], source=str(path))
    if "families" in d and sorted(d["families"]) != sorted(config.families):
        raise CircuitkitError(f"{path}: 'families' {d['families']} disagrees with the gate settings "
                              f"{config.families}")
    return config, GateMode.parse(d.get("mode", "eval"))


def attach_from_file(model: HookedTransformer, path: str | os.PathLike) -> Gates:
    """Attach the gates described by ``sparsity.json`` at ``path`` (evaluation mode by default)."""
    config, mode = read_sparsity_file(path)
    return attach(model, config, mode)


def load_model(name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
               gates: bool = True) -> HookedTransformer:
    """Any model :func:`circuitkit.models.load_model` loads, with a sparse checkpoint's gates
    attached in evaluation mode (``gates=False``: its finetuned weights alone)."""
    model = models.load_model(name_or_path, device, gates=False)
    path = models.resolve_path(name_or_path)
    if gates and path is not None and (path / models.SPARSITY_FILE).exists():
        attach_from_file(model, path / models.SPARSITY_FILE)
        model.eval()
    return model


def save_sparse_model(model: HookedTransformer, directory: str | os.PathLike,
                      card: dict[str, Any] | None = None, mode: GateMode | str = GateMode.EVAL) -> Path:
    """Write the (finetuned) weights and card via :func:`circuitkit.models.save_model`, plus
    ``sparsity.json`` (atomically). ``mode`` is the mode the loader restores (default eval)."""
    gates = get_gates(model)
    if gates is None:
        raise CircuitkitError("save_sparse_model: the model has no gates attached; use circuitkit.models.save_model "
                              "for a dense model, or attach gates first")
    full_card = {"sparse": True, "sparsity": sparsity_dict(gates.config, mode), **(card or {})}
    directory = models.save_model(model, directory, full_card)
    write_json(Path(directory) / models.SPARSITY_FILE, sparsity_dict(gates.config, mode))
    return Path(directory)
