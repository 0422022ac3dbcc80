"""The hot paths of attribution and the bench's model shapes (issue 15).

- eap / eap-ig keep their running scores on the model's device: no host transfer (``.cpu()``,
  ``.item()``, ``.tolist()``) per receiver, which on a GPU is one synchronisation each.
- ``circuitkit bench`` resolves the GPT-2-small shape and HookedTransformerConfig fields.
"""

from __future__ import annotations

import sys
from collections import Counter

import pytest
import torch

import circuitkit.circuits.attribution as attribution
from circuitkit import CircuitkitError
from circuitkit.bench.config import MODEL_SHAPES, _load, shape_fields
from circuitkit.circuits import attribute, attribute_nodes
from circuitkit.models import build_model, toy_config
from circuitkit.tasks import get_task


def _host_transfers_from_attribution(monkeypatch) -> Counter:
    """Count Tensor.cpu / .item / .tolist calls made from circuitkit/circuits/attribution.py."""
    calls: Counter = Counter()
    for name in ("cpu", "item", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, _original=original, **k):
            if sys._getframe(1).f_code.co_filename == attribution.__file__:
                calls[_name] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


@pytest.mark.parametrize("method,options", [("eap", {}), ("eap-ig", {"steps": 2})])
@pytest.mark.parametrize("level", ["edge", "node"])
def test_no_host_transfer_per_receiver(monkeypatch, method, options, level):
    """A model with twice the layers (twice the receivers) makes the same number of host transfers
    per batch: the scores are accumulated where the model is, and moved once at the end."""
    ds = get_task("addition").dataset(6, seed=1)
    counts = []
    for n_layers in (1, 3):
        m = build_model(toy_config("toy-2l", seed=0, n_layers=n_layers))
        calls = _host_transfers_from_attribution(monkeypatch)
        fn = attribute if level == "edge" else attribute_nodes
        fn(m, ds, method, batch_size=3, **options)  # two batches
        monkeypatch.undo()
        counts.append(sum(calls.values()))
    assert counts[0] == counts[1], f"host transfers grow with the receivers: {counts}"
    assert counts[1] <= 8, f"more host transfers than one per pass and call: {counts[1]}"


def test_eap_scores_unchanged_by_batching_the_copies(monkeypatch):
    """eap-ig with every step in one pass (the in-place LayerNorm corrections loop over copies)
    equals eap-ig one step per pass (a single copy each), for LN, RMS and LNPre."""
    ds = get_task("addition").dataset(5, seed=3)
    for norm in ("LN", "RMS", "LNPre"):
        m = build_model(toy_config("toy-2l", seed=1, normalization_type=norm))
        together = attribute(m, ds, "eap-ig", steps=3).scores
        with monkeypatch.context() as mp:
            mp.setattr(attribution, "IG_COPY_BUDGET", 1)  # one copy per pass
            apart = attribute(m, ds, "eap-ig", steps=3).scores
        assert torch.allclose(together, apart, rtol=1e-4, atol=1e-6 * float(apart.abs().max())), norm


def test_gpt2_small_shape_and_config_fields():
    fields = shape_fields("gpt2-small-shape")
    assert (fields["n_layers"], fields["n_heads"], fields["d_model"], fields["d_mlp"]) == (12, 12, 768, 3072)
    assert fields["d_head"] * fields["n_heads"] == fields["d_model"]
    small = shape_fields('{"n_layers": 1, "d_model": 32, "n_heads": 2, "d_head": 16, "d_mlp": 64, "n_ctx": 40}')
    model, desc = _load("random:" + '{"n_layers": 1, "d_model": 32, "n_heads": 2, "d_head": 16, "d_mlp": 64, '
                        '"n_ctx": 40}')
    assert (model.cfg.n_layers, model.cfg.d_model, model.cfg.n_ctx) == (1, 32, 40) and small["n_ctx"] == 40
    assert "random weights" in desc
    assert set(MODEL_SHAPES) >= {"gpt2-small-shape"}


@pytest.mark.parametrize("spec,words", [("nope-shape", "unknown model shape"),
                                         ('{"n_layers": 1, "d_model": 30, "n_heads": 4}', "invalid model"),
                                         ('{"n_layers": 1,', "JSON")])
def test_bad_shapes_are_clear_errors(spec, words):
    with pytest.raises(CircuitkitError, match=words):
        shape_fields(spec)
