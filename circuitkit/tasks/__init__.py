"""Tasks by name: ``get_task("addition", carry="double").dataset(100, seed=0)``.

Toy tasks (one shared word-level vocabulary, :mod:`circuitkit.tasks.vocab`): ``addition``,
``induction``, ``ioi``, ``greater-than``, ``docstring``, and ``max``, ``progression``, ``recall``
(added for the "more tasks" lever of the 6-layer zoo). Natural-language variants for
pretrained models take the model's tokenizer (:mod:`circuitkit.tasks.nl`): ``ioi-nl``,
``greater-than-nl``, ``docstring-nl``, ``induction-nl``. Code tasks for language models
trained on code (:mod:`circuitkit.tasks.code`) take the tokenizer too: ``code-induction``,
``code-args``, ``code-kwargs``, ``code-return``. :func:`task_for_model` picks the right one
for a model.

To add a toy task: one file here, registered with ``@register_task("name")`` and imported below. A task whose
answer is the one token after the prompt subclasses :class:`SingleAnswerTask` and only draws its examples
(``recall.py`` is a short example); any other subclasses :class:`Task`.
"""

from __future__ import annotations

from typing import Any

from circuitkit import CircuitkitError
from circuitkit.tasks.base import (Draw, Metric, SingleAnswerTask, Task, TaskDataset, check_n, get_task, register_task,
                                   task_names)
from circuitkit.tasks import (addition, code, docstring, greater_than, induction, ioi, max_digit, nl,  # noqa: F401
                              progression, recall)  # (importing registers them)
from circuitkit.tasks.code import is_code_task
from circuitkit.tasks.vocab import is_toy

NL_SUFFIX = "-nl"
# The five shipped toy tasks, in the order the study reports them.
TOY_TASKS = ("addition", "induction", "ioi", "greater-than", "docstring")
# Three more toy tasks, added so that heads have more distinct work (the "more tasks" lever,
# toy-multitask-6l-more); the study reports them after the five.
EXTRA_TOY_TASKS = ("max", "progression", "recall")


def toy_task_names() -> list[str]:
    return [n for n in task_names() if not n.endswith(NL_SUFFIX) and not is_code_task(n)]


def code_task_names() -> list[str]:
    return [n for n in task_names() if is_code_task(n)]


def task_for_model(name: str, model: Any, **options) -> Task:
    """The variant of task ``name`` that fits ``model``.

    Toy-vocabulary models get the toy task (``ioi``); any other model gets the
    natural-language variant (``ioi-nl``) built with ``tokenizer=model.tokenizer`` and
    ``d_vocab=model.cfg.d_vocab``. ``name`` may be given with or without the ``-nl`` suffix.
    Code tasks (``code-args``, ...) exist in one variant only, built with the model's tokenizer.
    """
    if is_code_task(name):
        return _code_task_for_model(name, model, **options)
    base = name[: -len(NL_SUFFIX)] if name.endswith(NL_SUFFIX) else name
    known = task_names()
    if base not in known and base + NL_SUFFIX not in known:
        raise CircuitkitError(f"unknown task {name!r}; known tasks: {', '.join(toy_task_names())} "
                              f"(natural-language variants: {', '.join(n for n in known if n.endswith(NL_SUFFIX))}; "
                              f"code tasks: {', '.join(code_task_names())})")
    if is_toy(model):
        if base not in known:
            raise CircuitkitError(f"task {name!r} has no toy-vocabulary variant; toy models support "
                                  f"{', '.join(toy_task_names())}")
        return get_task(base, **options)
    nl_name = base + NL_SUFFIX
    if nl_name not in known:
        nl_tasks = [n[: -len(NL_SUFFIX)] for n in known if n.endswith(NL_SUFFIX)]
        raise CircuitkitError(f"task {base!r} exists only for toy-vocabulary models, and "
                              f"{getattr(model.cfg, 'model_name', 'this model')} is a pretrained model with its own "
                              f"tokenizer; tasks with a natural-language variant: {', '.join(nl_tasks)}")
    if getattr(model, "tokenizer", None) is None:
        raise CircuitkitError(f"task {nl_name!r} needs the model's tokenizer, but this model has none and is not on "
                              "circuitkit's toy vocabulary; set one with model.set_tokenizer(...)")
    options.setdefault("d_vocab", model.cfg.d_vocab)
    return get_task(nl_name, tokenizer=model.tokenizer, **options)


def _code_task_for_model(name: str, model: Any, **options) -> Task:
    if name not in task_names():
        raise CircuitkitError(f"unknown code task {name!r}; code tasks: {', '.join(code_task_names())}")
    if is_toy(model) or getattr(model, "tokenizer", None) is None:
        raise CircuitkitError(f"task {name!r} is a code task: it needs a model with a tokenizer, such as a language "
                              f"model trained on code (code-lm); {getattr(model.cfg, 'model_name', 'this model')} "
                              f"has {'the toy vocabulary' if is_toy(model) else 'no tokenizer'}")
    options.setdefault("d_vocab", model.cfg.d_vocab)
    return get_task(name, tokenizer=model.tokenizer, **options)


__all__ = ["Draw", "EXTRA_TOY_TASKS", "Metric", "SingleAnswerTask", "Task", "TaskDataset", "check_n", "code_task_names", "get_task", "is_toy", "register_task", "task_for_model",
           "task_names", "toy_task_names"]
