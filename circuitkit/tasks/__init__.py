"""Tasks by name: ``get_task("addition", carry="double").dataset(100, seed=0)``.

Toy tasks (one shared word-level vocabulary, :mod:`circuitkit.tasks.vocab`): ``addition``,
``induction``, ``ioi``, ``greater-than``, ``docstring``. Natural-language variants for
pretrained models take the model's tokenizer: ``ioi-nl``, ``greater-than-nl``, ``docstring-nl``.
"""

from circuitkit.tasks.base import Metric, Task, TaskDataset, get_task, register_task, task_names
from circuitkit.tasks import addition  # noqa: F401  (registers)

__all__ = ["Metric", "Task", "TaskDataset", "get_task", "register_task", "task_names"]
