"""Training from scratch: config errors, mixture sampling, checkpoint round trip, exact resume."""

import json

import pytest
import torch

from circuitkit import CircuitkitError
from circuitkit.models import load_model
from circuitkit.tasks import get_task
from circuitkit.tasks.vocab import VOCAB
from circuitkit.training import TrainConfig, masked_ce, sample_mixture, train


def tiny_cfg(tmp_path, **kw):
    base = dict(name="tiny", out=str(tmp_path / "model"), run_dir=str(tmp_path / "run"),
                tasks={"addition": 1.0}, arch="toy-2l", seed=7, steps=12, batch_size=16,
                checkpoint_every=4, eval_every=6, eval_n=50, warmup=3)
    base.update(kw)
    return TrainConfig.from_dict(base)


def losses(run_dir):
    return [json.loads(l)["loss"] for l in (run_dir / "log.jsonl").read_text().splitlines()]


def test_resume_continues_exactly(tmp_path):
    full = tiny_cfg(tmp_path / "a")
    train(full, progress=False)
    ref = losses(tmp_path / "a" / "run")
    assert len(ref) == 12

    part = tiny_cfg(tmp_path / "b")
    state = train(part, max_steps=6, progress=False)  # "interrupted" after 6 steps
    assert state["finished"] is False and not (tmp_path / "b" / "model").exists()
    train(part, resume=True, progress=False)
    assert losses(tmp_path / "b" / "run") == ref  # bit-identical losses, no duplicated log lines

    x = get_task("addition").dataset(8, seed=3).clean
    a, b = load_model(tmp_path / "a" / "model"), load_model(tmp_path / "b" / "model")
    assert torch.equal(a(x), b(x))


def test_same_seed_same_model_different_seed_differs(tmp_path):
    train(tiny_cfg(tmp_path / "a", steps=3), progress=False)
    train(tiny_cfg(tmp_path / "b", steps=3), progress=False)
    train(tiny_cfg(tmp_path / "c", steps=3, seed=8), progress=False)
    x = get_task("addition").dataset(4, seed=0).clean
    la, lb, lc = (load_model(tmp_path / k / "model")(x) for k in "abc")
    assert torch.equal(la, lb) and not torch.allclose(la, lc)


def test_same_seed_same_weights_with_two_threads(tmp_path):
    """Two runs of one config at 2 threads give bit-identical weights, and the loop leaves torch's
    deterministic-algorithms setting as it found it. Without deterministic algorithms the embedding's
    backward (an accumulating index_put_ over repeated tokens) summed in a run-dependent order here."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for k in "ab":
            train(tiny_cfg(tmp_path / k, steps=4, batch_size=256, warmup=1, checkpoint_every=100), progress=False)
    finally:
        torch.set_num_threads(before)
    a, b = (load_model(tmp_path / k / "model").state_dict() for k in "ab")
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not torch.are_deterministic_algorithms_enabled()


def test_card_records_run(tmp_path):
    card = train(tiny_cfg(tmp_path, steps=4), progress=False, command="circuitkit train --config x.toml")
    saved = json.loads((tmp_path / "model" / "card.json").read_text())
    assert saved["steps"] == 4 and saved["seed"] == 7 and saved["command"] == "circuitkit train --config x.toml"
    assert 0.0 <= saved["heldout"]["addition"]["accuracy"] <= 1.0
    assert saved["wall_time_s"] == card["wall_time_s"] and saved["config"]["n_layers"] == 2


def test_masked_ce_matches_manual():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    tokens = torch.randint(0, 11, (2, 5), generator=g)
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 1, 0]], dtype=torch.bool)
    manual = []
    for b, t in [(0, 1), (0, 2), (1, 3)]:
        manual.append(-logits[b, t].log_softmax(-1)[tokens[b, t + 1]])
    assert torch.allclose(masked_ce(logits, tokens, mask), torch.stack(manual).mean())


def test_mixture_pads_and_masks():
    tasks = {"addition": get_task("addition")}
    tokens, mask, row_task = sample_mixture(tasks, {"addition": 1.0}, 10, torch.Generator().manual_seed(0))
    assert tokens.shape == mask.shape == (10, 12)
    assert mask.sum(1).tolist() == [5] * 10 and row_task.tolist() == [0] * 10


def test_mixture_rows_carry_their_task():
    """Row ids say which task drew each row: the addition rows are exactly those with 5 scored
    answer tokens, the ioi rows are the rest (one scored token), and padding is never scored."""
    tasks = {"addition": get_task("addition"), "ioi": get_task("ioi")}
    tokens, mask, row_task = sample_mixture(tasks, {"addition": 1.0, "ioi": 3.0}, 64,
                                            torch.Generator().manual_seed(1))
    assert set(row_task.tolist()) == {0, 1}
    assert (mask.sum(1)[row_task == 0] == 5).all() and (mask.sum(1)[row_task == 1] < 5).all()
    assert not (mask & (tokens == VOCAB.pad_id)).any()


@pytest.mark.parametrize("bad, message", [
    ({"tasks": {}}, "at least one task"),
    ({"stepz": 3}, "unknown keys"),
    ({"tasks": {"nope": 1.0}}, "unknown task"),
    ({"steps": 0}, "steps must be positive"),
])
def test_config_errors(tmp_path, bad, message):
    with pytest.raises(CircuitkitError, match=message):
        cfg = tiny_cfg(tmp_path, **bad)
        train(cfg, progress=False)


def test_resume_without_checkpoint_is_clear(tmp_path):
    with pytest.raises(CircuitkitError, match="no checkpoint"):
        train(tiny_cfg(tmp_path), resume=True, progress=False)


def test_missing_config_file(tmp_path):
    with pytest.raises(CircuitkitError, match="does not exist"):
        TrainConfig.from_toml(tmp_path / "none.toml")
