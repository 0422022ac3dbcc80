"""Discovery on a shipped sparse model: circuits respect the gates."""

import pytest
import torch

from circuitkit.circuits.attribution import attribute
from circuitkit.circuits.graph import GraphSpec
from circuitkit.circuits.selection import top_n
from circuitkit.models import ZOO_DIR
from circuitkit.sparsity import load_model
from circuitkit.sparsity import get_gates
from circuitkit.tasks import get_task

pytestmark = pytest.mark.skipif(not (ZOO_DIR / "toy-addition-sparse" / "card.json").exists(),
                                reason="zoo model toy-addition-sparse not trained yet")


def closed_heads(model, tokens) -> torch.Tensor:  # [n_layers, n_heads] bool
    """Heads whose gated pattern is zero at every query and key of every prompt."""
    seen = {}

    def grab(pattern, hook):  # [batch, head, q, k], after the permanent gate hook
        seen[hook.layer()] = pattern.detach().abs().sum((0, 2, 3)) == 0

    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), grab)])
    return torch.stack([seen[l] for l in range(model.cfg.n_layers)])


# eap's gradients are taken on the clean prompts, where a closed head's gates are 0: exactly zero.
# eap-ig-senders runs on prompts with one sender moved part of the way to its corrupted output;
# the gates follow the attention scores, so a few open on those paths (on toy-addition-sparse
# edges into closed heads reach 3e-5 of the largest score): small, never in the circuit.
@pytest.mark.parametrize("method,rel_tol", [("eap", 0.0), ("eap-ig-senders", 1e-3)])
def test_edges_into_closed_heads_score_zero(method, rel_tol):
    model = load_model("toy-addition-sparse")
    assert get_gates(model) is not None and get_gates(model).mode.name == "EVAL"
    ds = get_task("addition").dataset(64, seed=0)
    closed = closed_heads(model, ds.clean) & closed_heads(model, ds.corrupt)
    assert closed.any(), "expected some heads with every gate closed on the task prompts"
    scored = attribute(model, ds, method)
    scores = scored.scores  # [n_src, n_dst]
    spec = GraphSpec.from_model(model)
    bound = rel_tol * float(scores.abs().max())
    for l, h in closed.nonzero().tolist():
        for qkv in "qkv":
            col = scores[:, spec.head_dst(l, h, qkv)]
            assert torch.all(col.abs() <= bound), f"edges into closed head a{l}.h{h}<{qkv}> scored {col.abs().max()}"
    circuit = top_n(scored, 60)
    assert not (circuit.head_mask & closed).any()  # no closed head in the circuit
    assert get_gates(model) is not None  # discovery left the gates attached
